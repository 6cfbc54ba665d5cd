"""Triton kernels for KV-cache retention: TRIM-KV scores, per-head radix selection, compaction, and
the training-side retention mass.

* ``_retention_scores_kernel``: ``(step − pos)·log β (+ w·log‖k‖)`` elementwise, fp32 out.
* ``_select_retained_kernel``: one program per (batch, head) row. The row's scores (loaded, or
  computed on the fly from log β and positions in the fused ``evict``) are mapped to 32-bit
  order-preserving keys. Four passes of 8-bit radix selection, each a histogram of the next digit
  among the candidates that match the digits found so far, find the key T of the k-th best
  unprotected token and how many of the tokens tied at T to keep. A last pass writes the kept
  indices in position order with a running prefix sum: protected tokens, keys above T, and the
  most recent of the ties at T. No sort, no host synchronisation, every output slot written.
* ``_select_histogram_kernel`` / ``_select_write_kernel``: the same selection when the rows are
  too few to fill the GPU (decode with a small batch): each row's tokens are split over several
  programs, each pass is one launch, and every split stores its own histogram. Each program sums
  its row's histograms to the same digits; the write pass starts each split at the slot that the
  splits before it fill (their protected tokens, their keys above T, their kept ties).
* ``_compact_kv_kernel``: gathers K and V rows and up to two per-token metadata rows at the kept
  indices. The out-of-place form runs one program per (row, block of kept tokens, block of
  head dims). The in-place form writes the prefix of the source buffers: kept index j ≥ j, so a
  program that walks its row's blocks in order, loading a whole block before storing it (with a
  barrier between), never overwrites a token it still has to read.
* ``_retention_mass_fwd_kernel`` / ``_bwd_kernel``: Σ_{i≤t} β_i^{t−i} over causal tiles, skipping
  the tiles above the diagonal and before the token's sequence start (packed sequences). Only the
  diagonal block and the blocks holding a sequence boundary are masked. One exponential per pair
  would make the MUFU units the limit (16 lanes an SM against 128 for FFMA), so the forward takes
  them for a quarter of its pairs and multiplies for the rest, and the backward sums its blocks by
  Horner's rule in β^BLOCK_T with exponentials once per chunk of blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from . import cdiv, next_power_of_2

_LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------- scores


@triton.jit
def _trim_kv_scores(
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    b,
    h,
    offs,
    mask,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
):
    lb = tl.load(lb_ptr + b * stride_lb_b + h * stride_lb_h + offs * stride_lb_s, mask=mask, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + b * stride_pos_b + h * stride_pos_h + offs * stride_pos_s, mask=mask, other=0)
    if STEP_PER_BATCH:
        step = tl.load(step_ptr + b)
    else:
        step = step_value
    if POS_FLOAT:
        age = step.to(tl.float32) - pos.to(tl.float32)
    else:
        age = (step.to(tl.int64) - pos.to(tl.int64)).to(tl.float32)  # exact integer age, then one rounding
    return age * lb


@triton.jit
def _retention_scores_kernel(
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    keys_ptr,
    out_ptr,
    heads,
    seq,
    dim,
    key_norm_weight,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_k_d,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
    HAS_KEYS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 row, batch and head: h·stride_h alone passes 2³¹ once H·S·D does (S = 1M, D = 128, H ≥ 16).
    row = tl.program_id(0).to(tl.int64)
    b = row // heads
    h = row % heads
    offs = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    mask = offs < seq
    scores = _trim_kv_scores(
        lb_ptr,
        pos_ptr,
        step_ptr,
        step_value,
        b,
        h,
        offs,
        mask,
        stride_lb_b,
        stride_lb_h,
        stride_lb_s,
        stride_pos_b,
        stride_pos_h,
        stride_pos_s,
        STEP_PER_BATCH,
        POS_FLOAT,
    )
    if HAS_KEYS:
        sq = tl.zeros([BLOCK_S], tl.float32)
        base = keys_ptr + b.to(tl.int64) * stride_k_b + h * stride_k_h + offs[:, None].to(tl.int64) * stride_k_s
        for d0 in range(0, dim, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            k = tl.load(base + dims[None, :] * stride_k_d, mask=mask[:, None] & (dims[None, :] < dim), other=0.0)
            k = k.to(tl.float32)
            sq += tl.sum(k * k, axis=1)
        scores += key_norm_weight * 0.5 * tl.log(sq)
    tl.store(out_ptr + row.to(tl.int64) * seq + offs, scores, mask=mask)


def retention_scores_fwd(log_beta, positions, step, keys, key_norm_weight):
    """[B, H, S] fp32 scores; ``positions`` already expanded (stride 0 where broadcast)."""
    b, h, s = log_beta.shape
    out = torch.empty((b, h, s), device=log_beta.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    per_batch = isinstance(step, torch.Tensor)
    has_keys = keys is not None and key_norm_weight != 0.0
    kt = keys if has_keys else log_beta.new_empty((1, 1, 1, 1))
    dim = keys.shape[-1] if has_keys else 1
    block_s = 256
    _retention_scores_kernel[(b * h, cdiv(s, block_s))](
        log_beta,
        positions,
        step if per_batch else out,
        0 if per_batch else int(step),
        kt,
        out,
        h,
        s,
        dim,
        float(key_norm_weight),
        *log_beta.stride(),
        *positions.stride(),
        *kt.stride(),
        STEP_PER_BATCH=per_batch,
        POS_FLOAT=positions.is_floating_point() or (per_batch and step.is_floating_point()),
        HAS_KEYS=has_keys,
        BLOCK_S=block_s,
        BLOCK_D=min(next_power_of_2(dim), 64),
    )
    return out


# ---------------------------------------------------------------------------------- selection


@triton.jit
def _ordered_key(x):
    """fp32 → int64 in [0, 2^32) with the order of the floats; −0 = +0; every NaN the largest key."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    return tl.where(x != x, 4294967295, key)


