"""The distillation loss terms of Gompertz-CNN and of the standard CIFAR KD benchmark methods, as
pure functions of tensors (and small modules where a method owns trainable parts or state).

The objective the :class:`~gompertz_kd.module.DistillationModule` optimises is

    total = ce_weight * loss_ce + kd_weight(t) * loss_kd + wd_weight(t) * loss_wd
            + gm_weight(t) * loss_gm

where each weight comes from its own schedule (:mod:`gompertz_kd.schedules`). The functions here
know nothing of weights, epochs or schedules: they map tensors to a scalar loss, the batch mean
the published method defines. Each docstring names its paper, the reference implementation it
follows and the published defaults. Everything is importable from ``gompertz_kd.losses``; the
submodules group the methods by family.

Logits (:mod:`.logits`, :mod:`.wasserstein`)

- KD (Hinton et al., 2015): :func:`kd_loss`; logit standardisation (Sun et al., CVPR 2024):
  :func:`standardize_logits`, also ``standardize=True`` of :func:`kd_loss` and DKD.
- DKD (Zhao et al., CVPR 2022): :func:`dkd_parts`, :func:`dkd_loss`.
- DIST (Huang et al., NeurIPS 2022): :func:`pearson_correlation`, :func:`dist_loss`.
- CTKD (Li et al., AAAI 2023): :func:`reverse_gradient`, :class:`LearnableTemperature`.
- WKD-L (Lv et al., NeurIPS 2024): :func:`wkd_cost_matrix`, :func:`wkd_logit_loss`,
  :func:`wkd_target_loss`.

Features and embeddings (:mod:`.features`, :mod:`.contrastive`)

- FitNets (Romero et al., ICLR 2015): :func:`fitnet_loss`, :class:`HintRegressor`.
- AT (Zagoruyko & Komodakis, ICLR 2017): :func:`at_loss` (one pair of maps;
  :func:`match_spatial` pools the larger).
- RKD (Park et al., CVPR 2019): :func:`rkd_loss`.
- CRD (Tian et al., ICLR 2020): :func:`crd_nce_loss`, :class:`ContrastMemory`, :class:`Embed`,
  :func:`draw_negatives`.
- ReviewKD (Chen et al., CVPR 2021): :func:`hcl_loss`, :class:`ReviewFusion`.

Relations inside a batch or a map (:mod:`.relations`), regressed teacher maps (:mod:`.regression`)

- SP (Tung & Mori, ICCV 2019): :func:`sp_loss`.
- PKT (Passalis & Tefas, ECCV 2018): :func:`pkt_loss`.
- NST (Huang & Wang, 2017): :func:`nst_loss`.
- KDSVD (Lee et al., ECCV 2018): :func:`kdsvd_loss`, :func:`truncated_svd`,
  :func:`align_singular_vectors`.
- VID (Ahn et al., CVPR 2019): :func:`vid_loss`, :class:`VIDRegressor`.
- OFD (Heo et al., ICCV 2019): :func:`ofd_loss`, :func:`ofd_margin`, :class:`OFDConnector`.

Gompertz-CNN's own terms (:mod:`.wasserstein`, :mod:`.gradients`)

- :func:`gaussian_wasserstein_loss` / :func:`sliced_wasserstein_loss` (with
  :func:`channel_gaussian_stats`) and the :class:`WassersteinFeatureLoss` module that owns the
  student-side projectors (:class:`FeatureProjector`) — the Wasserstein distance between teacher
  and student features.
- :func:`true_class_input_gradient` and :func:`gradient_matching_loss` — gradient (Jacobian)
  matching, aligning the student's input gradients with the teacher's.
"""

from gompertz_kd.losses.contrastive import ContrastMemory, Embed, crd_nce_loss, draw_negatives
from gompertz_kd.losses.features import (
    HintRegressor,
    ReviewFusion,
    at_loss,
    fitnet_loss,
    hcl_loss,
    match_spatial,
    rkd_loss,
)
from gompertz_kd.losses.gradients import gradient_matching_loss, true_class_input_gradient
from gompertz_kd.losses.logits import (
    LearnableTemperature,
    dist_loss,
    dkd_loss,
    dkd_parts,
    kd_loss,
    pearson_correlation,
    reverse_gradient,
    standardize_logits,
)
from gompertz_kd.losses.regression import (
    OFDConnector,
    VIDRegressor,
    ofd_loss,
    ofd_margin,
    vid_loss,
)
from gompertz_kd.losses.relations import (
    align_singular_vectors,
    kdsvd_loss,
    nst_loss,
    pkt_loss,
    sp_loss,
    truncated_svd,
)
from gompertz_kd.losses.wasserstein import (
    FeatureProjector,
    WassersteinFeatureLoss,
    channel_gaussian_stats,
    check_feature_options,
    gaussian_wasserstein_loss,
    sliced_wasserstein_loss,
    wkd_cost_matrix,
    wkd_logit_loss,
    wkd_target_loss,
)

__all__ = [
    "ContrastMemory",
    "Embed",
    "FeatureProjector",
    "HintRegressor",
    "LearnableTemperature",
    "OFDConnector",
    "ReviewFusion",
    "VIDRegressor",
    "WassersteinFeatureLoss",
    "align_singular_vectors",
    "at_loss",
    "channel_gaussian_stats",
    "check_feature_options",
    "crd_nce_loss",
    "dist_loss",
    "dkd_loss",
    "dkd_parts",
    "draw_negatives",
    "fitnet_loss",
    "gaussian_wasserstein_loss",
    "gradient_matching_loss",
    "hcl_loss",
    "kd_loss",
    "kdsvd_loss",
    "match_spatial",
    "nst_loss",
    "ofd_loss",
    "ofd_margin",
    "pearson_correlation",
    "pkt_loss",
    "reverse_gradient",
    "rkd_loss",
    "sliced_wasserstein_loss",
    "sp_loss",
    "standardize_logits",
    "true_class_input_gradient",
    "truncated_svd",
    "vid_loss",
    "wkd_cost_matrix",
    "wkd_logit_loss",
    "wkd_target_loss",
]
