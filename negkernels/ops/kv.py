"""KV-cache retention: public API, custom ops and autograd.

Layering: :func:`retention_scores`, :func:`select_retained`, :func:`compact_kv`, :func:`evict`,
:func:`retention_mass` (validation, before any kernel runs) → the custom ops ``negkernels::*``
(fake + autograd + backend routing) → the Triton or CUDA launchers, or the plain-PyTorch
reference in ``negkernels/reference/kv.py``.

Nothing here reads a tensor on the host: shapes and budgets are Python ints, ``step`` and
``lengths`` may be device tensors, so :func:`evict` can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._backend import register_op, resolve_backend
from .._kernel_op import kernel_op
from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_cu_seqlens,
    check_disjoint_outputs,
    check_finite_float,
    check_int,
    check_tensor,
)
from ..reference.kv import (
    ATTENTION_SCORERS,
    SELECT_MODES,
    attention_scores_reference,
    compact_kv_reference,
    forced_per_head,
    key_norm_scores_reference,
    keydiff_scores_reference,
    ragged_from_keep,
    retention_mass_reference,
    retention_scores_reference,
    select_retained_global_reference,
    select_retained_reference,
    token_offsets,
)

RETENTION_SCORES_BACKENDS = register_op("retention_scores", ("reference", "triton"))
SELECT_RETAINED_BACKENDS = register_op("select_retained", ("reference", "triton", "cuda"))
SELECT_GLOBAL_BACKENDS = ("reference", "triton")  # select_retained(mode="global")
COMPACT_KV_BACKENDS = register_op("compact_kv", ("reference", "triton"))
EVICT_BACKENDS = register_op("evict", ("reference", "triton", "cuda"))
RETENTION_MASS_BACKENDS = register_op("retention_mass", ("reference", "triton"))
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class GlobalSelection(NamedTuple):
    """Kept tokens of :func:`select_retained` with ``mode="global"``, ragged by (batch, head)."""

    indices: Tensor  # [B·H·min(budget, S)] int64: head (b, h)'s kept token indices, ascending, at
    #                  cu_seqlens[b·H + h] : cu_seqlens[b·H + h + 1]; entries past cu_seqlens[-1] are −1
    counts: Tensor  # [B, H] int64 tokens kept per head
    cu_seqlens: Tensor  # [B·H + 1] int32 offsets (as flash-attention's varlen kernels take them)


class Evicted(NamedTuple):
    """Result of :func:`evict`: the kept tokens' K, V and metadata, and where they came from."""

    keys: Tensor  # [B, H, M, D]
    values: Tensor  # [B, H, M, D]
    log_beta: Tensor  # [B, H, M]
    positions: Tensor  # [B, H, M]
    indices: Tensor  # [B, H, M] int64, ascending; −1 past a short sequence's length


# ============================================================================ argument checks


def _check_rows(name: str, x, ndim: int = 3, dtypes=FLOAT_DTYPES, device=None) -> None:
    check_tensor(name, x, ndim=ndim, dtypes=dtypes, device=device)


def _expand_positions(positions, shape, device) -> Tensor:
    check_tensor("positions", positions, device=device)
    if positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"positions: expected an integer or float tensor, got {positions.dtype}")
    try:
        return positions.expand(shape)
    except RuntimeError:
        raise ValueError(f"positions: shape {tuple(positions.shape)} does not broadcast to {tuple(shape)}") from None


def _check_step(step, batch: int, device) -> int | Tensor:
    if isinstance(step, Tensor):
        check_tensor("step", step, device=device)
        if step.dtype == torch.bool or step.is_complex():
            raise TypeError(f"step: expected an integer or float tensor, got {step.dtype}")
        if step.dim() == 0:
            step = step.reshape(1)
        if step.dim() != 1 or step.shape[0] not in (1, batch):
            raise ValueError(f"step: expected an int or a tensor of shape ({batch},), got shape {tuple(step.shape)}")
        return step.expand(batch).contiguous()
    return check_int("step", step)


def _check_lengths(lengths, batch: int, device) -> Optional[Tensor]:
    if lengths is None:
        return None
    check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if lengths.shape[0] != batch:
        raise ValueError(f"lengths: expected shape ({batch},), got {tuple(lengths.shape)}")
    return lengths.contiguous()