@triton.jit
def _row_keys(
    scores_ptr,
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    b,
    h,
    row,
    offs,
    mask,
    seq,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    FROM_LOG_BETA: tl.constexpr,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
):
    if FROM_LOG_BETA:
        scores = _trim_kv_scores(
            lb_ptr,
            pos_ptr,
            step_ptr,
            step_value,
            b,
            h,
            offs,
            mask,
            stride_lb_b,
            stride_lb_h,
            stride_lb_s,
            stride_pos_b,
            stride_pos_h,
            stride_pos_s,
            STEP_PER_BATCH,
            POS_FLOAT,
        )
    else:
        scores = tl.load(scores_ptr + row.to(tl.int64) * seq + offs, mask=mask, other=0.0)
    return _ordered_key(scores)


@triton.jit
def _row_extent(lengths_ptr, b, seq, kept, sink, window, HAS_LENGTHS: tl.constexpr):
    """(length, sink tokens, window tokens, unprotected tokens to choose) of a row."""
    if HAS_LENGTHS:
        length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b).to(tl.int64), 0), seq)
    else:
        length = seq + tl.zeros([], tl.int64)
    n_sink = tl.minimum(sink, length)
    n_window = tl.minimum(window, length - n_sink)
    total = tl.minimum(kept, length)
    return length, n_sink, n_window, total - n_sink - n_window  # the last >= 0: kept >= sink + window


@triton.jit
def _take_digit(hist, prefix, need, bins, PASS: tl.constexpr):
    """One radix step from a digit histogram of the candidates matching `prefix`: the largest digit
    d with at least `need` of them at or above it → (d, prefix with d, need less those above d,
    candidates at d). Digit PASS of a 32-bit key (most significant first)."""
    return _take_digit_at(hist, prefix, need, bins, 24 - 8 * PASS)


@triton.jit
def _take_digit_at(hist, prefix, need, bins, SHIFT: tl.constexpr):
    """_take_digit for the 8-bit digit at bit SHIFT."""
    at_least = tl.sum(hist) - tl.cumsum(hist, 0) + hist
    digit = tl.max(tl.where(at_least >= need, bins, 0))
    count_digit = tl.sum(tl.where(bins == digit, hist, 0))
    above = tl.sum(tl.where(bins == digit, at_least, 0)) - count_digit
    return (digit, prefix | (digit.to(tl.int64) << SHIFT), need - above, count_digit.to(tl.int64))


@triton.jit
def _block_keys(
    scores_ptr,
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    b,
    h,
    row,
    offs,
    seq,
    length,
    n_sink,
    n_window,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    FROM_LOG_BETA: tl.constexpr,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
):
    """A block of a row: (tokens before the length, unprotected ones among them, their keys)."""
    eligible = offs < length
    key = _row_keys(
        scores_ptr,
        lb_ptr,
        pos_ptr,
        step_ptr,
        step_value,
        b,
        h,
        row,
        offs,
        eligible,
        seq,
        stride_lb_b,
        stride_lb_h,
        stride_lb_s,
        stride_pos_b,
        stride_pos_h,
        stride_pos_s,
        FROM_LOG_BETA,
        STEP_PER_BATCH,
        POS_FLOAT,
    )
    return eligible, eligible & (offs >= n_sink) & (offs < length - n_window), key


@triton.jit
def _digit_histogram(
    scores_ptr,
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    b,
    h,
    row,
    seq,
    start,
    end,
    length,
    n_sink,
    n_window,
    prefix,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    PASS: tl.constexpr,
    FROM_LOG_BETA: tl.constexpr,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Histogram of digit PASS (most significant first) of the unprotected tokens in [start, end)
    whose keys match `prefix` in the digits before it."""
    lanes = tl.arange(0, BLOCK)
    hist = tl.zeros([256], tl.int32)
    for block_start in range(start, end, BLOCK):
        offs = block_start + lanes
        eligible, candidate, key = _block_keys(
            scores_ptr,
            lb_ptr,
            pos_ptr,
            step_ptr,
            step_value,
            b,
            h,
            row,
            offs,
            seq,
            length,
            n_sink,
            n_window,
            stride_lb_b,
            stride_lb_h,
            stride_lb_s,
            stride_pos_b,
            stride_pos_h,
            stride_pos_s,
            FROM_LOG_BETA,
            STEP_PER_BATCH,
            POS_FLOAT,
        )
        if PASS > 0:
            candidate = candidate & ((key >> (32 - 8 * PASS)) == (prefix >> (32 - 8 * PASS)))
        digits = ((key >> (24 - 8 * PASS)) & 255).to(tl.int32)
        hist += tl.histogram(digits, 256, mask=candidate)
    return hist


@triton.jit
def _write_kept(
    scores_ptr,
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    out_row,
    b,
    h,
    row,
    seq,
    start,
    end,
    length,
    n_sink,
    n_window,
    threshold,
    first_kept_tie,
    written,
    ties_seen,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    FROM_LOG_BETA: tl.constexpr,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Writes the kept indices of [start, end) in position order from slot `written` (given the kept
    tokens and ties before `start`); returns the slot after the last."""
    lanes = tl.arange(0, BLOCK)
    for block_start in range(start, end, BLOCK):
        offs = block_start + lanes
        eligible, candidate, key = _block_keys(
            scores_ptr,
            lb_ptr,
            pos_ptr,
            step_ptr,
            step_value,
            b,
            h,
            row,
            offs,
            seq,
            length,
            n_sink,
            n_window,
            stride_lb_b,
            stride_lb_h,
            stride_lb_s,
            stride_pos_b,
            stride_pos_h,
            stride_pos_s,
            FROM_LOG_BETA,
            STEP_PER_BATCH,
            POS_FLOAT,
        )
        protected = eligible & ((offs < n_sink) | (offs >= length - n_window))
        tie = candidate & (key == threshold)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int64), 0) - 1
        keep = protected | (candidate & (key > threshold)) | (tie & (tie_rank >= first_kept_tie))
        slot = written + tl.cumsum(keep.to(tl.int64), 0) - 1
        tl.store(out_row + slot, offs.to(tl.int64), mask=keep)
        written += tl.sum(keep.to(tl.int64))
        ties_seen += tl.sum(tie.to(tl.int64))
    return written


