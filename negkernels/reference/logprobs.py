"""Token log-probs, entropy and the PPO/GRPO family of policy losses in plain PyTorch.

These functions are the CPU fallback and the oracle of every test: run on float64 inputs they give
the exact numbers every kernel is compared to, and autograd through them gives the exact gradients.
They are written from the formulas in the docstrings of ``negkernels.ops.logprobs``; readability
beats speed here (the token log-probs materialise a full-size fp32 log-softmax).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple, Optional

import torch
from torch import Tensor

LOSS_TYPES = ("ppo", "gspo", "cispo", "sapo", "gpg", "npo", "geo_mean")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k3+")
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IS_MODES = ("truncate", "mask")


# The kernels' codes for each option, one definition for Triton and CUDA (csrc/logprobs.h spells
# the same enums; tests/test_kernel_codes.py holds the two equal).
class LossType(IntEnum):
    PPO = 0
    GSPO = 1
    CISPO = 2
    SAPO = 3
    GPG = 4
    NPO = 5
    GEO_MEAN = 6


class KlEstimator(IntEnum):
    NONE = -1  # no ref_logp: no KL term
    K1 = 0
    K2 = 1
    K3 = 2
    ABS = 3
    K3_PLUS = 4


class Aggregation(IntEnum):
    TOKEN_MEAN = 0
    TOKEN_SUM = 1
    SEQ_MEAN_TOKEN_MEAN = 2
    SEQ_MEAN_TOKEN_SUM = 3
    SEQ_MEAN_TOKEN_SUM_NORM = 4


class IsMode(IntEnum):
    NONE = 0  # no is_weights
    TRUNCATE = 1
    MASK = 2


LOSS_CODE = dict(zip(LOSS_TYPES, LossType))
KL_CODE = dict(zip(KL_ESTIMATORS, list(KlEstimator)[1:]))
AGGREGATION_CODE = dict(zip(AGGREGATIONS, Aggregation))
IS_CODE = dict(zip(IS_MODES, list(IsMode)[1:]))
# Metrics reported next to the loss, in this order (kernels write them in the same order).
METRICS = ("clip_fraction_low", "clip_fraction_high", "dual_clip_fraction", "approx_kl", "mean_ratio", "kl")
# Per-sequence partial sums the kernels write: the loss, the unmasked-token count, the metrics' numerators.
POLICY_LOSS_PARTIALS = 2 + len(METRICS)


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def token_logprobs_reference(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    vocab_start: int = 0,
    vocab_total: Optional[int] = None,
):
    """log softmax(logits / T)[target] (and the entropy of softmax(logits / T)), differentiable.

    ``logits`` [..., V], ``targets`` [...] ids. With ``vocab_start`` the logits hold the slice
    [vocab_start, vocab_start + V) of a larger vocabulary: targets outside it give log-prob 0 and
    the statistics are those of the slice alone (the vocab-parallel partials); ids outside
    [0, ``vocab_total``) (default: the end of this slice) give NaN.
    """
    z = logits.to(compute_dtype(logits)) / temperature
    logsm = torch.log_softmax(z, dim=-1)
    local = targets.long() - vocab_start
    owned = (local >= 0) & (local < z.shape[-1])
    logp = torch.gather(logsm, -1, local.clamp(0, max(z.shape[-1] - 1, 0)).unsqueeze(-1)).squeeze(-1)
    # A target in another rank's slice contributes 0 to the gathered sum; an id outside the whole
    # vocabulary (unvalidated input) gives NaN, as on the kernel backends.
    total = z.shape[-1] + vocab_start if vocab_total is None else vocab_total
    inside = (targets >= 0) & (targets < total)
    logp = torch.where(owned, logp, torch.where(inside, 0.0, float("nan")).to(logp.dtype))
    if not return_entropy:
        return logp
    p = logsm.exp()
    # 0·log 0 = 0 for tokens whose logit is −inf; NaN stays NaN. log p is replaced before the
    # product too: otherwise its backward multiplies the zero upstream gradient by −inf.
    zero = p == 0
    entropy = -torch.where(zero, 0.0, p * torch.where(zero, 0.0, logsm)).sum(-1)
    return logp, entropy


def linear_logits_reference(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, fp32_lm_head: bool = False
) -> Tensor:
    """The LM head: hidden [..., H] @ weight[V, H]ᵀ (+ bias) → logits [..., V], differentiable.

    ``fp32_lm_head``: in fp32 (float64 inputs stay float64); otherwise in the inputs' dtype.
    """
    if fp32_lm_head and hidden.dtype != torch.float64:
        hidden, weight = hidden.float(), weight.float()
        bias = bias.float() if bias is not None else None
    return torch.nn.functional.linear(hidden, weight, bias)


def linear_token_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    fp32_lm_head: bool = False,
):
    """log softmax((hidden @ weightᵀ + bias) / T)[target] (and the entropy), materialising the logits."""
    logits = linear_logits_reference(hidden, weight, bias, fp32_lm_head)
    return token_logprobs_reference(logits, targets, temperature, return_entropy)


def token_logprobs_partials_reference(
    logits: Tensor, targets: Tensor, temperature: float, vocab_start: int, vocab_total: int
):
    """Closed-form forward of one vocabulary slice, no autograd: (logp, entropy, lse) of the slice, fp32/fp64."""
    with torch.no_grad():
        z = logits.to(compute_dtype(logits)) / temperature
        lse = torch.logsumexp(z, dim=-1)
        logp, entropy = token_logprobs_reference(logits, targets, temperature, True, vocab_start, vocab_total)
    return logp, entropy, lse


def token_logprobs_grad_reference(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    vocab_start: int,
) -> Tensor:
    """d/d logits of Σ g_logp·log p_t + g_H·H given the (global) log-sum-exp and entropy.

    With z = x/T, p = softmax(z): d log p_t/dz_j = 1[j=t] − p_j and dH/dz_j = −p_j·(log p_j + H).
    """
    with torch.no_grad():
        z = logits.to(compute_dtype(logits)) / temperature
        logp_all = z - lse.unsqueeze(-1).to(z.dtype)
        p = logp_all.exp()
        g = torch.zeros_like(z)
        if grad_logp is not None:
            local = targets.long() - vocab_start
            owned = (local >= 0) & (local < z.shape[-1])
            onehot = torch.zeros_like(z).scatter_(
                -1, local.clamp(0, max(z.shape[-1] - 1, 0)).unsqueeze(-1), owned.unsqueeze(-1).to(z.dtype)
            )
            g = g + grad_logp.unsqueeze(-1).to(z.dtype) * (onehot - p)
        if grad_entropy is not None:
            h = entropy.unsqueeze(-1).to(z.dtype)
            g = g - grad_entropy.unsqueeze(-1).to(z.dtype) * torch.where(p == 0, 0.0, p * (logp_all + h))
        return (g / temperature).to(logits.dtype)


class PolicyLossReference(NamedTuple):
    loss: Tensor
    metrics: Tensor  # [len(METRICS)], see METRICS


def _sequence_ids(shape_or_n, cu_seqlens: Optional[Tensor], device) -> tuple[Tensor, int]:
    if cu_seqlens is None:
        b, t = shape_or_n
        return torch.arange(b, device=device).repeat_interleave(t), b
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths), lengths.numel()


def clipped_surrogate(
    ratio: Tensor, adv: Tensor, lo: float, hi: float, delta: Optional[float], dual_clip: Optional[float]
):
    """−min(min(ρ, δ)·A, clip(ρ, lo, hi)·A), then for A < 0 capped at −c·A (dual clip).

    Where both branches are equal the unclipped one is taken (its gradient flows), and the dual
    clip applies only where −c·A is strictly smaller: a token exactly on a boundary keeps its gradient.
    """
    surr1 = (ratio.clamp(max=delta) if delta is not None else ratio) * adv
    surr2 = ratio.clamp(lo, hi) * adv
    pg = -torch.where(surr2 < surr1, surr2, surr1)
    dual = torch.zeros_like(adv, dtype=torch.bool)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual = (adv < 0) & (cap < pg)
        pg = torch.where(dual, cap, pg)
    low = (adv < 0) & (ratio < lo)
    high = (adv > 0) & (ratio > hi)
    return pg, low, high, dual


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from d = logp − ref_logp (samples drawn from π).

    k1: d;  k2: d²/2;  k3: exp(−d) − 1 + d;  abs: |d|;  k3+: the k3 value with the k2 gradient.
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    k3 = torch.expm1(-d) + d
    if estimator == "k3":
        return k3
    if estimator == "abs":
        return d.abs()
    k2 = 0.5 * d * d
    return k3.detach() + k2 - k2.detach()


def policy_loss_reference(
    logp: Tensor,
    old_logp: Optional[Tensor],
    advantages: Optional[Tensor],
    mask: Optional[Tensor] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    loss_type: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    delta: Optional[float] = None,
    cispo_two_sided: bool = False,
    ratio_level: str = "token",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    npo_beta: float = 0.1,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_bias_correction: bool = False,
    kl_times_is_weights: bool = False,
    kl_clamp: Optional[float] = None,
    is_mode: str = "truncate",
    is_threshold: float = 2.0,
    is_threshold_low: Optional[float] = None,
    aggregation: str = "token-mean",
    norm_constant: Optional[float] = None,
    num_tokens: Optional[Tensor] = None,
    num_sequences: Optional[Tensor] = None,
) -> PolicyLossReference:
    """The policy-loss family, differentiable in ``logp``; see ``negkernels.policy_loss`` for the formulas.

    ``num_tokens`` / ``num_sequences`` are the (global) normalizers; by default the local count of
    unmasked tokens / of sequences with at least one unmasked token. Metrics are means over the
    local unmasked tokens (all zero when there are none).
    """
    dtype = compute_dtype(logp)
    packed = cu_seqlens is not None
    n = logp.numel()
    seq, num_seq = _sequence_ids(n if packed else logp.shape, cu_seqlens, logp.device)
    m = torch.ones(n, dtype=dtype, device=logp.device) if mask is None else (mask.reshape(-1) != 0).to(dtype)

    zero = torch.zeros((), dtype=dtype, device=logp.device)

    def unmasked(x: Tensor) -> Tensor:
        """[N] in the compute dtype with masked positions replaced by 0 before any arithmetic: padding
        may hold ±inf or NaN, and a multiply by the mask afterwards would still send 0·inf = NaN
        into the gradient."""
        return torch.where(m > 0, x, zero)

    lp = unmasked(logp.reshape(-1).to(dtype))
    # old_logp, advantages and ref_logp are constants of the policy gradient; old_logp None: on-policy.
    old = lp.detach() if old_logp is None else unmasked(old_logp.detach().reshape(-1).to(dtype))
    if advantages is None:
        adv = torch.zeros(n, dtype=dtype, device=logp.device)
    else:
        adv = advantages.detach().reshape(-1).to(dtype)
        adv = unmasked(adv if advantages.shape == logp.shape else adv[seq])
    ref = unmasked(ref_logp.detach().reshape(-1).to(dtype)) if ref_logp is not None else None

    count_b = torch.zeros(num_seq, dtype=dtype, device=logp.device).index_add(0, seq, m)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high

    if is_weights is None:
        iw = torch.ones(n, dtype=dtype, device=logp.device)
    else:
        w = is_weights.reshape(-1).to(dtype)
        w = w if is_weights.shape == logp.shape else w[seq]
        if is_mode == "truncate":
            iw = w.clamp(max=is_threshold)
        else:
            low = 1.0 / is_threshold if is_threshold_low is None else is_threshold_low
            iw = torch.where((w >= low) & (w <= is_threshold), w, torch.zeros_like(w))
        iw = unmasked(iw.detach())

    zeros = torch.zeros(n, dtype=torch.bool, device=logp.device)
    low_flag = high_flag = dual_flag = zeros
    seq_ratio = None
    if loss_type == "gspo" or ratio_level == "sequence":
        # s = exp(mean_t log ρ) per sequence, with its gradient through every token (the bias-
        # corrected KL's factor); the policy term takes its token form s_t = sg(s)·exp(logp − sg(logp))
        seq_log_ratio = torch.zeros(num_seq, dtype=dtype, device=logp.device).index_add(
            0, seq, torch.where(m > 0, log_ratio, 0.0)
        )
        seq_ratio = torch.exp(seq_log_ratio / count_b.clamp_min(1))[seq]
        seq_ratio_token_form = seq_ratio.detach() * torch.exp(lp - lp.detach())
        if ratio_level == "sequence":  # sapo / cispo on s
            ratio = seq_ratio_token_form
    if loss_type == "ppo":
        pg, low_flag, high_flag, dual_flag = clipped_surrogate(ratio, adv, lo, hi, delta, dual_clip)
    elif loss_type == "gspo":  # the token form: value s, gradient s through each token's own log-prob
        pg, low_flag, high_flag, dual_flag = clipped_surrogate(seq_ratio_token_form, adv, lo, hi, delta, dual_clip)
    elif loss_type == "cispo":
        weight = ratio.clamp(lo, hi) if cispo_two_sided else ratio.clamp(max=hi)
        pg = -weight.detach() * adv * lp
        high_flag = ratio > hi
        low_flag = (ratio < lo) if cispo_two_sided else zeros
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, sapo_tau_pos), torch.full_like(adv, sapo_tau_neg))
        # σ(x) as exp(−softplus(−x)): its autograd forms σ(x)·σ(−x), where sigmoid's own backward,
        # σ·(1 − σ), cancels to nothing in fp32 once σ rounds near 1.
        gate = torch.exp(-torch.nn.functional.softplus(-tau * (ratio - 1.0)))
        pg = -(4.0 / tau) * gate * adv
    elif loss_type == "gpg":
        pg = -adv * lp
    elif loss_type == "geo_mean":
        # GMPO: log ρ clipped to [−clip_low, clip_high] on the side the advantage's sign makes
        # pessimistic (a zero advantage contributes 0), the sequence ratio s_b their exp-mean, and
        # −Ā_b·s_b per token with Ā_b the sequence's mean advantage; token form as gspo.
        high_flag = (adv > 0) & (log_ratio > clip_high)
        low_flag = (adv < 0) & (log_ratio < -clip_low)
        c = torch.where(high_flag | low_flag, log_ratio.clamp(-clip_low, clip_high).detach(), log_ratio)
        c = torch.where((adv != 0) & (m > 0), c, zero)
        seq_c = torch.zeros(num_seq, dtype=dtype, device=logp.device).index_add(0, seq, c)
        s_b = torch.exp(seq_c / count_b.clamp_min(1))[seq]
        adv_b = torch.zeros(num_seq, dtype=dtype, device=logp.device).index_add(0, seq, adv) / count_b.clamp_min(1)
        pg = -adv_b[seq] * s_b.detach() * torch.exp(c - c.detach())
    elif loss_type == "npo":
        if ref is None:
            raise ValueError("ref_logp: loss_type='npo' needs the reference model's log-probs")
        diff_b = torch.zeros(num_seq, dtype=dtype, device=logp.device).index_add(
            0, seq, torch.where(m > 0, lp - ref, 0.0)
        )
        seq_loss = (2.0 / npo_beta) * torch.nn.functional.softplus(npo_beta * diff_b)
        pg = (seq_loss / count_b.clamp_min(1))[seq]
    else:
        raise ValueError(f"loss_type: unknown {loss_type!r}")

    if seq_ratio is not None:  # the KL's bias correction uses s (with its gradient) for gspo / sequence level
        ratio = seq_ratio
    token_loss = iw * pg
    kl = None
    if ref is not None:
        kl = kl_penalty(lp, ref, kl_estimator)
        if kl_clamp is not None:  # torch.clamp: no gradient outside the band, as verl's low_var_kl
            kl = kl.clamp(-kl_clamp, kl_clamp)
        if kl_bias_correction:  # weighted by the importance ratio, with its gradient (s_b for gspo)
            kl = kl * ratio
        if kl_times_is_weights:
            kl = kl * iw
        if kl_coef != 0.0:
            token_loss = token_loss + kl_coef * kl

    if num_tokens is None:
        num_tokens = m.sum()
    if num_sequences is None:
        num_sequences = (count_b > 0).sum().to(dtype)
    if aggregation == "token-mean":
        weight, denom = m, num_tokens
    elif aggregation == "token-sum":
        weight, denom = m, torch.ones((), dtype=dtype, device=logp.device)
    elif aggregation == "seq-mean-token-mean":
        weight, denom = m / count_b.clamp_min(1)[seq], num_sequences
    elif aggregation == "seq-mean-token-sum":
        weight, denom = m, num_sequences
    else:
        if norm_constant is None:  # Dr. GRPO's constant: the padded length
            norm_constant = float(logp.shape[-1])
        weight, denom = m / norm_constant, num_sequences
    denom = torch.as_tensor(denom, dtype=dtype, device=logp.device)
    # Masked tokens are left out, not multiplied by 0: padding may hold ±inf.
    loss = torch.where(m > 0, weight * token_loss, 0.0).sum() / denom.clamp_min(torch.finfo(dtype).tiny)

    with torch.no_grad():
        safe = m.sum().clamp_min(1)

        def masked_mean(x):
            return torch.where(m > 0, x.to(dtype), 0.0).sum() / safe

        # ρ − 1 − log ρ in float64: in fp32 it cancels to noise for policies a small step apart.
        lr64 = log_ratio.double()
        approx_kl = torch.expm1(lr64) - lr64
        mean_ratio = torch.exp(log_ratio)
        metrics = torch.stack(
            [
                masked_mean(low_flag),
                masked_mean(high_flag),
                masked_mean(dual_flag),
                masked_mean(approx_kl),
                masked_mean(mean_ratio),
                masked_mean(kl) if kl is not None else torch.zeros((), dtype=dtype, device=logp.device),
            ]
        )
    return PolicyLossReference(loss, metrics)