def _check_budget(budget, sink, window) -> tuple[int, int, int]:
    budget = check_int("budget", budget, minimum=0)
    sink = check_int("sink", sink, minimum=0)
    window = check_int("window", window, minimum=0)
    if sink + window > budget:
        raise ValueError(f"sink + window: {sink} + {window} protected tokens exceed the budget {budget}")
    return budget, sink, window


# ============================================================================ scores


@kernel_op("negkernels::retention_scores", mutates_args=())
def _retention_scores_op(
    log_beta: Tensor,
    positions: Tensor,
    step_tensor: Optional[Tensor],
    step: int,
    keys: Optional[Tensor],
    key_norm_weight: float,
) -> Tensor:
    from ..triton.kv import retention_scores_fwd

    return retention_scores_fwd(
        log_beta, positions, step_tensor if step_tensor is not None else step, keys, key_norm_weight
    )


@_retention_scores_op.register_fake
def _(log_beta, positions, step_tensor, step, keys, key_norm_weight):
    return log_beta.new_empty(log_beta.shape, dtype=torch.float32)


def _retention_scores_setup(ctx, inputs, output):
    log_beta, positions, step_tensor, step, keys, w = inputs
    ctx.save_for_backward(log_beta, positions, step_tensor, keys)
    ctx.step, ctx.weight = step, w


def _retention_scores_backward(ctx, grad):
    log_beta, positions, step_tensor, keys = ctx.saved_tensors
    dlb = dkeys = None
    if ctx.needs_input_grad[0]:
        step = step_tensor.reshape(-1, 1, 1) if step_tensor is not None else ctx.step
        age = retention_scores_reference(torch.ones_like(log_beta, dtype=torch.float32), positions, step)
        dlb = (grad * age).to(log_beta.dtype)
    if keys is not None and ctx.needs_input_grad[4]:
        k = keys.float()
        dkeys = (grad[..., None] * ctx.weight * k / (k * k).sum(-1, keepdim=True)).to(keys.dtype)
    return dlb, None, None, None, dkeys, None


_retention_scores_op.register_autograd(_retention_scores_backward, setup_context=_retention_scores_setup)


def retention_scores(
    log_beta: Tensor,
    positions: Tensor,
    step,
    *,
    keys: Optional[Tensor] = None,
    key_norm_weight: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """TRIM-KV retention scores: how much each cached token still matters at the next query.

    Args:
        log_beta: [B, H, S] any float dtype: log of the retention gate β ∈ (0, 1] per token and KV head.
        positions: integer or float positions of the cached tokens, broadcastable to [B, H, S]
            (after compaction every head keeps different tokens, so [B, H, S] is the general case).
        step: int, or a [B] tensor: the position of the next query.
        keys: [B, H, S, D] (only with ``key_norm_weight``).
        key_norm_weight: w in the formula.

    Formula: ``score = (step − position)·log β + w·log‖k‖`` (β^(step−position) in log space). The
    age is computed exactly in integers when positions and step are integers.

    Returns fp32 [B, H, S] (fp64 for fp64 ``log_beta`` on the reference backend). Differentiable in
    ``log_beta`` and ``keys``.
    """
    _check_rows("log_beta", log_beta)
    b, h, s = log_beta.shape
    device = log_beta.device
    positions = _expand_positions(positions, (b, h, s), device)
    step = _check_step(step, b, device)
    key_norm_weight = check_finite_float("key_norm_weight", key_norm_weight)
    if keys is not None:
        check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES, device=device)
        if tuple(keys.shape[:3]) != (b, h, s):
            raise ValueError(f"keys: shape {tuple(keys.shape)} does not match log_beta's [B, H, S] = {(b, h, s)}")
    chosen = resolve_backend(backend, device, "retention_scores", RETENTION_SCORES_BACKENDS)
    if chosen == "reference" or log_beta.dtype == torch.float64:  # fp64 is the oracle's precision: PyTorch
        return retention_scores_reference(log_beta, positions, step, keys, key_norm_weight)
    step_tensor = step if isinstance(step, Tensor) else None
    return _retention_scores_op(
        log_beta,
        positions,
        step_tensor,
        0 if step_tensor is not None else step,
        keys if key_norm_weight != 0.0 else None,
        key_norm_weight,
    )


