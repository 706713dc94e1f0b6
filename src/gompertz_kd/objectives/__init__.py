"""Distillation objectives: cross-entropy plus named terms, each with a scale and a schedule.

    from gompertz_kd.objectives import DKD, Objective
    objective = Objective({"dkd": {"term": DKD(), "scale": 1.0, "schedule": "linear(t0=0.083)"}})

One file per method; each term declares what it needs from a step (:class:`Need`) and returns one
scalar. ``conf/method/<name>.yaml`` holds each method's published defaults.
"""

from gompertz_kd.objectives.at import AT
from gompertz_kd.objectives.base import LogitTerm, Need, Networks, Step, Term
from gompertz_kd.objectives.crd import CRD
from gompertz_kd.objectives.ctkd import CTKD
from gompertz_kd.objectives.dist import DIST
from gompertz_kd.objectives.dkd import DKD
from gompertz_kd.objectives.fitnet import FitNet
from gompertz_kd.objectives.gradient_matching import GradientMatching
from gompertz_kd.objectives.kd import KD
from gompertz_kd.objectives.kdsvd import KDSVD
from gompertz_kd.objectives.nst import NST
from gompertz_kd.objectives.objective import MIXINGS, SHARED, Objective, gompertz_cnn
from gompertz_kd.objectives.ofd import OFD
from gompertz_kd.objectives.pkt import PKT
from gompertz_kd.objectives.reviewkd import ReviewKD
from gompertz_kd.objectives.rkd import RKD
from gompertz_kd.objectives.sp import SP
from gompertz_kd.objectives.spec import objective_from_spec
from gompertz_kd.objectives.vid import VID
from gompertz_kd.objectives.wasserstein import Wasserstein
from gompertz_kd.objectives.wkd import WKDL, WKDTarget

__all__ = [
    "AT",
    "CRD",
    "CTKD",
    "DIST",
    "DKD",
    "KD",
    "KDSVD",
    "MIXINGS",
    "NST",
    "OFD",
    "PKT",
    "RKD",
    "SHARED",
    "SP",
    "VID",
    "WKDL",
    "FitNet",
    "GradientMatching",
    "LogitTerm",
    "Need",
    "Networks",
    "Objective",
    "ReviewKD",
    "Step",
    "Term",
    "WKDTarget",
    "Wasserstein",
    "gompertz_cnn",
    "objective_from_spec",
]
