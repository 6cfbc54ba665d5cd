"""Triton kernels for token log-probs, entropy and the policy-loss family.

* ``_token_logprobs_fwd_kernel`` / ``_token_logprobs_bwd_kernel``: one program per token row streams
  the vocabulary in blocks with an online max / sum-exp / Σ p·z, so no fp32 or full-size copy of
  the logits ever exists. The forward saves only the row's log-sum-exp (and entropy); the backward
  recomputes p from the logits.
* ``_policy_loss_fwd_kernel``: one program per sequence. An optional first sweep gathers what a
  sequence-level loss needs (token count, GSPO's mean log-ratio, NPO's log-likelihood gap); the
  second sweep computes every token's loss, its gradient (written straight away, so the backward
  is a scale) and the metric sums. The last program to finish adds up the per-sequence partials
  in a fixed order: the loss has the same bits every run.
* ``_policy_loss_from_logits_kernel``: logits → log-prob → loss gradient → logits gradient in one
  sweep per token for the token-local losses (ppo, cispo, sapo, gpg): the logits are read by the
  online pass and re-read from L2 while the gradient is written.

Hyper-parameters are runtime scalars (a new clip range does not recompile); disabled options are
passed as +inf sentinels so they need no compile-time variant.
"""

from __future__ import annotations

import functools
from enum import IntEnum

import torch
import triton
import triton.language as tl

from .. import _backend
from ..reference.logprobs import (
    POLICY_LOSS_PARTIALS,
    Aggregation,
    IsMode,
    KlEstimator,
    LossType,
)
from . import cdiv, next_power_of_2

# The kernels' option codes by name (values from negkernels.reference.logprobs, shared with CUDA).
_LOSS_PPO: tl.constexpr = tl.constexpr(int(LossType.PPO))
_LOSS_GSPO: tl.constexpr = tl.constexpr(int(LossType.GSPO))
_LOSS_CISPO: tl.constexpr = tl.constexpr(int(LossType.CISPO))
_LOSS_SAPO: tl.constexpr = tl.constexpr(int(LossType.SAPO))
_LOSS_NPO: tl.constexpr = tl.constexpr(int(LossType.NPO))
_LOSS_GEO_MEAN: tl.constexpr = tl.constexpr(int(LossType.GEO_MEAN))
_KL_NONE: tl.constexpr = tl.constexpr(int(KlEstimator.NONE))
_KL_K1: tl.constexpr = tl.constexpr(int(KlEstimator.K1))
_KL_K2: tl.constexpr = tl.constexpr(int(KlEstimator.K2))
_KL_K3: tl.constexpr = tl.constexpr(int(KlEstimator.K3))
_KL_ABS: tl.constexpr = tl.constexpr(int(KlEstimator.ABS))
_AGG_TOKEN_MEAN: tl.constexpr = tl.constexpr(int(Aggregation.TOKEN_MEAN))
_AGG_TOKEN_SUM: tl.constexpr = tl.constexpr(int(Aggregation.TOKEN_SUM))
_AGG_SEQ_MEAN_TOKEN_MEAN: tl.constexpr = tl.constexpr(int(Aggregation.SEQ_MEAN_TOKEN_MEAN))
_AGG_SEQ_MEAN_TOKEN_SUM_NORM: tl.constexpr = tl.constexpr(int(Aggregation.SEQ_MEAN_TOKEN_SUM_NORM))
_IS_NONE: tl.constexpr = tl.constexpr(int(IsMode.NONE))
_IS_TRUNCATE: tl.constexpr = tl.constexpr(int(IsMode.TRUNCATE))


class NormaliserSource(IntEnum):
    """Where the fused loss-from-logits kernel takes the divisor of a row's aggregation weight."""

    TENSOR = 0  # the 0-d ``normaliser`` argument
    UNMASKED_ROWS = 1  # token-mean of this call: the unmasked rows, counted by every program first
    ONE = 2  # token-sum


_NORMALISER_TENSOR: tl.constexpr = tl.constexpr(int(NormaliserSource.TENSOR))
_NORMALISER_UNMASKED_ROWS: tl.constexpr = tl.constexpr(int(NormaliserSource.UNMASKED_ROWS))
# Mask bytes a program counts per step before its first row (a few steps for any batch).
MASK_COUNT_BLOCK = 4096


# The fused loss-from-logits kernel keeps about one 151936-wide bf16 row (300 KB) per SM in
# flight, about 40 MB on an H100, inside its 50 MB L2; wide blocks and many warps keep enough
# bytes in flight per SM to approach the memory bandwidth. Untuned: no GPU has run it yet.
FUSED_PROGRAMS_PER_SM = 1
# Rows of per-sequence partials the policy-loss kernel's last program sums per step.
FINAL_ROWS = 128
FUSED_MAX_BLOCK_V = 16384
FUSED_NUM_WARPS = 32


@functools.lru_cache(maxsize=256)
def _vocab_block(n_vocab: int, largest: int = 4096) -> int:
    return max(16, min(largest, next_power_of_2(max(n_vocab, 1))))


# ----------------------------------------------------------------------------- rows of logits


_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _online_block(z2, m, s, w, WITH_ENTROPY: tl.constexpr):
    """One block of the online softmax, in base 2: z2 = x·inv_t·log2(e); (m, s, w) the running
    max, Σ 2^(z2−m) and Σ 2^(z2−m)·(z2−m)."""
    m_new = tl.maximum(m, tl.max(z2, axis=0))
    # A row that is −inf so far keeps m = −inf; shift by 0 instead so nothing becomes NaN.
    shift = tl.where(m_new > -float("inf"), m_new, 0.0)
    alpha = tl.math.exp2(m - shift)
    e = tl.math.exp2(z2 - shift)
    if WITH_ENTROPY:
        d = tl.where(e > 0.0, z2 - shift, 0.0)
        w = alpha * (w + tl.where(s > 0.0, s * (m - shift), 0.0)) + tl.sum(e * d, axis=0)
    s = s * alpha + tl.sum(e, axis=0)
    return m_new, s, w