def key_norm_scores(keys: Tensor) -> Tensor:
    """Key-norm scores −‖k‖ (tokens with small keys draw attention and are kept). ``keys`` [B, H, S, D]
    → fp32 [B, H, S]. Plain PyTorch on every device (one fused reduction)."""
    check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES)
    return key_norm_scores_reference(keys)


def keydiff_scores(keys: Tensor) -> Tensor:
    """KeyDiff scores −cos(k, anchor), anchor the mean of the row's L2-normalised keys: tokens whose
    keys differ most from the rest are kept. ``keys`` [B, H, S, D] → fp32 [B, H, S]. Plain PyTorch."""
    check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES)
    return keydiff_scores_reference(keys)


def attention_scores(attention: Tensor, num_kv_heads: int, method: str = "snapkv", *, pool_kernel: int = 5) -> Tensor:
    """Scores from the attention weights of the last W queries, reduced to the KV heads.

    Args:
        attention: [B, Hq, W, S] softmax weights of the last W queries (the last W of the S
            tokens) over the S cached tokens (:func:`last_window_attention` computes them).
        num_kv_heads: Hkv; must divide Hq (grouped-query attention: query heads h·G … h·G + G − 1
            share KV head h).
        method, as the papers define them, and the variants kept beside them:

            * ``"snapkv"`` (Li et al. 2024): the prefix's (the first S − W tokens') weights,
              averaged over the W queries and each KV head's query heads, then a 1-D average pool
              of width ``pool_kernel`` (stride 1, centred) over the prefix only, with the zero
              padding counted (``avg_pool1d(kernel, padding=kernel // 2)``); the W tokens of the
              observation window score +inf (always kept).
            * ``"snapkv_whole_row"``: the same mean over every one of the S tokens, pooled over
              the whole row without counting padding (at the edges only the tokens inside).
            * ``"tova"`` (Oren et al. 2024): the last query's weights averaged over **all** Hq query
              heads (TOVA's ``mean(attn_weights[:, :, -1, :], dim=1)``), the same for every KV head.
            * ``"tova_grouped"``: the last query's weights averaged within each KV head's group.
            * ``"h2o"`` (Zhang et al. 2023): the weights summed over the W queries (accumulated
              attention), averaged over each KV head's query heads.
            * ``"h2o_normalized"``: that sum divided by the number of the W queries that see each
              token, min(W, S − j) under causal masking (kvpress's ``ObservedAttentionPress``).

    Ties: every scorer's ranking goes through :func:`select_retained`, where equal scores go to
    the more recent token (then, in ``mode="global"``, the lower head). TOVA's scores are the same
    for every KV head, so its heads keep the same tokens; SnapKV's window ties at +inf and is kept
    whole whenever the budget holds it.

    Returns fp32 [B, Hkv, S]. Plain PyTorch on every device.
    """
    check_tensor("attention", attention, ndim=4, dtypes=FLOAT_DTYPES)
    num_kv_heads = check_int("num_kv_heads", num_kv_heads, minimum=1)
    if attention.shape[1] % num_kv_heads:
        raise ValueError(f"num_kv_heads: {num_kv_heads} does not divide the {attention.shape[1]} query heads")
    check_choice("method", method, ATTENTION_SCORERS)
    pool_kernel = check_int("pool_kernel", pool_kernel, minimum=1)
    if pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel: must be odd (a centred window), got {pool_kernel}")
    return attention_scores_reference(attention, num_kv_heads, method, pool_kernel)


# ============================================================================ selection


def _cuda_select(scores, log_beta, positions, step, budget, sink, window, lengths):
    from .. import _cuda_ext

    return _cuda_ext.select_retained(scores, log_beta, positions, step, budget, sink, window, lengths)


@kernel_op("negkernels::select_retained", mutates_args=())
def _select_retained_op(
    scores: Tensor, budget: int, sink: int, window: int, lengths: Optional[Tensor], backend: str
) -> Tensor:
    if backend == "cuda":
        return _cuda_select(scores, None, None, None, budget, sink, window, lengths)
    from ..triton.kv import select_retained_fwd

    return select_retained_fwd(scores, budget, sink, window, lengths)


