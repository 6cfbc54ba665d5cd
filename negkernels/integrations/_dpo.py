"""The DPO loss types of TRL's ``DPOTrainer`` and Liger's ``LigerFusedLinearDPOLoss`` as
:func:`negkernels.preference_loss` options: one home for both adapters.

Liger's loss types are TRL's names with TRL's formulas, less ``ipo`` and ``sigmoid_norm``. In
both, ``sigmoid`` ignores ``label_smoothing`` (cDPO is preference_loss's ``label_smoothing`` with
``sigmoid`` left alone) while ``robust`` and ``exo_pair`` read it; TRL's ``ipo`` and
``sigmoid_norm`` divide both log-ratios by the completion length.
"""

from __future__ import annotations

from ..ops.preference import PreferenceLossConfig

# Each loss type's fixed options; "smoothed": it reads label_smoothing.
DPO_LOSS_OPTIONS: dict[str, dict] = {
    "sigmoid": dict(loss_type="sigmoid"),
    "sigmoid_norm": dict(loss_type="sigmoid", length_normalize=True),
    "hinge": dict(loss_type="hinge"),
    "ipo": dict(loss_type="ipo", length_normalize=True),
    "exo_pair": dict(loss_type="exo_pair", smoothed=True),
    "nca_pair": dict(loss_type="nca_pair"),
    "robust": dict(loss_type="robust", smoothed=True),
    "bco_pair": dict(loss_type="bco_pair"),
    "sppo_hard": dict(loss_type="sppo_hard"),
    "apo_zero": dict(loss_type="apo_zero"),
    "apo_down": dict(loss_type="apo_down"),
    "discopop": dict(loss_type="discopop"),
}


def dpo_config(
    loss_type: str, *, beta: float, label_smoothing: float, discopop_tau: float, length_normalize: bool = False
) -> PreferenceLossConfig:
    """The :class:`PreferenceLossConfig` of a peer's DPO ``loss_type`` (a key of
    ``DPO_LOSS_OPTIONS``); ``length_normalize`` averages every response's log-probs (Liger's
    ``average_log_prob``)."""
    options = dict(length_normalize=length_normalize) | DPO_LOSS_OPTIONS[loss_type]
    smoothed = options.pop("smoothed", False)
    return PreferenceLossConfig(
        beta=float(beta),
        label_smoothing=float(label_smoothing) if smoothed else 0.0,
        discopop_tau=float(discopop_tau),
        **options,
    )
