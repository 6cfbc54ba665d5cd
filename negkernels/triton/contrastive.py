"""Triton kernels for InfoNCE against a memory bank, and streaming top-k hard-negative mining.

Work is split two ways: into blocks of queries and into contiguous, tile-aligned ranges of bank
slots (split-K), so that N = 4096 queries (32 blocks of 128) still fill the GPU's SMs. Each
(block, split) program writes small partial results, and a merge kernel adds them in split
order, so results are the same bits on every run.

* ``_bank_info_nce_fwd_kernel``: streams its slots in tiles (tensor-core ``q·bᵀ``), keeping an
  online log-sum-exp over the denominator set A (the positive, usable slots, per-query extras) and
  one over the positive set P. ``_bank_info_nce_combine_kernel`` merges the splits into the loss
  and the two per-row log-sum-exps the backward needs. The N×K logits never exist.
* ``_bank_info_nce_bwd_query_kernel``: the same sweep recomputes the logits and their gradient
  G = g·(softmax_A − 1[P]·softmax_P). It accumulates Σ_j G_j·b_j in registers (each program owns
  its rows: no atomics) and r = Σ_j G_j·l_j. Split 0 also writes d(positive) and d(extras).
  ``_bank_info_nce_dq_kernel`` merges the splits into d(query) and r, which gives
  d(temperature) = −Σ r / τ and the normalisation term.
* ``_bank_info_nce_bwd_bank_kernel``: one program per block of slots streams the queries for
  d(bank) = Gᵀ·Q. It runs only when the bank requires a gradient (a MoCo queue does not).
* Top-k by a bound, in three passes. ``_bank_topk_threshold_kernel`` splits each row's slots
  into groups (position within the tile, per split) and keeps the largest similarity of each:
  one max per element. τ, the k-th largest group maximum, is at most the k-th largest
  similarity, and for independent similarities only ~1.2·k slots reach it.
  ``_bank_topk_gather_kernel`` recomputes the tiles and appends the slots at or above τ to a
  per-row list, taking each tile's out one per row per round with row reductions (a row meets
  one in about one tile in twelve). ``_bank_topk_finish_kernel`` merges each list into a sorted
  top-k of (similarity, slot) keys packed into int64: a tile sorted ascending, max-ed with the
  descending list, is a bitonic sequence that log2(KP) half-cleaner stages sort
  (``_merge_bitonic_rows``). A row block whose lists overflowed (ties at τ, keys crowded into
  few groups, NaN) takes the exact path there: the same merge over every filled slot.

With ``NORMALIZE`` the inverse norms are computed from the tiles as they are loaded, so no
normalised copy of the bank is made: l = (q·b)·|q|⁻¹·|b|⁻¹/τ. The chain rule through the
normalisation is d q = |q|⁻¹·(Σ_j G_j·b̂_j)/τ − |q|⁻²·r·q (likewise for each key).

Unfilled slots are never read: with a filled count the splits cover only the filled prefix;
with a mask, the loads are masked. The temperature is read from a device tensor, so a learnable
temperature needs no host read and a new value does not recompile.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _backend
from ..reference.contrastive import NORMALIZE_EPS
from . import cdiv, next_power_of_2

_EPS = tl.constexpr(NORMALIZE_EPS)
_LOG2E = tl.constexpr(1.4426950408889634)
FALSE_NEGATIVE_CODES = {None: 0, "exclude": 1, "positive": 2, "supcon": 3}
# Kernel codes of the positive-set modes: "positive" takes log Σ_P exp(l) (SupCon's L_in),
# "supcon" the mean of the positive logits (SupCon's L_out), whose gradient weight is 1/|P|.
_FN_NONE = tl.constexpr(FALSE_NEGATIVE_CODES[None])
_FN_EXCLUDE = tl.constexpr(FALSE_NEGATIVE_CODES["exclude"])
_FN_POSITIVE = tl.constexpr(FALSE_NEGATIVE_CODES["positive"])
_FN_SUPCON = tl.constexpr(FALSE_NEGATIVE_CODES["supcon"])
# The running maximum of a row with no positive key starts here: finite, so no −inf − (−inf).
_NO_LOGIT = tl.constexpr(-1e30)
# Largest k the streaming top-k keeps in registers ([rows, next_pow2(k)] int64 per program); the
# sorting network's code grows quickly with its width (k = 512 takes minutes to compile).
TOPK_MAX_K = 256


@functools.lru_cache(maxsize=None)  # pure in its arguments; read-only results
def _dot_settings(dtype: torch.dtype, interpret: bool) -> dict:
    """Operand types of the tensor-core products.

    The forward multiplies the inputs as they are (fp32 with exact fp32 products: tf32 would cost
    ~1e-3 relative error). The backward multiplies the logits' gradient G, whose entries are
    softmax weights times 1/N, small enough to underflow in fp16 (below 6e-8): for fp16 inputs
    that product runs on fp32 operands in tf32, which holds fp16 values exactly and has fp32's
    range; bf16 has fp32's range already. The interpreter has no bf16/fp16 arithmetic, so there
    every operand is upcast first.
    """
    fp32 = dtype == torch.float32 or interpret
    return dict(
        DOT_FP32=fp32,
        PRECISION="ieee",
        GRAD_DOT_FP32=fp32 or dtype == torch.float16,
        GRAD_PRECISION="ieee" if fp32 else "tf32",
    )


# ----------------------------------------------------------------------------- shared tile helpers


@triton.jit
def _load_rows(ptr, rows, row_ok, stride_row, dims, dim_ok, stride_dim):
    offs = rows.to(tl.int64)[:, None] * stride_row + dims[None, :] * stride_dim
    return tl.load(ptr + offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _inverse_norm_from_squares(sum_sq, NORMALIZE: tl.constexpr):
    """1/max(|x|, eps) from Σx² per row (1 without NORMALIZE)."""
    if NORMALIZE:
        return 1.0 / tl.maximum(tl.sqrt(sum_sq), _EPS)
    else:
        return tl.full(sum_sq.shape, 1.0, tl.float32)


@triton.jit
def _inverse_norm(x_f32, NORMALIZE: tl.constexpr):
    return _inverse_norm_from_squares(tl.sum(x_f32 * x_f32, axis=1), NORMALIZE)


@triton.jit
def _slots_filled(cols, num_slots, valid_mask_ptr, valid_count, HAS_VALID_MASK: tl.constexpr):
    in_range = cols < num_slots
    if HAS_VALID_MASK:
        return in_range & (tl.load(valid_mask_ptr + cols, mask=in_range, other=0) != 0)
    else:
        return in_range & (cols < valid_count)


@triton.jit
def _bank_tile_logits(
    q_dot,
    row_scale,
    bank_ptr,
    cols,
    filled,
    stride_bk,
    stride_bd,
    dims,
    dim_ok,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Loads one bank tile (unfilled slots read as 0) → (tile as loaded, its inverse norms, logits [BN, BK])."""
    b = _load_rows(bank_ptr, cols, filled, stride_bk, dims, dim_ok, stride_bd)
    if DOT_FP32:
        b = b.to(tl.float32)
    s = tl.dot(q_dot, tl.trans(b), input_precision=PRECISION)
    inv_b = _inverse_norm(b.to(tl.float32), NORMALIZE)
    return b, inv_b, s * row_scale[:, None] * inv_b[None, :]


@triton.jit
def _tile_sets(qid, self_slot, bank_ids_ptr, cols, filled, FN_MODE: tl.constexpr, HAS_SELF_SLOT: tl.constexpr):
    """(usable [BN, BK]: counted in the denominator, in_positive_set [BN, BK]). A row's own slot
    (``self_slot``, −1 for none) is in neither."""
    # (x == x) and (x != x) on the row ids broadcast the slot mask to [BN, BK] as all-true / all-false.
    usable = filled[None, :] & (qid[:, None] == qid[:, None])
    if HAS_SELF_SLOT:
        usable = usable & (cols[None, :].to(tl.int64) != self_slot[:, None])
    in_pos = usable & (qid[:, None] != qid[:, None])
    if FN_MODE != _FN_NONE:
        bid = tl.load(bank_ids_ptr + cols, mask=filled, other=0)
        same = qid[:, None] == bid[None, :]
        if FN_MODE == _FN_EXCLUDE:
            usable = usable & ~same
        else:
            in_pos = usable & same
    return usable, in_pos