@_select_retained_op.register_fake
def _(scores, budget, sink, window, lengths, backend):
    b, h, s = scores.shape
    return scores.new_empty((b, h, min(budget, s)), dtype=torch.int64)


def select_retained(
    scores: Tensor,
    budget: int,
    *,
    sink: int = 0,
    window: int = 0,
    lengths: Optional[Tensor] = None,
    mode: str = "per_head",
    min_per_head: int = 0,
    backend: Optional[str] = None,
):
    """Which cached tokens to keep: the ``budget`` best per head, or a budget shared across heads.

    Args:
        scores: [B, H, S] float: higher is kept first (e.g. :func:`retention_scores`).
        budget: tokens kept per head (M = min(budget, S)); ``budget >= S`` keeps every token.
        sink, window: the first ``sink`` and last ``window`` tokens of each sequence are always kept
            (attention sinks, the recent window); they count toward the budget, so
            ``sink + window <= budget``.
        lengths: [B] int: tokens at or past a sequence's length (padding) are never kept; default S.
            Values are clamped to [0, S].
        mode: ``"per_head"`` or ``"global"`` (one budget of H·M per sequence, shared across heads).
        min_per_head: with ``"global"``, each head keeps at least this many tokens (≤ budget).

    Ranking within a row: protected tokens first, then by score (NaN ranks above +inf, so a
    corrupted token stays visible), ties to the more recent token; across heads (global) ties go to
    the more recent token, then the lower head.

    Returns:
        ``"per_head"``: kept indices [B, H, M] int64 in increasing position order; a sequence with
        fewer than M tokens fills the tail with −1. ``"global"``: a :class:`GlobalSelection`
        (ragged indices, per-head counts, cu_seqlens). The global mode runs the PyTorch reference
        (sorts) on every device; the per-head mode has Triton and CUDA radix-select kernels.
    """
    _check_rows("scores", scores)
    b, h, s = scores.shape
    budget, sink, window = _check_budget(budget, sink, window)
    lengths = _check_lengths(lengths, b, scores.device)
    check_choice("mode", mode, SELECT_MODES)
    min_per_head = check_int("min_per_head", min_per_head, minimum=0)
    if min_per_head > budget:
        raise ValueError(f"min_per_head: {min_per_head} exceeds the per-head budget {budget}")
    if mode == "global":
        chosen = resolve_backend(backend, scores.device, "select_retained_global", SELECT_GLOBAL_BACKENDS)
        if chosen == "reference":
            return GlobalSelection(
                *select_retained_global_reference(scores.detach(), budget, sink, window, lengths, min_per_head)
            )
        return GlobalSelection(
            *_select_global_triton(scores.detach().float().contiguous(), budget, sink, window, lengths, min_per_head)
        )
    chosen = resolve_backend(backend, scores.device, "select_retained", SELECT_RETAINED_BACKENDS)
    if chosen == "reference":
        return select_retained_reference(scores.detach(), budget, sink, window, lengths)
    return _select_retained_op(scores.detach().float().contiguous(), budget, sink, window, lengths, chosen)


def _select_global_triton(
    scores: Tensor, budget: int, sink: int, window: int, lengths: Optional[Tensor], min_per_head: int
):
    """Global selection on the device, no host reads: each head's forced tokens (its protected ones
    and its best ``min_per_head``) come from the per-head radix select at budget
    max(min_per_head, sink + window); one program per sequence then radix-selects H·M (head,
    token) pairs with the forced ones first; the ragged layout is built from the keep mask."""
    from ..triton.kv import select_global_keep, select_retained_fwd

    b, h, s = scores.shape
    forced_budget = max(min_per_head, sink + window)
    if forced_budget > 0:
        forced = forced_per_head(select_retained_fwd(scores, forced_budget, sink, window, lengths), s)
    else:
        forced = torch.zeros(b, h, s, dtype=torch.bool, device=scores.device)
    keep = select_global_keep(scores, forced, budget, lengths)
    return ragged_from_keep(keep, min(budget, s))


# ============================================================================ compaction