@triton.jit
def _fill_unused(out_row, written, kept, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for start in range(0, kept, BLOCK):
        offs = start + lanes
        tl.store(out_row + offs, tl.full([BLOCK], -1, tl.int64), mask=(offs >= written) & (offs < kept))


@triton.jit
def _select_retained_kernel(
    scores_ptr,
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    lengths_ptr,
    out_ptr,
    heads,
    seq,
    kept,
    sink,
    window,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    FROM_LOG_BETA: tl.constexpr,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit addressing, as in _retention_scores_kernel
    b = row // heads
    h = row % heads
    length, n_sink, n_window, k = _row_extent(lengths_ptr, b, seq, kept, sink, window, HAS_LENGTHS)

    # Radix select over 8-bit digits, most significant first: `prefix` holds the digits found,
    # `need` how many of the candidates matching them are still to be taken.
    prefix = tl.zeros([], tl.int64)
    need = k
    ties = tl.zeros([], tl.int64)
    bins = tl.arange(0, 256)
    for p in tl.static_range(4):
        hist = _digit_histogram(
            scores_ptr,
            lb_ptr,
            pos_ptr,
            step_ptr,
            step_value,
            b,
            h,
            row,
            seq,
            0,
            seq,
            length,
            n_sink,
            n_window,
            prefix,
            stride_lb_b,
            stride_lb_h,
            stride_lb_s,
            stride_pos_b,
            stride_pos_h,
            stride_pos_s,
            p,
            FROM_LOG_BETA,
            STEP_PER_BATCH,
            POS_FLOAT,
            BLOCK,
        )
        _, prefix, need, ties = _take_digit(hist, prefix, need, bins, p)
    threshold = tl.where(k > 0, prefix, 4294967296)
    # The `need` most recent of the `ties` tokens whose key equals the threshold are kept.
    out_row = out_ptr + row * kept
    written = _write_kept(
        scores_ptr,
        lb_ptr,
        pos_ptr,
        step_ptr,
        step_value,
        out_row,
        b,
        h,
        row,
        seq,
        0,
        seq,
        length,
        n_sink,
        n_window,
        threshold,
        ties - need,
        tl.zeros([], tl.int64),
        tl.zeros([], tl.int64),
        stride_lb_b,
        stride_lb_h,
        stride_lb_s,
        stride_pos_b,
        stride_pos_h,
        stride_pos_s,
        FROM_LOG_BETA,
        STEP_PER_BATCH,
        POS_FLOAT,
        BLOCK,
    )
    _fill_unused(out_row, written, kept, BLOCK)


@triton.jit
def _split_digits(
    hist_ptr, row, splits, split, need, PASSES: tl.constexpr, COUNT_BEFORE: tl.constexpr, SPLIT_BLOCK: tl.constexpr
):
    """The digits of the first PASSES passes from every split's histograms of a row ([rows, splits,
    4, 256] int32): (prefix, need, ties at the last digit). With COUNT_BEFORE, also the
    candidates of the splits before `split` that lie above the prefix (each counted at the first
    digit where it exceeds it) and those tied with it at the last digit."""
    bins = tl.arange(0, 256)
    split_lanes = tl.arange(0, SPLIT_BLOCK)
    prefix = tl.zeros([], tl.int64)
    ties = tl.zeros([], tl.int64)
    above_before = tl.zeros([], tl.int64)
    ties_before = tl.zeros([], tl.int64)
    for p in tl.static_range(PASSES):
        hist = tl.zeros([256], tl.int32)
        before = tl.zeros([256], tl.int32)  # the part of `hist` from the splits before `split`
        for s0 in range(0, splits, SPLIT_BLOCK):
            s = s0 + split_lanes
            tile = tl.load(
                hist_ptr + ((row * splits + s[:, None]) * 4 + p) * 256 + bins[None, :],
                mask=(s < splits)[:, None],
                other=0,
            )
            hist += tl.sum(tile, 0)
            if COUNT_BEFORE:
                before += tl.sum(tl.where((s < split)[:, None], tile, 0), 0)
        digit, prefix, need, ties = _take_digit(hist, prefix, need, bins, p)
        if COUNT_BEFORE:
            above_before += tl.sum(tl.where(bins > digit, before, 0)).to(tl.int64)
            if p == PASSES - 1:
                ties_before = tl.sum(tl.where(bins == digit, before, 0)).to(tl.int64)
    return prefix, need, ties, above_before, ties_before


@triton.jit
def _select_histogram_kernel(
    scores_ptr,
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    lengths_ptr,
    hist_ptr,
    heads,
    seq,
    kept,
    sink,
    window,
    splits,
    chunk,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    PASS: tl.constexpr,
    FROM_LOG_BETA: tl.constexpr,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = row // heads
    h = row % heads
    length, n_sink, n_window, k = _row_extent(lengths_ptr, b, seq, kept, sink, window, HAS_LENGTHS)
    prefix, _, _, _, _ = _split_digits(hist_ptr, row, splits, split, k, PASS, False, SPLIT_BLOCK)
    start = split.to(tl.int64) * chunk
    hist = _digit_histogram(
        scores_ptr,
        lb_ptr,
        pos_ptr,
        step_ptr,
        step_value,
        b,
        h,
        row,
        seq,
        start,
        tl.minimum(start + chunk, seq),
        length,
        n_sink,
        n_window,
        prefix,
        stride_lb_b,
        stride_lb_h,
        stride_lb_s,
        stride_pos_b,
        stride_pos_h,
        stride_pos_s,
        PASS,
        FROM_LOG_BETA,
        STEP_PER_BATCH,
        POS_FLOAT,
        BLOCK,
    )
    tl.store(hist_ptr + ((row * splits + split) * 4 + PASS) * 256 + tl.arange(0, 256), hist)


@triton.jit
def _select_write_kernel(
    scores_ptr,
    lb_ptr,
    pos_ptr,
    step_ptr,
    step_value,
    lengths_ptr,
    hist_ptr,
    out_ptr,
    heads,
    seq,
    kept,
    sink,
    window,
    splits,
    chunk,
    stride_lb_b,
    stride_lb_h,
    stride_lb_s,
    stride_pos_b,
    stride_pos_h,
    stride_pos_s,
    FROM_LOG_BETA: tl.constexpr,
    STEP_PER_BATCH: tl.constexpr,
    POS_FLOAT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = row // heads
    h = row % heads
    length, n_sink, n_window, k = _row_extent(lengths_ptr, b, seq, kept, sink, window, HAS_LENGTHS)
    prefix, need, ties, above_before, ties_before = _split_digits(hist_ptr, row, splits, split, k, 4, True, SPLIT_BLOCK)
    threshold = tl.where(k > 0, prefix, 4294967296)
    first_kept_tie = ties - need
    start = split.to(tl.int64) * chunk
    # This split's first slot: the protected tokens before it (the sink, then the window's part
    # before it), the candidates above the threshold before it, and the kept ties before it (the
    # ties past the first `first_kept_tie`).
    protected_before = tl.minimum(n_sink, start) + tl.maximum(tl.minimum(length, start) - (length - n_window), 0)
    chosen_before = tl.where(k > 0, above_before + tl.maximum(ties_before - first_kept_tie, 0), 0)
    out_row = out_ptr + row * kept
    written = _write_kept(
        scores_ptr,
        lb_ptr,
        pos_ptr,
        step_ptr,
        step_value,
        out_row,
        b,
        h,
        row,
        seq,
        start,
        tl.minimum(start + chunk, seq),
        length,
        n_sink,
        n_window,
        threshold,
        first_kept_tie,
        protected_before + chosen_before,
        ties_before,
        stride_lb_b,
        stride_lb_h,
        stride_lb_s,
        stride_pos_b,
        stride_pos_h,
        stride_pos_s,
        FROM_LOG_BETA,
        STEP_PER_BATCH,
        POS_FLOAT,
        BLOCK,
    )
    if split == splits - 1:
        _fill_unused(out_row, written, kept, BLOCK)


SELECT_MIN_CHUNK = 2048  # tokens per program below which a row is not shared by several


def select_splits(rows: int, seq: int, sms: int | None) -> int:
    """Programs per (batch, head) row. One, unless the rows alone would leave SMs idle and are long
    enough to share: then the row's tokens are split so that about every SM holds a program, and
    the selection runs as four histogram launches and a write launch (each split's histograms,
    summed over the row's splits, give every program the same digits; no atomics)."""
    if sms is None:  # the interpreter: one program per row unless a test asks for more
        return 1
    return max(1, min(sms // max(rows, 1), cdiv(seq, SELECT_MIN_CHUNK), 64))


def _select_launch(
    b, h, s, kept, sink, window, lengths, device, *, scores=None, log_beta=None, positions=None, step=None
):
    out = torch.empty((b, h, kept), device=device, dtype=torch.int64)
    if b * h == 0 or kept == 0:
        return out
    from_lb = scores is None
    per_batch = from_lb and isinstance(step, torch.Tensor)
    dummy = out
    lb = log_beta if from_lb else dummy
    pos = positions if from_lb else dummy
    lb_strides = log_beta.stride() if from_lb else (0, 0, 0)
    pos_strides = positions.stride() if from_lb else (0, 0, 0)
    pos_float = from_lb and (positions.is_floating_point() or (per_batch and step.is_floating_point()))
    sources = dict(
        scores_ptr=scores if not from_lb else dummy,
        lb_ptr=lb,
        pos_ptr=pos,
        step_ptr=step if per_batch else dummy,
        step_value=0 if per_batch or not from_lb else int(step),
        lengths_ptr=lengths if lengths is not None else dummy,
        heads=h,
        seq=s,
        kept=kept,
        sink=sink,
        window=window,
        stride_lb_b=lb_strides[0],
        stride_lb_h=lb_strides[1],
        stride_lb_s=lb_strides[2],
        stride_pos_b=pos_strides[0],
        stride_pos_h=pos_strides[1],
        stride_pos_s=pos_strides[2],
        FROM_LOG_BETA=from_lb,
        STEP_PER_BATCH=per_batch,
        POS_FLOAT=pos_float,
        HAS_LENGTHS=lengths is not None,
    )
    rows = b * h
    splits = select_splits(rows, s, _backend.sm_count(device))
    if splits == 1:
        block = min(max(next_power_of_2(s), 16), 4096)
        _select_retained_kernel[(rows,)](**sources, out_ptr=out, BLOCK=block, num_warps=16 if block >= 2048 else 4)
        return out
    block = min(max(next_power_of_2(cdiv(s, splits)), 16), 4096)
    chunk = cdiv(cdiv(s, splits), block) * block
    splits = cdiv(s, chunk)
    # Every pass writes its own [256] per (row, split) before any later pass reads it: no zeroing.
    hist = torch.empty((rows, splits, 4, 256), device=device, dtype=torch.int32)
    shape = dict(
        splits=splits,
        chunk=chunk,
        BLOCK=block,
        SPLIT_BLOCK=min(next_power_of_2(splits), 16),
        num_warps=16 if block >= 2048 else 4,
    )
    for digit_pass in range(4):
        _select_histogram_kernel[(rows, splits)](**sources, hist_ptr=hist, PASS=digit_pass, **shape)
    _select_write_kernel[(rows, splits)](**sources, hist_ptr=hist, out_ptr=out, **shape)
    return out


def select_retained_fwd(scores, budget, sink, window, lengths):
    """Kept indices [B, H, min(budget, S)] int64 from fp32 scores [B, H, S] (contiguous)."""
    b, h, s = scores.shape
    return _select_launch(b, h, s, min(budget, s), sink, window, lengths, scores.device, scores=scores)


def select_from_log_beta_fwd(log_beta, positions, step, budget, sink, window, lengths):
    """The fused form: TRIM-KV scores computed inside the selection, never stored."""
    b, h, s = log_beta.shape
    return _select_launch(
        b,
        h,
        s,
        min(budget, s),
        sink,
        window,
        lengths,
        log_beta.device,
        log_beta=log_beta,
        positions=positions,
        step=step,
    )


# ---------------------------------------------------------------------- selection across heads


@triton.jit
def _global_keys(scores_ptr, forced_ptr, b, heads, seq, offs, length):
    """Flattened (token, head) positions p = t·H + (H − 1 − h) of sequence b → 40-bit keys:
    class (3 forced, 1 eligible, 0 past the length) above the 32-bit ordered score. In this order
    a higher position is a more recent token, then a lower head: the tie order of the selection."""
    t = offs // heads
    hd = heads - 1 - offs % heads
    in_row = offs < heads * seq
    at = (b * heads + hd) * seq + t
    score = tl.load(scores_ptr + at, mask=in_row, other=0.0)
    forced = tl.load(forced_ptr + at, mask=in_row, other=0) != 0
    eligible = in_row & (t < length)
    klass = tl.where(eligible, tl.where(forced, 3, 1), 0).to(tl.int64)
    return (klass << 32) | _ordered_key(score), in_row, at


@triton.jit
def _select_global_kernel(
    scores_ptr, forced_ptr, lengths_ptr, keep_ptr, heads, seq, kept, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr
):
    """Program b: marks (keep_ptr [B, H, S] int8) the H·kept best (head, token) pairs of sequence
    b by (class, score, recency, lower head), by a radix select over five 8-bit digits of the
    40-bit keys (the class digit first); nothing past the length is kept."""
    b = tl.program_id(0).to(tl.int64)
    length, no_sink, no_window, kept_per_head = _row_extent(lengths_ptr, b, seq, kept, 0, 0, HAS_LENGTHS)
    k = heads * kept_per_head
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    total = heads * seq
    prefix = tl.zeros([], tl.int64)
    need = k
    ties = tl.zeros([], tl.int64)
    for p in tl.static_range(5):
        hist = tl.zeros([256], tl.int32)
        for start in range(0, total, BLOCK):
            key, in_row, unused_at = _global_keys(scores_ptr, forced_ptr, b, heads, seq, start + lanes, length)
            candidate = in_row & (key >= 4294967296)  # eligible: class ≥ 1
            if p > 0:
                candidate = candidate & ((key >> (40 - 8 * p)) == (prefix >> (40 - 8 * p)))
            hist += tl.histogram(((key >> (32 - 8 * p)) & 255).to(tl.int32), 256, mask=candidate)
        digit, prefix, need, ties = _take_digit_at(hist, prefix, need, bins, 32 - 8 * p)
    threshold = tl.where(k > 0, prefix, 1 << 40)
    first_kept_tie = ties - need  # the `need` most recent ties are kept
    ties_seen = tl.zeros([], tl.int64)
    for start in range(0, total, BLOCK):
        key, in_row, at = _global_keys(scores_ptr, forced_ptr, b, heads, seq, start + lanes, length)
        tie = in_row & (key == threshold)
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int64), 0) - 1
        keep = in_row & ((key > threshold) | (tie & (tie_rank >= first_kept_tie)))
        tl.store(keep_ptr + at, keep.to(tl.int8), mask=in_row)
        ties_seen += tl.sum(tie.to(tl.int64))


def select_global_keep(scores, forced, budget, lengths):
    """[B, H, S] int8 keep mask of the global selection (see _select_global_kernel) from fp32
    scores and a forced mask [B, H, S] (int8 or bool), both contiguous."""
    b, h, s = scores.shape
    keep = torch.empty((b, h, s), dtype=torch.int8, device=scores.device)
    if b * h * s == 0:
        return keep.zero_()
    forced = forced.contiguous()
    if forced.dtype == torch.bool:
        forced = forced.view(torch.int8)  # the same bytes, read as bytes (a bool pointer is i1)
    block = min(max(next_power_of_2(h * s), 16), 2048)
    _select_global_kernel[(b,)](
        scores_ptr=scores,
        forced_ptr=forced,
        lengths_ptr=lengths if lengths is not None else scores,
        keep_ptr=keep,
        heads=h,
        seq=s,
        kept=min(budget, s),
        HAS_LENGTHS=lengths is not None,
        BLOCK=block,
        num_warps=8 if block >= 1024 else 4,
    )
    return keep


# --------------------------------------------------------------------------------- compaction


@triton.jit
def _gather_block(
    src_ptr, dst_ptr, idx, used, j, dims, dim, stride_s, stride_d, dst_stride_s, dst_stride_d, IN_PLACE: tl.constexpr
):
    dmask = dims[None, :] < dim
    vals = tl.load(src_ptr + idx[:, None] * stride_s + dims[None, :] * stride_d, mask=used[:, None] & dmask, other=0.0)
    if IN_PLACE:
        tl.debug_barrier()  # every lane has read its source before any lane overwrites the prefix
    tl.store(dst_ptr + j[:, None] * dst_stride_s + dims[None, :] * dst_stride_d, vals, mask=(j[:, None] >= 0) & dmask)


@triton.jit
def _gather_meta(src_ptr, dst_ptr, idx, used, j, stride_s, dst_stride_s, IN_PLACE: tl.constexpr):
    vals = tl.load(src_ptr + idx * stride_s, mask=used, other=0)
    if IN_PLACE:
        tl.debug_barrier()
    tl.store(dst_ptr + j * dst_stride_s, vals, mask=j >= 0)


@triton.jit
def _compact_kv_kernel(
    idx_ptr,
    k_ptr,
    v_ptr,
    ok_ptr,
    ov_ptr,
    m0_ptr,
    om0_ptr,
    m1_ptr,
    om1_ptr,
    heads,
    seq,
    kept,
    kept_per_program,
    dim_k,
    dim_v,
    s_kb,
    s_kh,
    s_ks,
    s_kd,
    s_vb,
    s_vh,
    s_vs,
    s_vd,
    s_okb,
    s_okh,
    s_oks,
    s_okd,
    s_ovb,
    s_ovh,
    s_ovs,
    s_ovd,
    s_m0b,
    s_m0h,
    s_m0s,
    s_om0b,
    s_om0h,
    s_om0s,
    s_m1b,
    s_m1h,
    s_m1s,
    s_om1b,
    s_om1h,
    s_om1s,
    HAS_KV: tl.constexpr,
    NUM_META: tl.constexpr,
    IN_PLACE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // heads
    h = row % heads
    first = tl.program_id(1) * kept_per_program
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_M)
    for offset in range(0, kept_per_program, BLOCK_M):
        j = first + offset + lanes
        inside = j < kept
        idx = tl.load(idx_ptr + row * kept + j, mask=inside, other=-1)
        # An index outside [0, S) (unvalidated input) gives zeros like −1: nothing is read out of bounds.
        used = (idx >= 0) & (idx < seq)
        jj = tl.where(inside, j, -1).to(tl.int64)
        if HAS_KV:
            _gather_block(
                k_ptr + b * s_kb + h * s_kh,
                ok_ptr + b * s_okb + h * s_okh,
                idx,
                used,
                jj,
                dims,
                dim_k,
                s_ks,
                s_kd,
                s_oks,
                s_okd,
                IN_PLACE,
            )
            _gather_block(
                v_ptr + b * s_vb + h * s_vh,
                ov_ptr + b * s_ovb + h * s_ovh,
                idx,
                used,
                jj,
                dims,
                dim_v,
                s_vs,
                s_vd,
                s_ovs,
                s_ovd,
                IN_PLACE,
            )
        if NUM_META >= 1:
            if tl.program_id(2) == 0:
                _gather_meta(
                    m0_ptr + b * s_m0b + h * s_m0h,
                    om0_ptr + b * s_om0b + h * s_om0h,
                    idx,
                    used,
                    jj,
                    s_m0s,
                    s_om0s,
                    IN_PLACE,
                )
        if NUM_META >= 2:
            if tl.program_id(2) == 0:
                _gather_meta(
                    m1_ptr + b * s_m1b + h * s_m1h,
                    om1_ptr + b * s_om1b + h * s_om1h,
                    idx,
                    used,
                    jj,
                    s_m1s,
                    s_om1s,
                    IN_PLACE,
                )


def compact_kv_fwd(keys, values, indices, metas, outs, in_place: bool):
    """Gather into ``outs`` = (keys_out, values_out, *meta_outs) (the prefixes of the sources when
    ``in_place``). ``keys``/``values`` may be None (metadata only); ``metas`` are [B, H, S] views."""
    b, h, kept = indices.shape
    if b * h * kept == 0:
        return
    indices = indices.contiguous()
    has_kv = keys is not None
    dim_k, dim_v = (keys.shape[-1], values.shape[-1]) if has_kv else (1, 1)
    seq = (keys if has_kv else metas[0]).shape[2]
    dim = max(dim_k, dim_v)
    block_d = min(next_power_of_2(max(dim, 1)), 128)
    block_m = 64 if block_d <= 64 else 32
    if in_place:
        kept_per_program, d_programs = kept, cdiv(dim, block_d)
    else:
        kept_per_program, d_programs = block_m * 4, cdiv(dim, block_d)
    grid = (b * h, cdiv(kept, kept_per_program), d_programs if has_kv else 1)
    zeros4, zeros3 = (0, 0, 0, 0), (0, 0, 0)
    kv = (keys, values, outs[0], outs[1]) if has_kv else (indices,) * 4
    kv_strides = (*keys.stride(), *values.stride(), *outs[0].stride(), *outs[1].stride()) if has_kv else zeros4 * 4
    meta_outs = outs[2:] if has_kv else outs
    for first in range(0, max(len(metas), 1), 2):
        pair = list(metas[first : first + 2])
        pair_out = list(meta_outs[first : first + 2])
        strides = []
        for i in range(2):
            if i < len(pair):
                strides += [*pair[i].stride(), *pair_out[i].stride()]
            else:
                strides += [*zeros3, *zeros3]
                pair.append(indices)
                pair_out.append(indices)
        launch_kv = has_kv and first == 0
        _compact_kv_kernel[grid if launch_kv else (b * h, grid[1], 1)](
            indices,
            *kv,
            pair[0],
            pair_out[0],
            pair[1],
            pair_out[1],
            h,
            seq,
            kept,
            kept_per_program,
            dim_k,
            dim_v,
            *kv_strides,
            *strides,
            HAS_KV=launch_kv,
            NUM_META=min(len(metas) - first, 2),
            IN_PLACE=in_place,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
        )


# ----------------------------------------------------------------------------- retention mass


# Far below any exponent that matters, and finite: (t − i)·c is formed as r·c + q·c (r + q = t − i),
# which for c = −inf (β = 0) would be −inf + inf = NaN. With c ≥ −1e30 it is ≤ −1e30 for every
# positive age, so its power is 0 as it should be; a NaN gate stays NaN.
_MIN_LOG2_BETA = tl.constexpr(-1e30)
# The backward sums each token's terms over _MASS_CHUNK step blocks at a time by Horner's rule in
# β^BLOCK_T, so its exponentials are one per pair and chunk, and a term carries at most
# _MASS_CHUNK roundings of the carried power (~5e-6 relative).
_MASS_CHUNK = tl.constexpr(32)


@triton.jit
def _log2_beta(lb_ptr, offs, mask):
    c = tl.load(lb_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _LOG2E
    return tl.where(c < _MIN_LOG2_BETA, _MIN_LOG2_BETA, c)


@triton.jit
def _mass_fwd_group(acc, c, i, t_group, start_t, seq, MASKED: tl.constexpr, BLOCK_G: tl.constexpr):
    """acc[t, i] += β_i^(t − i) for the steps t_group + [0, BLOCK_G), by exponentials, masked."""
    t = t_group + tl.arange(0, BLOCK_G)
    x = tl.fma(tl.arange(0, BLOCK_G).to(tl.float32)[:, None], c[None, :], ((t_group - i).to(tl.float32) * c)[None, :])
    if MASKED:
        age = t[:, None] - i[None, :]
        live = (age >= 0) & (i[None, :] >= start_t[:, None]) & (t[:, None] < seq)
        # β⁰ = 1 also for β = 0: the exponent is 0 by selection.
        return acc + tl.where(live, tl.exp2(tl.where(age > 0, x, 0.0)), 0.0)
    return acc + tl.exp2(x)


@triton.jit
def _mass_fwd_tile(
    acc0,
    acc1,
    acc2,
    acc3,
    lb_ptr,
    row,
    seq,
    i0,
    t0,
    starts_ptr,
    MASKED: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """The four groups of BLOCK_G steps t0 + g·BLOCK_G + [0, BLOCK_G) against the columns i0 +
    [0, BLOCK_I). Unmasked (every step sees every column at a positive age), only the first group
    takes exponentials: group g's powers are the first's times β^(g·BLOCK_G), one FFMA per pair
    into its accumulator, so a pair costs a quarter of an exponential and 1.5 instructions."""
    i = i0 + tl.arange(0, BLOCK_I)
    c = _log2_beta(lb_ptr, row * seq + i, i < seq)
    if MASKED:
        g = tl.arange(0, BLOCK_G)
        acc0 = _mass_fwd_group(
            acc0, c, i, t0, tl.load(starts_ptr + t0 + g, mask=t0 + g < seq, other=seq), seq, True, BLOCK_G
        )
        acc1 = _mass_fwd_group(
            acc1,
            c,
            i,
            t0 + BLOCK_G,
            tl.load(starts_ptr + t0 + BLOCK_G + g, mask=t0 + BLOCK_G + g < seq, other=seq),
            seq,
            True,
            BLOCK_G,
        )
        acc2 = _mass_fwd_group(
            acc2,
            c,
            i,
            t0 + 2 * BLOCK_G,
            tl.load(starts_ptr + t0 + 2 * BLOCK_G + g, mask=t0 + 2 * BLOCK_G + g < seq, other=seq),
            seq,
            True,
            BLOCK_G,
        )
        acc3 = _mass_fwd_group(
            acc3,
            c,
            i,
            t0 + 3 * BLOCK_G,
            tl.load(starts_ptr + t0 + 3 * BLOCK_G + g, mask=t0 + 3 * BLOCK_G + g < seq, other=seq),
            seq,
            True,
            BLOCK_G,
        )
    else:
        power = _mass_fwd_group(tl.zeros([BLOCK_G, BLOCK_I], tl.float32), c, i, t0, t0, seq, False, BLOCK_G)
        step1 = tl.exp2(c * BLOCK_G)[None, :]
        step2 = step1 * step1
        acc0 += power
        acc1 = tl.fma(power, step1, acc1)
        acc2 = tl.fma(power, step2, acc2)
        acc3 = tl.fma(power, step2 * step1, acc3)
    return acc0, acc1, acc2, acc3


@triton.jit
def _retention_mass_fwd_kernel(lb_ptr, starts_ptr, out_ptr, seq, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program per (row, block of BLOCK_T steps t; BLOCK_T == BLOCK_I), in four groups of
    BLOCK_T / 4 steps. The column blocks [lo, full) hold the sequence start of some row, and the
    diagonal block: both masked; the blocks [full, t0) between them run unmasked."""
    BLOCK_G: tl.constexpr = BLOCK_T // 4
    row = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * BLOCK_T
    first_start = tl.load(starts_ptr + t0).to(tl.int32)  # starts are non-decreasing
    last_start = tl.load(starts_ptr + tl.minimum(t0 + BLOCK_T, seq) - 1).to(tl.int32)
    lo = first_start - first_start % BLOCK_I
    full = tl.minimum(tl.cdiv(last_start, BLOCK_I) * BLOCK_I, t0)
    acc0 = tl.zeros([BLOCK_G, BLOCK_I], tl.float32)
    acc1 = tl.zeros([BLOCK_G, BLOCK_I], tl.float32)
    acc2 = tl.zeros([BLOCK_G, BLOCK_I], tl.float32)
    acc3 = tl.zeros([BLOCK_G, BLOCK_I], tl.float32)
    for i0 in range(lo, full, BLOCK_I):
        acc0, acc1, acc2, acc3 = _mass_fwd_tile(
            acc0, acc1, acc2, acc3, lb_ptr, row, seq, i0, t0, starts_ptr, True, BLOCK_I, BLOCK_G
        )
    for i0 in range(full, t0, BLOCK_I):
        acc0, acc1, acc2, acc3 = _mass_fwd_tile(
            acc0, acc1, acc2, acc3, lb_ptr, row, seq, i0, t0, starts_ptr, False, BLOCK_I, BLOCK_G
        )
    acc0, acc1, acc2, acc3 = _mass_fwd_tile(
        acc0, acc1, acc2, acc3, lb_ptr, row, seq, t0, t0, starts_ptr, True, BLOCK_I, BLOCK_G
    )  # the diagonal block
    g = t0 + tl.arange(0, BLOCK_G)
    out = out_ptr + row * seq
    tl.store(out + g, tl.sum(acc0, axis=1), mask=g < seq)
    tl.store(out + g + BLOCK_G, tl.sum(acc1, axis=1), mask=g + BLOCK_G < seq)
    tl.store(out + g + 2 * BLOCK_G, tl.sum(acc2, axis=1), mask=g + 2 * BLOCK_G < seq)
    tl.store(out + g + 3 * BLOCK_G, tl.sum(acc3, axis=1), mask=g + 3 * BLOCK_G < seq)


@triton.jit
def _mass_bwd_tile(
    acc_lead, acc_grad, power, grad_ptr, row, seq, t0, i0, i, end_i, MASKED: tl.constexpr, BLOCK_T: tl.constexpr
):
    """Over the tile of steps t = t0 + [0, BLOCK_T), with ``power`` = β_i^(t − i) given (0 at ages
    ≤ 0): acc_lead += g_t·(t − i0)·power and acc_grad += g_t·power. Since t − i = (t − i0) −
    (i − i0), the gradient is Σ acc_lead − (i − i0)·Σ acc_grad: two FFMAs per pair and nothing per
    token i inside the loop. (i − i0 < BLOCK_I ≤ t − i0 past the diagonal block: the two parts
    cancel by at most one bit there, by at most BLOCK_I in the diagonal block.)"""
    t = t0 + tl.arange(0, BLOCK_T)
    g = tl.load(grad_ptr + row * seq + t, mask=t < seq, other=0.0)
    lead = g * (t - i0).to(tl.float32)
    if MASKED:
        power = tl.where(t[None, :] < end_i[:, None], power, 0.0)
    acc_lead = tl.fma(lead[None, :], power, acc_lead)
    acc_grad = tl.fma(g[None, :], power, acc_grad)
    return acc_lead, acc_grad


@triton.jit
def _mass_bwd_powers(i, t0, c, BLOCK_T: tl.constexpr):
    """β_i^(t − i) over the tile of steps t0 + [0, BLOCK_T), by exponentials (0 at ages ≤ 0)."""
    s = tl.arange(0, BLOCK_T).to(tl.float32)
    x = tl.fma(s[None, :], c[:, None], ((t0 - i).to(tl.float32) * c)[:, None])
    return tl.exp2(tl.where(t0 + tl.arange(0, BLOCK_T)[None, :] > i[:, None], x, -float("inf")))


@triton.jit
def _retention_mass_bwd_kernel(lb_ptr, ends_ptr, grad_ptr, out_ptr, seq, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program per (row, block of BLOCK_I tokens i; BLOCK_T == BLOCK_I), over the step blocks
    from the diagonal to the last end of its tokens' sequences. The diagonal block and the blocks
    holding a sequence end are masked; between them, chunks of _MASS_CHUNK blocks are summed by
    Horner's rule (β^(a + n·BLOCK_T) = β^a·(β^BLOCK_T)^n): two FFMAs per pair."""
    row = tl.program_id(0).to(tl.int64)
    i0 = tl.program_id(1) * BLOCK_I
    i = i0 + tl.arange(0, BLOCK_I)
    i_in = i < seq
    end_i = tl.load(ends_ptr + i, mask=i_in, other=0).to(tl.int32)  # 0 past the row: nothing is live
    c = _log2_beta(lb_ptr, row * seq + i, i_in)
    step = tl.exp2(c * BLOCK_T)[:, None]
    first_end = tl.load(ends_ptr + i0).to(tl.int32)  # ends are non-decreasing
    hi = tl.load(ends_ptr + tl.minimum(i0 + BLOCK_I, seq) - 1).to(tl.int32)
    full = tl.maximum((first_end // BLOCK_T) * BLOCK_T, i0 + BLOCK_T)
    acc_lead = tl.zeros([BLOCK_I, BLOCK_T], tl.float32)
    acc_grad = tl.zeros([BLOCK_I, BLOCK_T], tl.float32)
    acc_lead, acc_grad = _mass_bwd_tile(
        acc_lead, acc_grad, _mass_bwd_powers(i, i0, c, BLOCK_T), grad_ptr, row, seq, i0, i0, i, end_i, True, BLOCK_T
    )  # the diagonal block
    for chunk in range(i0 + BLOCK_T, full, BLOCK_T * _MASS_CHUNK):
        # Σ_n a_n·step^n over the chunk's blocks n by Horner's rule, last block first: one FFMA per
        # pair and sum, then one multiplication by the powers of the chunk's first block.
        blocks = tl.minimum(_MASS_CHUNK, (full - chunk) // BLOCK_T)
        lead_sum = tl.zeros([BLOCK_I, BLOCK_T], tl.float32)
        grad_sum = tl.zeros([BLOCK_I, BLOCK_T], tl.float32)
        for n in range(0, blocks):
            t = chunk + (blocks - 1 - n) * BLOCK_T + tl.arange(0, BLOCK_T)
            g = tl.load(grad_ptr + row * seq + t)  # t < full ≤ seq
            lead_sum = tl.fma(lead_sum, step, (g * (t - i0).to(tl.float32))[None, :])
            grad_sum = tl.fma(grad_sum, step, g[None, :])
        power = _mass_bwd_powers(i, chunk, c, BLOCK_T)
        acc_lead = tl.fma(power, lead_sum, acc_lead)
        acc_grad = tl.fma(power, grad_sum, acc_grad)
    for t0 in range(full, hi, BLOCK_T):
        acc_lead, acc_grad = _mass_bwd_tile(
            acc_lead, acc_grad, _mass_bwd_powers(i, t0, c, BLOCK_T), grad_ptr, row, seq, t0, i0, i, end_i, True, BLOCK_T
        )
    grad = tl.sum(acc_lead, axis=1) - (i - i0).to(tl.float32) * tl.sum(acc_grad, axis=1)
    tl.store(out_ptr + row * seq + i, grad, mask=i_in)


def _sequence_bounds(seq: int, cu_seqlens, device):
    pos = torch.arange(seq, device=device)
    if cu_seqlens is None:
        return torch.zeros(seq, dtype=torch.int64, device=device), torch.full(
            (seq,), seq, dtype=torch.int64, device=device
        )
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    which = (torch.searchsorted(cu, pos, right=True) - 1).clamp(0, max(cu.numel() - 2, 0))
    return cu[which].contiguous(), cu[which + 1].contiguous()


_MASS_BLOCK = 64


def retention_mass_fwd(log_beta_rows, cu_seqlens):
    """[R, T] rows (contiguous) → fp32 mass [R, T]."""
    r, t = log_beta_rows.shape
    out = torch.empty((r, t), device=log_beta_rows.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    starts, _ = _sequence_bounds(t, cu_seqlens, log_beta_rows.device)
    _retention_mass_fwd_kernel[(r, cdiv(t, _MASS_BLOCK))](
        log_beta_rows, starts, out, t, BLOCK_T=_MASS_BLOCK, BLOCK_I=_MASS_BLOCK, num_warps=4
    )
    return out


def retention_mass_bwd(log_beta_rows, cu_seqlens, grad_rows):
    """d mass → d log β, fp32 [R, T]: Σ_{t≥i} g_t·(t−i)·β_i^{t−i}."""
    r, t = log_beta_rows.shape
    out = torch.empty((r, t), device=log_beta_rows.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    _, ends = _sequence_bounds(t, cu_seqlens, log_beta_rows.device)
    _retention_mass_bwd_kernel[(r, cdiv(t, _MASS_BLOCK))](
        log_beta_rows,
        ends,
        grad_rows.float().contiguous(),
        out,
        t,
        BLOCK_T=_MASS_BLOCK,
        BLOCK_I=_MASS_BLOCK,
        num_warps=8,
    )  # four [64, 64] fp32 tiles live in the Horner loop: 128 registers a thread at 8 warps
    return out