@triton.jit
def _online_softmax_row(row_ptr, n_vocab, inv_t, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """(log-sum-exp, entropy) of softmax(x·inv_t) over one row, one streaming pass in fp32.

    The entropy is log s − w/s with w = Σ e^(z−m)·(z−m) kept relative to the running max m, so no
    large z cancels against the log-sum-exp. Without ``WITH_ENTROPY`` the entropy is 0 and its
    per-element work (a select, a multiply-add and a second reduction) is not compiled in.
    Computed in base 2 (one multiply per element folds the temperature and log2(e), and exp2 is
    the hardware's instruction); full blocks are read without a mask, the tail with one.
    """
    lanes = tl.arange(0, BLOCK_V)
    c = inv_t * _LOG2E
    m = -float("inf")
    s = 0.0
    w = 0.0
    n_full = (n_vocab // BLOCK_V) * BLOCK_V
    for v0 in range(0, n_full, BLOCK_V):
        z2 = tl.load(row_ptr + v0 + lanes).to(tl.float32) * c
        m, s, w = _online_block(z2, m, s, w, WITH_ENTROPY)
    if n_full < n_vocab:
        offs = n_full + lanes
        z2 = tl.load(row_ptr + offs, mask=offs < n_vocab, other=-float("inf")).to(tl.float32) * c
        m, s, w = _online_block(z2, m, s, w, WITH_ENTROPY)
    shift = tl.where(m > -float("inf"), m, 0.0)
    log2_s = tl.math.log2(s)
    lse = (shift + log2_s) * _LN2
    entropy = 0.0
    if WITH_ENTROPY:
        entropy = (log2_s - w / s) * _LN2
    return lse, entropy


@triton.jit
def _grad_block(x, c, lse2, a, b, entropy, WITH_ENTROPY: tl.constexpr):
    """−a·p_j − b·p_j·(log p_j + H) for one block (the target's +a is added after the sweep)."""
    lp2 = x.to(tl.float32) * c - lse2
    p = tl.math.exp2(lp2)
    g = -a * p
    if WITH_ENTROPY:
        g -= b * tl.where(p > 0.0, p * (lp2 * _LN2 + entropy), 0.0)
    return g


@triton.jit
def _write_logits_grad_row(
    row_ptr,
    grad_row_ptr,
    n_vocab,
    inv_t,
    lse,
    entropy,
    target_local,
    g_logp,
    g_entropy,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """d/dx of g_logp·log p_t + g_entropy·H:  inv_t·(g_logp·(1[j=t] − p_j) − g_entropy·p_j·(log p_j + H)).

    The sweep writes every element without the 1[j=t] term (no per-element compare); the target's
    element is then rewritten from its logit, read before the sweep (``grad_row_ptr`` may be
    ``row_ptr``), after a block barrier orders it behind the sweep's store to the same address.
    """
    lanes = tl.arange(0, BLOCK_V)
    c = inv_t * _LOG2E
    lse2 = lse * _LOG2E
    a = g_logp * inv_t
    b = g_entropy * inv_t
    owned = (target_local >= 0) & (target_local < n_vocab)
    safe_target = tl.where(owned, target_local, 0)
    x_t = tl.load(row_ptr + safe_target).to(tl.float32)
    out_ty = grad_row_ptr.dtype.element_ty
    n_full = (n_vocab // BLOCK_V) * BLOCK_V
    for v0 in range(0, n_full, BLOCK_V):
        x = tl.load(row_ptr + v0 + lanes)
        tl.store(grad_row_ptr + v0 + lanes, _grad_block(x, c, lse2, a, b, entropy, WITH_ENTROPY).to(out_ty))
    if n_full < n_vocab:
        offs = n_full + lanes
        valid = offs < n_vocab
        x = tl.load(row_ptr + offs, mask=valid, other=-float("inf"))
        tl.store(grad_row_ptr + offs, _grad_block(x, c, lse2, a, b, entropy, WITH_ENTROPY).to(out_ty), mask=valid)
    if owned:
        tl.debug_barrier()
        g_t = a + _grad_block(x_t, c, lse2, a, b, entropy, WITH_ENTROPY)
        tl.store(grad_row_ptr + safe_target, g_t.to(out_ty))


@triton.jit
def _row_offset(row, stride_outer, stride_inner, inner_size):
    # Rows of [O, I, V] views such as logits[:, :-1]: no copy to make them contiguous.
    return (row // inner_size) * stride_outer + (row % inner_size) * stride_inner


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    stride_outer,
    stride_inner,
    inner_size,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    n_vocab,
    vocab_start,
    vocab_total,
    inv_t,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, stride_outer, stride_inner, inner_size)
    lse, entropy = _online_softmax_row(row_ptr, n_vocab, inv_t, WITH_ENTROPY, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)
    local = target - vocab_start
    owned = (local >= 0) & (local < n_vocab)
    z_t = tl.load(row_ptr + tl.where(owned, local, 0)).to(tl.float32) * inv_t
    # A target in another rank's vocabulary slice contributes 0 to the gathered sum; an id outside
    # the whole vocabulary (unvalidated input) gives NaN and is never read.
    valid = (target >= 0) & (target < vocab_total)
    tl.store(logp_ptr + row, tl.where(owned, z_t - lse, tl.where(valid, 0.0, float("nan"))))
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    stride_outer,
    stride_inner,
    inner_size,
    grad_ptr,
    grad_stride_outer,
    grad_stride_inner,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    n_vocab,
    vocab_start,
    inv_t,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g_logp = 0.0
    g_entropy = 0.0
    entropy = 0.0
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row)
    local = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
    _write_logits_grad_row(
        logits_ptr + _row_offset(row, stride_outer, stride_inner, inner_size),
        grad_ptr + _row_offset(row, grad_stride_outer, grad_stride_inner, inner_size),
        n_vocab,
        inv_t,
        tl.load(lse_ptr + row),
        entropy,
        local,
        g_logp,
        g_entropy,
        HAS_GRAD_ENTROPY,
        BLOCK_V,
    )


@triton.jit
def _scale_rows_unless_one_kernel(
    x_ptr, stride_outer, stride_inner, inner_size, n_cols, scale_ptr, BLOCK: tl.constexpr
):
    """x ← x·scale, row by row, except where scale is 1 (the incoming gradient of
    ``loss.backward()``): then the program returns without touching x. The decision is made on
    the device, so the host never reads the scale."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        row = tl.program_id(0).to(tl.int64)
        row_ptr = x_ptr + _row_offset(row, stride_outer, stride_inner, inner_size)
        lanes = tl.arange(0, BLOCK)
        for c0 in range(0, n_cols, BLOCK):
            offs = c0 + lanes
            valid = offs < n_cols
            x = tl.load(row_ptr + offs, mask=valid).to(tl.float32)
            tl.store(row_ptr + offs, (x * scale).to(row_ptr.dtype.element_ty), mask=valid)


def scale_rows_unless_one(
    x, stride_outer: int, stride_inner: int, inner_size: int, rows: int, n_cols: int, scale: torch.Tensor
) -> None:
    """In place: rows of ``x`` (addressed as in :func:`token_logprobs_fwd`) times the 0-d ``scale``,
    skipped on the device when it is 1."""
    if rows == 0 or n_cols == 0:
        return
    block = _vocab_block(n_cols)
    _scale_rows_unless_one_kernel[(rows,)](
        x_ptr=x,
        stride_outer=stride_outer,
        stride_inner=stride_inner,
        inner_size=inner_size,
        n_cols=n_cols,
        scale_ptr=scale,
        BLOCK=block,
        num_warps=_num_warps(block),
    )


# ----------------------------------------------------------------------------- per-token losses


@triton.jit
def _nan_min(x, y):
    """min that returns NaN when either side is NaN (tl.minimum's default drops a NaN operand)."""
    return tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_max(x, y):
    return tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clipped_surrogate(ratio, adv, lo, hi, delta, dual_c):
    """−min(min(ρ, δ)·A, clip(ρ, lo, hi)·A), capped at −c·A for A < 0; returns (value, d/dρ, flags).

    Ties take the unclipped branch and the dual cap applies only when strictly smaller, as in the
    reference; δ = c = +inf disable those options.
    """
    d_capped = tl.where(ratio > delta, 0.0, 1.0)
    d_clipped = tl.where((ratio < lo) | (ratio > hi), 0.0, 1.0)
    surr1 = _nan_min(ratio, delta) * adv
    surr2 = _nan_min(_nan_max(ratio, lo), hi) * adv
    use_clipped = surr2 < surr1
    value = -tl.where(use_clipped, surr2, surr1)
    d_ratio = -adv * tl.where(use_clipped, d_clipped, d_capped)
    cap = -dual_c * adv
    dual = (adv < 0.0) & (cap < value)
    value = tl.where(dual, cap, value)
    d_ratio = tl.where(dual, 0.0, d_ratio)
    low = tl.where((adv < 0.0) & (ratio < lo), 1.0, 0.0)
    high = tl.where((adv > 0.0) & (ratio > hi), 1.0, 0.0)
    return value, d_ratio, low, high, tl.where(dual, 1.0, 0.0)


@triton.jit
def _token_local_loss(
    lp, ratio, adv, lo, hi, delta, dual_c, tau_pos, tau_neg, LOSS: tl.constexpr, CISPO_TWO_SIDED: tl.constexpr
):
    """Per-token policy term of the token-local losses: (value, d value/d logp, low, high, dual flags)."""
    zero = tl.zeros_like(ratio)
    if LOSS == _LOSS_PPO:
        value, d_ratio, low, high, dual = _clipped_surrogate(ratio, adv, lo, hi, delta, dual_c)
        d_logp = d_ratio * ratio
    elif LOSS == _LOSS_CISPO:  # detached clipped ratio × A × logp
        weight = _nan_min(ratio, hi)
        if CISPO_TWO_SIDED:
            weight = _nan_max(weight, lo)
            low = tl.where(ratio < lo, 1.0, 0.0)
        else:
            low = zero
        value = -weight * adv * lp
        d_logp = -weight * adv
        high = tl.where(ratio > hi, 1.0, 0.0)
        dual = zero
    elif LOSS == _LOSS_SAPO:  # soft gate (4/τ)·σ(τ(ρ − 1)), τ by the sign of A
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        x = tau * (ratio - 1.0)
        gate = tl.sigmoid(x)
        value = -(4.0 / tau) * gate * adv
        # σ'(x) = σ(x)·σ(−x): 1 − σ(x) would cancel to nothing in fp32 once σ(x) rounds near 1.
        d_logp = -4.0 * gate * tl.sigmoid(-x) * ratio * adv
        low = zero
        high = zero
        dual = zero
    else:  # gpg: −A·logp
        value = -adv * lp
        d_logp = -adv + zero
        low = zero
        high = zero
        dual = zero
    return value, d_logp, low, high, dual


@triton.jit
def _exp_minus_one_minus(x):
    """e^x − 1 − x (the k3 / approx-KL shape) without fp32 cancellation: for |x| < 0.5 a Taylor
    series through x^7 (truncation below 1e-6 relative), else the direct form (value ≥ 0.1)."""
    series = (
        x * x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0 + x * (1.0 / 5040.0))))))
    )
    return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0 - x)


