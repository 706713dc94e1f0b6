"""gompertz_kd."""