def _check_compact(keys, values, indices, extras, validate: bool):
    check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES)
    b, h, s, d = keys.shape
    check_tensor("values", values, ndim=4, device=keys.device)
    if tuple(values.shape[:3]) != (b, h, s):
        raise ValueError(f"values: shape {tuple(values.shape)} does not match keys' [B, H, S] = {(b, h, s)}")
    check_tensor("indices", indices, ndim=3, dtypes=(torch.int64,), device=keys.device)
    if tuple(indices.shape[:2]) != (b, h) or indices.shape[2] > s:
        raise ValueError(f"indices: expected [B, H, M] = [{b}, {h}, M <= {s}], got {tuple(indices.shape)}")
    if validate and indices.numel():
        lo, hi = (int(v) for v in torch.aminmax(indices))  # one host read
        if lo < -1 or hi >= s:
            raise ValueError(f"indices: entries must lie in [-1, {s}) (−1 = unused), found {lo if lo < -1 else hi}")
    out = []
    for i, e in enumerate(extras):
        check_tensor(f"extras[{i}]", e, device=keys.device)
        if e.dim() < 3 or tuple(e.shape[:3]) != (b, h, s):
            try:
                e = e.expand(b, h, s)
            except RuntimeError:
                raise ValueError(
                    f"extras[{i}]: shape {tuple(e.shape)} is neither [B, H, S, ...] = [{b}, {h}, {s}, ...] "
                    "nor broadcastable to it"
                ) from None
        out.append(e)
    return out


@kernel_op("negkernels::compact_kv", mutates_args=())
def _compact_kv_op(keys: Tensor, values: Tensor, indices: Tensor, extras: list[Tensor]) -> list[Tensor]:
    from ..triton.kv import compact_kv_fwd

    b, h, m = indices.shape
    outs = [keys.new_empty((b, h, m, keys.shape[-1])), values.new_empty((b, h, m, values.shape[-1]))]
    outs += [e.new_empty((b, h, m)) for e in extras]
    compact_kv_fwd(keys, values, indices, list(extras), outs, in_place=False)
    return outs


@_compact_kv_op.register_fake
def _(keys, values, indices, extras):
    b, h, m = indices.shape
    return [keys.new_empty((b, h, m, keys.shape[-1])), values.new_empty((b, h, m, values.shape[-1]))] + [
        e.new_empty((b, h, m)) for e in extras
    ]


def _compact_setup(ctx, inputs, output):
    keys, values, indices, extras = inputs
    ctx.save_for_backward(indices)
    ctx.shapes = (keys.shape, values.shape, [e.shape for e in extras])
    ctx.dtypes = (keys.dtype, values.dtype, [e.dtype for e in extras])


def _compact_backward(ctx, grads):
    (indices,) = ctx.saved_tensors
    (kshape, vshape, eshapes), (kdt, vdt, edts) = ctx.shapes, ctx.dtypes
    used = (indices >= 0) & (indices < kshape[2])  # unvalidated out-of-range entries gathered zeros
    safe = indices.masked_fill(~used, 0)

    def scatter(g, shape, dtype):
        if g is None or not dtype.is_floating_point:
            return None
        g = g.masked_fill(~used.reshape(*used.shape, *([1] * (g.dim() - 3))), 0)
        idx = safe.reshape(*safe.shape, *([1] * (g.dim() - 3))).expand(g.shape)
        # kept indices are distinct within a row, so the scatter adds nothing twice
        return torch.zeros(shape, dtype=g.dtype, device=g.device).scatter_add_(2, idx, g).to(dtype)

    dkeys = scatter(grads[0], kshape, kdt) if ctx.needs_input_grad[0] else None
    dvalues = scatter(grads[1], vshape, vdt) if ctx.needs_input_grad[1] else None
    dextras = [scatter(g, s, d) for g, s, d in zip(grads[2:], eshapes, edts)]
    return dkeys, dvalues, None, dextras


_compact_kv_op.register_autograd(_compact_backward, setup_context=_compact_setup)


