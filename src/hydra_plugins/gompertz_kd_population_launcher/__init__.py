"""gompertz_kd's Hydra launcher: sweep jobs as population runs (population_launcher.py)."""
