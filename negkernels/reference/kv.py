"""KV-cache retention in plain PyTorch: scores, budgeted selection, compaction, retention mass.

The CPU fallback and the float64 oracle of the Triton and CUDA kernels. Written straight from the
definitions, with sorts where the kernels use radix selection.

Ordering of tokens within one (batch, head) row, used by every backend: a token t < length is
*eligible*; eligible tokens among the first ``sink`` or the last ``window`` of the sequence are
*protected* and always kept; the rest are ranked by score (NaN above +inf, so a corrupted token
is kept and its NaN reaches the attention output rather than being silently dropped), ties going
to the more recent token (higher index).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

SELECT_MODES = ("per_head", "global")
ATTENTION_SCORERS = ("snapkv", "snapkv_whole_row", "tova", "tova_grouped", "h2o", "h2o_normalized")
NORM_EPS = 1e-12


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def retention_scores_reference(
    log_beta: Tensor, positions: Tensor, step, keys: Optional[Tensor] = None, key_norm_weight: float = 0.0
) -> Tensor:
    """TRIM-KV scores ``(step − positions)·log_beta (+ key_norm_weight·log‖k‖)``, [B, H, S]."""
    dtype = _compute_dtype(log_beta, keys)
    b, h, s = log_beta.shape
    if isinstance(step, Tensor):
        step = step.reshape(b, 1, 1)
    positions = positions.expand(b, h, s)
    if positions.is_floating_point() or (isinstance(step, Tensor) and step.is_floating_point()):
        age = (step - positions.to(dtype)).to(dtype)
    else:
        age = (step - positions.long()).to(dtype)  # exact integer ages, as the kernels compute them
    scores = age * log_beta.to(dtype)
    if keys is not None and key_norm_weight != 0.0:
        scores = scores + key_norm_weight * torch.log(keys.to(dtype).norm(dim=-1))
    return scores


def key_norm_scores_reference(keys: Tensor) -> Tensor:
    """−‖k‖ per token (small-norm keys attract attention, so they are kept), [B, H, S]."""
    return -keys.to(_compute_dtype(keys)).norm(dim=-1)


def keydiff_scores_reference(keys: Tensor) -> Tensor:
    """KeyDiff: −cos(k, anchor), anchor = the mean of the row's L2-normalised keys, [B, H, S]."""
    k = keys.to(_compute_dtype(keys))
    unit = F.normalize(k, dim=-1, eps=NORM_EPS)
    anchor = F.normalize(unit.mean(dim=-2, keepdim=True), dim=-1, eps=NORM_EPS)
    return -(unit * anchor).sum(dim=-1)