@triton.jit
def _kl_term(d, kl_clamp, KL: tl.constexpr):
    """KL(π‖π_ref) estimate from d = logp − ref_logp and its derivative in logp, clamped to
    [−kl_clamp, kl_clamp] with no gradient outside (torch.clamp's rule: the edges keep theirs)."""
    if KL == _KL_K1:
        value = d
        grad = tl.zeros_like(d) + 1.0
    elif KL == _KL_K2:
        value = 0.5 * d * d
        grad = d
    elif KL == _KL_K3:  # e^{−d} − 1 + d, gradient 1 − e^{−d} = d − k3
        value = _exp_minus_one_minus(-d)
        grad = d - value
    elif KL == _KL_ABS:
        value = tl.abs(d)
        grad = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    else:  # k3+: k3 value, k2 gradient
        value = _exp_minus_one_minus(-d)
        grad = d
    outside = tl.abs(value) > kl_clamp
    value = tl.where(outside, tl.where(value > 0.0, kl_clamp, -kl_clamp), value)
    grad = tl.where(outside, 0.0, grad)
    return value, grad


@triton.jit
def _importance_weight(w, is_hi, is_lo, IS: tl.constexpr):
    if IS == _IS_TRUNCATE:
        w = _nan_min(w, is_hi)
    else:  # mask
        w = tl.where((w >= is_lo) & (w <= is_hi), w, 0.0)
    return w


@triton.jit
def _token_importance_weights(iw_ptr, offs, inside, iw_seq, is_hi, is_lo, IS: tl.constexpr, IW_PER_TOKEN: tl.constexpr):
    """Bounded IS weights of a block of tokens: per token, else the sequence's (``iw_seq``, 1 without weights)."""
    if IS != _IS_NONE and IW_PER_TOKEN:
        w = _importance_weight(tl.load(iw_ptr + offs, mask=inside, other=1.0).to(tl.float32), is_hi, is_lo, IS)
    else:
        w = tl.where(inside, iw_seq, 1.0)
    return w


@triton.jit
def _softplus(x):
    t = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(t < 1e-4, t - 0.5 * t * t, tl.log(1.0 + t))


