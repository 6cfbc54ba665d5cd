"""Triton kernel for the pairwise preference losses (see :func:`negkernels.preference_loss`).

``_preference_loss_kernel``: one program per block of pairs. A first sweep over each response's
tokens sums the (masked, optionally confidence-weighted) policy and reference log-probs in fp64, so
the log-ratio difference h = (s_w − s_ref,w) − (s_l − s_ref,l) of sums over a thousand tokens keeps
its digits; the pair's loss and d loss / d sequence value are then computed in fp32, and a second
sweep writes every token's gradient (so the backward is a scale by the incoming gradient). The
last program to finish adds up every program's partial sums in a fixed order into the mean or sum
of the losses and the pair summaries, so nothing runs on the host after the kernel. A
[B] input of sequence sums is a [B, 1] one. Hyper-parameters are runtime scalars; the loss type
and which inputs are present are compile-time variants.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _backend
from ..reference.preference import FLT_MIN, PreferenceLossType
from . import cdiv, next_power_of_2

# The kernel's loss codes by name (values from negkernels.reference.preference).
_LOSS_SIGMOID: tl.constexpr = tl.constexpr(int(PreferenceLossType.SIGMOID))
_LOSS_ROBUST: tl.constexpr = tl.constexpr(int(PreferenceLossType.ROBUST))
_LOSS_HINGE: tl.constexpr = tl.constexpr(int(PreferenceLossType.HINGE))
_LOSS_IPO: tl.constexpr = tl.constexpr(int(PreferenceLossType.IPO))
_LOSS_EXO_PAIR: tl.constexpr = tl.constexpr(int(PreferenceLossType.EXO_PAIR))
_LOSS_NCA_PAIR: tl.constexpr = tl.constexpr(int(PreferenceLossType.NCA_PAIR))
_LOSS_BCO_PAIR: tl.constexpr = tl.constexpr(int(PreferenceLossType.BCO_PAIR))
_LOSS_SPPO_HARD: tl.constexpr = tl.constexpr(int(PreferenceLossType.SPPO_HARD))
_LOSS_APO_ZERO: tl.constexpr = tl.constexpr(int(PreferenceLossType.APO_ZERO))
_LOSS_APO_DOWN: tl.constexpr = tl.constexpr(int(PreferenceLossType.APO_DOWN))
_LOSS_DISCOPOP: tl.constexpr = tl.constexpr(int(PreferenceLossType.DISCOPOP))
_LOSS_SIMPO: tl.constexpr = tl.constexpr(int(PreferenceLossType.SIMPO))
_LOSS_ORPO: tl.constexpr = tl.constexpr(int(PreferenceLossType.ORPO))
_LOSS_KTO: tl.constexpr = tl.constexpr(int(PreferenceLossType.KTO))
_LOSS_NPO: tl.constexpr = tl.constexpr(int(PreferenceLossType.NPO))
_FLT_MIN: tl.constexpr = tl.constexpr(FLT_MIN)

# Most tokens one program holds at once (BLOCK_B × BLOCK_T).
_TILE = 4096


@triton.jit
def _log_sigmoid(x):
    # min(x, 0) − log(1 + e^{−|x|}): no overflow for either sign.
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid_slope(x):
    # σ'(x) = σ(x)·σ(−x): no 1 − σ(x) rounding to 0 for large x
    return tl.sigmoid(x) * tl.sigmoid(-x)


@triton.jit
def _expm1_nonpositive(x):
    """e^x − 1 for x ≤ 0 without cancellation near 0 (a Taylor series where |x| < 1/2)."""
    series = 1.0 + x / 12.0
    series = 1.0 + x / 11.0 * series
    series = 1.0 + x / 10.0 * series
    series = 1.0 + x / 9.0 * series
    series = 1.0 + x / 8.0 * series
    series = 1.0 + x / 7.0 * series
    series = 1.0 + x / 6.0 * series
    series = 1.0 + x / 5.0 * series
    series = 1.0 + x / 4.0 * series
    series = 1.0 + x / 3.0 * series
    series = 1.0 + x / 2.0 * series
    return tl.where(x > -0.5, x * series, tl.exp(x) - 1.0)


@triton.jit
def _log_odds(avg_logp):
    """(log odds ℓ − log(1 − e^ℓ), its derivative in ℓ); 1 − e^ℓ clamped at FLT_MIN as p → 1."""
    one_minus_p = -_expm1_nonpositive(avg_logp)
    clamped = one_minus_p <= _FLT_MIN
    safe = tl.maximum(one_minus_p, _FLT_MIN)
    return avg_logp - tl.log(safe), tl.where(clamped, 1.0, 1.0 / safe)


@triton.jit
def _token_weights(logp_ptr, mask_ptr, rows, cols, ok, sb, st, mask_sb, mask_st, HAS_MASK, CALIBRATE):
    """(log-probs, weight of each token): the mask, times p = e^{logp} when calibrating."""
    x = tl.load(logp_ptr + rows[:, None] * sb + cols[None, :] * st, mask=ok, other=0.0).to(tl.float32)
    w = ok.to(tl.float32)
    if HAS_MASK:
        m = tl.load(mask_ptr + rows[:, None] * mask_sb + cols[None, :] * mask_st, mask=ok, other=0)
        w = tl.where(m != 0, w, 0.0)
    if CALIBRATE:
        w = w * tl.exp(x)
    return x, w


@triton.jit
def _sequence_value(
    logp_ptr,
    mask_ptr,
    ref_ptr,
    rows,
    row_ok,
    T,
    sb,
    st,
    mask_sb,
    mask_st,
    ref_sb,
    ref_st,
    HAS_MASK: tl.constexpr,
    HAS_REF: tl.constexpr,
    REF_PER_TOKEN: tl.constexpr,
    NORMALIZE: tl.constexpr,
    CALIBRATE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """(policy value, reference value, divisor) per row; the sums in fp64, the value Σ w·x / divisor."""
    policy = tl.zeros([BLOCK_B], dtype=tl.float64)
    reference = tl.zeros([BLOCK_B], dtype=tl.float64)
    weight = tl.zeros([BLOCK_B], dtype=tl.float64)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < T)
        x, w = _token_weights(logp_ptr, mask_ptr, rows, cols, ok, sb, st, mask_sb, mask_st, HAS_MASK, CALIBRATE)
        policy += tl.sum((w * x).to(tl.float64), axis=1)
        weight += tl.sum(w.to(tl.float64), axis=1)
        if HAS_REF and REF_PER_TOKEN:
            r = tl.load(ref_ptr + rows[:, None] * ref_sb + cols[None, :] * ref_st, mask=ok, other=0.0)
            reference += tl.sum((w * r.to(tl.float32)).to(tl.float64), axis=1)
    if HAS_REF and not REF_PER_TOKEN:
        reference = tl.load(ref_ptr + rows * ref_sb, mask=row_ok, other=0.0).to(tl.float64)
    if CALIBRATE:
        divisor = tl.maximum(weight, _FLT_MIN)
    elif NORMALIZE:
        divisor = tl.maximum(weight, 1.0)
    else:
        divisor = tl.full([BLOCK_B], 1.0, dtype=tl.float64)
    return policy / divisor, reference / divisor, divisor


@triton.jit
def _write_token_grads(
    grad_ptr,
    logp_ptr,
    mask_ptr,
    coef,
    rows,
    row_ok,
    T,
    sb,
    st,
    mask_sb,
    mask_st,
    HAS_MASK: tl.constexpr,
    CALIBRATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """grad[b, t] = coef[b]·weight[b, t] over a contiguous [rows, T] fp32 gradient."""
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < T)
        _, w = _token_weights(logp_ptr, mask_ptr, rows, cols, ok, sb, st, mask_sb, mask_st, HAS_MASK, CALIBRATE)
        tl.store(grad_ptr + rows[:, None] * T + cols[None, :], coef[:, None] * w, mask=ok)


@triton.jit
def _preference_loss_kernel(
    chosen_ptr,
    rejected_ptr,
    chosen_mask_ptr,
    rejected_mask_ptr,
    ref_chosen_ptr,
    ref_rejected_ptr,
    kto_reference_point_ptr,
    loss_ptr,
    stats_ptr,
    chosen_grad_ptr,
    rejected_grad_ptr,
    partial_ptr,
    num_chosen,
    num_rejected,
    num_programs,
    chosen_len,
    rejected_len,
    c_sb,
    c_st,
    r_sb,
    r_st,
    cm_sb,
    cm_st,
    rm_sb,
    rm_st,
    rc_sb,
    rc_st,
    rr_sb,
    rr_st,
    beta,
    label_smoothing,
    simpo_gamma,
    discopop_tau,
    exo_log_odds,
    robust_slope,
    kto_desirable_weight,
    kto_undesirable_weight,
    inv_pairs,
    loss_scale,
    LOSS: tl.constexpr,
    HAS_CHOSEN_MASK: tl.constexpr,
    HAS_REJECTED_MASK: tl.constexpr,
    HAS_REF: tl.constexpr,
    REF_CHOSEN_PER_TOKEN: tl.constexpr,
    REF_REJECTED_PER_TOKEN: tl.constexpr,
    NORMALIZE: tl.constexpr,
    CALIBRATE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    PAIRED: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    chosen_ok = rows < num_chosen
    rejected_ok = rows < num_rejected
    s_w, ref_w, div_w = _sequence_value(
        chosen_ptr, chosen_mask_ptr, ref_chosen_ptr, rows, chosen_ok, chosen_len,
        c_sb, c_st, cm_sb, cm_st, rc_sb, rc_st,
        HAS_CHOSEN_MASK, HAS_REF, REF_CHOSEN_PER_TOKEN, NORMALIZE, False, BLOCK_B, BLOCK_T,
    )  # fmt: skip
    s_l, ref_l, div_l = _sequence_value(
        rejected_ptr, rejected_mask_ptr, ref_rejected_ptr, rows, rejected_ok, rejected_len,
        r_sb, r_st, rm_sb, rm_st, rr_sb, rr_st,
        HAS_REJECTED_MASK, HAS_REF, REF_REJECTED_PER_TOKEN, NORMALIZE, CALIBRATE, BLOCK_B, BLOCK_T,
    )  # fmt: skip
    # Log-ratios differenced in fp64 (sums of many tokens cancel), the rest in fp32.
    r_w = (s_w - ref_w).to(tl.float32)
    r_l = (s_l - ref_l).to(tl.float32)
    h = (s_w - ref_w - s_l + ref_l).to(tl.float32)
    u = beta * h
    a = beta * r_w
    b = beta * r_l
    eps = label_smoothing
    zero = tl.zeros([BLOCK_B], dtype=tl.float32)
    loss = zero
    loss_l = zero  # kto's undesirable terms (its own outputs)
    d_w = zero  # d loss / d chosen value
    d_l = zero  # d loss / d rejected value
    # With log σ(−u) = log σ(u) − u the smoothed forms lose nothing to cancellation:
    # cDPO −(1−ε)·log σ(u) − ε·log σ(−u) = −log σ(u) + ε·u, and the robust loss
    # (−(1−ε)·log σ(u) + ε·log σ(−u)) / (1 − 2ε) = −log σ(u) − ε/(1 − 2ε)·u (exact even as ε → ½).
    if LOSS == _LOSS_SIGMOID:
        loss = -_log_sigmoid(u) + eps * u
        d_u = -tl.sigmoid(-u) + eps
        d_w = beta * d_u
        d_l = -beta * d_u
    elif LOSS == _LOSS_ROBUST:
        loss = -_log_sigmoid(u) - robust_slope * u
        d_u = -tl.sigmoid(-u) - robust_slope
        d_w = beta * d_u
        d_l = -beta * d_u
    elif LOSS == _LOSS_HINGE:
        loss = tl.maximum(1.0 - u, 0.0)
        d_u = tl.where(u < 1.0, -1.0, 0.0)
        d_w = beta * d_u
        d_l = -beta * d_u
    elif LOSS == _LOSS_IPO:
        gap = h - 0.5 / beta
        loss = gap * gap
        d_w = 2.0 * gap
        d_l = -2.0 * gap
    elif LOSS == _LOSS_EXO_PAIR:
        q = tl.sigmoid(u)
        loss = q * (_log_sigmoid(u) - tl.log(1.0 - eps)) + tl.sigmoid(-u) * (_log_sigmoid(-u) - tl.log(eps))
        d_u = _sigmoid_slope(u) * (u - exo_log_odds)
        d_w = beta * d_u
        d_l = -beta * d_u
    elif LOSS == _LOSS_NCA_PAIR:
        loss = -_log_sigmoid(a) - 0.5 * _log_sigmoid(-a) - 0.5 * _log_sigmoid(-b)
        d_w = beta * (-tl.sigmoid(-a) + 0.5 * tl.sigmoid(a))
        d_l = beta * 0.5 * tl.sigmoid(b)
    elif LOSS == _LOSS_BCO_PAIR:
        loss = -_log_sigmoid(a) - _log_sigmoid(-b)
        d_w = -beta * tl.sigmoid(-a)
        d_l = beta * tl.sigmoid(b)
    elif LOSS == _LOSS_SPPO_HARD:
        gap_w = r_w - 0.5 / beta
        gap_l = r_l + 0.5 / beta
        loss = gap_w * gap_w + gap_l * gap_l
        d_w = 2.0 * gap_w
        d_l = 2.0 * gap_l
    elif LOSS == _LOSS_APO_ZERO:
        sig_a = tl.sigmoid(a)
        sig_b = tl.sigmoid(b)
        loss = 1.0 - sig_a + sig_b
        d_w = -beta * _sigmoid_slope(a)
        d_l = beta * _sigmoid_slope(b)
    elif LOSS == _LOSS_APO_DOWN:
        sig_a = tl.sigmoid(a)
        sig_u = tl.sigmoid(u)
        loss = sig_a + 1.0 - sig_u
        d_w = beta * (_sigmoid_slope(a) - _sigmoid_slope(u))
        d_l = beta * _sigmoid_slope(u)
    elif LOSS == _LOSS_DISCOPOP:
        mix = tl.sigmoid(u / discopop_tau)
        log_sig_u = _log_sigmoid(u)
        modulated_exp = tl.exp(_log_sigmoid(u / discopop_tau) - u)  # σ(u/τ)·e^{−u}, no overflow
        loss = -log_sig_u * (1.0 - mix) + modulated_exp
        d_mix = _sigmoid_slope(u / discopop_tau) / discopop_tau
        d_u = -tl.sigmoid(-u) * (1.0 - mix) + log_sig_u * d_mix + modulated_exp * ((1.0 - mix) / discopop_tau - 1.0)
        d_w = beta * d_u
        d_l = -beta * d_u
    elif LOSS == _LOSS_SIMPO:
        v = beta * (s_w - s_l).to(tl.float32) - simpo_gamma
        loss = -_log_sigmoid(v) + eps * v
        d_v = -tl.sigmoid(-v) + eps
        d_w = beta * d_v
        d_l = -beta * d_v
    elif LOSS == _LOSS_ORPO:
        avg_w = s_w.to(tl.float32)
        odds_w, d_odds_w = _log_odds(avg_w)
        odds_l, d_odds_l = _log_odds(s_l.to(tl.float32))
        v = odds_w - odds_l
        loss = -avg_w - beta * _log_sigmoid(v)
        d_v = -beta * tl.sigmoid(-v)
        d_w = -1.0 + d_v * d_odds_w
        d_l = -d_v * d_odds_l
    elif LOSS == _LOSS_KTO:
        z = tl.load(kto_reference_point_ptr).to(tl.float32)
        loss = kto_desirable_weight * tl.sigmoid(beta * (z - r_w))  # 1 − σ(x) = σ(−x)
        loss_l = kto_undesirable_weight * tl.sigmoid(beta * (r_l - z))
        d_w = -kto_desirable_weight * beta * _sigmoid_slope(beta * (r_w - z))
        d_l = kto_undesirable_weight * beta * _sigmoid_slope(beta * (z - r_l))
    elif LOSS == _LOSS_NPO:
        loss = (2.0 / beta) * (tl.maximum(b, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(b))))
        d_l = 2.0 * tl.sigmoid(b)

    # This program's share of the loss sum (over the examples whose losses it computed).
    if LOSS == _LOSS_KTO:
        loss_sum = tl.sum(tl.where(chosen_ok, loss, 0.0), axis=0) + tl.sum(tl.where(rejected_ok, loss_l, 0.0), axis=0)
    elif LOSS == _LOSS_NPO:
        loss_sum = tl.sum(tl.where(rejected_ok, loss, 0.0), axis=0)
    else:
        loss_sum = tl.sum(tl.where(chosen_ok, loss, 0.0), axis=0)
    if not REDUCE:
        if LOSS == _LOSS_KTO:
            tl.store(loss_ptr + rows, loss, mask=chosen_ok)
            tl.store(loss_ptr + num_chosen + rows, loss_l, mask=rejected_ok)
        elif LOSS == _LOSS_NPO:
            tl.store(loss_ptr + rows, loss, mask=rejected_ok)
        else:
            tl.store(loss_ptr + rows, loss, mask=chosen_ok)
    # stats: chosen rewards, rejected rewards, chosen values, rejected values, then the reward
    # accuracy and margin over the pairs (written by the last program).
    if LOSS == _LOSS_SIMPO or LOSS == _LOSS_ORPO:
        reward_w = beta * s_w.to(tl.float32)
        reward_l = beta * s_l.to(tl.float32)
    else:
        reward_w = a
        reward_l = b
    tl.store(stats_ptr + rows, reward_w, mask=chosen_ok)
    tl.store(stats_ptr + num_chosen + rows, reward_l, mask=rejected_ok)
    tl.store(stats_ptr + num_chosen + num_rejected + rows, s_w.to(tl.float32), mask=chosen_ok)
    tl.store(stats_ptr + 2 * num_chosen + num_rejected + rows, s_l.to(tl.float32), mask=rejected_ok)
    margin_sum = tl.sum(tl.where(chosen_ok, reward_w - reward_l, 0.0), axis=0)
    wins_sum = tl.sum(tl.where(chosen_ok & (reward_w > reward_l), 1.0, 0.0), axis=0)
    slot = tl.arange(0, 4)
    partial = tl.where(slot == 0, loss_sum, tl.where(slot == 1, margin_sum, tl.where(slot == 2, wins_sum, 0.0)))
    tl.store(partial_ptr + tl.program_id(0) * 4 + slot, partial)
    # The last program to finish sums every program's partials in one fixed order (same bits
    # every run) and writes the reduced loss and the pair summaries: no host ops after the kernel.
    # Its acq_rel ticket (the fp32 word after the partials, zeroed with them) orders the other
    # programs' partial stores before its loads, which are volatile so that no stale line is read.
    ticket = tl.atomic_add(partial_ptr + num_programs * 4, 1.0, sem="acq_rel")
    if ticket == num_programs - 1:
        totals = tl.zeros([FINAL_BLOCK, 4], tl.float32)
        program = tl.arange(0, FINAL_BLOCK)
        for p0 in range(0, num_programs, FINAL_BLOCK):
            inside = (p0 + program) < num_programs
            offsets = (p0 + program)[:, None] * 4 + slot[None, :]
            totals += tl.load(partial_ptr + offsets, mask=inside[:, None], other=0.0, volatile=True)
        total = tl.sum(totals, axis=0)
        if REDUCE:
            tl.store(loss_ptr, tl.sum(tl.where(slot == 0, total, 0.0), axis=0) * loss_scale)
        # reward accuracy and margin: means over the pairs, NaN for a batch that does not pair them
        accuracy = tl.sum(tl.where(slot == 2, total, 0.0), axis=0) * inv_pairs
        margin = tl.sum(tl.where(slot == 1, total, 0.0), axis=0) * inv_pairs
        if not PAIRED:
            accuracy = float("nan")
            margin = float("nan")
        summaries = 2 * (num_chosen + num_rejected)
        tl.store(stats_ptr + summaries, accuracy)
        tl.store(stats_ptr + summaries + 1, margin)
    if COMPUTE_GRAD:
        # d loss / d token = (d loss / d value) · weight / divisor, times the reduction's scale (1/N for a mean)
        _write_token_grads(
            chosen_grad_ptr, chosen_ptr, chosen_mask_ptr, (d_w * loss_scale / div_w).to(tl.float32), rows, chosen_ok,
            chosen_len, c_sb, c_st, cm_sb, cm_st, HAS_CHOSEN_MASK, False, BLOCK_T,
        )  # fmt: skip
        _write_token_grads(
            rejected_grad_ptr, rejected_ptr, rejected_mask_ptr, (d_l * loss_scale / div_l).to(tl.float32), rows,
            rejected_ok,
            rejected_len, r_sb, r_st, rm_sb, rm_st, HAS_REJECTED_MASK, CALIBRATE, BLOCK_T,
        )  # fmt: skip


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[B] sequence sums as [B, 1] token rows (a view)."""
    return x[:, None] if x.dim() == 1 else x


