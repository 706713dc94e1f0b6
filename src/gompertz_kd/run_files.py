"""What a finished run leaves on disk, named once: written by :mod:`gompertz_kd.train` and
:mod:`gompertz_kd.population`, read by :mod:`gompertz_kd.report`. Plain constants, no imports, so
the report still runs where only these files and this package are (no torch needed)."""

__all__ = ["HISTORY_FILE", "RESULTS_FILE", "STAGE_NAMES", "TERM_ORDER"]

# A run directory's summary, written last and atomically by a run that finished.
RESULTS_FILE = "results.json"
# The CSVLogger history, relative to the run directory (logger ``csv``, no version folder).
HISTORY_FILE = "csv/metrics.csv"
# The Gompertz curve's stages, in order; gompertz_kd.schedules.Stage is built from these, and
# ``results.json``'s ``final_stage`` and the logged ``schedule/stage`` use them.
STAGE_NAMES = ("lag", "growth", "saturation")
# How tables and plots order loss terms: cross-entropy, then Gompertz-CNN's terms, then the rest.
TERM_ORDER = ("ce", "kd", "wd", "gm")