@kernel_op("negkernels::compact_kv_", mutates_args=("keys", "values", "extras"))
def _compact_kv_inplace_op(keys: Tensor, values: Tensor, indices: Tensor, extras: list[Tensor]) -> None:
    from ..triton.kv import compact_kv_fwd

    m = indices.shape[2]
    outs = [keys[:, :, :m], values[:, :, :m]] + [e[:, :, :m] for e in extras]
    compact_kv_fwd(keys, values, indices, list(extras), outs, in_place=True)


@_compact_kv_inplace_op.register_fake
def _(keys, values, indices, extras):
    return None


def compact_kv(
    keys: Tensor, values: Tensor, indices: Tensor, *extras: Tensor, validate: bool = True, backend: Optional[str] = None
):
    """Gather the kept tokens: K, V [B, H, S, D] and per-token metadata at ``indices`` [B, H, M].

    ``extras`` are per-token tensors [B, H, S] (positions, log β; anything broadcastable to it) or
    [B, H, S, ...] (on the reference backend). Entries −1 in ``indices`` (unused, see
    :func:`select_retained`) give zeros. Returns ``(keys [B, H, M, D], values [B, H, M, D],
    *extras [B, H, M])``. Differentiable in every floating input (the gradient scatters back).

    ``validate`` checks on the host (one synchronisation) that every index lies in [−1, S);
    without it an index outside that range gives zeros like −1 and nothing is read out of bounds.
    """
    extras = _check_compact(keys, values, indices, extras, validate)
    chosen = resolve_backend(backend, keys.device, "compact_kv", COMPACT_KV_BACKENDS)
    if chosen == "reference" or any(e.dim() != 3 for e in extras):
        return compact_kv_reference(keys, values, indices, *extras)
    return tuple(_compact_kv_op(keys, values, indices, list(extras)))


def compact_kv_(
    keys: Tensor, values: Tensor, indices: Tensor, *extras: Tensor, validate: bool = True, backend: Optional[str] = None
):
    """In-place :func:`compact_kv`: the kept tokens are written into the prefix ``[:, :, :M]`` of the
    source buffers, which must be distinct, non-overlapping tensors (no broadcast or expanded
    views: two rows writing one address would corrupt each other); returns those prefix views.
    Needs ``indices`` ascending per row (as :func:`select_retained` returns them). No gradient."""
    extra_list = list(extras)
    _check_compact(keys, values, indices, extra_list, validate)
    for i, e in enumerate(extra_list):
        if e.dim() != 3 or tuple(e.shape) != tuple(keys.shape[:3]):
            raise ValueError(
                f"extras[{i}]: the in-place form needs a writable [B, H, S] tensor, got shape {tuple(e.shape)}"
            )
    check_disjoint_outputs({"keys": keys, "values": values, **{f"extras[{i}]": e for i, e in enumerate(extra_list)}})
    chosen = resolve_backend(backend, keys.device, "compact_kv", COMPACT_KV_BACKENDS)
    m = indices.shape[2]
    if chosen == "reference":
        gathered = compact_kv_reference(keys, values, indices, *extra_list)
        with torch.no_grad():
            for dst, src in zip([keys, values, *extra_list], gathered):
                dst[:, :, :m].copy_(src)
    else:
        _compact_kv_inplace_op(keys, values, indices, extra_list)
    return tuple(t[:, :, :m] for t in (keys, values, *extra_list))


# ============================================================================ fused evict