def attention_scores_reference(attention: Tensor, num_kv_heads: int, method: str, pool_kernel: int = 5) -> Tensor:
    """Scores from attention weights ``[B, Hq, W, S]`` of the last W queries (the last W of the S
    tokens) → [B, Hkv, S]. See :func:`negkernels.attention_scores` for each ``method``."""
    a = attention.to(_compute_dtype(attention))
    b, hq, w, s = a.shape
    group = a.reshape(b, num_kv_heads, hq // num_kv_heads, w, s)
    if method == "tova":  # the last query's weights, averaged over every query head
        last = a[:, :, -1, :].mean(dim=1, keepdim=True) if w else a.new_zeros(b, 1, s)
        return last.expand(b, num_kv_heads, s).contiguous()
    if method == "tova_grouped":  # ... averaged over each KV head's query heads
        return group[:, :, :, -1, :].mean(dim=2) if w else a.new_zeros(b, num_kv_heads, s)
    if method in ("h2o", "h2o_normalized"):
        total = group.sum(dim=3)
        if method == "h2o_normalized":
            # query S − W + i sees the tokens j ≤ S − W + i: token j is seen by min(W, S − j) of them
            seen = (s - torch.arange(s, device=a.device)).clamp(max=w).clamp(min=1).to(a.dtype)
            total = total / seen
        return total.mean(dim=2)
    if method == "snapkv":
        prefix = max(s - w, 0)
        mean = group[..., :prefix].mean(dim=(2, 3)) if w else a.new_zeros(b, num_kv_heads, prefix)
        if pool_kernel > 1 and prefix:
            # zero padding counted, as SnapKV's avg_pool1d(kernel, padding=kernel // 2)
            flat = F.avg_pool1d(
                mean.reshape(b * num_kv_heads, 1, prefix),
                pool_kernel,
                stride=1,
                padding=pool_kernel // 2,
                count_include_pad=True,
            )
            mean = flat[..., :prefix].reshape(b, num_kv_heads, prefix)
        # the observation window itself is always kept
        return torch.cat([mean, mean.new_full((b, num_kv_heads, s - prefix), float("inf"))], dim=-1)
    # "snapkv_whole_row": mean over the W queries and each KV head's query heads, pooled over the
    # whole row; at the edges only the tokens inside are averaged
    mean = group.mean(dim=(2, 3)) if w else a.new_zeros(b, num_kv_heads, s)
    if pool_kernel <= 1 or s == 0:
        return mean
    flat = mean.reshape(b * num_kv_heads, 1, s)
    pooled = F.avg_pool1d(flat, pool_kernel, stride=1, padding=pool_kernel // 2, count_include_pad=False)
    return pooled[..., :s].reshape(b, num_kv_heads, s)


def _token_classes(scores: Tensor, sink: int, window: int, lengths: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """→ (eligible [B, 1|H, S] bool, protected [B, 1|H, S] bool)."""
    b, _, s = scores.shape
    idx = torch.arange(s, device=scores.device)
    if lengths is None:
        length = torch.full((b, 1, 1), s, device=scores.device, dtype=torch.long)
    else:
        length = lengths.long().clamp(0, s).reshape(b, 1, 1)
    eligible = idx < length
    protected = eligible & ((idx < sink) | (idx >= length - window))
    return eligible, protected


def _rank_order(scores: Tensor, klass: Tensor) -> Tensor:
    """Indices sorting each row by (class desc, score desc with NaN first, index desc)."""
    s = scores.shape[-1]
    order = torch.arange(s - 1, -1, -1, device=scores.device).expand(scores.shape).contiguous()
    by_score = torch.sort(torch.gather(scores, -1, order), dim=-1, descending=True, stable=True).indices
    order = torch.gather(order, -1, by_score)
    by_class = torch.sort(torch.gather(klass, -1, order), dim=-1, descending=True, stable=True).indices
    return torch.gather(order, -1, by_class)


def _ascending_with_unused_last(indices: Tensor, unused: Tensor, s: int) -> Tensor:
    filled = torch.where(unused, torch.full_like(indices, s), indices)
    filled = torch.sort(filled, dim=-1).values
    return torch.where(filled == s, torch.full_like(filled, -1), filled)


def select_retained_reference(
    scores: Tensor, budget: int, sink: int = 0, window: int = 0, lengths: Optional[Tensor] = None
) -> Tensor:
    """Per-head selection: kept token indices [B, H, min(budget, S)] int64, ascending, −1 unused."""
    b, h, s = scores.shape
    m = min(budget, s)
    eligible, protected = _token_classes(scores, sink, window, lengths)
    klass = (eligible.long() + protected.long()).expand(b, h, s)
    order = _rank_order(scores.float() if scores.dtype != torch.float64 else scores, klass)[..., :m]
    unused = torch.gather(klass, -1, order) == 0
    return _ascending_with_unused_last(order, unused, s)


def select_retained_global_reference(
    scores: Tensor, budget: int, sink: int = 0, window: int = 0, lengths: Optional[Tensor] = None, min_per_head: int = 0
):
    """Global selection: per sequence the best H·min(budget, S) tokens across heads, each head keeping
    its protected tokens and at least ``min_per_head`` (or all its eligible ones).

    Returns (indices [B·H·min(budget,S)] int64 ragged by (batch, head) with the unused tail −1,
    counts [B, H] int64, cu_seqlens [B·H + 1] int32)."""
    b, h, s = scores.shape
    m = min(budget, s)
    scores = scores.float() if scores.dtype != torch.float64 else scores
    eligible, protected = _token_classes(scores, sink, window, lengths)
    klass = (eligible.long() + protected.long()).expand(b, h, s)
    order = _rank_order(scores, klass)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(s, device=scores.device).expand(b, h, s).contiguous()
    )
    forced = (klass > 0) & ((klass == 2) | (rank < min_per_head))
    # One row per sequence over (head, token): the class now puts forced tokens first; ties in score
    # go to the more recent token, then to the lower head.
    klass2 = torch.where(forced, torch.full_like(klass, 3), klass).reshape(b, h * s)
    flat_scores = scores.reshape(b, h * s)
    token = torch.arange(s, device=scores.device).repeat(h)
    # Pairs are in head order; a stable sort by token, most recent first, puts the lower head
    # first among a token's pairs, and the stable sorts below keep that order among equals.
    order = torch.argsort(token, stable=True, descending=True)
    order = order.expand(b, h * s)
    order = torch.gather(
        order, -1, torch.sort(torch.gather(flat_scores, -1, order), dim=-1, descending=True, stable=True).indices
    )
    order = torch.gather(
        order, -1, torch.sort(torch.gather(klass2, -1, order), dim=-1, descending=True, stable=True).indices
    )
    chosen = order[:, : h * m]
    keep = torch.zeros(b, h * s, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, chosen, torch.gather(klass2, -1, chosen) > 0)
    return ragged_from_keep(keep.reshape(b, h, s), m)


def forced_per_head(indices: Tensor, seq: int) -> Tensor:
    """Bool mask [B, H, S] of per-head kept ``indices`` [B, H, M] (−1 unused)."""
    b, h, _ = indices.shape
    mask = torch.zeros(b, h, seq + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(indices < 0, seq, indices), True)
    return mask[..., :seq].contiguous()


def ragged_from_keep(keep: Tensor, m: int):
    """A keep mask [B, H, S] → (indices [B·H·m] ragged by (batch, head), ascending, unused tail −1;
    counts [B, H] int64; cu_seqlens [B·H + 1] int32), with no read on the host."""
    b, h, s = keep.shape
    keep = keep.bool()
    counts = keep.sum(-1)
    cu = torch.zeros(b * h + 1, dtype=torch.int32, device=keep.device)
    cu[1:] = counts.reshape(-1).cumsum(0).to(torch.int32)
    # Scatter the kept tokens to their ragged slots without reading a count on the host.
    flat_keep = keep.reshape(-1)
    slot = torch.where(
        flat_keep, flat_keep.long().cumsum(0) - 1, torch.full_like(flat_keep, b * h * m, dtype=torch.long)
    )
    token_ids = torch.arange(s, device=keep.device).repeat(b * h)
    out = torch.full((b * h * m + 1,), -1, dtype=torch.long, device=keep.device)
    out.scatter_(0, slot, token_ids)
    return out[:-1], counts, cu


def compact_kv_reference(keys: Tensor, values: Tensor, indices: Tensor, *extras: Tensor):
    """Gather K, V [B, H, S, D] and per-token extras [B, H, S, ...] at ``indices`` [B, H, M];
    entries −1 (and, unvalidated, any index outside [0, S)) give zeros."""
    unused = (indices < 0) | (indices >= keys.shape[2])
    safe = indices.masked_fill(unused, 0)

    def take(x: Tensor) -> Tensor:
        idx = safe.reshape(*safe.shape, *([1] * (x.dim() - 3))).expand(*safe.shape, *x.shape[3:])
        out = torch.gather(x, 2, idx)
        return out.masked_fill(unused.reshape(*unused.shape, *([1] * (x.dim() - 3))), 0)

    return (take(keys), take(values), *(take(e) for e in extras))


def retention_mass_reference(log_beta: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """mass[..., t] = Σ_{i≤t, same sequence} exp((t − i)·log_beta[..., i]) over the last dim."""
    dtype = _compute_dtype(log_beta)
    lb = log_beta.to(dtype)
    t = lb.shape[-1]
    pos = torch.arange(t, device=lb.device)
    age = (pos[:, None] - pos[None, :]).to(dtype)  # [t, i]
    allowed = pos[:, None] >= pos[None, :]
    if cu_seqlens is not None:
        seq = torch.searchsorted(cu_seqlens.long(), pos, right=True) - 1
        allowed = allowed & (seq[:, None] == seq[None, :])
    # β⁰ = 1 also for β = 0: the exponent is 0 by selection, not 0·(−inf) = NaN.
    live = age > 0
    terms = torch.exp(torch.where(live, age * lb[..., None, :], torch.zeros((), dtype=dtype, device=lb.device)))
    return torch.where(allowed, terms, torch.zeros((), dtype=dtype, device=lb.device)).sum(-1)


def token_offsets(t: int, cu_seqlens: Optional[Tensor], device: torch.device) -> Tensor:
    """1-based position of every token within its sequence, [t] int64."""
    pos = torch.arange(t, device=device)
    if cu_seqlens is None:
        return pos + 1
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.searchsorted(cu, pos, right=True) - 1
    return pos - cu[seq.clamp(0, cu.numel() - 1)] + 1


def retention_capacity_loss_reference(log_beta: Tensor, budget: float, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """mean over every token t of max(0, mass_t − budget) / t, t the 1-based position in its sequence."""
    mass = retention_mass_reference(log_beta, cu_seqlens)
    t = token_offsets(mass.shape[-1], cu_seqlens, mass.device).to(mass.dtype)
    excess = torch.clamp_min(mass - budget, 0) / t
    return excess.mean() if excess.numel() else excess.sum()
