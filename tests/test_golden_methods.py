"""Golden values of the second round of feature distillers (SP, PKT, NST, VID, OFD, KDSVD): each
term and the weighted total on fixed inputs, recorded when the methods were added
(``python tests/test_golden_methods.py --record``). A later change to how these objectives are
built or computed (a refactor of the terms, the losses or the models' stage maps) must reproduce
them; a deliberate change of formula re-records them and says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gompertz_kd.config import CONFIG_DIR
from test_golden_objectives import objective_values

GOLDEN = Path(__file__).parent / "fixtures" / "golden_methods.json"

# (experiment, method) -> class count; KDSVD needs equal widths, so not on ResNet50 -> MobileNetV2
CASES = {
    **{f"c10cpu method={m}": 10 for m in ("sp", "pkt", "nst", "vid", "ofd", "kdsvd")},
    **{f"c100_resnet50_mbv2 method={m}": 100 for m in ("sp", "pkt", "nst", "vid", "ofd")},
}


def _values(case: str, num_classes: int) -> dict[str, float]:
    experiment, method = case.split()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", method])
    return objective_values(cfg, num_classes)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.slow) if c.startswith("c100_resnet50") else c
        for c in CASES
    ],  # ResNet50's forward takes seconds on a CPU: the paper's pair runs with `slow`
)
def test_method_objective_reproduces_its_recorded_values(case):
    expected = json.loads(GOLDEN.read_text())[case]
    got = _values(case, CASES[case])
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=5e-4, abs=1e-7), name


if __name__ == "__main__" and "--record" in sys.argv:
    GOLDEN.write_text(json.dumps({c: _values(c, k) for c, k in CASES.items()}, indent=2) + "\n")