@triton.jit
def _query_ids(query_ids_ptr, rows, row_ok, FN_MODE: tl.constexpr):
    """The rows' ids; without ids the row numbers stand in (only their shape is used then)."""
    if FN_MODE != _FN_NONE:
        return tl.load(query_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        return rows.to(tl.int64)


@triton.jit
def _self_slots(self_slot_ptr, rows, row_ok, HAS_SELF_SLOT: tl.constexpr):
    """Each row's own bank slot, excluded from its sets (−1: none; unread without HAS_SELF_SLOT)."""
    if HAS_SELF_SLOT:
        return tl.load(self_slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    else:
        return tl.full(rows.shape, -1, tl.int64)


@triton.jit
def _query_block(
    q_ptr,
    pos_ptr,
    rows,
    row_ok,
    stride_qn,
    stride_qd,
    stride_pn,
    stride_pd,
    dims,
    dim_ok,
    inv_t,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HAS_POSITIVE: tl.constexpr,
):
    """Loads a block of queries and positives (without HAS_POSITIVE, ``pos_ptr`` is the queries' and
    the positive logit reads _NO_LOGIT) → (q for the dot, q fp32, p fp32, |q|⁻¹, |p|⁻¹, |q|⁻¹/τ, positive logits)."""
    q = _load_rows(q_ptr, rows, row_ok, stride_qn, dims, dim_ok, stride_qd)
    qf = q.to(tl.float32)
    pf = _load_rows(pos_ptr, rows, row_ok, stride_pn, dims, dim_ok, stride_pd).to(tl.float32)
    inv_q = _inverse_norm(qf, NORMALIZE)
    inv_p = _inverse_norm(pf, NORMALIZE)
    row_scale = inv_q * inv_t
    pos_logit = tl.sum(qf * pf, axis=1) * row_scale * inv_p
    if not HAS_POSITIVE:
        pos_logit = tl.full(pos_logit.shape, _NO_LOGIT, tl.float32)
    if DOT_FP32:
        q = qf
    return q, qf, pf, inv_q, inv_p, row_scale, pos_logit


# ----------------------------------------------------------------------------- InfoNCE


@triton.jit
def _bank_info_nce_fwd_kernel(
    q_ptr,
    pos_ptr,
    bank_ptr,
    extra_ptr,
    query_ids_ptr,
    bank_ids_ptr,
    valid_mask_ptr,
    self_slot_ptr,
    temperature_ptr,
    partial_ptr,
    n_queries,
    n_slots,
    dim,
    n_extra,
    valid_count,
    split_slots,
    stride_qn,
    stride_qd,
    stride_pn,
    stride_pd,
    stride_bk,
    stride_bd,
    stride_en,
    stride_em,
    stride_ed,
    FN_MODE: tl.constexpr,
    HAS_VALID_MASK: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_SELF_SLOT: tl.constexpr,
    HAS_POSITIVE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (row block, split): online log-sum-exps over the split's slots → partials [4, splits, N]:
    (max, sum) over A, then over P; with _FN_SUPCON the last two are Σ_P l and |P| instead."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_queries
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    q, qf, pf, inv_q, inv_p, row_scale, pos_logit = _query_block(
        q_ptr,
        pos_ptr,
        rows,
        row_ok,
        stride_qn,
        stride_qd,
        stride_pn,
        stride_pd,
        dims,
        dim_ok,
        inv_t,
        NORMALIZE,
        DOT_FP32,
        HAS_POSITIVE,
    )
    qid = _query_ids(query_ids_ptr, rows, row_ok, FN_MODE)
    sid = _self_slots(self_slot_ptr, rows, row_ok, HAS_SELF_SLOT)

    # Every split starts its maxima at the positive logit (or _NO_LOGIT), so they are finite and
    # no −inf − (−inf) arises; only split 0 counts the positive (and the extras) in its sums.
    first = (split == 0).to(tl.float32)
    if not HAS_POSITIVE:
        first = first * 0.0
    m_all = pos_logit
    s_all = tl.full([BLOCK_N], 1.0, tl.float32) * first
    m_pos = pos_logit
    s_pos = tl.full([BLOCK_N], 1.0, tl.float32) * first
    if FN_MODE == _FN_SUPCON:
        m_pos = tl.where(first > 0, pos_logit, 0.0)  # Σ_P l; s_pos counts |P|
    slot_start = split * split_slots
    for offset in range(0, split_slots, BLOCK_K):
        cols = slot_start + offset + tl.arange(0, BLOCK_K)
        filled = _slots_filled(cols, n_slots, valid_mask_ptr, valid_count, HAS_VALID_MASK)
        b, inv_b, logits = _bank_tile_logits(
            q, row_scale, bank_ptr, cols, filled, stride_bk, stride_bd, dims, dim_ok, NORMALIZE, DOT_FP32, PRECISION
        )
        usable, in_pos = _tile_sets(qid, sid, bank_ids_ptr, cols, filled, FN_MODE, HAS_SELF_SLOT)
        l_all = tl.where(usable, logits, -float("inf"))
        m_new = tl.maximum(m_all, tl.max(l_all, axis=1))
        s_all = s_all * tl.exp(m_all - m_new) + tl.sum(tl.exp(l_all - m_new[:, None]), axis=1)
        m_all = m_new
        if FN_MODE == _FN_POSITIVE:
            l_pos = tl.where(in_pos, logits, -float("inf"))
            m_new = tl.maximum(m_pos, tl.max(l_pos, axis=1))
            s_pos = s_pos * tl.exp(m_pos - m_new) + tl.sum(tl.exp(l_pos - m_new[:, None]), axis=1)
            m_pos = m_new
        if FN_MODE == _FN_SUPCON:
            m_pos += tl.sum(tl.where(in_pos, logits, 0.0), axis=1)
            s_pos += tl.sum(in_pos.to(tl.float32), axis=1)
    if HAS_EXTRA:
        if split == 0:
            for m in range(0, n_extra):
                ef = _load_rows(extra_ptr + m * stride_em, rows, row_ok, stride_en, dims, dim_ok, stride_ed)
                ef = ef.to(tl.float32)
                le = tl.sum(qf * ef, axis=1) * row_scale * _inverse_norm(ef, NORMALIZE)
                m_new = tl.maximum(m_all, le)
                s_all = s_all * tl.exp(m_all - m_new) + tl.exp(le - m_new)
                m_all = m_new
    plane = tl.num_programs(1) * n_queries
    out = split * n_queries + rows
    tl.store(partial_ptr + out, m_all, mask=row_ok)
    tl.store(partial_ptr + plane + out, s_all, mask=row_ok)
    tl.store(partial_ptr + 2 * plane + out, m_pos, mask=row_ok)
    tl.store(partial_ptr + 3 * plane + out, s_pos, mask=row_ok)


@triton.jit
def _merge_log_sum_exp(partial_ptr, plane_offset, rows, row_ok, n_queries, n_splits):
    """log Σ_s s_s·exp(m_s) over the splits, in split order."""
    m = tl.full(rows.shape, -float("inf"), tl.float32)
    total = tl.zeros(rows.shape, tl.float32)
    for split in range(0, n_splits):
        m_s = tl.load(partial_ptr + plane_offset + split * n_queries + rows, mask=row_ok, other=0.0)
        # rows past the end read a sum of 1, which keeps their (unstored) arithmetic finite
        s_s = tl.load(partial_ptr + plane_offset + (n_splits + split) * n_queries + rows, mask=row_ok, other=1.0)
        m_new = tl.maximum(m, m_s)
        total = total * tl.exp(m - m_new) + s_s * tl.exp(m_s - m_new)
        m = m_new
    return m + tl.log(total)


@triton.jit
def _bank_info_nce_combine_kernel(
    partial_ptr,
    loss_ptr,
    lse_all_ptr,
    lse_pos_ptr,
    n_queries,
    n_splits,
    reduce_scale,
    FN_MODE: tl.constexpr,
    REDUCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Merges the splits → lse_all, lse_pos [N] and the loss: per query [N], or with REDUCE one
    0-d reduce_scale·Σ loss (a fixed-order sum, one program walking every row block)."""
    if REDUCE:
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_queries, BLOCK):
            total += _combine_rows(
                partial_ptr,
                loss_ptr,
                lse_all_ptr,
                lse_pos_ptr,
                start + tl.arange(0, BLOCK),
                n_queries,
                n_splits,
                FN_MODE,
                False,
            )
        tl.store(loss_ptr, tl.sum(total, axis=0) * reduce_scale)
    else:
        _combine_rows(
            partial_ptr,
            loss_ptr,
            lse_all_ptr,
            lse_pos_ptr,
            tl.program_id(0) * BLOCK + tl.arange(0, BLOCK),
            n_queries,
            n_splits,
            FN_MODE,
            True,
        )


@triton.jit
def _combine_rows(
    partial_ptr,
    loss_ptr,
    lse_all_ptr,
    lse_pos_ptr,
    rows,
    n_queries,
    n_splits,
    FN_MODE: tl.constexpr,
    STORE_LOSS: tl.constexpr,
):
    """Per row: lse_all; lse_pos (with _FN_SUPCON log |P|, −inf for none) and the loss."""
    row_ok = rows < n_queries
    lse_all = _merge_log_sum_exp(partial_ptr, 0, rows, row_ok, n_queries, n_splits)
    if FN_MODE == _FN_SUPCON:
        pos_sum = tl.zeros(rows.shape, tl.float32)
        count = tl.zeros(rows.shape, tl.float32)
        for split in range(0, n_splits):
            pos_sum += tl.load(partial_ptr + (2 * n_splits + split) * n_queries + rows, mask=row_ok, other=0.0)
            count += tl.load(partial_ptr + (3 * n_splits + split) * n_queries + rows, mask=row_ok, other=0.0)
        # A row without positives has loss 0 (and, in the backward, no gradient).
        loss = tl.where(count > 0, lse_all - pos_sum / tl.maximum(count, 1.0), 0.0)
        lse_pos = tl.log(count)
    else:
        lse_pos = _merge_log_sum_exp(partial_ptr, 2 * n_splits * n_queries, rows, row_ok, n_queries, n_splits)
        loss = lse_all - lse_pos
    if STORE_LOSS:
        tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_all_ptr + rows, lse_all, mask=row_ok)
    tl.store(lse_pos_ptr + rows, lse_pos, mask=row_ok)
    return tl.where(row_ok, loss, 0.0)


@triton.jit
def _logit_grads(logits, usable, in_pos, g, lse_all, lse_pos, FN_MODE: tl.constexpr):
    """d loss_i / d l_ij · g_i = g_i·(softmax over A − softmax over P restricted to P); with
    _FN_SUPCON the second term is 1[P]/|P| (lse_pos = log |P|)."""
    grad = tl.where(usable, tl.exp(logits - lse_all[:, None]), 0.0)
    if FN_MODE == _FN_POSITIVE:
        grad -= tl.where(in_pos, tl.exp(logits - lse_pos[:, None]), 0.0)
    if FN_MODE == _FN_SUPCON:
        grad -= tl.where(in_pos, tl.exp(-lse_pos)[:, None], 0.0)
    return grad * g[:, None]


@triton.jit
def _row_grads(grad_loss_ptr, rows, row_ok, grad_stride, grad_scale, lse_pos, FN_MODE: tl.constexpr):
    """Each row's incoming gradient times the reduction's scale; 0 for a _FN_SUPCON row without
    positives, whose loss is the constant 0."""
    g = tl.load(grad_loss_ptr + rows * grad_stride, mask=row_ok, other=0.0).to(tl.float32) * grad_scale
    if FN_MODE == _FN_SUPCON:
        g = tl.where(lse_pos > -float("inf"), g, 0.0)
    return g


@triton.jit
def _grad_dot(grad_f32, keys, GRAD_DOT_FP32: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """grad [R, C] fp32 times keys [C, BLOCK_D] (in their dot dtype) → fp32 [R, BLOCK_D]."""
    if GRAD_DOT_FP32:
        return tl.dot(grad_f32, keys.to(tl.float32), input_precision=GRAD_PRECISION)
    else:
        return tl.dot(grad_f32.to(keys.dtype), keys)


@triton.jit
def _query_grad_tile(
    q,
    c2,
    lse2_all,
    lse2_pos,
    qid,
    sid,
    bank_ptr,
    bank_ids_ptr,
    valid_mask_ptr,
    cols,
    n_slots,
    valid_count,
    stride_bk,
    stride_bd,
    dims,
    dim_ok,
    FN_MODE: tl.constexpr,
    HAS_VALID_MASK: tl.constexpr,
    HAS_SELF_SLOT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    GRAD_DOT_FP32: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One bank tile of the query gradient, without the row's incoming gradient g_i:
    (Σ_j (G_ij/g_i)·|k_j|⁻¹·k_j [BN, BD], Σ_j (G_ij/g_i)·u_ij [BN]). Unmasked (MASKED false) only
    for a tile every slot of which is filled and in the denominator."""
    if MASKED:
        filled = _slots_filled(cols, n_slots, valid_mask_ptr, valid_count, HAS_VALID_MASK)
        b = _load_rows(bank_ptr, cols, filled, stride_bk, dims, dim_ok, stride_bd)
    else:
        b = tl.load(
            bank_ptr + cols.to(tl.int64)[:, None] * stride_bk + dims[None, :] * stride_bd,
            mask=dim_ok[None, :],
            other=0.0,
        )
    if DOT_FP32:
        b = b.to(tl.float32)
    inv_b = _inverse_norm(b.to(tl.float32), NORMALIZE)
    u = tl.dot(q, tl.trans(b), input_precision=PRECISION) * inv_b[None, :]
    grad = tl.math.exp2(u * c2[:, None] - lse2_all[:, None])
    if MASKED:
        usable, in_pos = _tile_sets(qid, sid, bank_ids_ptr, cols, filled, FN_MODE, HAS_SELF_SLOT)
        grad = tl.where(usable, grad, 0.0)
        if FN_MODE == _FN_POSITIVE:
            grad -= tl.where(in_pos, tl.math.exp2(u * c2[:, None] - lse2_pos[:, None]), 0.0)
        if FN_MODE == _FN_SUPCON:
            grad -= tl.where(in_pos, tl.math.exp2(-lse2_pos)[:, None], 0.0)
    return _grad_dot(grad * inv_b[None, :], b, GRAD_DOT_FP32, GRAD_PRECISION), tl.sum(grad * u, axis=1)


@triton.jit
def _query_grad_tiles(
    acc,
    r,
    q,
    c2,
    lse2_all,
    lse2_pos,
    qid,
    sid,
    bank_ptr,
    bank_ids_ptr,
    valid_mask_ptr,
    slot_start,
    start,
    end,
    n_slots,
    valid_count,
    stride_bk,
    stride_bd,
    dims,
    dim_ok,
    FN_MODE: tl.constexpr,
    HAS_VALID_MASK: tl.constexpr,
    HAS_SELF_SLOT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    GRAD_DOT_FP32: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MASKED: tl.constexpr,
):
    """(acc, r) plus the tiles of slots [slot_start + start, slot_start + end) (see _query_grad_tile)."""
    for offset in range(start, end, BLOCK_K):
        d_acc, d_r = _query_grad_tile(
            q,
            c2,
            lse2_all,
            lse2_pos,
            qid,
            sid,
            bank_ptr,
            bank_ids_ptr,
            valid_mask_ptr,
            slot_start + offset + tl.arange(0, BLOCK_K),
            n_slots,
            valid_count,
            stride_bk,
            stride_bd,
            dims,
            dim_ok,
            FN_MODE,
            HAS_VALID_MASK,
            HAS_SELF_SLOT,
            NORMALIZE,
            DOT_FP32,
            PRECISION,
            GRAD_DOT_FP32,
            GRAD_PRECISION,
            MASKED,
        )
        acc += d_acc
        r += d_r
    return acc, r


@triton.jit
def _bank_info_nce_bwd_query_kernel(
    q_ptr,
    pos_ptr,
    bank_ptr,
    extra_ptr,
    query_ids_ptr,
    bank_ids_ptr,
    valid_mask_ptr,
    self_slot_ptr,
    temperature_ptr,
    grad_loss_ptr,
    lse_all_ptr,
    lse_pos_ptr,
    acc_ptr,
    r_partial_ptr,
    dpos_ptr,
    dextra_ptr,
    n_queries,
    n_slots,
    dim,
    n_extra,
    valid_count,
    split_slots,
    grad_stride,
    grad_scale,
    stride_qn,
    stride_qd,
    stride_pn,
    stride_pd,
    stride_bk,
    stride_bd,
    stride_en,
    stride_em,
    stride_ed,
    FN_MODE: tl.constexpr,
    HAS_VALID_MASK: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    EXTRA_GRAD: tl.constexpr,
    HAS_SELF_SLOT: tl.constexpr,
    HAS_POSITIVE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    GRAD_DOT_FP32: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (row block, split) → Σ_j G_j·|k_j|⁻¹·k_j [splits, N, D] and r = Σ_j G_j·l_j [splits, N]
    over the split's slots; split 0 adds the positive and the extras and writes their gradients."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_queries
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    q, _, _, _, _, row_scale, pos_logit = _query_block(
        q_ptr,
        pos_ptr,
        rows,
        row_ok,
        stride_qn,
        stride_qd,
        stride_pn,
        stride_pd,
        dims,
        dim_ok,
        inv_t,
        NORMALIZE,
        DOT_FP32,
        HAS_POSITIVE,
    )
    qid = _query_ids(query_ids_ptr, rows, row_ok, FN_MODE)
    sid = _self_slots(self_slot_ptr, rows, row_ok, HAS_SELF_SLOT)
    lse_all = tl.load(lse_all_ptr + rows, mask=row_ok, other=0.0)
    lse_pos = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)

    # The sweep accumulates G_ij / g_i (g_i, the row's incoming gradient, is applied once after
    # it), in base 2: the logit over |q_i|⁻¹/τ is u_ij = s_ij·|k_j|⁻¹, and the softmax weight
    # exp(l_ij − lse_i) = 2^(u_ij·c_i − lse_i·log2 e) with c_i = |q_i|⁻¹/τ·log2 e: one multiply-add
    # and the hardware's exp2 per element. r_i = Σ_j G_ij·l_ij = g_i·|q_i|⁻¹/τ·Σ_j (G_ij/g_i)·u_ij.
    c2 = row_scale * _LOG2E
    lse2_all = lse_all * _LOG2E
    lse2_pos = lse_pos * _LOG2E
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    r = tl.zeros([BLOCK_N], tl.float32)
    slot_start = split * split_slots
    split_end = tl.minimum(split_slots, n_slots - slot_start)
    full_end = 0
    if FN_MODE == _FN_NONE and not HAS_VALID_MASK and not HAS_SELF_SLOT:
        # Tiles filled throughout need no slot mask and no select: every slot is in the denominator.
        full_end = tl.maximum(tl.minimum(split_end, valid_count - slot_start), 0) // BLOCK_K * BLOCK_K
        acc, r = _query_grad_tiles(
            acc,
            r,
            q,
            c2,
            lse2_all,
            lse2_pos,
            qid,
            sid,
            bank_ptr,
            bank_ids_ptr,
            valid_mask_ptr,
            slot_start,
            0,
            full_end,
            n_slots,
            valid_count,
            stride_bk,
            stride_bd,
            dims,
            dim_ok,
            FN_MODE,
            HAS_VALID_MASK,
            HAS_SELF_SLOT,
            NORMALIZE,
            DOT_FP32,
            PRECISION,
            GRAD_DOT_FP32,
            GRAD_PRECISION,
            BLOCK_K,
            False,
        )
    acc, r = _query_grad_tiles(
        acc,
        r,
        q,
        c2,
        lse2_all,
        lse2_pos,
        qid,
        sid,
        bank_ptr,
        bank_ids_ptr,
        valid_mask_ptr,
        slot_start,
        full_end,
        split_slots,
        n_slots,
        valid_count,
        stride_bk,
        stride_bd,
        dims,
        dim_ok,
        FN_MODE,
        HAS_VALID_MASK,
        HAS_SELF_SLOT,
        NORMALIZE,
        DOT_FP32,
        PRECISION,
        GRAD_DOT_FP32,
        GRAD_PRECISION,
        BLOCK_K,
        True,
    )
    # grad_stride 0: one incoming gradient shared by every query (a reduced loss), times the
    # reduction's scale.
    g = _row_grads(grad_loss_ptr, rows, row_ok, grad_stride, grad_scale, lse_pos, FN_MODE)
    acc *= g[:, None]
    r *= g * row_scale
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if split == 0:
        # The fp32 query and positive are loaded again rather than held through the sweep, where
        # they would take 64 registers a thread.
        _, qf, pf, _, inv_p, _, _ = _query_block(
            q_ptr,
            pos_ptr,
            rows,
            row_ok,
            stride_qn,
            stride_qd,
            stride_pn,
            stride_pd,
            dims,
            dim_ok,
            inv_t,
            NORMALIZE,
            DOT_FP32,
            HAS_POSITIVE,
        )
        if FN_MODE == _FN_SUPCON:
            g_pos = g * (tl.exp(pos_logit - lse_all) - tl.exp(-lse_pos))
        else:
            g_pos = g * (tl.exp(pos_logit - lse_all) - tl.exp(pos_logit - lse_pos))
        if not HAS_POSITIVE:
            g_pos = g * 0.0
        acc += (g_pos * inv_p)[:, None] * pf
        r += g_pos * pos_logit
        if HAS_EXTRA:
            for m in range(0, n_extra):
                extra_row = extra_ptr + m * stride_em
                ef = _load_rows(extra_row, rows, row_ok, stride_en, dims, dim_ok, stride_ed).to(tl.float32)
                inv_e = _inverse_norm(ef, NORMALIZE)
                le = tl.sum(qf * ef, axis=1) * row_scale * inv_e
                g_e = g * tl.exp(le - lse_all)
                r += g_e * le
                acc += (g_e * inv_e)[:, None] * ef
                if EXTRA_GRAD:
                    d_e = (g_e * inv_e * row_scale)[:, None] * qf
                    if NORMALIZE:
                        d_e -= (g_e * le * inv_e * inv_e)[:, None] * ef
                    offs = (rows.to(tl.int64)[:, None] * n_extra + m) * dim + dims[None, :]
                    tl.store(dextra_ptr + offs, d_e.to(dextra_ptr.dtype.element_ty), mask=out_mask)
        dpos = (g_pos * row_scale * inv_p)[:, None] * qf
        if NORMALIZE:
            dpos -= (g_pos * pos_logit * inv_p * inv_p)[:, None] * pf
        if HAS_POSITIVE:
            out = rows.to(tl.int64)[:, None] * dim + dims[None, :]
            tl.store(dpos_ptr + out, dpos.to(dpos_ptr.dtype.element_ty), mask=out_mask)
    part = split * n_queries + rows
    tl.store(acc_ptr + part.to(tl.int64)[:, None] * dim + dims[None, :], acc, mask=out_mask)
    tl.store(r_partial_ptr + part, r, mask=row_ok)


@triton.jit
def _bank_info_nce_dq_kernel(
    q_ptr,
    temperature_ptr,
    acc_ptr,
    r_partial_ptr,
    dq_ptr,
    r_ptr,
    n_queries,
    dim,
    n_splits,
    stride_qn,
    stride_qd,
    NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adds the splits' partials in split order: dq = |q|⁻¹/τ·Σ acc − |q|⁻²·r·q (without the second
    term unless normalising), and r for the temperature's gradient."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_queries
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    mask = row_ok[:, None] & dim_ok[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    r = tl.zeros([BLOCK_N], tl.float32)
    for split in range(0, n_splits):
        part = split * n_queries + rows
        acc += tl.load(acc_ptr + part.to(tl.int64)[:, None] * dim + dims[None, :], mask=mask, other=0.0)
        r += tl.load(r_partial_ptr + part, mask=row_ok, other=0.0)
    qf = _load_rows(q_ptr, rows, row_ok, stride_qn, dims, dim_ok, stride_qd).to(tl.float32)
    inv_q = _inverse_norm(qf, NORMALIZE)
    dq = acc * (inv_q / tl.load(temperature_ptr).to(tl.float32))[:, None]
    if NORMALIZE:
        dq -= (r * inv_q * inv_q)[:, None] * qf
    tl.store(dq_ptr + rows.to(tl.int64)[:, None] * dim + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(r_ptr + rows, r, mask=row_ok)


@triton.jit
def _bank_info_nce_bwd_bank_kernel(
    q_ptr,
    bank_ptr,
    query_ids_ptr,
    bank_ids_ptr,
    valid_mask_ptr,
    self_slot_ptr,
    temperature_ptr,
    grad_loss_ptr,
    lse_all_ptr,
    lse_pos_ptr,
    dbank_ptr,
    n_queries,
    n_slots,
    dim,
    valid_count,
    grad_stride,
    grad_scale,
    stride_qn,
    stride_qd,
    stride_bk,
    stride_bd,
    FN_MODE: tl.constexpr,
    HAS_VALID_MASK: tl.constexpr,
    HAS_SELF_SLOT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    GRAD_DOT_FP32: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    inv_t = 1.0 / tl.load(temperature_ptr).to(tl.float32)
    filled = _slots_filled(cols, n_slots, valid_mask_ptr, valid_count, HAS_VALID_MASK)
    b = _load_rows(bank_ptr, cols, filled, stride_bk, dims, dim_ok, stride_bd)
    bf = b.to(tl.float32)
    if DOT_FP32:
        b = bf
    inv_b = _inverse_norm(bf, NORMALIZE)

    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)  # Σ_i G_ij·|q_i|⁻¹·q_i
    r = tl.zeros([BLOCK_K], tl.float32)  # Σ_i G_ij·l_ij
    if tl.max(filled.to(tl.int32), axis=0) > 0:
        for n0 in range(0, n_queries, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < n_queries
            q = _load_rows(q_ptr, rows, row_ok, stride_qn, dims, dim_ok, stride_qd)
            qf = q.to(tl.float32)
            if DOT_FP32:
                q = qf
            inv_q = _inverse_norm(qf, NORMALIZE)
            row_scale = inv_q * inv_t
            logits = tl.dot(q, tl.trans(b), input_precision=PRECISION) * row_scale[:, None] * inv_b[None, :]
            qid = _query_ids(query_ids_ptr, rows, row_ok, FN_MODE)
            sid = _self_slots(self_slot_ptr, rows, row_ok, HAS_SELF_SLOT)
            usable, in_pos = _tile_sets(qid, sid, bank_ids_ptr, cols, filled, FN_MODE, HAS_SELF_SLOT)
            lse_all = tl.load(lse_all_ptr + rows, mask=row_ok, other=0.0)
            lse_pos = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)
            g = _row_grads(grad_loss_ptr, rows, row_ok, grad_stride, grad_scale, lse_pos, FN_MODE)
            grad = _logit_grads(logits, usable, in_pos, g, lse_all, lse_pos, FN_MODE)
            r += tl.sum(grad * logits, axis=0)
            acc += _grad_dot(tl.trans(grad * inv_q[:, None]), q, GRAD_DOT_FP32, GRAD_PRECISION)
    db = acc * (inv_b * inv_t)[:, None]
    if NORMALIZE:
        db -= (r * inv_b * inv_b)[:, None] * bf
    out = cols.to(tl.int64)[:, None] * dim + dims[None, :]
    tl.store(dbank_ptr + out, db.to(dbank_ptr.dtype.element_ty), mask=(cols < n_slots)[:, None] & dim_ok[None, :])


# ----------------------------------------------------------------------------- top-k


@triton.jit
def _flip_order(bits):
    """fp32 bits (as int32) ↔ an int32 whose signed order is the float order (+NaN above +inf, −NaN
    below −inf): negative floats have their other bits flipped. The map is its own inverse."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _ordered_bits(x):
    return _flip_order(x.to(tl.int32, bitcast=True))


@triton.jit
def _float_of_ordered(key):
    return _flip_order(key).to(tl.float32, bitcast=True)


@triton.jit
def _pack_similarity(sim, cols):
    """fp32 similarity and slot → an int64 key whose signed order is (similarity, then lower slot
    first). Every NaN ranks first, as in a descending sort (a NaN's sign bit is arbitrary)."""
    sim = tl.where(sim != sim, float("nan"), sim)
    return (_ordered_bits(sim).to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _pack_candidate(raw):
    """A candidate as the gather stores it (similarity bits << 32 | slot) → its packed key."""
    return (_flip_order((raw >> 32).to(tl.int32)).to(tl.int64) << 32) | (0x7FFFFFFF - (raw & 0xFFFFFFFF))


# Below every packed similarity (its high word is below the key of −inf).
_EMPTY_KEY = tl.constexpr(-9223372036854775807)
_INT32_MIN = tl.constexpr(-2147483648)
_ORDERED_NEG_INF = tl.constexpr(-2139095041)  # _ordered_bits(−inf)


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _merge_bitonic_rows(x, LOG2_ROWS: tl.constexpr, LOG2_COLS: tl.constexpr):
    """Each row of x [2^LOG2_ROWS, 2^LOG2_COLS] (integers), a bitonic sequence (e.g. the elementwise
    max of a descending and an ascending list), sorted descending by LOG2_COLS half-cleaner stages:
    a bitonic merge, where a full sort would take LOG2_COLS·(LOG2_COLS+1)/2 stages.

    The tensor is viewed as a hypercube of 2s, one axis per index bit; at the stage for column
    bit j each element meets its partner across that bit (x XOR the XOR over the pair), and the
    element with the bit clear keeps the larger key."""
    h = tl.reshape(x, [2] * (LOG2_ROWS + LOG2_COLS))
    for stage in tl.static_range(LOG2_COLS):  # column bits from the highest: axes LOG2_ROWS, LOG2_ROWS + 1, ...
        h = _half_cleaner(h, LOG2_ROWS + stage, LOG2_ROWS + LOG2_COLS)
    return tl.reshape(h, x.shape)


@triton.jit
def _half_cleaner(h, AXIS: tl.constexpr, DIMS: tl.constexpr):
    partner = h ^ tl.reduce(h, AXIS, _xor, keep_dims=True)
    upper = tl.reshape(tl.arange(0, 2), [1] * AXIS + [2] + [1] * (DIMS - 1 - AXIS))
    return tl.where(upper == 1, tl.minimum(h, partner), tl.maximum(h, partner))


@triton.jit
def _topk_query(
    q_ptr,
    rows,
    row_ok,
    stride_qn,
    stride_qd,
    dim,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
):
    """→ (the query block as the products take it, its inverse norms). With D_CHUNKS > 1 the block
    is re-read chunk by chunk per tile (from cache) and the first value is only a placeholder."""
    lanes_d = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:
        q = _load_rows(q_ptr, rows, row_ok, stride_qn, lanes_d, lanes_d < dim, stride_qd)
        qf = q.to(tl.float32)
        if DOT_FP32:
            q = qf
        return q, _inverse_norm(qf, NORMALIZE)
    else:
        sq = tl.zeros(rows.shape, tl.float32)
        if NORMALIZE:
            for c in range(0, D_CHUNKS):
                dims = c * BLOCK_D + lanes_d
                qf = _load_rows(q_ptr, rows, row_ok, stride_qn, dims, dims < dim, stride_qd).to(tl.float32)
                sq += tl.sum(qf * qf, axis=1)
        inv_q = _inverse_norm_from_squares(sq, NORMALIZE)
        return inv_q, inv_q


@triton.jit
def _topk_tile(
    q,
    inv_q,
    q_ptr,
    bank_ptr,
    rows,
    row_ok,
    cols,
    filled,
    dim,
    stride_qn,
    stride_qd,
    stride_bk,
    stride_bd,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
):
    """Similarities [BLOCK_N, BLOCK_K] of the rows with the slots ``cols`` (unfilled slots read as 0).
    Every pass computes them with this one function, so a pass that re-computes a tile gets the
    same bits."""
    lanes_d = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:
        _, _, sims = _bank_tile_logits(
            q,
            inv_q,
            bank_ptr,
            cols,
            filled,
            stride_bk,
            stride_bd,
            lanes_d,
            lanes_d < dim,
            NORMALIZE,
            DOT_FP32,
            PRECISION,
        )
        return sims
    else:
        dot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        sqb = tl.zeros([BLOCK_K], tl.float32)
        for c in range(0, D_CHUNKS):
            dims = c * BLOCK_D + lanes_d
            dim_ok = dims < dim
            qc = _load_rows(q_ptr, rows, row_ok, stride_qn, dims, dim_ok, stride_qd)
            bc = _load_rows(bank_ptr, cols, filled, stride_bk, dims, dim_ok, stride_bd)
            if DOT_FP32:
                qc = qc.to(tl.float32)
                bc = bc.to(tl.float32)
            dot = tl.dot(qc, tl.trans(bc), dot, input_precision=PRECISION)
            if NORMALIZE:
                bf = bc.to(tl.float32)
                sqb += tl.sum(bf * bf, axis=1)
        return dot * inv_q[:, None] * _inverse_norm_from_squares(sqb, NORMALIZE)[None, :]


@triton.jit
def _full_tiles_end(slot_start, split_slots, n_slots, valid_count, HAS_VALID_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Offset in the split below which every tile is filled throughout: those tiles are loaded
    and scanned without a slot mask (with a validity mask, none is)."""
    if HAS_VALID_MASK:
        return 0
    else:
        filled_end = tl.minimum(n_slots, valid_count) - slot_start
        return tl.minimum(tl.maximum(filled_end, 0) // BLOCK_K * BLOCK_K, split_slots)


@triton.jit
def _tile_slots(
    offset,
    slot_start,
    n_slots,
    valid_mask_ptr,
    valid_count,
    FULL: tl.constexpr,
    HAS_VALID_MASK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(slots of the tile, which are filled); a FULL tile's mask is the constant true."""
    cols = slot_start + offset + tl.arange(0, BLOCK_K)
    if FULL:
        return cols, tl.full([BLOCK_K], 1, tl.int1)
    else:
        return cols, _slots_filled(cols, n_slots, valid_mask_ptr, valid_count, HAS_VALID_MASK)


@triton.jit
def _group_max_step(
    even,
    odd,
    offset,
    slot_start,
    q,
    inv_q,
    q_ptr,
    bank_ptr,
    rows,
    row_ok,
    valid_mask_ptr,
    n_slots,
    valid_count,
    dim,
    stride_qn,
    stride_qd,
    stride_bk,
    stride_bd,
    FULL: tl.constexpr,
    HAS_VALID_MASK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    PARITY_GROUPS: tl.constexpr,
):
    """One tile of pass 1: the group maxima (NaN kept, so that a row with one is seen)."""
    cols, filled = _tile_slots(offset, slot_start, n_slots, valid_mask_ptr, valid_count, FULL, HAS_VALID_MASK, BLOCK_K)
    sims = _topk_tile(
        q,
        inv_q,
        q_ptr,
        bank_ptr,
        rows,
        row_ok,
        cols,
        filled,
        dim,
        stride_qn,
        stride_qd,
        stride_bk,
        stride_bd,
        NORMALIZE,
        DOT_FP32,
        PRECISION,
        BLOCK_N,
        BLOCK_K,
        BLOCK_D,
        D_CHUNKS,
    )
    if not FULL:
        sims = tl.where(filled[None, :], sims, float("-inf"))
    if PARITY_GROUPS and (offset // BLOCK_K) % 2 == 1:
        odd = tl.maximum(odd, sims, propagate_nan=tl.PropagateNan.ALL)
    else:
        even = tl.maximum(even, sims, propagate_nan=tl.PropagateNan.ALL)
    return even, odd


@triton.jit
def _gather_step(
    full,
    offset,
    slot_start,
    threshold,
    lists,
    q,
    inv_q,
    q_ptr,
    bank_ptr,
    rows,
    row_ok,
    valid_mask_ptr,
    count_ptr,
    n_slots,
    valid_count,
    dim,
    stride_qn,
    stride_qd,
    stride_bk,
    stride_bd,
    FULL: tl.constexpr,
    HAS_VALID_MASK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    CAPACITY: tl.constexpr,
):
    """One tile of pass 2: appends the tile's slots at or above each row's τ to the row's list
    (rows already ``full`` excepted) → the rows whose lists are full.

    A row meets a candidate in about one tile in twelve, so they are taken out one per row per
    round, largest first, with row reductions (no per-element list writes); a tile holding many
    of a row's candidates (a bank sorted or clustered by similarity) costs a round each. NaN marks
    what is not (or no longer) a candidate: the max skips it. A similarity that is itself NaN was
    flagged by the first pass, and its row takes the exact path."""
    lanes = tl.arange(0, BLOCK_K)
    cols, filled = _tile_slots(offset, slot_start, n_slots, valid_mask_ptr, valid_count, FULL, HAS_VALID_MASK, BLOCK_K)
    sims = _topk_tile(
        q,
        inv_q,
        q_ptr,
        bank_ptr,
        rows,
        row_ok,
        cols,
        filled,
        dim,
        stride_qn,
        stride_qd,
        stride_bk,
        stride_bd,
        NORMALIZE,
        DOT_FP32,
        PRECISION,
        BLOCK_N,
        BLOCK_K,
        BLOCK_D,
        D_CHUNKS,
    )
    if FULL:
        remaining = sims
    else:
        remaining = tl.where(filled[None, :], sims, float("nan"))
    best = tl.max(remaining, axis=1)
    taking = (best >= threshold) & ~full
    while tl.max(taking.to(tl.int32), axis=0) > 0:
        col = tl.min(tl.where(remaining == best[:, None], lanes[None, :], BLOCK_K), axis=1)
        at = tl.atomic_add(count_ptr + rows, 1, mask=taking, sem="relaxed")
        raw = (best.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (slot_start + offset + col).to(tl.int64)
        tl.store(lists + at, raw, mask=taking & (at < CAPACITY))
        # A list that overflowed stays so (its row takes the exact path): it takes no more.
        full = full | (taking & (at >= CAPACITY))
        remaining = tl.where(lanes[None, :] == col[:, None], float("nan"), remaining)
        best = tl.max(remaining, axis=1)
        taking = (best >= threshold) & ~full
    return full


@triton.jit
def _bank_topk_threshold_kernel(
    q_ptr,
    bank_ptr,
    valid_mask_ptr,
    group_max_ptr,
    count_ptr,
    n_queries,
    n_slots,
    dim,
    valid_count,
    split_slots,
    stride_qn,
    stride_qd,
    stride_bk,
    stride_bd,
    HAS_VALID_MASK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    LOG2_N: tl.constexpr,
    LOG2_K: tl.constexpr,
    CAPACITY: tl.constexpr,
    PARITY_GROUPS: tl.constexpr,
):
    """Pass 1, program (row block, split): the split's slots fall into BLOCK_K groups by their
    position within the tile (2·BLOCK_K with PARITY_GROUPS: × the tile's parity, when the splits
    alone give fewer than 2k groups); the largest similarity of each group, per row, costs one
    max per element. Writes each row's top BLOCK_K group maxima, descending, as ordered int32
    keys [splits, N, BLOCK_K]. A row with a NaN similarity has its count pushed past the
    capacity: it takes the exact path, which ranks NaN first as a sort does."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_queries
    q, inv_q = _topk_query(q_ptr, rows, row_ok, stride_qn, stride_qd, dim, NORMALIZE, DOT_FP32, BLOCK_D, D_CHUNKS)
    even = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)
    odd = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)
    slot_start = split * split_slots
    full_end = _full_tiles_end(slot_start, split_slots, n_slots, valid_count, HAS_VALID_MASK, BLOCK_K)
    for offset in range(0, full_end, BLOCK_K):
        even, odd = _group_max_step(
            even,
            odd,
            offset,
            slot_start,
            q,
            inv_q,
            q_ptr,
            bank_ptr,
            rows,
            row_ok,
            valid_mask_ptr,
            n_slots,
            valid_count,
            dim,
            stride_qn,
            stride_qd,
            stride_bk,
            stride_bd,
            True,
            HAS_VALID_MASK,
            NORMALIZE,
            DOT_FP32,
            PRECISION,
            BLOCK_N,
            BLOCK_K,
            BLOCK_D,
            D_CHUNKS,
            PARITY_GROUPS,
        )
    for offset in range(full_end, split_slots, BLOCK_K):
        even, odd = _group_max_step(
            even,
            odd,
            offset,
            slot_start,
            q,
            inv_q,
            q_ptr,
            bank_ptr,
            rows,
            row_ok,
            valid_mask_ptr,
            n_slots,
            valid_count,
            dim,
            stride_qn,
            stride_qd,
            stride_bk,
            stride_bd,
            False,
            HAS_VALID_MASK,
            NORMALIZE,
            DOT_FP32,
            PRECISION,
            BLOCK_N,
            BLOCK_K,
            BLOCK_D,
            D_CHUNKS,
            PARITY_GROUPS,
        )
    has_nan = tl.max(((even != even) | (odd != odd)).to(tl.int32), axis=1) > 0
    tl.atomic_add(count_ptr + rows, CAPACITY + 1, mask=has_nan & row_ok, sem="relaxed")
    top = tl.sort(_ordered_bits(even), dim=1, descending=True)
    if PARITY_GROUPS:
        top = _merge_into(top, _ordered_bits(odd), LOG2_N, LOG2_K)
    lanes = tl.arange(0, BLOCK_K)
    out = (split * n_queries + rows).to(tl.int64)[:, None] * BLOCK_K + lanes[None, :]
    tl.store(group_max_ptr + out, top, mask=row_ok[:, None])


@triton.jit
def _bank_topk_gather_kernel(
    q_ptr,
    bank_ptr,
    valid_mask_ptr,
    group_max_ptr,
    count_ptr,
    candidate_ptr,
    n_queries,
    n_slots,
    dim,
    valid_count,
    split_slots,
    k,
    n_splits,
    stride_qn,
    stride_qd,
    stride_bk,
    stride_bd,
    HAS_VALID_MASK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    LOG2_N: tl.constexpr,
    LOG2_K: tl.constexpr,
    CAPACITY: tl.constexpr,
):
    """Pass 2, program (row block, split): τ, the k-th largest group maximum over all splits, is a
    lower bound on the k-th largest similarity (k groups each hold one at least as large), so the
    top k are among the slots with similarity ≥ τ. The same sweep appends those (similarity bits
    << 32 | slot) to the row's list [N, CAPACITY], counting every one in count [N] (past CAPACITY
    the count still grows: the finish pass then takes the exact path)."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_queries
    lanes = tl.arange(0, BLOCK_K)
    groups = tl.load(
        group_max_ptr + rows.to(tl.int64)[:, None] * BLOCK_K + lanes[None, :], mask=row_ok[:, None], other=_INT32_MIN
    )
    for other in range(1, n_splits):
        base = (other * n_queries + rows).to(tl.int64)[:, None] * BLOCK_K
        ascending = tl.load(
            group_max_ptr + base + (BLOCK_K - 1 - lanes)[None, :], mask=row_ok[:, None], other=_INT32_MIN
        )
        groups = _merge_bitonic_rows(tl.maximum(groups, ascending), LOG2_N, LOG2_K)
    kth = tl.max(tl.where(lanes[None, :] == k - 1, groups, _INT32_MIN), axis=1)
    # A few units in the last place lower, so that no rounding between passes can drop a slot;
    # at most down to −inf (fewer than k groups filled: every filled slot is a candidate).
    threshold = _float_of_ordered(tl.maximum(kth, _ORDERED_NEG_INF + 4) - 4)
    q, inv_q = _topk_query(q_ptr, rows, row_ok, stride_qn, stride_qd, dim, NORMALIZE, DOT_FP32, BLOCK_D, D_CHUNKS)
    lists = candidate_ptr + rows.to(tl.int64) * CAPACITY
    slot_start = split * split_slots
    full_end = _full_tiles_end(slot_start, split_slots, n_slots, valid_count, HAS_VALID_MASK, BLOCK_K)
    full = ~row_ok  # rows past the queries take nothing
    for offset in range(0, full_end, BLOCK_K):
        full = _gather_step(
            full,
            offset,
            slot_start,
            threshold,
            lists,
            q,
            inv_q,
            q_ptr,
            bank_ptr,
            rows,
            row_ok,
            valid_mask_ptr,
            count_ptr,
            n_slots,
            valid_count,
            dim,
            stride_qn,
            stride_qd,
            stride_bk,
            stride_bd,
            True,
            HAS_VALID_MASK,
            NORMALIZE,
            DOT_FP32,
            PRECISION,
            BLOCK_N,
            BLOCK_K,
            BLOCK_D,
            D_CHUNKS,
            CAPACITY,
        )
    for offset in range(full_end, split_slots, BLOCK_K):
        full = _gather_step(
            full,
            offset,
            slot_start,
            threshold,
            lists,
            q,
            inv_q,
            q_ptr,
            bank_ptr,
            rows,
            row_ok,
            valid_mask_ptr,
            count_ptr,
            n_slots,
            valid_count,
            dim,
            stride_qn,
            stride_qd,
            stride_bk,
            stride_bd,
            False,
            HAS_VALID_MASK,
            NORMALIZE,
            DOT_FP32,
            PRECISION,
            BLOCK_N,
            BLOCK_K,
            BLOCK_D,
            D_CHUNKS,
            CAPACITY,
        )


@triton.jit
def _store_packed(keys, rows, row_ok, lanes, k, values_ptr, indices_ptr):
    """Packed keys [rows, ≥ k], descending → the first k similarities and slots; empty keys and
    −inf similarities → (−inf, −1)."""
    values = tl.where(keys == _EMPTY_KEY, -float("inf"), _float_of_ordered((keys >> 32).to(tl.int32)))
    # A filled slot at −inf is reported as missing too, as the reference does.
    indices = tl.where(values == -float("inf"), -1, 0x7FFFFFFF - (keys & 0xFFFFFFFF))
    out = rows.to(tl.int64)[:, None] * k + lanes[None, :]
    out_mask = row_ok[:, None] & (lanes < k)[None, :]
    tl.store(values_ptr + out, values, mask=out_mask)
    tl.store(indices_ptr + out, indices, mask=out_mask)


@triton.jit
def _merge_into(best, keys, LOG2_N: tl.constexpr, LOG2_K: tl.constexpr):
    """The top BLOCK_K of a descending list and a tile of keys [BLOCK_N, BLOCK_K], descending: the
    tile sorted ascending, its elementwise max with the list is a bitonic sequence holding the top
    BLOCK_K of both, which ``_merge_bitonic_rows`` sorts."""
    return _merge_bitonic_rows(tl.maximum(best, tl.sort(keys, dim=1, descending=False)), LOG2_N, LOG2_K)


@triton.jit
def _bank_topk_finish_kernel(
    q_ptr,
    bank_ptr,
    valid_mask_ptr,
    count_ptr,
    candidate_ptr,
    values_ptr,
    indices_ptr,
    n_queries,
    n_slots,
    dim,
    valid_count,
    slot_end,
    k,
    stride_qn,
    stride_qd,
    stride_bk,
    stride_bd,
    HAS_VALID_MASK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    LOG2_N: tl.constexpr,
    LOG2_K: tl.constexpr,
    CAPACITY: tl.constexpr,
):
    """Pass 3, one program per BLOCK_N rows. When every row's candidates fit its list, the lists
    are merged BLOCK_K at a time into a running top-BLOCK_K (as far as the longest list reaches).
    Otherwise (many ties at τ, or the top slots crowded into few groups) the block takes the
    exact path: the same running list over every filled slot, one bank tile at a time."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_queries
    lanes = tl.arange(0, BLOCK_K)
    count = tl.load(count_ptr + rows, mask=row_ok, other=0)
    longest = tl.max(count, axis=0)
    best = tl.full([BLOCK_N, BLOCK_K], _EMPTY_KEY, tl.int64)  # sorted descending
    if longest <= CAPACITY:
        lists = candidate_ptr + rows.to(tl.int64)[:, None] * CAPACITY
        for start in range(0, longest, BLOCK_K):
            listed = row_ok[:, None] & ((start + lanes)[None, :] < count[:, None])
            raw = tl.load(lists + (start + lanes)[None, :], mask=listed, other=0)
            best = _merge_into(best, tl.where(listed, _pack_candidate(raw), _EMPTY_KEY), LOG2_N, LOG2_K)
    else:
        q, inv_q = _topk_query(q_ptr, rows, row_ok, stride_qn, stride_qd, dim, NORMALIZE, DOT_FP32, BLOCK_D, D_CHUNKS)
        for offset in range(0, slot_end, BLOCK_K):
            cols, filled = _tile_slots(offset, 0, n_slots, valid_mask_ptr, valid_count, False, HAS_VALID_MASK, BLOCK_K)
            sims = _topk_tile(
                q,
                inv_q,
                q_ptr,
                bank_ptr,
                rows,
                row_ok,
                cols,
                filled,
                dim,
                stride_qn,
                stride_qd,
                stride_bk,
                stride_bd,
                NORMALIZE,
                DOT_FP32,
                PRECISION,
                BLOCK_N,
                BLOCK_K,
                BLOCK_D,
                D_CHUNKS,
            )
            keys = tl.where(filled[None, :], _pack_similarity(sims, cols[None, :]), _EMPTY_KEY)
            best = _merge_into(best, keys, LOG2_N, LOG2_K)
    _store_packed(best, rows, row_ok, lanes, k, values_ptr, indices_ptr)


# ----------------------------------------------------------------------------- launchers


def _dim_block(d: int) -> int:
    return max(16, next_power_of_2(max(d, 1)))


def _row_block(n: int, largest: int) -> int:
    return max(16, min(largest, next_power_of_2(max(n, 1))))


# Hopper gives a block at most 232,448 B of shared memory, where the operands of each tl.dot (a
# block of rows × BLOCK_D) are staged, two or three pipeline stages deep. Holding each operand
# tile to 32 KiB keeps every kernel inside that for any D up to 1024 (bf16 D = 512 at the D = 128
# tiles would need ~262 KB). tests/test_triton_codegen.py compiles the tiles chosen here.
OPERAND_TILE_BYTES = 32768


def _tile_rows(block_d: int, operand_bytes: int, largest: int) -> int:
    """Rows of a [rows, block_d] dot operand: a power of two in [16, largest] within OPERAND_TILE_BYTES."""
    fit = OPERAND_TILE_BYTES // (block_d * operand_bytes)
    return max(16, min(largest, 1 << max(fit, 1).bit_length() - 1))


def _operand_bytes(dtype: torch.dtype, dot_fp32: bool) -> int:
    return 4 if dot_fp32 else dtype.itemsize


@functools.lru_cache(maxsize=None)  # pure in its arguments; read-only results
def nce_tiles(dtype: torch.dtype, d: int, interpret: bool = False) -> dict:
    """The InfoNCE kernels' tiles for head dimension ``d``: BLOCK_D, the forward's largest row block
    and slot tile, and the backward's row block = slot tile (fp16's second products take fp32
    operands)."""
    dots = _dot_settings(dtype, interpret)
    block_d = _dim_block(d)
    fwd = _operand_bytes(dtype, dots["DOT_FP32"])
    bwd = _operand_bytes(dtype, dots["DOT_FP32"] or dots["GRAD_DOT_FP32"])
    return dict(
        block_d=block_d,
        fwd_rows=_tile_rows(block_d, fwd, 128),
        fwd_slots=_tile_rows(block_d, fwd, SLOT_TILE),
        bwd_tile=_tile_rows(block_d, bwd, 64),
    )


@functools.lru_cache(maxsize=None)  # pure in its arguments; read-only results
def topk_tiles(dtype: torch.dtype, d: int, k: int, interpret: bool = False) -> dict:
    """The top-k kernels' tiles: the slot tile width BLOCK_K ≥ k (also the width of the group
    maxima and of the exact path's running list), the largest row block, and the head-dimension
    chunk BLOCK_D that keeps a slot tile within OPERAND_TILE_BYTES."""
    block_k = max(SLOT_TILE, next_power_of_2(k))
    operand = _operand_bytes(dtype, _dot_settings(dtype, interpret)["DOT_FP32"])
    block_d = _tile_rows(block_k, operand, _dim_block(d))  # a [block_k, block_d] tile, read the other way
    return dict(
        block_k=block_k, rows=max(16, min(64, 4096 // block_k)), block_d=block_d, d_chunks=cdiv(max(d, 1), block_d)
    )


def topk_capacity(block_k: int) -> int:
    """Candidates kept per row. With G ≥ 2k groups in all, the slots at or above τ are about
    G·ln(G / (G − k)) for independent similarities (benchmarks/static_cost.py:
    expected_candidates; ≈ 74 at k = 64 with 4 splits, ≤ 1.39·k at G = 2k): twice the tile
    width, at least 256, holds them with room."""
    return max(TOPK_MIN_CAPACITY, 2 * block_k)


def _slot_end(num_slots: int, valid_mask, valid_count: int) -> int:
    # A filled count bounds the sweep: a partly filled bank costs only its filled part.
    return num_slots if valid_mask is not None else min(num_slots, valid_count)


# Bank tiles per split at least: a split below this costs more in partials than it saves.
MIN_TILES_PER_SPLIT = 4
SLOT_TILE = 64
# Programs of each kernel resident on one SM at its bench tiles (registers and shared memory, as
# benchmarks/static_cost.py reports them; tests/test_static_cost.py holds these to it).
FWD_PROGRAMS_PER_SM = 2
BWD_QUERY_PROGRAMS_PER_SM = 1
TOPK_PROGRAMS_PER_SM = 2
# The top-k finish pass: rows per program, and the shortest candidate list (topk_capacity).
TOPK_FINISH_ROWS = 16
TOPK_MIN_CAPACITY = 256


def _bank_splits(
    row_blocks: int, slot_end: int, device: torch.device, interpret: bool, tile: int = SLOT_TILE, per_sm: int = 2
) -> tuple[int, int]:
    """(splits, slots per split): the bank is cut into contiguous ranges of whole ``tile``-slot
    tiles so that row blocks × splits programs fill the GPU (N = 4096 queries make only 32 row
    blocks of 128) in one wave of ``per_sm`` resident programs per SM: rounded down, since one
    program past a wave costs a whole second wave."""
    tiles = max(1, cdiv(slot_end, tile))
    sms = None if interpret else _backend.sm_count(device)
    if sms is None:
        splits = min(3, tiles)  # exercise the split and merge path on small shapes
    else:
        splits = max(1, min((per_sm * sms) // row_blocks, tiles // MIN_TILES_PER_SPLIT))
    per_split = cdiv(tiles, splits)
    return cdiv(tiles, per_split), per_split * tile


def _strides(x):
    return x.stride() if x is not None else (0, 0)  # the [N, D] / [K, D] operands: two strides


def bank_info_nce_fwd(
    query,
    positive,
    bank,
    temperature,
    extra,
    query_ids,
    bank_ids,
    valid_mask,
    valid_count: int,
    fn_mode,
    normalize: bool,
    interpret: bool,
    reduce_scale=None,
    self_slots=None,
):
    """[N, D] queries and positives (or None), [K, D] bank, optional [N, M, D] extras and [N] int64
    self slots → (loss, lse_all, lse_pos), fp32 [N]; with ``reduce_scale`` the loss is
    reduce_scale·Σ_i loss_i instead (0-d)."""
    n, d = query.shape
    num_slots = bank.shape[0]
    dev = query.device
    reduce = reduce_scale is not None
    # The loss: per query, or (reducing) one 0-d value; the mean of no queries is 0.
    loss = torch.empty(() if reduce else n, dtype=torch.float32, device=dev)
    lse_all = torch.empty(n, dtype=torch.float32, device=dev)
    lse_pos = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return (loss.zero_() if reduce else loss), lse_all, lse_pos
    dots = _dot_settings(query.dtype, interpret)
    tiles = nce_tiles(query.dtype, d, interpret)
    block_d, slot_tile = tiles["block_d"], tiles["fwd_slots"]
    block_n = _row_block(n, tiles["fwd_rows"])
    row_blocks = cdiv(n, block_n)
    splits, split_slots = _bank_splits(
        row_blocks, _slot_end(num_slots, valid_mask, valid_count), dev, interpret, slot_tile, FWD_PROGRAMS_PER_SM
    )
    partial = torch.empty((4, splits, n), dtype=torch.float32, device=dev)  # max and sum, over A and over P
    m = extra.shape[1] if extra is not None else 0
    placeholder = lse_all
    has_positive = positive is not None
    positive = positive if has_positive else query
    _bank_info_nce_fwd_kernel[(row_blocks, splits)](
        query,
        positive,
        bank,
        extra if extra is not None else query,
        query_ids if query_ids is not None else placeholder,
        bank_ids if bank_ids is not None else placeholder,
        valid_mask if valid_mask is not None else placeholder,
        self_slots if self_slots is not None else placeholder,
        temperature,
        partial,
        n,
        num_slots,
        d,
        m,
        valid_count,
        split_slots,
        *_strides(query),
        *_strides(positive),
        *_strides(bank),
        *(extra.stride() if extra is not None else (0, 0, 0)),
        FN_MODE=FALSE_NEGATIVE_CODES[fn_mode],
        HAS_VALID_MASK=valid_mask is not None,
        HAS_EXTRA=m > 0,
        NORMALIZE=normalize,
        HAS_SELF_SLOT=self_slots is not None,
        HAS_POSITIVE=has_positive,
        DOT_FP32=dots["DOT_FP32"],
        PRECISION=dots["PRECISION"],
        BLOCK_N=block_n,
        BLOCK_K=slot_tile,
        BLOCK_D=block_d,
        num_warps=8 if block_n * block_d >= 128 * 128 else 4,
    )
    # Reducing, one program walks the rows in wide blocks (4 for N = 4096): a few µs on the device,
    # where a torch sum and scale would cost two launches.
    block = 1024 if reduce else 256
    _bank_info_nce_combine_kernel[(1 if reduce else cdiv(n, block),)](
        partial,
        loss,
        lse_all,
        lse_pos,
        n,
        splits,
        reduce_scale if reduce else 1.0,
        FN_MODE=FALSE_NEGATIVE_CODES[fn_mode],
        REDUCE=reduce,
        BLOCK=block,
    )
    return loss, lse_all, lse_pos


def bank_info_nce_bwd(
    grad_loss,
    query,
    positive,
    bank,
    temperature,
    extra,
    query_ids,
    bank_ids,
    valid_mask,
    valid_count: int,
    fn_mode,
    normalize: bool,
    lse_all,
    lse_pos,
    bank_grad: bool,
    extra_grad: bool,
    interpret: bool,
    grad_scale: float = 1.0,
    self_slots=None,
):
    """→ (d query [N, D], d positive [N, D] (or [0] without a positive), d bank [K, D] or [0],
    d extras [N, M, D] or [0], r [N] fp32).

    ``grad_loss``: [N] per-query gradients, or one (0-d or [1]) that every query shares, read
    at stride 0; either is multiplied by ``grad_scale`` in the kernels."""
    n, d = query.shape
    num_slots = bank.shape[0]
    dev = query.device
    # empty_like and new_empty take their dtype and device from the tensor: cheaper to parse
    dq = torch.empty_like(query, memory_format=torch.contiguous_format)
    has_positive = positive is not None
    dpos = torch.empty_like(positive, memory_format=torch.contiguous_format) if has_positive else query.new_empty(0)
    positive = positive if has_positive else query
    r = torch.empty(n, dtype=torch.float32, device=dev)
    dbank = torch.empty_like(bank, memory_format=torch.contiguous_format) if bank_grad else bank.new_empty(0)
    has_extra = extra is not None and extra.shape[1] > 0
    # Extras may be strided (an expanded [1, M, D] shared by every query); their gradient is dense.
    dextra = torch.empty_like(extra, memory_format=torch.contiguous_format) if extra_grad else query.new_empty(0)
    tiles = nce_tiles(query.dtype, d, interpret)
    block_d, tile = tiles["block_d"], tiles["bwd_tile"]
    placeholder = r
    ids = (query_ids if query_ids is not None else placeholder, bank_ids if bank_ids is not None else placeholder)
    vmask = valid_mask if valid_mask is not None else placeholder
    sslots = self_slots if self_slots is not None else placeholder
    if grad_loss.dim() and not grad_loss.is_contiguous():
        grad_loss = grad_loss.contiguous()
    grad_stride = 1 if grad_loss.dim() and grad_loss.numel() == n and n != 1 else 0
    common = dict(
        FN_MODE=FALSE_NEGATIVE_CODES[fn_mode],
        HAS_VALID_MASK=valid_mask is not None,
        HAS_SELF_SLOT=self_slots is not None,
        NORMALIZE=normalize,
        BLOCK_D=block_d,
        **_dot_settings(query.dtype, interpret),
    )
    num_warps = 8 if block_d >= 128 else 4
    if n > 0:
        block_n = _row_block(n, tile)
        row_blocks = cdiv(n, block_n)
        splits, split_slots = _bank_splits(
            row_blocks, _slot_end(num_slots, valid_mask, valid_count), dev, interpret, tile, BWD_QUERY_PROGRAMS_PER_SM
        )
        acc = torch.empty((splits, n, d), dtype=torch.float32, device=dev)
        r_partial = torch.empty((splits, n), dtype=torch.float32, device=dev)
        _bank_info_nce_bwd_query_kernel[(row_blocks, splits)](
            query,
            positive,
            bank,
            extra if has_extra else query,
            *ids,
            vmask,
            sslots,
            temperature,
            grad_loss,
            lse_all,
            lse_pos,
            acc,
            r_partial,
            dpos if has_positive else dq,
            dextra if extra_grad else dq,
            n,
            num_slots,
            d,
            extra.shape[1] if has_extra else 0,
            valid_count,
            split_slots,
            grad_stride,
            grad_scale,
            *_strides(query),
            *_strides(positive),
            *_strides(bank),
            *(extra.stride() if has_extra else (0, 0, 0)),
            HAS_EXTRA=has_extra,
            EXTRA_GRAD=extra_grad and has_extra,
            HAS_POSITIVE=has_positive,
            BLOCK_N=block_n,
            BLOCK_K=tile,
            num_warps=num_warps,
            **common,
        )
        _bank_info_nce_dq_kernel[(row_blocks,)](
            query,
            temperature,
            acc,
            r_partial,
            dq,
            r,
            n,
            d,
            splits,
            *_strides(query),
            NORMALIZE=normalize,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    if bank_grad and num_slots > 0:
        block_k = _row_block(num_slots, tile)
        _bank_info_nce_bwd_bank_kernel[(cdiv(num_slots, block_k),)](
            query,
            bank,
            *ids,
            vmask,
            sslots,
            temperature,
            grad_loss,
            lse_all,
            lse_pos,
            dbank,
            n,
            num_slots,
            d,
            valid_count,
            grad_stride,
            grad_scale,
            *_strides(query),
            *_strides(bank),
            BLOCK_N=tile,
            BLOCK_K=block_k,
            num_warps=num_warps,
            **common,
        )
    return dq, dpos, dbank, dextra, r


def bank_topk(query, bank, k: int, valid_mask, valid_count: int, normalize: bool, interpret: bool):
    """→ (similarities [N, k] fp32, slots [N, k] int64), largest first; missing entries (−inf, −1).

    Three passes: group maxima per split (``_bank_topk_threshold_kernel``), the slots at or above
    the bound they give (``_bank_topk_gather_kernel``), and a sort of those per row, or the exact
    sweep for a row block whose candidates overflowed (``_bank_topk_finish_kernel``)."""
    n, d = query.shape
    num_slots = bank.shape[0]
    values = torch.empty((n, k), dtype=torch.float32, device=query.device)
    indices = torch.empty((n, k), dtype=torch.int64, device=query.device)
    if n == 0 or k == 0:
        return values, indices
    dots = _dot_settings(query.dtype, interpret)
    tiles = topk_tiles(query.dtype, d, k, interpret)
    block_k = tiles["block_k"]
    capacity = topk_capacity(block_k)
    block_n = _row_block(n, tiles["rows"])
    row_blocks = cdiv(n, block_n)
    slot_end = _slot_end(num_slots, valid_mask, valid_count)
    splits, split_slots = _bank_splits(
        row_blocks, slot_end, query.device, interpret, tile=block_k, per_sm=TOPK_PROGRAMS_PER_SM
    )
    group_max = torch.empty((splits, n, block_k), dtype=torch.int32, device=query.device)
    counts = torch.zeros((n,), dtype=torch.int32, device=query.device)
    candidates = torch.empty((n, capacity), dtype=torch.int64, device=query.device)
    bank_args = dict(
        q_ptr=query,
        bank_ptr=bank,
        valid_mask_ptr=valid_mask if valid_mask is not None else values,
        n_queries=n,
        n_slots=num_slots,
        dim=d,
        valid_count=valid_count,
        stride_qn=query.stride(0),
        stride_qd=query.stride(1),
        stride_bk=bank.stride(0),
        stride_bd=bank.stride(1),
        HAS_VALID_MASK=valid_mask is not None,
        NORMALIZE=normalize,
        DOT_FP32=dots["DOT_FP32"],
        PRECISION=dots["PRECISION"],
        BLOCK_K=block_k,
        BLOCK_D=tiles["block_d"],
        D_CHUNKS=tiles["d_chunks"],
        LOG2_K=block_k.bit_length() - 1,
    )
    sweep = dict(bank_args, split_slots=split_slots, BLOCK_N=block_n, LOG2_N=block_n.bit_length() - 1, num_warps=4)
    # Fewer than 2k groups (one split of a narrow tile) make τ loose: the tiles' parity doubles them.
    parity = splits * block_k < 2 * k
    _bank_topk_threshold_kernel[(row_blocks, splits)](
        group_max_ptr=group_max, count_ptr=counts, CAPACITY=capacity, PARITY_GROUPS=parity, **sweep
    )
    _bank_topk_gather_kernel[(row_blocks, splits)](
        group_max_ptr=group_max,
        count_ptr=counts,
        candidate_ptr=candidates,
        k=k,
        n_splits=splits,
        CAPACITY=capacity,
        **sweep,
    )
    _bank_topk_finish_kernel[(cdiv(n, TOPK_FINISH_ROWS),)](
        count_ptr=counts,
        candidate_ptr=candidates,
        values_ptr=values,
        indices_ptr=indices,
        slot_end=slot_end,
        k=k,
        BLOCK_N=TOPK_FINISH_ROWS,
        LOG2_N=TOPK_FINISH_ROWS.bit_length() - 1,
        CAPACITY=capacity,
        num_warps=4,
        **bank_args,
    )
    return values, indices
