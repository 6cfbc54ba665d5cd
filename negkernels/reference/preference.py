"""Reference pairwise preference losses (DPO family, SimPO, ORPO, KTO, NPO).

Readable PyTorch in float64, one formula per line; the oracle for the Triton kernel. Arguments are
already validated by :func:`negkernels.preference_loss`, whose docstring is the specification.

Notation: for a response y, s(y) is the policy's sequence value (the masked sum of its token
log-probs, or their mean with ``length_normalize``), r(y) = s(y) − s_ref(y) its log-ratio against
the reference model, w the chosen and l the rejected response of a pair, h = r_w − r_l, u = β·h.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# The kernel's code for each loss type (negkernels/triton/preference.py names them _LOSS_*).
class PreferenceLossType(IntEnum):
    SIGMOID = 0
    ROBUST = 1
    HINGE = 2
    IPO = 3
    EXO_PAIR = 4
    NCA_PAIR = 5
    BCO_PAIR = 6
    SPPO_HARD = 7
    APO_ZERO = 8
    APO_DOWN = 9
    DISCOPOP = 10
    SIMPO = 11
    ORPO = 12
    KTO = 13
    NPO = 14


PREFERENCE_LOSS_TYPES = tuple(t.name.lower() for t in PreferenceLossType)
# Losses of the policy alone: no reference log-probs (SimPO, ORPO).
REFERENCE_FREE = ("simpo", "orpo")
# Losses whose batch need not pair each chosen response with a rejected one.
UNPAIRED = ("kto", "npo")
# Sequence values are means over tokens by default (the loss is defined on average log-probs).
LENGTH_NORMALIZED_BY_DEFAULT = ("simpo", "orpo")
# The smallest normal float32: ORPO's 1 − e^ℓ is clamped here when ℓ rounds to 0 (p = 1).
FLT_MIN = 1.1754943508222875e-38


def sequence_values(
    logp: Tensor, mask: Optional[Tensor], length_normalize: bool, calibrate: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """(sequence value, token weights, divisor) of [B, T] (or [B]) log-probs, in float64.

    The value is Σ_t weight_t·logp_t / divisor: weight_t is the mask (1 on kept tokens) and the
    divisor 1 (a sum) or the kept-token count clamped at 1 (``length_normalize``, a mean). With
    ``calibrate`` the weight is p_t = exp(logp_t) (detached) on kept tokens and the divisor Σ p_t:
    the confidence-calibrated mean of the npo option."""
    x = logp.double()
    if x.dim() == 1:
        x = x[:, None]
    weight = torch.ones_like(x) if mask is None else (mask != 0).reshape(x.shape).double()
    if calibrate:
        weight = weight * x.detach().exp()
        divisor = weight.sum(1).clamp_min(FLT_MIN)
    elif length_normalize:
        divisor = weight.sum(1).clamp_min(1.0)
    else:
        divisor = torch.ones_like(x[:, 0])
    return (weight * x).sum(1) / divisor, weight, divisor


def _reference_values(ref: Optional[Tensor], weight: Tensor, divisor: Tensor) -> Optional[Tensor]:
    """The reference model's sequence values: a [B] input is its masked sum, divided by the
    policy's divisor; a [B, T] one is reduced with the policy's token weights and divisor."""
    if ref is None:
        return None
    r = ref.detach().double()
    return (r if r.dim() == 1 else (weight * r).sum(1)) / divisor


def _log_odds(avg_logp: Tensor) -> Tensor:
    """log(p / (1 − p)) with log p = ``avg_logp`` ≤ 0, via expm1 so ℓ → 0 keeps its digits."""
    return avg_logp - torch.log(torch.clamp(-torch.expm1(avg_logp), min=FLT_MIN))


def pair_losses(
    loss_type: str,
    s_w: Tensor,
    s_l: Tensor,
    r_w: Tensor,
    r_l: Tensor,
    *,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float,
    discopop_tau: float,
    kto_reference_point: Tensor,
    kto_desirable_weight: float,
    kto_undesirable_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-example losses, chosen rewards, rejected rewards) from sequence values s and log-ratios r.

    The losses are [B] per pair, except kto ([B_w + B_l]: the desirable terms, then the
    undesirable ones) and npo ([B_l])."""
    eps = label_smoothing
    if loss_type in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * s_w.detach(), beta * s_l.detach()
    else:
        chosen_rewards = beta * r_w.detach()
        rejected_rewards = beta * r_l.detach()

    if loss_type == "kto":
        z = kto_reference_point
        desirable = kto_desirable_weight * (1 - torch.sigmoid(beta * (r_w - z)))
        undesirable = kto_undesirable_weight * (1 - torch.sigmoid(beta * (z - r_l)))
        return torch.cat([desirable, undesirable]), chosen_rewards, rejected_rewards
    if loss_type == "npo":
        return (2.0 / beta) * F.softplus(beta * r_l), chosen_rewards, rejected_rewards
    if loss_type == "simpo":
        u = beta * (s_w - s_l) - simpo_gamma
        loss = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
        return loss, chosen_rewards, rejected_rewards
    if loss_type == "orpo":
        # λ = beta weighs the odds-ratio term against the chosen response's average NLL −ℓ_w.
        v = _log_odds(s_w) - _log_odds(s_l)
        return -s_w - beta * F.logsigmoid(v), chosen_rewards, rejected_rewards

    h = r_w - r_l
    u = beta * h
    a, b = beta * r_w, beta * r_l
    if loss_type == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    elif loss_type == "robust":
        loss = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - u)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        q = torch.sigmoid(u)
        loss = q * (F.logsigmoid(u) - torch.log1p(torch.tensor(-eps, dtype=u.dtype))) + (1 - q) * (
            F.logsigmoid(-u) - torch.log(torch.tensor(eps, dtype=u.dtype))
        )
    elif loss_type == "nca_pair":
        loss = -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
    elif loss_type == "bco_pair":
        loss = -F.logsigmoid(a) - F.logsigmoid(-b)
    elif loss_type == "sppo_hard":
        loss = (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        loss = 1 - torch.sigmoid(a) + torch.sigmoid(b)
    elif loss_type == "apo_down":
        loss = torch.sigmoid(a) + 1 - torch.sigmoid(u)
    elif loss_type == "discopop":
        mix = torch.sigmoid(u / discopop_tau)
        loss = -F.logsigmoid(u) * (1 - mix) + torch.exp(F.logsigmoid(u / discopop_tau) - u)
    else:  # pragma: no cover - validated by PreferenceLossConfig
        raise ValueError(f"loss_type: unknown {loss_type!r}")
    return loss, chosen_rewards, rejected_rewards


def kto_batch_reference_point(r_w: Tensor, r_l: Tensor) -> Tensor:
    """KTO's default reference point from the batch itself: max(0, mean of every log-ratio), detached."""
    return torch.cat([r_w.detach(), r_l.detach()]).double().mean().clamp_min(0.0).nan_to_num(0.0)


def preference_loss_reference(
    chosen_logp: Optional[Tensor],
    rejected_logp: Tensor,
    ref_chosen_logp: Optional[Tensor],
    ref_rejected_logp: Optional[Tensor],
    chosen_mask: Optional[Tensor],
    rejected_mask: Optional[Tensor],
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float,
    length_normalize: bool,
    discopop_tau: float,
    kto_reference_point: Optional[float | Tensor],
    kto_desirable_weight: float,
    kto_undesirable_weight: float,
    npo_token_calibration: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(per-example losses, chosen rewards, rejected rewards, chosen values, rejected values),
    float64, differentiable in the policy log-probs through autograd."""
    if chosen_logp is not None:
        s_w, weight_w, divisor_w = sequence_values(chosen_logp, chosen_mask, length_normalize)
        s_ref_w = _reference_values(ref_chosen_logp, weight_w, divisor_w)
    else:  # npo on the rejected responses alone
        s_w, s_ref_w = rejected_logp.new_zeros(0, dtype=torch.float64), None
    s_l, weight_l, divisor_l = sequence_values(rejected_logp, rejected_mask, length_normalize, npo_token_calibration)
    s_ref_l = _reference_values(ref_rejected_logp, weight_l, divisor_l)
    r_w = s_w - s_ref_w if s_ref_w is not None else s_w
    r_l = s_l - s_ref_l if s_ref_l is not None else s_l
    z = s_l.new_zeros(())
    if loss_type == "kto":
        if kto_reference_point is None:
            z = kto_batch_reference_point(r_w, r_l)
        else:
            z = torch.as_tensor(kto_reference_point, dtype=torch.float64, device=s_l.device).detach()
    losses, chosen_rewards, rejected_rewards = pair_losses(
        loss_type,
        s_w,
        s_l,
        r_w,
        r_l,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        discopop_tau=discopop_tau,
        kto_reference_point=z,
        kto_desirable_weight=kto_desirable_weight,
        kto_undesirable_weight=kto_undesirable_weight,
    )
    return losses, chosen_rewards, rejected_rewards, s_w.detach(), s_l.detach()