@kernel_op("negkernels::evict", mutates_args=())
def _evict_op(
    keys: Tensor,
    values: Tensor,
    log_beta: Tensor,
    positions: Tensor,
    step_tensor: Optional[Tensor],
    step: int,
    budget: int,
    sink: int,
    window: int,
    lengths: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..triton.kv import compact_kv_fwd, select_from_log_beta_fwd

    step_arg = step_tensor if step_tensor is not None else step
    if backend == "cuda":
        indices = _cuda_select(None, log_beta, positions, step_arg, budget, sink, window, lengths)
    else:
        indices = select_from_log_beta_fwd(log_beta, positions, step_arg, budget, sink, window, lengths)
    b, h, m = indices.shape
    outs = [
        keys.new_empty((b, h, m, keys.shape[-1])),
        values.new_empty((b, h, m, values.shape[-1])),
        log_beta.new_empty((b, h, m)),
        positions.new_empty((b, h, m)),
    ]
    compact_kv_fwd(keys, values, indices, [log_beta, positions], outs, in_place=False)
    return (*outs, indices)


@_evict_op.register_fake
def _(keys, values, log_beta, positions, step_tensor, step, budget, sink, window, lengths, backend):
    b, h, s, d = keys.shape
    m = min(budget, s)
    return (
        keys.new_empty((b, h, m, d)),
        values.new_empty((b, h, m, values.shape[-1])),
        log_beta.new_empty((b, h, m)),
        positions.new_empty((b, h, m)),
        keys.new_empty((b, h, m), dtype=torch.int64),
    )


def evict(
    keys: Tensor,
    values: Tensor,
    log_beta: Tensor,
    positions: Tensor,
    step,
    budget: int,
    *,
    sink: int = 0,
    window: int = 0,
    lengths: Optional[Tensor] = None,
    key_norm_weight: float = 0.0,
    backend: Optional[str] = None,
) -> Evicted:
    """Score, select and compact in one call: keep the ``budget`` best tokens of every (batch, head).

    Args:
        keys, values: [B, H, S, D] cache (any float dtype; V may have its own width).
        log_beta: [B, H, S] retention gate log β per token and head; positions: broadcastable to
            [B, H, S]; step: int or [B] tensor, the position of the next query (see
            :func:`retention_scores`).
        budget, sink, window, lengths: as :func:`select_retained`.
        key_norm_weight: adds w·log‖k‖ to the score (then the scores are computed in a separate pass).

    Returns :class:`Evicted` (kept K, V, log β, positions, indices), M = min(budget, S) per head.
    The Triton and CUDA paths compute the scores inside the selection (never stored) and read
    nothing on the host: CUDA-graph capturable. No gradient.
    """
    check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES)
    b, h, s, _ = keys.shape
    device = keys.device
    check_tensor("values", values, ndim=4, device=device)
    if tuple(values.shape[:3]) != (b, h, s):
        raise ValueError(f"values: shape {tuple(values.shape)} does not match keys' [B, H, S] = {(b, h, s)}")
    _check_rows("log_beta", log_beta, device=device)
    if tuple(log_beta.shape) != (b, h, s):
        raise ValueError(f"log_beta: shape {tuple(log_beta.shape)} does not match keys' [B, H, S] = {(b, h, s)}")
    positions = _expand_positions(positions, (b, h, s), device)
    step = _check_step(step, b, device)
    budget, sink, window = _check_budget(budget, sink, window)
    lengths = _check_lengths(lengths, b, device)
    key_norm_weight = check_finite_float("key_norm_weight", key_norm_weight)
    chosen = resolve_backend(backend, device, "evict", EVICT_BACKENDS)
    if chosen == "reference" or log_beta.dtype == torch.float64:
        scores = retention_scores_reference(log_beta.detach(), positions, step, keys.detach(), key_norm_weight)
        indices = select_retained_reference(scores, budget, sink, window, lengths)
        k, v, lb, pos = compact_kv_reference(keys.detach(), values.detach(), indices, log_beta.detach(), positions)
        return Evicted(k, v, lb, pos, indices)
    with torch.no_grad():
        if key_norm_weight != 0.0:
            scores = retention_scores(
                log_beta, positions, step, keys=keys, key_norm_weight=key_norm_weight, backend="triton"
            )
            indices = _select_retained_op(scores, budget, sink, window, lengths, chosen)
            k, v, lb, pos = _compact_kv_op(keys, values, indices, [log_beta, positions])
            return Evicted(k, v, lb, pos, indices)
        step_tensor = step if isinstance(step, Tensor) else None
        return Evicted(
            *_evict_op(
                keys,
                values,
                log_beta,
                positions,
                step_tensor,
                0 if step_tensor is not None else step,
                budget,
                sink,
                window,
                lengths,
                chosen,
            )
        )


# ============================================================================ retention mass


def _rows(log_beta: Tensor) -> Tensor:
    rows = math.prod(log_beta.shape[:-1])
    return log_beta.reshape(rows, log_beta.shape[-1]).contiguous()