@triton.jit
def _geo_mean_log_ratio(log_ratio, adv, lo, hi):
    """GMPO's clipped log-ratio c (lo = −clip_low, hi = clip_high), its derivative in log ρ, and the
    clip flags (low: A < 0 below lo; high: A > 0 above hi). A zero advantage gives c = 0."""
    high = (adv > 0.0) & (log_ratio > hi)
    low = (adv < 0.0) & (log_ratio < lo)
    binds = high | low
    c = tl.where(binds, tl.minimum(tl.maximum(log_ratio, lo), hi), log_ratio)
    keep = (adv != 0.0) & (binds == 0)
    c = tl.where(adv != 0.0, c, 0.0)
    return c, tl.where(keep, 1.0, 0.0), tl.where(low, 1.0, 0.0), tl.where(high, 1.0, 0.0)


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    ref_ptr,
    iw_ptr,
    cu_ptr,
    partial_ptr,
    grad_ptr,
    loss_ptr,
    stats_ptr,
    normaliser_ptr,
    n_tokens,
    seq_len,
    max_len,
    num_sequences,
    lo,
    hi,
    delta,
    dual_c,
    tau_pos,
    tau_neg,
    npo_beta,
    kl_coef,
    kl_clamp,
    is_hi,
    is_lo,
    norm_constant,
    LOSS: tl.constexpr,
    KL: tl.constexpr,
    KL_BIAS_CORRECTION: tl.constexpr,
    KL_TIMES_IS_WEIGHTS: tl.constexpr,
    AGG: tl.constexpr,
    IS: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    IW_PER_TOKEN: tl.constexpr,
    CISPO_TWO_SIDED: tl.constexpr,
    SEQUENCE_RATIO: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_NORMALISER: tl.constexpr,
    BLOCK: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if PACKED:
        # Clamped into [0, N]: an unvalidated bad layout gives a wrong loss, never a bad access.
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + b).to(tl.int64), 0), n_tokens)
        end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1).to(tl.int64), start), n_tokens)
        length = end - start
    else:
        start = b * seq_len
        length = b * 0 + seq_len
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    if not ADV_PER_TOKEN:
        adv_seq = tl.load(adv_ptr + b).to(tl.float32)
    iw_seq = 1.0
    if IS != _IS_NONE and not IW_PER_TOKEN:
        iw_seq = _importance_weight(tl.load(iw_ptr + b).to(tl.float32), is_hi, is_lo, IS)

    # Sweep 1, only for what depends on the whole sequence: its token count (seq-mean-token-mean),
    # GSPO's mean log-ratio (and, with the bias-corrected KL, its KL sum: s·Σ k couples every
    # token through s), GMPO's mean clipped log-ratio and advantage sum, NPO's log-likelihood gap
    # and IS-weight sum.
    # GSPO and the sequence-level sapo / cispo share s = exp(mean_t log ρ)
    USES_SEQ_RATIO: tl.constexpr = (LOSS == _LOSS_GSPO) or SEQUENCE_RATIO
    KL_TIMES_SEQ_RATIO: tl.constexpr = KL_BIAS_CORRECTION and (KL != _KL_NONE) and USES_SEQ_RATIO
    count = 0.0
    seq_a = 0.0
    seq_b = 0.0
    if (AGG == _AGG_SEQ_MEAN_TOKEN_MEAN) or USES_SEQ_RATIO or (LOSS == _LOSS_NPO) or (LOSS == _LOSS_GEO_MEAN):
        acc_count = tl.zeros([BLOCK], tl.float32)
        acc_a = tl.zeros([BLOCK], tl.float32)
        acc_b = tl.zeros([BLOCK], tl.float32)
        for i in range(0, max_len, BLOCK):
            idx = i + lanes
            m = idx < length
            offs = start + idx
            if HAS_MASK:
                m = m & (tl.load(mask_ptr + offs, mask=m, other=0) != 0)
            acc_count += tl.where(m, 1.0, 0.0)
            if USES_SEQ_RATIO:
                lp = tl.load(logp_ptr + offs, mask=m, other=0.0).to(tl.float32)
                old = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
                acc_a += tl.where(m, lp - old, 0.0)
                if KL_TIMES_SEQ_RATIO:
                    ref = tl.load(ref_ptr + offs, mask=m, other=0.0).to(tl.float32)
                    kl, _ = _kl_term(lp - ref, kl_clamp, KL)
                    if KL_TIMES_IS_WEIGHTS:
                        kl = kl * _token_importance_weights(iw_ptr, offs, m, iw_seq, is_hi, is_lo, IS, IW_PER_TOKEN)
                    acc_b += tl.where(m, kl, 0.0)
            if LOSS == _LOSS_GEO_MEAN:
                lp = tl.load(logp_ptr + offs, mask=m, other=0.0).to(tl.float32)
                old = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
                if ADV_PER_TOKEN:
                    adv = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
                    acc_b += tl.where(m, adv, 0.0)
                else:
                    adv = tl.zeros_like(lp) + adv_seq
                c, _, _, _ = _geo_mean_log_ratio(lp - old, adv, lo, hi)
                acc_a += tl.where(m, c, 0.0)
            if LOSS == _LOSS_NPO:
                lp = tl.load(logp_ptr + offs, mask=m, other=0.0).to(tl.float32)
                ref = tl.load(ref_ptr + offs, mask=m, other=0.0).to(tl.float32)
                acc_a += tl.where(m, lp - ref, 0.0)
                iw = _token_importance_weights(iw_ptr, offs, m, iw_seq, is_hi, is_lo, IS, IW_PER_TOKEN)
                acc_b += tl.where(m, iw, 0.0)
        count = tl.sum(acc_count, axis=0)
        seq_a = tl.sum(acc_a, axis=0)
        seq_b = tl.sum(acc_b, axis=0)
    safe_count = tl.maximum(count, 1.0)

    if AGG == _AGG_SEQ_MEAN_TOKEN_MEAN:
        row_weight = 1.0 / safe_count
    elif AGG == _AGG_SEQ_MEAN_TOKEN_SUM_NORM:
        row_weight = 1.0 / norm_constant
    else:
        row_weight = 1.0
    # Not yet divided by the normaliser: the last program divides the loss, the backward the gradient.
    grad_weight = row_weight
    if USES_SEQ_RATIO or (LOSS == _LOSS_GEO_MEAN):
        seq_ratio = tl.exp(seq_a / safe_count)
    if LOSS == _LOSS_GEO_MEAN:
        seq_adv = seq_b / safe_count if ADV_PER_TOKEN else adv_seq
    if LOSS == _LOSS_NPO:
        seq_loss = (2.0 / npo_beta) * _softplus(npo_beta * seq_a)
        npo_value = seq_loss / safe_count
        # d(Σ_t w_t·iw_t·L/n)/d logp = (Σ_t iw_t / n)·2σ(β·gap): L couples every token of the sequence.
        npo_grad = (seq_b / safe_count) * 2.0 * tl.sigmoid(npo_beta * seq_a)

    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_n = tl.zeros([BLOCK], tl.float32)
    acc_low = tl.zeros([BLOCK], tl.float32)
    acc_high = tl.zeros([BLOCK], tl.float32)
    acc_dual = tl.zeros([BLOCK], tl.float32)
    acc_akl = tl.zeros([BLOCK], tl.float32)
    acc_ratio = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    for i in range(0, max_len, BLOCK):
        idx = i + lanes
        inside = idx < length
        offs = start + idx
        m = inside
        if HAS_MASK:
            m = m & (tl.load(mask_ptr + offs, mask=inside, other=0) != 0)
        lp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if ADV_PER_TOKEN:
            adv = tl.load(adv_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        else:
            adv = tl.zeros_like(lp) + adv_seq
        log_ratio = lp - old
        ratio = tl.exp(log_ratio)
        iw = _token_importance_weights(iw_ptr, offs, inside, iw_seq, is_hi, is_lo, IS, IW_PER_TOKEN)

        if LOSS == _LOSS_GSPO:  # the sequence ratio s with gradient s through each token's own logp
            s = tl.zeros_like(lp) + seq_ratio
            value, d_ratio, low, high, dual = _clipped_surrogate(s, adv, lo, hi, delta, dual_c)
            d_logp = iw * d_ratio * s
        elif LOSS == _LOSS_GEO_MEAN:  # −Ā·s, gradient through each token's own clipped log-ratio
            _, d_c, low, high = _geo_mean_log_ratio(log_ratio, adv, lo, hi)
            value = tl.zeros_like(lp) - seq_adv * seq_ratio
            d_logp = iw * value * d_c
            dual = tl.zeros_like(lp)
        elif LOSS == _LOSS_NPO:
            value = tl.zeros_like(lp) + npo_value
            d_logp = tl.zeros_like(lp) + npo_grad
            low = tl.zeros_like(lp)
            high = low
            dual = low
        elif SEQUENCE_RATIO:  # sapo / cispo of s, in token form: s in place of ρ (dρ/dlogp = ρ ↔ s)
            s = tl.zeros_like(lp) + seq_ratio
            value, d_pg, low, high, dual = _token_local_loss(
                lp, s, adv, lo, hi, delta, dual_c, tau_pos, tau_neg, LOSS, CISPO_TWO_SIDED
            )
            d_logp = iw * d_pg
        else:
            value, d_pg, low, high, dual = _token_local_loss(
                lp, ratio, adv, lo, hi, delta, dual_c, tau_pos, tau_neg, LOSS, CISPO_TWO_SIDED
            )
            d_logp = iw * d_pg
        token_loss = iw * value
        if KL != _KL_NONE:
            ref = tl.load(ref_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            kl, d_kl = _kl_term(lp - ref, kl_clamp, KL)
            if KL_TIMES_IS_WEIGHTS:
                kl = kl * iw
                d_kl = d_kl * iw
            if KL_TIMES_SEQ_RATIO:  # d(s·Σ k)/d logp_t = s·(k'_t + Σ k / n)
                d_kl = seq_ratio * (d_kl + seq_b / safe_count)
                kl = kl * seq_ratio
            elif KL_BIAS_CORRECTION:  # d(ρ·k)/d logp = ρ·(k' + k)
                d_kl = ratio * (d_kl + kl)
                kl = kl * ratio
            token_loss += kl_coef * kl
            d_logp += kl_coef * d_kl
            acc_kl += tl.where(m, kl, 0.0)
        acc_loss += tl.where(m, token_loss, 0.0)
        acc_n += tl.where(m, 1.0, 0.0)
        acc_low += tl.where(m, low, 0.0)
        acc_high += tl.where(m, high, 0.0)
        acc_dual += tl.where(m, dual, 0.0)
        acc_akl += tl.where(m, _exp_minus_one_minus(log_ratio), 0.0)
        acc_ratio += tl.where(m, ratio, 0.0)
        if COMPUTE_GRAD:
            tl.store(grad_ptr + offs, tl.where(m, d_logp * grad_weight, 0.0), mask=inside)

    out = partial_ptr + b * 8  # POLICY_LOSS_PARTIALS, in this order
    tl.store(out + 0, tl.sum(acc_loss, axis=0) * grad_weight)
    tl.store(out + 1, tl.sum(acc_n, axis=0))
    tl.store(out + 2, tl.sum(acc_low, axis=0))
    tl.store(out + 3, tl.sum(acc_high, axis=0))
    tl.store(out + 4, tl.sum(acc_dual, axis=0))
    tl.store(out + 5, tl.sum(acc_akl, axis=0))
    tl.store(out + 6, tl.sum(acc_ratio, axis=0))
    tl.store(out + 7, tl.sum(acc_kl, axis=0))

    # The last program to finish sums every sequence's partials in one fixed order (the loss has
    # the same bits every run) and writes the loss, the metrics and the normaliser: no host ops
    # after the kernel. Its acq_rel ticket orders the other programs' partial stores before its
    # loads, which are volatile so that no stale L1 line is read.
    # The ticket is the fp32 word after the partials (zeroed with them; exact below 2^24 sequences).
    ticket = tl.atomic_add(partial_ptr + num_sequences * 8, 1.0, sem="acq_rel")
    if ticket == num_sequences - 1:
        _finalize_policy_partials(
            partial_ptr, num_sequences, normaliser_ptr, loss_ptr, stats_ptr, AGG, HAS_NORMALISER, FINAL_BLOCK
        )


@triton.jit
def _finalize_policy_partials(
    partial_ptr,
    num_sequences,
    normaliser_ptr,
    loss_ptr,
    stats_ptr,
    AGG: tl.constexpr,
    HAS_NORMALISER: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
):
    """[B, 8] partials → loss (Σ loss / normaliser) and stats [8]: the 6 metrics (means over the
    unmasked tokens), the unmasked tokens, 1 / normaliser. The normaliser: the given one (already
    NaN on the host unless positive and finite), else this call's token count (token-mean), its
    number of sequences with an unmasked token (seq-mean-*) or 1 (token-sum), each at least 1."""
    rows = tl.arange(0, FINAL_BLOCK).to(tl.int64)
    cols = tl.arange(0, 8)
    acc = tl.zeros([FINAL_BLOCK, 8], tl.float32)
    seqs = tl.zeros([FINAL_BLOCK], tl.float32)
    for r0 in range(0, num_sequences, FINAL_BLOCK):
        r = r0 + rows
        inside = r < num_sequences
        part = tl.load(partial_ptr + r[:, None] * 8 + cols[None, :], mask=inside[:, None], other=0.0, volatile=True)
        acc += part
        n_b = tl.sum(tl.where(cols[None, :] == 1, part, 0.0), axis=1)
        seqs += tl.where(inside & (n_b > 0.0), 1.0, 0.0)
    totals = tl.sum(acc, axis=0)
    loss_sum = tl.sum(tl.where(cols == 0, totals, 0.0), axis=0)
    count = tl.sum(tl.where(cols == 1, totals, 0.0), axis=0)
    if HAS_NORMALISER:
        denom = tl.load(normaliser_ptr).to(tl.float32)
    elif AGG == _AGG_TOKEN_SUM:
        denom = 1.0
    elif AGG == _AGG_TOKEN_MEAN:
        denom = tl.maximum(count, 1.0)
    else:
        denom = tl.maximum(tl.sum(seqs, axis=0), 1.0)
    scale = 1.0 / denom
    tl.store(loss_ptr, loss_sum * scale)
    tl.store(stats_ptr + cols - 2, totals / tl.maximum(count, 1.0), mask=cols >= 2)
    tl.store(stats_ptr + 6, count)
    tl.store(stats_ptr + 7, scale)


@triton.jit
def _count_nonzero(ptr, n, BLOCK: tl.constexpr):
    """The nonzero entries of ``ptr[0:n]`` (uint8), as fp32 (exact up to 2^24)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        at = start + offs
        acc += (tl.load(ptr + at, mask=at < n, other=0) != 0).to(tl.int32)
    return tl.sum(acc, axis=0).to(tl.float32)


@triton.jit
def _policy_loss_from_logits_kernel(
    logits_ptr,
    stride_outer,
    stride_inner,
    inner_size,
    grad_ptr,
    grad_stride_outer,
    grad_stride_inner,
    targets_ptr,
    old_ptr,
    adv_ptr,
    weight_ptr,
    mask_ptr,
    normaliser_ptr,
    ref_ptr,
    iw_ptr,
    logp_ptr,
    entropy_ptr,
    partial_ptr,
    loss_ptr,
    stats_ptr,
    n_vocab,
    inv_t,
    lo,
    hi,
    delta,
    dual_c,
    tau_pos,
    tau_neg,
    kl_coef,
    kl_clamp,
    entropy_coef,
    is_hi,
    is_lo,
    row_scale,
    seq_len,
    n_rows,
    rows_per_program,
    LOSS: tl.constexpr,
    KL: tl.constexpr,
    KL_BIAS_CORRECTION: tl.constexpr,
    KL_TIMES_IS_WEIGHTS: tl.constexpr,
    IS: tl.constexpr,
    CISPO_TWO_SIDED: tl.constexpr,
    ON_POLICY: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    FINALIZE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    IW_PER_TOKEN: tl.constexpr,
    NORMALISER: tl.constexpr,
    BLOCK_V: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,
):
    # Persistent: a few rows in flight per SM, so a row read by the online pass is still in L2
    # when the gradient sweep reads it again. Each program sums its rows' terms in registers.
    pid = tl.program_id(0)
    # Without per-token weights every unmasked token weighs row_scale / normaliser. A call's own
    # token count is counted by every program (N mask bytes, from L2 after the first), so the
    # host runs no op for it and the rows need no second pass.
    base_weight = 0.0
    if not HAS_WEIGHT:
        if NORMALISER == _NORMALISER_TENSOR:
            base_weight = row_scale / tl.load(normaliser_ptr).to(tl.float32)
        elif NORMALISER == _NORMALISER_UNMASKED_ROWS:
            if HAS_MASK:
                base_weight = row_scale / tl.maximum(_count_nonzero(mask_ptr, n_rows, COUNT_BLOCK), 1.0)
            else:
                base_weight = row_scale / n_rows  # n_rows >= 1: an empty call launches nothing
        else:
            base_weight = row_scale
    s_loss = 0.0
    s_n = 0.0
    s_low = 0.0
    s_high = 0.0
    s_dual = 0.0
    s_akl = 0.0
    s_ratio = 0.0
    s_kl = 0.0
    s_ent = 0.0
    for k in range(0, rows_per_program):
        row = pid.to(tl.int64) + k * tl.num_programs(0)
        if row < n_rows:
            if HAS_WEIGHT:
                weight = tl.load(weight_ptr + row)
            elif HAS_MASK:
                weight = tl.where(tl.load(mask_ptr + row) != 0, base_weight, 0.0)
            else:
                weight = base_weight
            seq = row // seq_len if not (ADV_PER_TOKEN and IW_PER_TOKEN) else row
            adv_at = row if ADV_PER_TOKEN else seq
            iw_at = row if IW_PER_TOKEN else seq
            t_loss, t_n, t_low, t_high, t_dual, t_akl, t_ratio, t_kl, t_ent = _policy_loss_from_logits_row(
                row,
                logits_ptr,
                stride_outer,
                stride_inner,
                inner_size,
                grad_ptr,
                grad_stride_outer,
                grad_stride_inner,
                targets_ptr,
                old_ptr,
                adv_ptr + adv_at,
                weight,
                ref_ptr,
                iw_ptr + iw_at,
                logp_ptr,
                entropy_ptr,
                n_vocab,
                inv_t,
                lo,
                hi,
                delta,
                dual_c,
                tau_pos,
                tau_neg,
                kl_coef,
                kl_clamp,
                entropy_coef,
                is_hi,
                is_lo,
                LOSS,
                KL,
                KL_BIAS_CORRECTION,
                KL_TIMES_IS_WEIGHTS,
                IS,
                CISPO_TWO_SIDED,
                ON_POLICY,
                COMPUTE_GRAD,
                WITH_ENTROPY,
                BLOCK_V,
            )
            s_loss += t_loss
            s_n += t_n
            s_low += t_low
            s_high += t_high
            s_dual += t_dual
            s_akl += t_akl
            s_ratio += t_ratio
            s_kl += t_kl
            s_ent += t_ent
    out = partial_ptr + pid * 9  # FUSED_PARTIALS, in this order
    tl.store(out + 0, s_loss)
    tl.store(out + 1, s_n)
    tl.store(out + 2, s_low)
    tl.store(out + 3, s_high)
    tl.store(out + 4, s_dual)
    tl.store(out + 5, s_akl)
    tl.store(out + 6, s_ratio)
    tl.store(out + 7, s_kl)
    tl.store(out + 8, s_ent)
    if FINALIZE:
        # As in the policy-loss kernel: the last program sums every program's partials in one
        # fixed order (the rows each program takes are fixed, so the loss is deterministic).
        programs = tl.num_programs(0)
        ticket = tl.atomic_add(partial_ptr + programs * 9, 1.0, sem="acq_rel")
        if ticket == programs - 1:
            cols = tl.arange(0, 16)
            acc = tl.zeros([16], tl.float32)
            for p in range(0, programs):
                acc += tl.load(partial_ptr + p * 9 + cols, mask=cols < 9, other=0.0, volatile=True)
            count = tl.sum(tl.where(cols == 1, acc, 0.0), axis=0)
            tl.store(loss_ptr, tl.sum(tl.where(cols == 0, acc, 0.0), axis=0))
            # stats: the 6 metrics and the entropy (means over the unmasked tokens), the count.
            tl.store(stats_ptr + cols - 2, acc / tl.maximum(count, 1.0), mask=(cols >= 2) & (cols < 9))
            tl.store(stats_ptr + 7, count)


@triton.jit
def _policy_loss_from_logits_row(
    row,
    logits_ptr,
    stride_outer,
    stride_inner,
    inner_size,
    grad_ptr,
    grad_stride_outer,
    grad_stride_inner,
    targets_ptr,
    old_ptr,
    adv_at_ptr,
    weight,
    ref_ptr,
    iw_at_ptr,
    logp_ptr,
    entropy_ptr,
    n_vocab,
    inv_t,
    lo,
    hi,
    delta,
    dual_c,
    tau_pos,
    tau_neg,
    kl_coef,
    kl_clamp,
    entropy_coef,
    is_hi,
    is_lo,
    LOSS: tl.constexpr,
    KL: tl.constexpr,
    KL_BIAS_CORRECTION: tl.constexpr,
    KL_TIMES_IS_WEIGHTS: tl.constexpr,
    IS: tl.constexpr,
    CISPO_TWO_SIDED: tl.constexpr,
    ON_POLICY: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One token row (``adv_at_ptr`` / ``iw_at_ptr`` already at its advantage and IS weight,
    ``weight`` its aggregation weight): log-prob, entropy, loss gradient into the logits'
    gradient; returns the row's terms (weighted loss, then unmasked-token indicators of count, low, high, dual and the
    approx-KL, ratio, KL and entropy values, 0 for masked tokens)."""
    row_ptr = logits_ptr + _row_offset(row, stride_outer, stride_inner, inner_size)
    lse, entropy = _online_softmax_row(row_ptr, n_vocab, inv_t, WITH_ENTROPY, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = (target >= 0) & (target < n_vocab)  # unvalidated bad ids give NaN, never an out-of-bounds read
    lp = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32) * inv_t - lse
    lp = tl.where(valid, lp, float("nan"))
    tl.store(logp_ptr + row, lp)
    tl.store(entropy_ptr + row, entropy)

    # weight = mask · aggregation weight / normaliser: 0 exactly for masked tokens, whose other
    # inputs may be padding (±inf) and must not leak NaN into sums or gradients.
    m = weight != 0.0
    if ON_POLICY:  # old_logp = sg(logp): ρ = 1, with its gradient
        old = lp
    else:
        old = tl.load(old_ptr + row).to(tl.float32)
    adv = tl.load(adv_at_ptr).to(tl.float32)
    log_ratio = lp - old
    ratio = tl.exp(log_ratio)
    value, d_logp, low, high, dual = _token_local_loss(
        lp, ratio, adv, lo, hi, delta, dual_c, tau_pos, tau_neg, LOSS, CISPO_TWO_SIDED
    )
    if IS != _IS_NONE:
        iw = _importance_weight(tl.load(iw_at_ptr).to(tl.float32), is_hi, is_lo, IS)
        value = value * iw
        d_logp = d_logp * iw
    kl = 0.0
    if KL != _KL_NONE:
        ref = tl.load(ref_ptr + row).to(tl.float32)
        kl, d_kl = _kl_term(lp - ref, kl_clamp, KL)
        if KL_TIMES_IS_WEIGHTS:  # the launcher sets it only with IS weights
            kl = kl * iw
            d_kl = d_kl * iw
        if KL_BIAS_CORRECTION:  # d(ρ·k)/d logp = ρ·(k' + k)
            d_kl = ratio * (d_kl + kl)
            kl = kl * ratio
        value += kl_coef * kl
        d_logp += kl_coef * d_kl
    if COMPUTE_GRAD:
        g_logp = tl.where(m, weight * d_logp, 0.0)
        g_entropy = -entropy_coef * weight
        _write_logits_grad_row(
            row_ptr,
            grad_ptr + _row_offset(row, grad_stride_outer, grad_stride_inner, inner_size),
            n_vocab,
            inv_t,
            lse,
            entropy,
            target,
            g_logp,
            g_entropy,
            WITH_ENTROPY,
            BLOCK_V,
        )
    return (
        tl.where(m, weight * (value - entropy_coef * entropy), 0.0),
        tl.where(m, 1.0, 0.0),
        tl.where(m, low, 0.0),
        tl.where(m, high, 0.0),
        tl.where(m, dual, 0.0),
        tl.where(m, _exp_minus_one_minus(log_ratio), 0.0),
        tl.where(m, ratio, 0.0),
        tl.where(m, kl, 0.0),
        tl.where(m, entropy, 0.0),
    )


# ----------------------------------------------------------------------------- launchers


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def token_logprobs_fwd(
    logits,
    stride_outer: int,
    stride_inner: int,
    inner_size: int,
    rows: int,
    n_vocab: int,
    targets: torch.Tensor,
    temperature: float,
    vocab_start: int,
    with_entropy: bool,
    vocab_total: int | None = None,
):
    """Rows of ``logits`` addressed as (row // inner_size)·stride_outer + (row % inner_size)·stride_inner,
    unit stride along V; targets [rows] → (logp [rows], entropy [rows] or [0], lse [rows]), fp32."""
    dev = logits.device
    logp = torch.empty(rows, dtype=torch.float32, device=dev)
    lse = torch.empty(rows, dtype=torch.float32, device=dev)
    entropy = torch.empty(rows if with_entropy else 0, dtype=torch.float32, device=dev)
    if rows == 0:
        return logp, entropy, lse
    block = _vocab_block(n_vocab)
    _token_logprobs_fwd_kernel[(rows,)](
        logits,
        stride_outer,
        stride_inner,
        inner_size,
        targets,
        logp,
        entropy if with_entropy else lse,
        lse,
        n_vocab,
        vocab_start,
        vocab_total if vocab_total is not None else vocab_start + n_vocab,
        1.0 / temperature,
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block,
        num_warps=_num_warps(block),
    )
    return logp, entropy, lse


def token_logprobs_bwd(
    grad_logp,
    grad_entropy,
    logits,
    stride_outer,
    stride_inner,
    inner_size,
    out,
    out_stride_outer,
    out_stride_inner,
    rows: int,
    n_vocab: int,
    targets,
    lse,
    entropy,
    temperature: float,
    vocab_start: int,
) -> None:
    """Writes d loss / d logits into ``out`` (which may be ``logits`` itself)."""
    if rows == 0:
        return
    block = _vocab_block(n_vocab)
    has_gl, has_ge = grad_logp is not None, grad_entropy is not None
    _token_logprobs_bwd_kernel[(rows,)](
        logits,
        stride_outer,
        stride_inner,
        inner_size,
        out,
        out_stride_outer,
        out_stride_inner,
        targets,
        lse,
        entropy if has_ge else lse,
        grad_logp.contiguous() if has_gl else lse,
        grad_entropy.contiguous() if has_ge else lse,
        n_vocab,
        vocab_start,
        1.0 / temperature,
        HAS_GRAD_LOGP=has_gl,
        HAS_GRAD_ENTROPY=has_ge,
        BLOCK_V=block,
        num_warps=_num_warps(block),
    )


def policy_loss_fwd(logp, old_logp, advantages, mask, ref_logp, is_weights, cu_seqlens, normaliser, codes, scalars):
    """Contiguous per-token inputs (read flat: [N]) and per-sequence ones [B]; ``codes`` /
    ``scalars`` the :class:`~negkernels.ops.logprobs.PolicyKernelCodes` / ``PolicyKernelScalars``;
    ``normaliser`` a 0-d fp32 tensor or None (this call's own) → (loss 0-d, stats [8] = the 6
    metrics, the unmasked tokens, 1 / normaliser; d Σℓ / d logp [N] fp32 before normalisation, or
    [0]), all from one launch."""
    dev = logp.device
    n = logp.numel()
    num_sequences = codes.num_sequences
    grad = torch.empty(n if codes.compute_grad else 0, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty(POLICY_LOSS_PARTIALS, dtype=torch.float32, device=dev)
    if num_sequences == 0:  # no sequence, no launch: a zero loss and zero metrics
        loss.zero_()
        stats.zero_()
        stats[7] = 1.0 if normaliser is None else normaliser.reciprocal()
        return loss, stats, grad
    # The [B, 8] partials and, after them, the last-program ticket, zeroed in one op.
    partial = torch.zeros(num_sequences * POLICY_LOSS_PARTIALS + 1, dtype=torch.float32, device=dev)
    block = max(16, min(2048, next_power_of_2(max(codes.max_len, 1))))
    placeholder = logp
    _policy_loss_fwd_kernel[(num_sequences,)](
        logp_ptr=logp,
        old_ptr=old_logp,
        adv_ptr=advantages if advantages is not None else placeholder,
        mask_ptr=mask if mask is not None else placeholder,
        ref_ptr=ref_logp if ref_logp is not None else placeholder,
        iw_ptr=is_weights if is_weights is not None else placeholder,
        cu_ptr=cu_seqlens if cu_seqlens is not None else placeholder,
        partial_ptr=partial,
        grad_ptr=grad if codes.compute_grad else partial,
        loss_ptr=loss,
        stats_ptr=stats,
        normaliser_ptr=normaliser if normaliser is not None else stats,
        n_tokens=n,
        seq_len=codes.seq_len,
        max_len=codes.max_len,
        num_sequences=num_sequences,
        lo=scalars.lo,
        hi=scalars.hi,
        delta=scalars.delta,
        dual_c=scalars.dual_clip,
        tau_pos=scalars.tau_pos,
        tau_neg=scalars.tau_neg,
        npo_beta=scalars.npo_beta,
        kl_coef=scalars.kl_coef,
        kl_clamp=scalars.kl_clamp,
        is_hi=scalars.is_hi,
        is_lo=scalars.is_lo,
        norm_constant=scalars.norm_constant,
        LOSS=codes.loss,
        KL=codes.kl,
        KL_BIAS_CORRECTION=bool(codes.kl_bias_correction),
        KL_TIMES_IS_WEIGHTS=bool(codes.kl_times_is_weights),
        AGG=codes.aggregation,
        IS=codes.is_mode,
        PACKED=cu_seqlens is not None,
        HAS_MASK=mask is not None,
        ADV_PER_TOKEN=bool(codes.adv_per_token),
        IW_PER_TOKEN=bool(codes.iw_per_token),
        CISPO_TWO_SIDED=bool(codes.cispo_two_sided),
        SEQUENCE_RATIO=bool(codes.sequence_ratio),
        COMPUTE_GRAD=bool(codes.compute_grad),
        HAS_NORMALISER=normaliser is not None,
        BLOCK=block,
        FINAL_BLOCK=FINAL_ROWS,
        num_warps=4 if block <= 512 else 8,
    )
    return loss, stats, grad


def policy_loss_from_logits_fwd(
    logits,
    stride_outer,
    stride_inner,
    inner_size,
    grad,
    grad_stride_outer,
    grad_stride_inner,
    rows: int,
    n_vocab: int,
    targets,
    old_logp,
    advantages,
    weight,
    ref_logp,
    is_weights,
    codes,
    scalars,
    with_entropy: bool,
    finalize: bool = True,
    *,
    mask=None,
    normaliser=None,
    row_scale: float = 1.0,
    out_shape=None,
):
    """Token rows of logits; per-token inputs read flat by row, in any float dtype; advantages and
    IS weights per token or, with ``codes.adv_per_token`` / ``iw_per_token`` off, per sequence of
    ``codes.seq_len`` rows. The aggregation weight of a row: ``weight`` [rows] fp32 if given (mask ·
    aggregation weight / normaliser), else row_scale / normaliser for the rows that ``mask`` (uint8,
    optional) keeps, where the normaliser is ``normaliser`` (0-d) if given, else (from
    ``codes.aggregation``) this call's unmasked rows for token-mean, 1 for token-sum. ``codes`` /
    ``scalars`` as in :func:`policy_loss_fwd` → (logp [rows],
    entropy [rows] (0 unless ``with_entropy``), loss 0-d, stats [8] = the 6 metrics and the mean
    entropy over the unmasked tokens, then their count); with ``codes.compute_grad`` the logits'
    gradient for an incoming gradient of 1 goes to ``grad`` (which may be ``logits``). Without
    ``finalize``, loss and stats are not written and the third result is the programs' raw
    partial sums [P, 9] (loss, count, the 6 metric sums, the entropy sum) for a caller that adds
    up several launches. ``out_shape``: the shape of logp and entropy (default [rows])."""
    dev = logits.device
    shape = (rows,) if out_shape is None else out_shape
    logp = torch.empty(*shape, dtype=torch.float32, device=dev)  # sizes unpacked: parsed faster than a Size
    entropy = torch.empty(*shape, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    stats = torch.empty(POLICY_LOSS_PARTIALS, dtype=torch.float32, device=dev)
    if rows == 0:
        loss.zero_()
        stats.zero_()
        return (logp, entropy, loss, stats) if finalize else (logp, entropy, stats.new_zeros((1, 9)), None)
    if normaliser is not None or weight is not None:
        source = NormaliserSource.TENSOR
    elif codes.aggregation == Aggregation.TOKEN_MEAN:
        source = NormaliserSource.UNMASKED_ROWS
    elif codes.aggregation == Aggregation.TOKEN_SUM:
        source = NormaliserSource.ONE
    else:
        raise ValueError(
            f"normaliser: required for aggregation code {codes.aggregation} (only token-mean and "
            "token-sum count their own)"
        )
    block = _vocab_block(n_vocab, FUSED_MAX_BLOCK_V)
    sms = _backend.sm_count(logits.device)
    # The interpreter still walks the persistent loop with a few programs.
    programs = min(rows, FUSED_PROGRAMS_PER_SM * sms if sms is not None else 4)
    # Per-program partial sums and, after them, the last-program ticket, zeroed in one op.
    partial = torch.zeros(programs * 9 + 1, dtype=torch.float32, device=dev)
    placeholder = old_logp if old_logp is not None else targets  # old_logp None: on-policy
    _policy_loss_from_logits_kernel[(programs,)](
        logits_ptr=logits,
        stride_outer=stride_outer,
        stride_inner=stride_inner,
        inner_size=inner_size,
        grad_ptr=grad,
        grad_stride_outer=grad_stride_outer,
        grad_stride_inner=grad_stride_inner,
        targets_ptr=targets,
        old_ptr=placeholder,
        adv_ptr=advantages,
        weight_ptr=weight if weight is not None else placeholder,
        mask_ptr=mask if mask is not None else placeholder,
        normaliser_ptr=normaliser if normaliser is not None else placeholder,
        ref_ptr=ref_logp if ref_logp is not None else placeholder,
        iw_ptr=is_weights if is_weights is not None else placeholder,
        logp_ptr=logp,
        entropy_ptr=entropy,
        partial_ptr=partial,
        loss_ptr=loss,
        stats_ptr=stats,
        n_vocab=n_vocab,
        inv_t=1.0 / scalars.temperature,
        lo=scalars.lo,
        hi=scalars.hi,
        delta=scalars.delta,
        dual_c=scalars.dual_clip,
        tau_pos=scalars.tau_pos,
        tau_neg=scalars.tau_neg,
        kl_coef=scalars.kl_coef,
        kl_clamp=scalars.kl_clamp,
        entropy_coef=scalars.entropy_coef,
        is_hi=scalars.is_hi,
        is_lo=scalars.is_lo,
        row_scale=row_scale,
        seq_len=max(codes.seq_len, 1),
        n_rows=rows,
        rows_per_program=cdiv(rows, programs),
        LOSS=codes.loss,
        KL=codes.kl,
        KL_BIAS_CORRECTION=bool(codes.kl_bias_correction),
        KL_TIMES_IS_WEIGHTS=bool(codes.kl_times_is_weights),
        IS=codes.is_mode,
        CISPO_TWO_SIDED=bool(codes.cispo_two_sided),
        ON_POLICY=bool(codes.on_policy),
        COMPUTE_GRAD=bool(codes.compute_grad),
        WITH_ENTROPY=with_entropy,
        FINALIZE=finalize,
        HAS_WEIGHT=weight is not None,
        HAS_MASK=mask is not None,
        ADV_PER_TOKEN=bool(codes.adv_per_token),
        IW_PER_TOKEN=bool(codes.iw_per_token) or is_weights is None,
        NORMALISER=source,
        BLOCK_V=block,
        COUNT_BLOCK=MASK_COUNT_BLOCK,
        num_warps=FUSED_NUM_WARPS if block >= 8192 else _num_warps(block),
    )
    if finalize:
        return logp, entropy, loss, stats
    return logp, entropy, partial[:-1].view(programs, 9), None


# ----------------------------------------------------------------------------- fused linear (LM head)
#
# The logits of a chunk of tokens are computed by cuBLAS into one reused [C, V] buffer, the Triton
# row kernels above turn them into log-probs / losses and write the logits' gradient over that
# buffer, and two more cuBLAS products turn the gradient chunk into d hidden (written once per
# token) and d weight (accumulated over chunks). Peak extra memory is the buffer, d weight and
# d hidden; the full [N, V] logits never exist. The matmuls are where the time goes (3·2·N·H·V
# flops), so they stay on cuBLAS; what is fused is everything between them.

LINEAR_WORKSPACE_BYTES = 512 * 2**20  # the chunk buffers' budget
# torch.mm / addmm(out_dtype=torch.float32): fp32 products of half-precision inputs in one cuBLAS
# call (torch >= 2.8). Decided from the operator registry of the installed torch, not by trying
# a call: an exception (an out-of-memory error, say) must never switch the fp32 path off.
MM_OUT_DTYPE = all("dtype_out" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def linear_chunk_rows(rows: int, n_vocab: int, bytes_per_logit: int, chunk_size: int = 0) -> int:
    """Tokens per chunk: ``chunk_size`` if given, else the most that fit the workspace budget,
    balanced so the last chunk is not a sliver."""
    if rows == 0:
        return 0
    if chunk_size > 0:
        return min(chunk_size, rows)
    cap = max(1, LINEAR_WORKSPACE_BYTES // max(1, n_vocab * bytes_per_logit))
    chunks = cdiv(rows, cap)
    per = cdiv(rows, chunks)
    return min(rows, cap, cdiv(per, 16) * 16) if cap >= 16 else per


def _mm_fp32(a: torch.Tensor, b_t: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b_t for half-precision a, b_t: the products of bf16/fp16 values are exact in
    fp32, so only the output rounding differs from the half-precision matmul."""
    if a.is_cuda and MM_OUT_DTYPE:
        torch.mm(a, b_t, out_dtype=torch.float32, out=out)
        return
    # Fallback: upcast one vocabulary slice of the weight at a time (bounded temporaries).
    a32 = a.float()
    step = max(1, (64 * 2**20) // max(1, 4 * b_t.shape[0]))
    for s in range(0, b_t.shape[1], step):
        out[:, s : s + step].copy_(a32 @ b_t[:, s : s + step].float())


def linear_logits_into(hidden_rows: torch.Tensor, weight: torch.Tensor, bias, out: torch.Tensor) -> None:
    """out [c, V] = hidden_rows [c, H] @ weight[V, H]ᵀ (+ bias), fp32 accumulation, in out's dtype."""
    if out.dtype == hidden_rows.dtype:
        if bias is None:
            torch.mm(hidden_rows, weight.t(), out=out)
        else:
            torch.addmm(bias, hidden_rows, weight.t(), out=out)
        return
    _mm_fp32(hidden_rows, weight.t(), out)
    if bias is not None:
        out.add_(bias.float())


def _chunk_buffers(rows, hidden, weight, logits_dtype, chunk_size, with_grad):
    """(tokens per chunk, logits buffer [C, V], gradient buffer: the logits buffer itself when the
    dtypes agree, else a separate one in the weight's dtype)."""
    n_vocab = weight.shape[0]
    separate = with_grad and logits_dtype != weight.dtype
    per_logit = torch.finfo(logits_dtype).bits // 8 + (weight.element_size() if separate else 0)
    c = linear_chunk_rows(rows, n_vocab, per_logit, chunk_size)
    buf = torch.empty((max(c, 1), n_vocab), dtype=logits_dtype, device=hidden.device)
    grad_buf = torch.empty((max(c, 1), n_vocab), dtype=weight.dtype, device=hidden.device) if separate else buf
    return c, buf, grad_buf


class _GradAccumulator:
    """d hidden rows written chunk by chunk; d weight and d bias summed over chunks (d bias in fp32)."""

    def __init__(self, hidden, weight, bias, need_hidden, need_weight, need_bias):
        self.hidden, self.weight = hidden, weight
        dense = torch.contiguous_format  # row slices of d hidden are matmul outputs
        self.dh = torch.empty_like(hidden, memory_format=dense) if need_hidden else hidden.new_empty((0,))
        self.dw = torch.empty_like(weight, memory_format=dense) if need_weight else weight.new_empty((0,))
        self.db32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        self.bias_dtype = bias.dtype if bias is not None else weight.dtype
        self.first = True

    def add(self, start: int, grad_logits: torch.Tensor) -> None:
        rows = grad_logits.shape[0]
        if self.dh.numel():
            torch.mm(grad_logits, self.weight, out=self.dh[start : start + rows])
        if self.dw.numel():
            h = self.hidden[start : start + rows]
            if self.first:
                torch.mm(grad_logits.t(), h, out=self.dw)
            else:
                self.dw.addmm_(grad_logits.t(), h)
        if self.db32 is not None:
            self.db32 += grad_logits.sum(0, dtype=torch.float32)
        self.first = False

    def result(self):
        if self.first and self.dw.numel():
            self.dw.zero_()  # no tokens: the weight's gradient is 0
        db = self.db32.to(self.bias_dtype) if self.db32 is not None else self.weight.new_empty((0,))
        return self.dh, self.dw, db


def linear_token_logprobs_fwd(
    hidden,
    weight,
    bias,
    targets,
    temperature: float,
    vocab_start: int,
    vocab_total: int,
    with_entropy: bool,
    logits_dtype: torch.dtype,
    chunk_size: int = 0,
):
    """hidden [N, H], weight [V, H] (the slice [vocab_start, vocab_start + V) of vocab_total ids),
    bias [V] or None, targets [N] → (logp [N], entropy [N] or [0], lse [N]), fp32."""
    rows, n_vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    logp = torch.empty(rows, dtype=torch.float32, device=dev)
    lse = torch.empty(rows, dtype=torch.float32, device=dev)
    entropy = torch.empty(rows if with_entropy else 0, dtype=torch.float32, device=dev)
    c, buf, _ = _chunk_buffers(rows, hidden, weight, logits_dtype, chunk_size, with_grad=False)
    for start in range(0, rows, max(c, 1)):
        r = min(c, rows - start)
        x = buf[:r]
        linear_logits_into(hidden[start : start + r], weight, bias, x)
        lp, ent, ls = token_logprobs_fwd(
            x,
            0,
            n_vocab,
            r,
            r,
            n_vocab,
            targets[start : start + r],
            temperature,
            vocab_start,
            with_entropy,
            vocab_total,
        )
        logp[start : start + r] = lp
        lse[start : start + r] = ls
        if with_entropy:
            entropy[start : start + r] = ent
    return logp, entropy, lse


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation whatever the dtype of a and b."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not a.is_cuda:
        acc.addmm_(a.float(), b.float())
    elif MM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))  # older torch: the product rounds once to the half dtype


def linear_vocab_slice(rows: int, n_vocab: int, bytes_per_logit: int) -> int:
    """Vocabulary rows per slice for ``rows`` tokens: as many as keep a [rows, slice] buffer within
    the workspace budget (a multiple of 16, at least 16)."""
    fit = LINEAR_WORKSPACE_BYTES // max(1, rows * bytes_per_logit)
    return max(1, min(n_vocab, max(16, fit // 16 * 16)))


def linear_token_logprobs_bwd(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    temperature: float,
    vocab_start: int,
    logits_dtype: torch.dtype,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
):
    """Gradients from the saved log-sum-exp (and entropy), vocabulary slice by vocabulary slice:
    → (d hidden [N, H] or [0], d weight [V, H] or [0], d bias [V] or [0]) in the inputs' dtypes.

    The outer loop runs over slices of the vocabulary, the inner one over token chunks (by default
    one chunk of all tokens). Each slice's d weight is then one product over every token with fp32
    accumulation (or an fp32 accumulator across token chunks), and d hidden is summed over the
    slices in fp32: nothing is accumulated in half precision. Same flops as the token-outer order.
    """
    rows, n_hidden, n_vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
    dev = hidden.device
    dense = torch.contiguous_format
    dh = torch.empty_like(hidden, memory_format=dense) if need_hidden else hidden.new_empty((0,))
    dw = torch.empty_like(weight, memory_format=dense) if need_weight else weight.new_empty((0,))
    db32 = torch.zeros(n_vocab, dtype=torch.float32, device=dev) if need_bias else None
    if rows == 0 or not (need_hidden or need_weight or need_bias):
        if need_hidden:
            dh.zero_()
        if need_weight:
            dw.zero_()
        return dh, dw, db32.to(bias.dtype) if db32 is not None else weight.new_empty((0,))
    dh32 = (
        dh
        if hidden.dtype == torch.float32
        else (torch.empty((rows, n_hidden), dtype=torch.float32, device=dev) if need_hidden else None)
    )
    if need_hidden and dh32 is not None:  # dh32 is None only when no d hidden is wanted
        dh32.zero_()
    separate = logits_dtype != weight.dtype
    per_logit = torch.finfo(logits_dtype).bits // 8 + (weight.element_size() if separate else 0)
    tokens = min(chunk_size, rows) if chunk_size > 0 else rows
    width = linear_vocab_slice(tokens, n_vocab, per_logit)
    buf = torch.empty(tokens * width, dtype=logits_dtype, device=dev)
    grad_buf = torch.empty(tokens * width, dtype=weight.dtype, device=dev) if separate else buf
    one_chunk = tokens == rows
    acc = None if one_chunk or not need_weight else torch.empty((width, n_hidden), dtype=torch.float32, device=dev)
    for s in range(0, n_vocab, width):
        vs = min(width, n_vocab - s)
        w_s = weight[s : s + vs]
        if acc is not None:
            acc[:vs].zero_()
        for start in range(0, rows, tokens):
            r = min(tokens, rows - start)
            x, g = buf[: r * vs].view(r, vs), grad_buf[: r * vs].view(r, vs)
            h_c = hidden[start : start + r]
            linear_logits_into(h_c, w_s, bias[s : s + vs] if bias is not None else None, x)
            token_logprobs_bwd(
                grad_logp[start : start + r] if grad_logp is not None else None,
                grad_entropy[start : start + r] if grad_entropy is not None else None,
                x,
                0,
                vs,
                r,
                g,
                0,
                vs,
                r,
                vs,
                targets[start : start + r],
                lse[start : start + r],
                entropy[start : start + r] if entropy is not None else None,
                temperature,
                vocab_start + s,
            )
            if need_hidden and dh32 is not None:
                _addmm_fp32(dh32[start : start + r], g, w_s)
            if need_weight:
                if one_chunk:
                    torch.mm(g.t(), h_c, out=dw[s : s + vs])
                elif acc is not None:  # several chunks: d weight accumulates in fp32
                    _addmm_fp32(acc[:vs], g.t(), h_c)
            if db32 is not None:
                db32[s : s + vs] += g.sum(0, dtype=torch.float32)
        if acc is not None:
            dw[s : s + vs].copy_(acc[:vs])
    if need_hidden and dh32 is not None and dh32 is not dh:
        dh.copy_(dh32)
    return dh, dw, db32.to(bias.dtype) if db32 is not None else weight.new_empty((0,))


def linear_policy_loss_fwd(
    hidden,
    weight,
    bias,
    targets,
    old_logp,
    advantages,
    token_weight,
    ref_logp,
    is_weights,
    *,
    logits_dtype: torch.dtype,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    codes,
    scalars,
    with_entropy: bool,
):
    """The token-local policy loss of every token, fused with the LM head, chunk by chunk: per-token
    fp32 [N] inputs as in :func:`policy_loss_from_logits_fwd` → (logp [N], entropy [N], loss, stats
    [8] as there, d hidden, d weight, d bias for an incoming gradient of 1, each empty when not
    needed)."""
    rows, n_vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    compute_grad = need_hidden or need_weight or need_bias
    codes = codes._replace(compute_grad=int(compute_grad))
    logp = torch.empty(rows, dtype=torch.float32, device=dev)
    entropy = torch.empty(rows, dtype=torch.float32, device=dev)
    sums = torch.zeros(9, dtype=torch.float32, device=dev)
    acc = _GradAccumulator(hidden, weight, bias, need_hidden, need_weight, need_bias)
    c, buf, grad_buf = _chunk_buffers(rows, hidden, weight, logits_dtype, chunk_size, with_grad=compute_grad)

    def part(t, s, r):
        return t[s : s + r] if t is not None else None

    for start in range(0, rows, max(c, 1)):
        r = min(c, rows - start)
        x, g = buf[:r], grad_buf[:r]
        linear_logits_into(hidden[start : start + r], weight, bias, x)
        lp, ent, partial, _ = policy_loss_from_logits_fwd(
            x,
            0,
            n_vocab,
            r,
            g,
            0,
            n_vocab,
            r,
            n_vocab,
            targets[start : start + r],
            part(old_logp, start, r),
            advantages[start : start + r],
            token_weight[start : start + r],
            part(ref_logp, start, r),
            part(is_weights, start, r),
            codes,
            scalars,
            with_entropy,
            finalize=False,
        )
        logp[start : start + r] = lp
        entropy[start : start + r] = ent
        sums += partial.sum(0)  # chunks and programs in a fixed order: deterministic
        if compute_grad:
            acc.add(start, g)
    dh, dw, db = acc.result()
    count = sums[1].clamp_min(1.0)
    stats = torch.cat([sums[2:] / count, sums[1:2]])
    return logp, entropy, sums[0].clone(), stats, dh, dw, db