def _mask_arg(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return like
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _strides(x: torch.Tensor | None) -> tuple[int, int]:
    if x is None:
        return 0, 0
    if x.dim() == 1:
        return x.stride(0), 0
    return x.stride(0), x.stride(1)


def preference_loss_fwd(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_mask: torch.Tensor | None,
    rejected_mask: torch.Tensor | None,
    kto_reference_point: torch.Tensor | None,
    loss_code: int,
    reduction: str,
    length_normalize: bool,
    calibrate: bool,
    compute_grad: bool,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float,
    discopop_tau: float,
    kto_desirable_weight: float,
    kto_undesirable_weight: float,
):
    """One launch: (loss, stats, d loss / d chosen tokens, d loss / d rejected tokens), all fp32.
    ``loss`` is the per-example losses for ``reduction="none"``, else their mean or sum (0-d), and
    the token gradients are those of that loss. ``stats`` is [B_w chosen rewards | B_l rejected
    rewards | B_w chosen values | B_l rejected values | reward accuracy | reward margin], the last
    two means over the pairs (NaN unpaired, 0 for no pairs).

    ``chosen`` may have zero rows (npo without chosen responses; kto with no desirable one)."""
    dev = rejected.device
    c, r = _as_rows(chosen), _as_rows(rejected)
    num_chosen, chosen_len = c.shape
    num_rejected, rejected_len = r.shape
    kto = loss_code == int(PreferenceLossType.KTO)
    npo = loss_code == int(PreferenceLossType.NPO)
    paired = not npo and num_chosen == num_rejected
    num_losses = num_chosen + num_rejected if kto else (num_rejected if npo else num_chosen)

    def f32(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, device=dev)

    reduce = reduction != "none"
    loss = f32() if reduce else f32(num_losses)
    stats = f32(2 * (num_chosen + num_rejected) + 2)
    # Without a gradient the token gradients are empty and the kernel skips writing them.
    chosen_grad = f32(*chosen.shape) if compute_grad else f32(*(0,) * chosen.dim())
    rejected_grad = f32(*rejected.shape) if compute_grad else f32(*(0,) * rejected.dim())
    rows = max(num_chosen, num_rejected)
    if rows == 0:  # no example: a zero loss, and summaries over no pairs
        loss.zero_()
        stats.fill_(0.0 if paired else math.nan)
        return loss, stats, chosen_grad, rejected_grad
    block_t = min(next_power_of_2(max(chosen_len, rejected_len, 1)), 1024)
    block_b = max(1, min(next_power_of_2(rows), _TILE // block_t, 64))
    # Fewer rows a program until the grid covers every SM: each program streams its rows' tokens,
    # so 64 programs of 4 rows (256 pairs of 4,096 tokens) would leave half an H100 without loads.
    sms = _backend.sm_count(dev)
    while sms and block_b > 1 and cdiv(rows, block_b) < sms:
        block_b //= 2
    num_programs = cdiv(rows, block_b)
    # Each program's [loss, margin, wins, -] sums, then the last-program ticket, zeroed in one op.
    partials = torch.zeros(num_programs * 4 + 1, dtype=torch.float32, device=dev)
    has_ref = ref_rejected is not None
    c_sb, c_st = c.stride()
    r_sb, r_st = r.stride()
    cm_sb, cm_st = _strides(chosen_mask)
    rm_sb, rm_st = _strides(rejected_mask)
    rc_sb, rc_st = _strides(ref_chosen)
    rr_sb, rr_st = _strides(ref_rejected)
    eps = label_smoothing
    _preference_loss_kernel[(num_programs,)](
        chosen_ptr=c,
        rejected_ptr=r,
        chosen_mask_ptr=_mask_arg(chosen_mask, r),
        rejected_mask_ptr=_mask_arg(rejected_mask, r),
        ref_chosen_ptr=ref_chosen if ref_chosen is not None else r,
        ref_rejected_ptr=ref_rejected if has_ref else r,
        # read by kto only: any fp32 tensor stands in otherwise
        kto_reference_point_ptr=kto_reference_point if kto_reference_point is not None else loss,
        loss_ptr=loss,
        stats_ptr=stats,
        chosen_grad_ptr=chosen_grad,
        rejected_grad_ptr=rejected_grad,
        partial_ptr=partials,
        num_chosen=num_chosen,
        num_rejected=num_rejected,
        num_programs=num_programs,
        chosen_len=chosen_len,
        rejected_len=rejected_len,
        c_sb=c_sb,
        c_st=c_st,
        r_sb=r_sb,
        r_st=r_st,
        cm_sb=cm_sb,
        cm_st=cm_st,
        rm_sb=rm_sb,
        rm_st=rm_st,
        rc_sb=rc_sb,
        rc_st=rc_st,
        rr_sb=rr_sb,
        rr_st=rr_st,
        beta=float(beta),
        label_smoothing=float(eps),
        simpo_gamma=float(simpo_gamma),
        discopop_tau=float(discopop_tau),
        # exo_pair's u − log((1 − ε)/ε); only that loss reads it (ε > 0 there)
        exo_log_odds=math.log((1.0 - eps) / eps) if 0.0 < eps < 1.0 else 0.0,
        # ε/(1 − 2ε) in fp64 on the host: an fp32 ε near ½ would move 1 − 2ε by 1e-4 relative
        robust_slope=eps / (1.0 - 2.0 * eps),
        kto_desirable_weight=float(kto_desirable_weight),
        kto_undesirable_weight=float(kto_undesirable_weight),
        inv_pairs=1.0 / num_chosen if paired else 0.0,
        loss_scale=1.0 / num_losses if reduction == "mean" else 1.0,
        LOSS=loss_code,
        HAS_CHOSEN_MASK=chosen_mask is not None,
        HAS_REJECTED_MASK=rejected_mask is not None,
        HAS_REF=has_ref,
        REF_CHOSEN_PER_TOKEN=ref_chosen is not None and ref_chosen.dim() == 2,
        REF_REJECTED_PER_TOKEN=ref_rejected is not None and ref_rejected.dim() == 2,
        NORMALIZE=length_normalize,
        CALIBRATE=calibrate,
        COMPUTE_GRAD=compute_grad,
        PAIRED=paired,
        REDUCE=reduce,
        BLOCK_B=block_b,
        BLOCK_T=block_t,
        FINAL_BLOCK=min(next_power_of_2(num_programs), 256),
        num_warps=4,
    )
    return loss, stats, chosen_grad, rejected_grad