@kernel_op("negkernels::retention_mass_fwd", mutates_args=())
def _retention_mass_fwd_op(log_beta: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
    from ..triton.kv import retention_mass_fwd

    return retention_mass_fwd(_rows(log_beta), cu_seqlens).reshape(log_beta.shape)


@_retention_mass_fwd_op.register_fake
def _(log_beta, cu_seqlens):
    return log_beta.new_empty(log_beta.shape, dtype=torch.float32)


@kernel_op("negkernels::retention_mass_bwd", mutates_args=())
def _retention_mass_bwd_op(grad: Tensor, log_beta: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
    from ..triton.kv import retention_mass_bwd

    return retention_mass_bwd(_rows(log_beta), cu_seqlens, _rows(grad)).reshape(log_beta.shape).to(log_beta.dtype)


@_retention_mass_bwd_op.register_fake
def _(grad, log_beta, cu_seqlens):
    return torch.empty_like(log_beta, memory_format=torch.contiguous_format)


def _mass_setup(ctx, inputs, output):
    log_beta, cu_seqlens = inputs
    ctx.save_for_backward(log_beta, cu_seqlens)


def _mass_backward(ctx, grad):
    log_beta, cu_seqlens = ctx.saved_tensors
    return _retention_mass_bwd_op(grad, log_beta, cu_seqlens), None


_retention_mass_fwd_op.register_autograd(_mass_backward, setup_context=_mass_setup)


def _check_cu_seqlens(cu_seqlens, t: int, device) -> Optional[Tensor]:
    if cu_seqlens is None:
        return None
    check_cu_seqlens(cu_seqlens, t, device)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 offsets [0, ..., T], got shape {tuple(cu_seqlens.shape)}")
    return cu_seqlens.to(torch.int64).contiguous()


def retention_mass(log_beta: Tensor, cu_seqlens: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """Retention mass: how many tokens' worth of cache the gate asks to keep at every step.

    Args:
        log_beta: [..., T] any float dtype, log β_i of every token along the last dim (e.g. [B, H, T]).
        cu_seqlens: [n + 1] int offsets of packed sequences along T (0, ..., T); sequences do not
            see each other. Default: one sequence.

    Formula: ``mass_t = Σ_{i ≤ t, same sequence} β_i^{t−i} = Σ exp((t − i)·log β_i)``.

    Returns fp32 [..., T] (fp64 for fp64 input on the reference backend), differentiable in
    ``log_beta``: d/d log β_i = Σ_{t ≥ i} g_t·(t − i)·β_i^{t−i}. The Triton kernels visit only the
    causal tiles of each sequence: O(Σ L²/2) exponentials forward and backward, O(T) memory.
    """
    check_tensor("log_beta", log_beta, dtypes=FLOAT_DTYPES)
    if log_beta.dim() < 1:
        raise ValueError("log_beta: expected at least 1 dimension (time last), got a 0-d tensor")
    cu_seqlens = _check_cu_seqlens(cu_seqlens, log_beta.shape[-1], log_beta.device)
    chosen = resolve_backend(backend, log_beta.device, "retention_mass", RETENTION_MASS_BACKENDS)
    if chosen == "reference" or log_beta.dtype == torch.float64:
        return retention_mass_reference(log_beta, cu_seqlens)
    return _retention_mass_fwd_op(log_beta, cu_seqlens)


def retention_capacity_loss(
    log_beta: Tensor, budget: float, cu_seqlens: Optional[Tensor] = None, *, backend: Optional[str] = None
) -> Tensor:
    """TRIM-KV's capacity term: ``mean_t max(0, mass_t − budget) / t`` over every token (t is the
    1-based position within its sequence), with ``mass`` from :func:`retention_mass`. Penalises
    gates that would keep more than ``budget`` tokens; a 0-d fp32 loss (0 for no tokens)."""
    budget = check_finite_float("budget", budget, minimum=0.0)
    mass = retention_mass(log_beta, cu_seqlens, backend=backend)  # checks cu_seqlens
    cu = cu_seqlens.long() if cu_seqlens is not None else None
    t = token_offsets(mass.shape[-1], cu, mass.device).to(mass.dtype)
    excess = torch.clamp_min(mass - budget, 0) / t
    return excess.mean() if excess.numel() else excess.sum()
