"""Triton kernels for group-normalized advantages and the group discriminative loss.

Three kernels, each one launch:

* ``_group_advantages_uniform_kernel``: contiguous groups of ``group_size`` with a per-group divisor
  (or none). One program owns whole groups, so no atomics and no cross-program traffic.
* ``_group_advantages_segmented_kernel``: ragged ``group_index`` in any order, or anything that needs
  batch statistics. A persistent grid walks the rewards in phases separated by a grid barrier.
  Group sums are accumulated with *integer* atomics on fixed-point values (each group scaled by
  its own power of two from its largest |r|): integer addition is associative, so the statistics
  are bit-identical run to run, and an fp32 reward times a power of two converts to int64
  exactly, so the sums are exact down to 2^-(61-log2 N) of the group's largest |r| — far tighter
  than an fp32 running sum.

* ``_group_discriminative_kernel``: DisCO / DisCO-b over ragged groups, forward and gradient in
  one persistent launch (the same grid barrier): member sums, the negatives' log-sum-exp, each
  group's objective, then every score's gradient. Its sums are fp64 atomics (a loss, not a
  statistic that must be bit-identical: the fp32 results repeat unless a sum rounds at an fp32
  boundary).

The advantage kernels compute statistics and the per-element formula in fp64 and store fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._fixedpoint import exponent_bound, headroom_bits
from ..reference.advantages import ESTIMATORS, SCALES
from . import cdiv, next_power_of_2

# Kernel codes are positions in the reference's tuples; csrc/advantages.h names the same codes
# (enum Estimator, enum Scale) and tests/test_kernel_codes.py holds the three in step.
ESTIMATOR_CODES = {name: i for i, name in enumerate(ESTIMATORS)}
SCALE_CODES = {name: i for i, name in enumerate(SCALES)}
_ESTIMATOR_GRPO = tl.constexpr(ESTIMATOR_CODES["grpo"])
_ESTIMATOR_RLOO = tl.constexpr(ESTIMATOR_CODES["rloo"])
_ESTIMATOR_NGRPO = tl.constexpr(ESTIMATOR_CODES["ngrpo"])
_SCALE_GROUP = tl.constexpr(SCALE_CODES["group"])
_SCALE_BATCH = tl.constexpr(SCALE_CODES["batch"])
_SCALE_NONE = tl.constexpr(SCALE_CODES["none"])
_SCALE_WHITEN = tl.constexpr(SCALE_CODES["whiten"])
MAX_UNIFORM_GROUP = 4096


@triton.jit
def _pow2(e):
    # Exact fp64 2**e for integer e in [-1022, 1023], built from the exponent bits (exp2 is not exact).
    return ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _abs_bits(x):
    # |x| as its fp32 bit pattern: non-negative floats order like their bits; NaN sorts above inf.
    return (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _exponent_bound(abs_bits):
    # Smallest E with |x| < 2**E for every finite x whose |x| has these bits (or less).
    return ((abs_bits >> 23) & 0xFF).to(tl.int32) - 126


@triton.jit
def _numerator(r, n, mean, vmax, kvirt, ESTIMATOR: tl.constexpr):
    d = r - mean
    if ESTIMATOR == _ESTIMATOR_NGRPO:
        # centre on the group augmented with kvirt copies of vmax: a baseline even for one member
        return r - (n * mean + kvirt * vmax) / (n + kvirt)
    if ESTIMATOR == _ESTIMATOR_RLOO:
        a = n / tl.maximum(n - 1.0, 1.0) * d
    else:
        a = d
    return tl.where(n < 2.0, d * 0.0, a)


@triton.jit
def _group_spread(n, mean, m2, vmax, kvirt, ESTIMATOR: tl.constexpr):
    if ESTIMATOR == _ESTIMATOR_NGRPO:
        mean_aug = (n * mean + kvirt * vmax) / (n + kvirt)
        m2_aug = m2 + n * (mean - mean_aug) * (mean - mean_aug) + kvirt * (vmax - mean_aug) * (vmax - mean_aug)
        return tl.sqrt(m2_aug / tl.maximum(n + kvirt - 1.0, 1.0))
    return tl.where(n >= 2.0, tl.sqrt(m2 / tl.maximum(n - 1.0, 1.0)), 0.0)


@triton.jit
def _finish(
    base,
    n,
    zero_or_nan,
    pos_ptr,
    neg_ptr,
    offs,
    mask,
    pos_value,
    neg_value,
    ESTIMATOR: tl.constexpr,
    PER_SAMPLE_SIGN_SCALES: tl.constexpr,
):
    if ESTIMATOR != _ESTIMATOR_NGRPO:  # a group of one has no baseline (NGRPO's augmented group has)
        base = tl.where(n < 2.0, zero_or_nan, base)
    if PER_SAMPLE_SIGN_SCALES:
        pos = tl.load(pos_ptr + offs, mask=mask, other=1.0).to(tl.float64)
        neg = tl.load(neg_ptr + offs, mask=mask, other=1.0).to(tl.float64)
    else:
        pos = pos_value
        neg = neg_value
    return tl.where(base > 0, base * pos, tl.where(base < 0, base * neg, base))


@triton.jit
def _group_advantages_uniform_kernel(
    rewards_ptr,
    out_ptr,
    mean_ptr,
    std_ptr,
    count_ptr,
    pos_ptr,
    neg_ptr,
    num_groups,
    group_size,
    eps,
    vmax,
    kvirt,
    pos_value,
    neg_value,
    ESTIMATOR: tl.constexpr,
    SCALE: tl.constexpr,
    PER_SAMPLE_SIGN_SCALES: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    groups = pid * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_G)
    gmask = groups < num_groups
    offs = groups.to(tl.int64)[:, None] * group_size + cols[None, :]
    mask = gmask[:, None] & (cols[None, :] < group_size)
    r = tl.load(rewards_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    n = tl.cast(group_size, tl.float64)
    mean = tl.sum(r, axis=1) / n
    d = tl.where(mask, r - mean[:, None], 0.0)
    m2 = tl.sum(d * d, axis=1)
    nb = tl.zeros_like(r) + n
    a = _numerator(r, nb, mean[:, None], vmax, kvirt, ESTIMATOR)
    if SCALE == _SCALE_GROUP:
        base = a / (_group_spread(n, mean, m2, vmax, kvirt, ESTIMATOR)[:, None] + eps)
    else:
        base = a
    adv = _finish(
        base, nb, d * 0.0, pos_ptr, neg_ptr, offs, mask, pos_value, neg_value, ESTIMATOR, PER_SAMPLE_SIGN_SCALES
    )
    tl.store(out_ptr + offs, adv.to(tl.float32), mask=mask)
    tl.store(mean_ptr + groups, mean.to(tl.float32), mask=gmask)
    tl.store(std_ptr + groups, _group_spread(n, mean, m2, vmax, kvirt, _ESTIMATOR_GRPO).to(tl.float32), mask=gmask)
    tl.store(count_ptr + groups, tl.zeros_like(groups).to(tl.int64) + group_size, mask=gmask)


@triton.jit
def _grid_barrier(arrive_ptr, generation_ptr, num_programs):
    # Reusable barrier for a persistent grid (every program resident). The last program to arrive
    # resets the arrival count and bumps the generation; the others wait for the bump. The state
    # returns to "no arrivals" after every barrier, so the workspace never needs re-zeroing.
    tl.debug_barrier()
    generation = tl.atomic_add(generation_ptr, 0, sem="acquire")
    arrived = tl.atomic_add(arrive_ptr, 1, sem="acq_rel")
    if arrived == num_programs - 1:
        tl.atomic_xchg(arrive_ptr, 0, sem="relaxed")
        tl.atomic_add(generation_ptr, 1, sem="release")
    else:
        current = tl.atomic_add(generation_ptr, 0, sem="acquire")
        while current == generation:
            current = tl.atomic_add(generation_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _load_group(rewards_ptr, group_index_ptr, offs, n_rewards, num_groups, group_size, UNIFORM: tl.constexpr):
    mask = offs < n_rewards
    if UNIFORM:
        ids = offs // group_size
    else:
        ids = tl.load(group_index_ptr + offs, mask=mask, other=0).to(tl.int64)
    valid = mask & (ids >= 0) & (ids < num_groups)
    ids = tl.where(valid, ids, 0)
    r = tl.load(rewards_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return ids, valid, mask, r


@triton.jit
def _group_mean(work_ptr, slots, ids, mask, headroom):
    # Mean from the fixed-point sum; NaN when the group holds a non-finite reward.
    count = tl.load(work_ptr + 0 * slots + ids, mask=mask, other=1, cache_modifier=".cg").to(tl.float64)
    abs_bits = tl.load(work_ptr + 1 * slots + ids, mask=mask, other=0, cache_modifier=".cg")
    total = tl.load(work_ptr + 2 * slots + ids, mask=mask, other=0, cache_modifier=".cg")
    e = _exponent_bound(abs_bits)
    mean = total.to(tl.float64) * _pow2(e - (62 - headroom)) / tl.maximum(count, 1.0)
    mean = tl.where(abs_bits >= 0x7F800000, float("nan"), mean)
    return count, mean, e


@triton.jit
def _square_quanta(x, e, headroom, mask):
    # x is a deviation with |x| < 2**(e+1), so x² < 2**(2e+2): fixed-point x² below 2**(62-headroom).
    q = x * x * _pow2((62 - headroom) - (2 * e + 2))
    return tl.where(mask & (q == q), q, 0.0).to(tl.int64)


@triton.jit
def _read_spread_m2(work_ptr, slots, ids, mask, e, headroom):
    sq = tl.load(work_ptr + 3 * slots + ids, mask=mask, other=0, cache_modifier=".cg")
    return sq.to(tl.float64) * _pow2((2 * e + 2) - (62 - headroom))


@triton.jit
def _group_advantages_segmented_kernel(
    rewards_ptr,
    group_index_ptr,
    out_ptr,
    mean_ptr,
    std_ptr,
    count_ptr,
    pos_ptr,
    neg_ptr,
    work_ptr,
    barrier_ptr,
    batch_stats_ptr,
    n_rewards,
    num_groups,
    group_size,
    headroom,
    vmax_exponent,
    eps,
    vmax,
    kvirt,
    pos_value,
    neg_value,
    ESTIMATOR: tl.constexpr,
    SCALE: tl.constexpr,
    UNIFORM: tl.constexpr,
    PER_SAMPLE_SIGN_SCALES: tl.constexpr,
    EXTERNAL_BATCH_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # work: int64 [4, slots]; rows = count, max |r| bits, fixed-point sum, fixed-point sum of
    # squared deviations. Slot num_groups holds the batch's rewards, slot num_groups+1 the batch's
    # numerators (whitening).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    slots = num_groups + 2
    batch = num_groups
    whiten = num_groups + 1
    NEED_BATCH: tl.constexpr = (SCALE == _SCALE_BATCH or SCALE == _SCALE_WHITEN) and not EXTERNAL_BATCH_STATS
    arrive_ptr = barrier_ptr
    generation_ptr = barrier_ptr + 1
    lanes = tl.arange(0, BLOCK).to(tl.int64)

    # phase 0: clear the accumulators
    for start in range(pid * BLOCK, 4 * slots, nprog * BLOCK):
        o = start + lanes
        tl.store(work_ptr + o, tl.zeros_like(o).to(tl.int64), mask=o < 4 * slots)
    _grid_barrier(arrive_ptr, generation_ptr, nprog)

    # phase 1: counts and largest |r| per group (and for the batch). Every accumulation is a
    # relaxed atomic: integer adds and maxes commute, and the grid barrier after each phase (a
    # block barrier, then an acq_rel arrival) orders them before any program reads the sums,
    # which it does through L2 (.cg). acq_rel here would put a fence behind every element.
    for start in range(pid * BLOCK, n_rewards, nprog * BLOCK):
        offs = start + lanes
        ids, valid, mask, r = _load_group(
            rewards_ptr, group_index_ptr, offs, n_rewards, num_groups, group_size, UNIFORM
        )
        bits = _abs_bits(r)
        tl.atomic_add(work_ptr + ids, tl.full(ids.shape, 1, tl.int64), mask=valid, sem="relaxed")
        tl.atomic_max(work_ptr + slots + ids, bits, mask=valid, sem="relaxed")
        if NEED_BATCH:
            # Rewards whose id is out of range (unvalidated input) get NaN and join no statistic.
            tl.atomic_add(work_ptr + batch, tl.sum(valid.to(tl.int64), axis=0), sem="relaxed")
            tl.atomic_max(work_ptr + slots + batch, tl.max(tl.where(valid, bits, 0), axis=0), sem="relaxed")
    _grid_barrier(arrive_ptr, generation_ptr, nprog)

    # phase 2: fixed-point sums; r·2**(62-headroom-E) is exact and < 2**(62-headroom)
    for start in range(pid * BLOCK, n_rewards, nprog * BLOCK):
        offs = start + lanes
        ids, valid, mask, r = _load_group(
            rewards_ptr, group_index_ptr, offs, n_rewards, num_groups, group_size, UNIFORM
        )
        r64 = r.to(tl.float64)
        e = _exponent_bound(tl.load(work_ptr + slots + ids, mask=valid, other=0, cache_modifier=".cg"))
        q = tl.where(valid & (r == r) & (tl.abs(r) < float("inf")), r64 * _pow2((62 - headroom) - e), 0.0).to(tl.int64)
        tl.atomic_add(work_ptr + 2 * slots + ids, q, mask=valid, sem="relaxed")
        if NEED_BATCH:
            eb = _exponent_bound(tl.load(work_ptr + slots + batch, cache_modifier=".cg"))
            qb = tl.where(valid & (r == r) & (tl.abs(r) < float("inf")), r64 * _pow2((62 - headroom) - eb), 0.0).to(
                tl.int64
            )
            tl.atomic_add(work_ptr + 2 * slots + batch, tl.sum(qb, axis=0), sem="relaxed")
    _grid_barrier(arrive_ptr, generation_ptr, nprog)

    # phase 3: squared deviations from the group (and batch) mean; numerators' sum for whitening
    for start in range(pid * BLOCK, n_rewards, nprog * BLOCK):
        offs = start + lanes
        ids, valid, mask, r = _load_group(
            rewards_ptr, group_index_ptr, offs, n_rewards, num_groups, group_size, UNIFORM
        )
        r64 = r.to(tl.float64)
        n, mean, e = _group_mean(work_ptr, slots, ids, valid, headroom)
        tl.atomic_add(
            work_ptr + 3 * slots + ids, _square_quanta(r64 - mean, e, headroom, valid), mask=valid, sem="relaxed"
        )
        if NEED_BATCH:
            bids = tl.zeros_like(ids) + batch
            _, bmean, be = _group_mean(work_ptr, slots, bids, valid, headroom)
            if SCALE == _SCALE_BATCH:
                tl.atomic_add(
                    work_ptr + 3 * slots + batch,
                    tl.sum(_square_quanta(r64 - bmean, be, headroom, valid), axis=0),
                    sem="relaxed",
                )
            else:
                # |numerator| < 4·max(|r|max, |vmax|) = 2**ea
                ea = tl.maximum(be, vmax_exponent) + 2
                a = _numerator(r64, n, mean, vmax, kvirt, ESTIMATOR)
                qa = tl.where(valid & (a == a), a * _pow2((62 - headroom) - ea), 0.0).to(tl.int64)
                tl.atomic_add(work_ptr + 2 * slots + whiten, tl.sum(qa, axis=0), sem="relaxed")
    _grid_barrier(arrive_ptr, generation_ptr, nprog)

    if NEED_BATCH and SCALE == _SCALE_WHITEN:
        # phase 4: squared deviations of the numerators from their batch mean
        for start in range(pid * BLOCK, n_rewards, nprog * BLOCK):
            offs = start + lanes
            ids, valid, mask, r = _load_group(
                rewards_ptr, group_index_ptr, offs, n_rewards, num_groups, group_size, UNIFORM
            )
            n, mean, e = _group_mean(work_ptr, slots, ids, valid, headroom)
            a = _numerator(r.to(tl.float64), n, mean, vmax, kvirt, ESTIMATOR)
            nb = tl.load(work_ptr + batch, cache_modifier=".cg").to(tl.float64)
            bbits = tl.load(work_ptr + slots + batch, cache_modifier=".cg")
            ea = tl.maximum(_exponent_bound(bbits), vmax_exponent) + 2
            wmean = (
                tl.load(work_ptr + 2 * slots + whiten, cache_modifier=".cg").to(tl.float64)
                * _pow2(ea - (62 - headroom))
                / tl.maximum(nb, 1.0)
            )
            tl.atomic_add(
                work_ptr + 3 * slots + whiten,
                tl.sum(_square_quanta(a - wmean, ea, headroom, valid), axis=0),
                sem="relaxed",
            )
        _grid_barrier(arrive_ptr, generation_ptr, nprog)

    # phase 5: advantages
    if NEED_BATCH:
        nb = tl.load(work_ptr + batch, cache_modifier=".cg").to(tl.float64)
        bbits = tl.load(work_ptr + slots + batch, cache_modifier=".cg")
        be = _exponent_bound(bbits)
        if SCALE == _SCALE_BATCH:
            center = 0.0
            m2b = tl.load(work_ptr + 3 * slots + batch, cache_modifier=".cg").to(tl.float64) * _pow2(
                (2 * be + 2) - (62 - headroom)
            )
        else:
            ea = tl.maximum(be, vmax_exponent) + 2
            center = (
                tl.load(work_ptr + 2 * slots + whiten, cache_modifier=".cg").to(tl.float64)
                * _pow2(ea - (62 - headroom))
                / tl.maximum(nb, 1.0)
            )
            m2b = tl.load(work_ptr + 3 * slots + whiten, cache_modifier=".cg").to(tl.float64) * _pow2(
                (2 * ea + 2) - (62 - headroom)
            )
        spread = tl.where(nb >= 2.0, tl.sqrt(m2b / tl.maximum(nb - 1.0, 1.0)), 0.0)
        spread = tl.where(bbits >= 0x7F800000, float("nan"), spread)
    elif EXTERNAL_BATCH_STATS:
        center = tl.load(batch_stats_ptr).to(tl.float64)
        spread = tl.load(batch_stats_ptr + 1).to(tl.float64)
        if SCALE == _SCALE_BATCH:
            center = 0.0
    else:
        center = 0.0
        spread = 0.0
    for start in range(pid * BLOCK, n_rewards, nprog * BLOCK):
        offs = start + lanes
        ids, valid, mask, r = _load_group(
            rewards_ptr, group_index_ptr, offs, n_rewards, num_groups, group_size, UNIFORM
        )
        r64 = r.to(tl.float64)
        n, mean, e = _group_mean(work_ptr, slots, ids, valid, headroom)
        a = _numerator(r64, n, mean, vmax, kvirt, ESTIMATOR)
        if SCALE == _SCALE_GROUP:
            m2 = _read_spread_m2(work_ptr, slots, ids, valid, e, headroom)
            base = a / (_group_spread(n, mean, m2, vmax, kvirt, ESTIMATOR) + eps)
        elif SCALE == _SCALE_NONE:
            base = a
        else:
            base = (a - center) / (spread + eps)
        adv = _finish(
            base,
            n,
            (r64 - mean) * 0.0,
            pos_ptr,
            neg_ptr,
            offs,
            mask,
            pos_value,
            neg_value,
            ESTIMATOR,
            PER_SAMPLE_SIGN_SCALES,
        )
        adv = tl.where(valid, adv, float("nan"))
        tl.store(out_ptr + offs, adv.to(tl.float32), mask=mask)
    for start in range(pid * BLOCK, num_groups, nprog * BLOCK):
        g = start + lanes
        gm = g < num_groups
        n, mean, e = _group_mean(work_ptr, slots, g, gm, headroom)
        m2 = _read_spread_m2(work_ptr, slots, g, gm, e, headroom)
        mean = tl.where(n > 0.0, mean, 0.0)
        tl.store(mean_ptr + g, mean.to(tl.float32), mask=gm)
        std = _group_spread(n, mean, m2, vmax, kvirt, _ESTIMATOR_GRPO)
        std = tl.where(mean == mean, std, float("nan"))
        tl.store(std_ptr + g, std.to(tl.float32), mask=gm)
        tl.store(count_ptr + g, n.to(tl.int64), mask=gm)


_barriers: dict = {}


def _barrier_workspace(device: torch.device) -> torch.Tensor:
    # One zeroed (arrive, generation) pair per device and stream: the barrier leaves it ready for
    # the next launch, and launches on different streams never share one.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws = _barriers.get(key)
    if ws is None:
        ws = torch.zeros(2, dtype=torch.int32, device=device)
        _barriers[key] = ws
    return ws


def group_advantages_fwd(
    rewards: torch.Tensor,
    group_index: torch.Tensor | None,
    group_size: int,
    num_groups: int,
    estimator: str,
    scale: str,
    eps: float,
    virtual_max_reward: float,
    num_virtual: int,
    positive_scale: float,
    negative_scale: float,
    positive_scale_tensor: torch.Tensor | None,
    negative_scale_tensor: torch.Tensor | None,
    batch_stats: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch one kernel; returns (advantages fp32 [N], mean fp32 [G], std fp32 [G], count int64 [G])."""
    n = rewards.numel()
    dev = rewards.device
    rewards = rewards.contiguous()
    out = torch.empty(n, dtype=torch.float32, device=dev)
    mean = torch.empty(num_groups, dtype=torch.float32, device=dev)
    std = torch.empty(num_groups, dtype=torch.float32, device=dev)
    count = torch.empty(num_groups, dtype=torch.int64, device=dev)
    if n == 0 and num_groups == 0:
        return out, mean, std, count
    per_sample = positive_scale_tensor is not None or negative_scale_tensor is not None
    if per_sample:
        # Only when one side is per-sample and the other a scalar does the scalar need a tensor.
        per_sample_like = positive_scale_tensor if positive_scale_tensor is not None else negative_scale_tensor
        assert per_sample_like is not None
        pos_t = positive_scale_tensor
        if pos_t is None:
            pos_t = torch.full_like(per_sample_like, positive_scale)
        neg_t = negative_scale_tensor
        if neg_t is None:
            neg_t = torch.full_like(per_sample_like, negative_scale)
        pos_t, neg_t = pos_t.contiguous(), neg_t.contiguous()
    else:
        pos_t = neg_t = rewards  # never read: PER_SAMPLE_SIGN_SCALES is off
    est, sc = ESTIMATOR_CODES[estimator], SCALE_CODES[scale]
    uniform = group_index is None
    if uniform and sc in (0, 2) and 0 < group_size <= MAX_UNIFORM_GROUP:
        block_g = next_power_of_2(group_size)
        gpp = max(1, min(64, 4096 // block_g))
        grid = (cdiv(num_groups, gpp),)
        _group_advantages_uniform_kernel[grid](
            rewards,
            out,
            mean,
            std,
            count,
            pos_t,
            neg_t,
            num_groups,
            group_size,
            float(eps),
            float(virtual_max_reward),
            float(num_virtual),
            float(positive_scale),
            float(negative_scale),
            ESTIMATOR=est,
            SCALE=sc,
            PER_SAMPLE_SIGN_SCALES=per_sample,
            GROUPS_PER_PROGRAM=gpp,
            BLOCK_G=block_g,
            num_warps=4 if block_g * gpp <= 1024 else 8,
        )
        return out, mean, std, count

    block = 1024
    slots = num_groups + 2
    sms = _backend.sm_count(dev)
    # The interpreter runs programs one after another: a grid barrier needs one.
    grid_size = 1 if sms is None else max(1, min(cdiv(max(n, 4 * slots), block), sms))
    work = torch.empty(4 * slots, dtype=torch.int64, device=dev)
    headroom = headroom_bits(n)
    external = batch_stats is not None
    bstats = batch_stats.to(device=dev, dtype=torch.float64).contiguous() if batch_stats is not None else work
    gi = group_index.contiguous() if group_index is not None else rewards
    _group_advantages_segmented_kernel[(grid_size,)](
        rewards,
        gi,
        out,
        mean,
        std,
        count,
        pos_t,
        neg_t,
        work,
        _barrier_workspace(dev),
        bstats,
        n,
        num_groups,
        max(group_size, 1),
        headroom,
        exponent_bound(virtual_max_reward if estimator == "ngrpo" else 0.0),
        float(eps),
        float(virtual_max_reward),
        float(num_virtual),
        float(positive_scale),
        float(negative_scale),
        ESTIMATOR=est,
        SCALE=sc,
        UNIFORM=uniform,
        PER_SAMPLE_SIGN_SCALES=per_sample,
        EXTERNAL_BATCH_STATS=external,
        BLOCK=block,
        num_warps=8,
        # On a GPU, a cooperative launch: the driver refuses a grid whose programs cannot all be
        # resident at once (another kernel holding SMs, MPS or green contexts) instead of the
        # grid barrier waiting forever for programs that never start.
        **({"launch_cooperative_grid": True} if sms is not None else {}),
    )
    return out, mean, std, count


# ------------------------------------------------------------------ group discriminative loss
# work (fp64) rows of num_groups: positives, negatives, Σ_{S+} w, Σ_{S+} w·s, Σ_{S−} e^{s/τ − max}
# (disco) or Σ_{S−} s (disco_b); then the objective sum and the non-empty group count.
DISCO_WORK_ROWS = 5
_DISCO_ROWS = tl.constexpr(DISCO_WORK_ROWS)


@triton.jit
def _discriminative_members(
    scores_ptr, correct_ptr, ids_ptr, weights_ptr, offs, n, num_groups, HAS_WEIGHTS: tl.constexpr
):
    inside = offs < n
    ids = tl.load(ids_ptr + offs, mask=inside, other=0).to(tl.int64)
    # an unvalidated id outside [0, num_groups) joins no group and gets gradient 0
    valid = inside & (ids >= 0) & (ids < num_groups)
    ids = tl.where(valid, ids, 0)
    s = tl.load(scores_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    correct = tl.load(correct_ptr + offs, mask=valid, other=0) != 0
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        w = tl.full(s.shape, 1.0, tl.float32)
    return ids, valid, valid & correct, valid & (correct == 0), s, w


@triton.jit
def _group_discriminative_kernel(
    scores_ptr,
    correct_ptr,
    ids_ptr,
    weights_ptr,
    grad_ptr,
    loss_ptr,
    work_ptr,
    neg_max_ptr,
    barrier_ptr,
    n,
    num_groups,
    tau,
    DISCO: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    arrive_ptr = barrier_ptr
    generation_ptr = barrier_ptr + 1
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    g_rows = _DISCO_ROWS * num_groups
    objective_ptr = work_ptr + g_rows
    present_ptr = work_ptr + g_rows + 1
    inv_tau = 1.0 / tau

    # phase 0: clear the accumulators
    for start in range(pid * BLOCK, g_rows + 2, nprog * BLOCK):
        o = start + lanes
        tl.store(work_ptr + o, tl.zeros_like(o).to(tl.float64), mask=o < g_rows + 2)
    for start in range(pid * BLOCK, num_groups, nprog * BLOCK):
        o = start + lanes
        tl.store(neg_max_ptr + o, tl.full(o.shape, float("-inf"), tl.float32), mask=o < num_groups)
    _grid_barrier(arrive_ptr, generation_ptr, nprog)

    # phase 1: member counts, the positives' weighted sums, the negatives' max (disco) or sum
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + lanes
        ids, valid, pos, neg, s, w = _discriminative_members(
            scores_ptr, correct_ptr, ids_ptr, weights_ptr, offs, n, num_groups, HAS_WEIGHTS
        )
        tl.atomic_add(work_ptr + ids, tl.where(pos, 1.0, 0.0).to(tl.float64), mask=pos, sem="relaxed")
        tl.atomic_add(work_ptr + num_groups + ids, tl.where(neg, 1.0, 0.0).to(tl.float64), mask=neg, sem="relaxed")
        tl.atomic_add(work_ptr + 2 * num_groups + ids, w.to(tl.float64), mask=pos, sem="relaxed")
        tl.atomic_add(work_ptr + 3 * num_groups + ids, (w * s).to(tl.float64), mask=pos, sem="relaxed")
        if DISCO:
            tl.atomic_max(neg_max_ptr + ids, s * inv_tau, mask=neg, sem="relaxed")
        else:
            tl.atomic_add(work_ptr + 4 * num_groups + ids, s.to(tl.float64), mask=neg, sem="relaxed")
    _grid_barrier(arrive_ptr, generation_ptr, nprog)

    if DISCO:
        # phase 2: Σ_{S−} exp(s/τ − max), every term in (0, 1]
        for start in range(pid * BLOCK, n, nprog * BLOCK):
            offs = start + lanes
            ids, valid, pos, neg, s, w = _discriminative_members(
                scores_ptr, correct_ptr, ids_ptr, weights_ptr, offs, n, num_groups, HAS_WEIGHTS
            )
            top = tl.load(neg_max_ptr + ids, mask=neg, other=0.0, cache_modifier=".cg")
            top = tl.where(tl.abs(top) < float("inf"), top, 0.0)
            tl.atomic_add(
                work_ptr + 4 * num_groups + ids, tl.exp(s * inv_tau - top).to(tl.float64), mask=neg, sem="relaxed"
            )
        _grid_barrier(arrive_ptr, generation_ptr, nprog)

    # phase 3: each group's objective J_g (groups with both kinds) and the non-empty groups
    for start in range(pid * BLOCK, num_groups, nprog * BLOCK):
        g = start + lanes
        gm = g < num_groups
        n_pos = tl.load(work_ptr + g, mask=gm, other=0.0, cache_modifier=".cg")
        n_neg = tl.load(work_ptr + num_groups + g, mask=gm, other=0.0, cache_modifier=".cg")
        sw = tl.load(work_ptr + 2 * num_groups + g, mask=gm, other=0.0, cache_modifier=".cg")
        sws = tl.load(work_ptr + 3 * num_groups + g, mask=gm, other=0.0, cache_modifier=".cg")
        neg_sum = tl.load(work_ptr + 4 * num_groups + g, mask=gm, other=0.0, cache_modifier=".cg")
        # NaN must reach the loss: tl.maximum would drop it
        pos_term = sws / tl.maximum(sw, 1e-300, propagate_nan=tl.PropagateNan.ALL)
        if DISCO:
            top = tl.load(neg_max_ptr + g, mask=gm, other=0.0, cache_modifier=".cg")
            top = tl.where(tl.abs(top) < float("inf"), top, 0.0).to(tl.float64)
            neg_term = tau * (tl.log(tl.maximum(neg_sum, 1e-300, propagate_nan=tl.PropagateNan.ALL)) + top)
        else:
            neg_term = neg_sum / tl.maximum(n_neg, 1.0)
        both = gm & (n_pos > 0.0) & (n_neg > 0.0)
        tl.atomic_add(objective_ptr, tl.sum(tl.where(both, pos_term - neg_term, 0.0), axis=0), sem="relaxed")
        tl.atomic_add(present_ptr, tl.sum(tl.where(gm & (n_pos + n_neg > 0.0), 1.0, 0.0), axis=0), sem="relaxed")
    _grid_barrier(arrive_ptr, generation_ptr, nprog)

    # phase 4: d loss / d s. loss = −Σ J / present; dJ/ds = w / Σw on S+, −softmax(s/τ) (disco) or
    # −1/|S−| (disco_b) on S−.
    present = tl.maximum(tl.load(present_ptr, cache_modifier=".cg"), 1.0)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + lanes
        ids, valid, pos, neg, s, w = _discriminative_members(
            scores_ptr, correct_ptr, ids_ptr, weights_ptr, offs, n, num_groups, HAS_WEIGHTS
        )
        n_pos = tl.load(work_ptr + ids, mask=valid, other=0.0, cache_modifier=".cg")
        n_neg = tl.load(work_ptr + num_groups + ids, mask=valid, other=0.0, cache_modifier=".cg")
        sw = tl.load(work_ptr + 2 * num_groups + ids, mask=valid, other=1.0, cache_modifier=".cg")
        neg_sum = tl.load(work_ptr + 4 * num_groups + ids, mask=valid, other=1.0, cache_modifier=".cg")
        d_pos = -w.to(tl.float64) / tl.maximum(sw, 1e-300, propagate_nan=tl.PropagateNan.ALL)
        if DISCO:
            top = tl.load(neg_max_ptr + ids, mask=valid, other=0.0, cache_modifier=".cg")
            top = tl.where(tl.abs(top) < float("inf"), top, 0.0)
            d_neg = tl.exp(s * inv_tau - top).to(tl.float64) / tl.maximum(
                neg_sum, 1e-300, propagate_nan=tl.PropagateNan.ALL
            )
        else:
            d_neg = 1.0 / tl.maximum(n_neg, 1.0)
        grad = tl.where(pos, d_pos, d_neg) / present
        grad = tl.where(valid & (n_pos > 0.0) & (n_neg > 0.0), grad, 0.0)
        tl.store(grad_ptr + offs, grad.to(tl.float32), mask=offs < n)
    if pid == 0:
        tl.store(loss_ptr, (-tl.load(objective_ptr, cache_modifier=".cg") / present).to(tl.float32))


def group_discriminative_fwd(
    scores: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor,
    weights: torch.Tensor | None,
    num_groups: int,
    tau: float,
    disco: bool,
):
    """One launch: (loss 0-d fp32, d loss / d scores [N] fp32)."""
    n = scores.numel()
    dev = scores.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    grad = torch.empty(n, dtype=torch.float32, device=dev)
    block = 1024
    sms = _backend.sm_count(dev)
    # The interpreter runs programs one after another: a grid barrier needs one.
    grid_size = 1 if sms is None else max(1, min(cdiv(max(n, DISCO_WORK_ROWS * num_groups + 2), block), sms))
    work = torch.empty(DISCO_WORK_ROWS * num_groups + 2, dtype=torch.float64, device=dev)
    neg_max = torch.empty(max(num_groups, 1), dtype=torch.float32, device=dev)
    scores = scores.contiguous()
    _group_discriminative_kernel[(grid_size,)](
        scores_ptr=scores,
        correct_ptr=correct.contiguous().view(torch.uint8),
        ids_ptr=group_index.contiguous(),
        weights_ptr=weights.contiguous() if weights is not None else scores,
        grad_ptr=grad,
        loss_ptr=loss,
        work_ptr=work,
        neg_max_ptr=neg_max,
        barrier_ptr=_barrier_workspace(dev),
        n=n,
        num_groups=num_groups,
        tau=float(tau),
        DISCO=disco,
        HAS_WEIGHTS=weights is not None,
        BLOCK=block,
        num_warps=8,
        **({"launch_cooperative_grid": True} if sms is not None else {}),
    )
    return loss, grad
