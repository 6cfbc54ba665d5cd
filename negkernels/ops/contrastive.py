"""Contrastive losses against a memory bank: public API, custom ops and autograd.

Layering: :func:`bank_info_nce`, :func:`bank_topk`, :func:`mochi_negatives` (validation) → the
custom ops ``negkernels::bank_info_nce_fwd`` / ``_bwd`` and ``negkernels::bank_topk`` (fake +
autograd + backend routing) → the Triton launchers. The ``reference`` backend is plain
differentiable PyTorch (it materialises the N×K logits).
"""

from __future__ import annotations

from typing import Optional, overload

import torch
from torch import Tensor

from .._backend import register_op, resolve_backend, triton_interpret
from .._kernel_op import bounded_memo, kernel_op, no_grads_after
from .._validation import INDEX_DTYPES, check_choice, check_finite_float, check_int, check_tensor
from ..reference.contrastive import (
    FALSE_NEGATIVE_MODES,
    REDUCTIONS,
    bank_info_nce_reference,
    bank_supcon_reference,
    bank_topk_reference,
)

BANK_INFO_NCE_BACKENDS = register_op("bank_info_nce", ("reference", "triton"))
BANK_TOPK_BACKENDS = register_op("bank_topk", ("reference", "triton"))
BANK_SUPCON_BACKENDS = register_op("bank_supcon", ("reference", "triton"))
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}
INPUT_DTYPES = KERNEL_DTYPES + (torch.float64,)


# ============================================================================ argument checks


def _check_bank(query: Tensor, bank: Tensor) -> None:
    check_tensor("query", query, ndim=2, dtypes=INPUT_DTYPES)
    check_tensor("bank", bank, ndim=2, device=query.device)
    if bank.shape[1] != query.shape[1]:
        raise ValueError(f"bank: key width {bank.shape[1]} does not match the query width {query.shape[1]}")
    if bank.dtype != query.dtype:
        raise TypeError(f"bank: dtype {bank.dtype} does not match query dtype {query.dtype} (convert one with .to())")


def _check_bank_valid(bank_valid, num_slots: int, device: torch.device):
    """→ (bool mask [K] or None, filled count: the sweep's bound when there is no mask)."""
    if bank_valid is None:
        return None, num_slots
    if isinstance(bank_valid, Tensor):
        if bank_valid.dtype != torch.bool or bank_valid.shape != (num_slots,):
            raise ValueError(
                f"bank_valid: expected a filled count or a bool mask of shape ({num_slots},), got "
                f"{bank_valid.dtype} of shape {tuple(bank_valid.shape)}"
            )
        check_tensor("bank_valid", bank_valid, device=device)
        return bank_valid.contiguous(), num_slots
    count = check_int("bank_valid", bank_valid, minimum=0)
    if count > num_slots:
        raise ValueError(f"bank_valid: {count} filled slots in a bank of {num_slots}")
    return None, count


def _check_temperature(temperature, device: torch.device) -> Tensor | float:
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise ValueError(
                f"temperature: expected a float or a 0-d floating tensor, got {temperature.dtype} of shape "
                f"{tuple(temperature.shape)}"
            )
        check_tensor("temperature", temperature, device=device)
        # Not read on the host (a learnable τ would cost a synchronisation every step): a value
        # that is not positive and finite makes the loss NaN.
        return torch.where((temperature > 0) & torch.isfinite(temperature), temperature, float("nan"))
    return check_finite_float("temperature", temperature, minimum=0.0, exclusive=True)


_TEMPERATURES: dict = {}


def _temperature_tensor(value: float, device: torch.device) -> Tensor:
    """A 0-d fp32 tensor holding a float temperature, which the kernels read on the device.

    Eager calls share one tensor per (value, device), never written, so a fixed τ costs no
    allocation and no copy per call; traced calls make their own."""
    if torch.compiler.is_compiling():
        return torch.full((), value, dtype=torch.float32, device=device)
    return bounded_memo(
        _TEMPERATURES, (value, device), lambda: torch.full((), value, dtype=torch.float32, device=device), 64
    )


def _check_ids(query_ids, bank_ids, n: int, k: int, device: torch.device):
    if (query_ids is None) != (bank_ids is None):
        raise ValueError(
            "query_ids and bank_ids: give both (false negatives are slots whose id equals the query's) or neither"
        )
    if query_ids is None:
        return None, None
    check_tensor("query_ids", query_ids, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_tensor("bank_ids", bank_ids, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if query_ids.shape[0] != n:
        raise ValueError(f"query_ids: length {query_ids.shape[0]} does not match the {n} queries")
    if bank_ids.shape[0] != k:
        raise ValueError(f"bank_ids: length {bank_ids.shape[0]} does not match the {k} bank slots")
    return query_ids.to(torch.int64).contiguous(), bank_ids.to(torch.int64).contiguous()


def _check_positive(query: Tensor, positive: Tensor) -> None:
    check_tensor("positive", positive, ndim=2, device=query.device)
    if positive.shape != query.shape:
        raise ValueError(f"positive: shape {tuple(positive.shape)} does not match query shape {tuple(query.shape)}")
    if positive.dtype != query.dtype:
        raise TypeError(f"positive: dtype {positive.dtype} does not match query dtype {query.dtype}")


def _kernel_temperature(temperature, device: torch.device) -> Tensor:
    """The checked temperature as the 0-d fp32 tensor the kernels read."""
    return temperature.float() if isinstance(temperature, Tensor) else _temperature_tensor(temperature, device)


@overload
def _upcast_half(x: Tensor) -> Tensor: ...
@overload
def _upcast_half(x: None) -> None: ...
def _upcast_half(x: Optional[Tensor]) -> Optional[Tensor]:
    return x.float() if x is not None and x.dtype in (torch.float16, torch.bfloat16) else x


# ============================================================================ InfoNCE custom ops


@kernel_op("negkernels::bank_info_nce_fwd", mutates_args=())
def _bank_info_nce_fwd_op(
    query: Tensor,
    positive: Optional[Tensor],
    bank: Tensor,
    temperature: Tensor,
    extra_negatives: Optional[Tensor],
    query_ids: Optional[Tensor],
    bank_ids: Optional[Tensor],
    valid_mask: Optional[Tensor],
    valid_count: int,
    false_negatives: Optional[str],
    normalize: bool,
    reduction: int,
    self_slots: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss: [N] per query, or their fixed-order sum (``reduction`` 1) or mean (2), 0-d;
    lse_all [N], lse_pos [N] (log |P| for ``"supcon"``)). Reduced inside the op: no autograd nodes
    for the reduction. ``positive`` may be None (then P holds bank slots only); ``self_slots``
    [N] int64 names each query's own slot (−1: none), which is in neither set."""
    from ..triton.contrastive import bank_info_nce_fwd

    return bank_info_nce_fwd(
        query,
        positive,
        bank,
        temperature,
        extra_negatives,
        query_ids,
        bank_ids,
        valid_mask,
        valid_count,
        false_negatives,
        normalize,
        triton_interpret(),
        reduce_scale=_reduction_scale(reduction, query.shape[0]) if reduction else None,
        self_slots=self_slots,
    )


def _reduction_scale(reduction: int, n: int) -> float:
    return 1.0 / max(n, 1) if reduction == REDUCTION_CODES["mean"] else 1.0


@_bank_info_nce_fwd_op.register_fake
def _(
    query,
    positive,
    bank,
    temperature,
    extra,
    query_ids,
    bank_ids,
    valid_mask,
    valid_count,
    fn,
    normalize,
    reduction,
    self_slots,
):
    out = query.new_empty(query.shape[0], dtype=torch.float32)
    loss = query.new_empty((), dtype=torch.float32) if reduction else out.clone()
    return loss, out, out.clone()


@kernel_op("negkernels::bank_info_nce_bwd", mutates_args=())
def _bank_info_nce_bwd_op(
    grad_loss: Tensor,
    query: Tensor,
    positive: Optional[Tensor],
    bank: Tensor,
    temperature: Tensor,
    extra_negatives: Optional[Tensor],
    query_ids: Optional[Tensor],
    bank_ids: Optional[Tensor],
    valid_mask: Optional[Tensor],
    valid_count: int,
    false_negatives: Optional[str],
    normalize: bool,
    lse_all: Tensor,
    lse_pos: Tensor,
    bank_grad: bool,
    extra_grad: bool,
    grad_scale: float,
    self_slots: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """→ (d query, d positive or [0], d bank or [0], d extras or [0], r = Σ_j (d loss_i / d l_ij)·l_ij
    per query), for incoming gradients ``grad_loss`` ([N], or one 0-d for a reduced loss) times
    ``grad_scale``."""
    from ..triton.contrastive import bank_info_nce_bwd

    return bank_info_nce_bwd(
        grad_loss,
        query,
        positive,
        bank,
        temperature,
        extra_negatives,
        query_ids,
        bank_ids,
        valid_mask,
        valid_count,
        false_negatives,
        normalize,
        lse_all,
        lse_pos,
        bank_grad,
        extra_grad,
        triton_interpret(),
        grad_scale,
        self_slots=self_slots,
    )


@_bank_info_nce_bwd_op.register_fake
def _(
    grad_loss,
    query,
    positive,
    bank,
    temperature,
    extra_negatives,
    query_ids,
    bank_ids,
    valid_mask,
    valid_count,
    false_negatives,
    normalize,
    lse_all,
    lse_pos,
    bank_grad,
    extra_grad,
    grad_scale,
    self_slots,
):
    dextra = (
        torch.empty_like(extra_negatives, memory_format=torch.contiguous_format)
        if extra_grad and extra_negatives is not None
        else query.new_empty(0)
    )
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(positive, memory_format=torch.contiguous_format)
        if positive is not None
        else query.new_empty(0),
        torch.empty_like(bank, memory_format=torch.contiguous_format) if bank_grad else bank.new_empty(0),
        dextra,
        query.new_empty(query.shape[0], dtype=torch.float32),
    )


def _bank_info_nce_setup(ctx, inputs, output):
    (
        query,
        positive,
        bank,
        temperature,
        extra,
        query_ids,
        bank_ids,
        valid_mask,
        valid_count,
        fn,
        normalize,
        reduction,
        self_slots,
    ) = inputs
    _, lse_all, lse_pos = output
    ctx.save_for_backward(
        query, positive, bank, temperature, extra, query_ids, bank_ids, valid_mask, lse_all, lse_pos, self_slots
    )
    ctx.options = (valid_count, fn, normalize)
    ctx.grad_scale = _reduction_scale(reduction, query.shape[0]) if reduction else None
    ctx.mark_non_differentiable(lse_all, lse_pos)


def _bank_info_nce_backward(ctx, grad_loss, grad_lse_all, grad_lse_pos):
    (query, positive, bank, temperature, extra, query_ids, bank_ids, valid_mask, lse_all, lse_pos, self_slots) = (
        ctx.saved_tensors
    )
    valid_count, fn, normalize = ctx.options
    needs = ctx.needs_input_grad
    # A reduced loss: its one gradient is read by every query at stride 0, times the reduction's scale.
    # The direct eager entrance has already settled that nothing here is traced.
    bwd = _bank_info_nce_bwd_op.impl if getattr(ctx, "direct_call", False) else _bank_info_nce_bwd_op
    dq, dpos, dbank, dextra, r = bwd(
        grad_loss,
        query,
        positive,
        bank,
        temperature,
        extra,
        query_ids,
        bank_ids,
        valid_mask,
        valid_count,
        fn,
        normalize,
        lse_all,
        lse_pos,
        bool(needs[2]),
        bool(needs[4]) and extra is not None,
        1.0 if ctx.grad_scale is None else ctx.grad_scale,
        self_slots,
    )
    # l = (q·k)/τ, so d loss/dτ = −Σ_ij G_ij·l_ij / τ (a fixed-order sum: deterministic).
    dtemperature = -r.sum() / temperature if needs[3] else None
    return no_grads_after(
        ctx,
        dq,
        dpos if positive is not None else None,
        dbank if needs[2] else None,
        dtemperature,
        dextra if needs[4] else None,
    )


_bank_info_nce_fwd_op.register_autograd(
    _bank_info_nce_backward, setup_context=_bank_info_nce_setup, differentiable=5
)  # query, positive, bank, temperature, extras


# ============================================================================ InfoNCE public API


def bank_info_nce(
    query: Tensor,
    positive: Tensor,
    bank: Tensor,
    *,
    temperature=0.07,
    normalize: bool = False,
    query_ids: Optional[Tensor] = None,
    bank_ids: Optional[Tensor] = None,
    false_negatives: Optional[str] = "exclude",
    bank_valid=None,
    extra_negatives: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """InfoNCE of each query against its positive and a bank of negatives, never forming N×K logits.

    Args:
        query, positive: [N, D] fp16 / bf16 / fp32 (fp64 on the reference backend), same dtype.
        bank: [K, D], the query's dtype and device; it gets a gradient only when it requires one.
        temperature: τ > 0, a float or a learnable 0-d tensor (it then gets a gradient; a tensor is
            not read on the host, so one that is not positive and finite makes the loss NaN).
        normalize: L2-normalise query, positive, bank and extras inside the op (gradients flow
            through the normalisation; ε = 1e-12 as in ``F.normalize``).
        query_ids [N], bank_ids [K]: integer ids (e.g. instance or class); a slot whose id equals
            the query's is a false negative.
        false_negatives: ``"exclude"`` drops such slots from the denominator, ``"positive"`` adds
            them to the positive set, ``None`` ignores ids.
        bank_valid: number of filled slots (slots [0, bank_valid) are used) or a bool mask [K].
        extra_negatives: [N, M, D] per-query negatives (e.g. :func:`mochi_negatives`); they are
            always negatives. May be strided (an expanded [1, M, D] is shared by every query).
        reduction: ``"mean"`` (over the N queries; 0 when N = 0), ``"sum"``, ``"none"`` ([N]).

    Formula, per query i (l = logits / τ over the denominator set A_i = {k⁺_i} ∪ usable slots ∪ extras):
        loss_i = logsumexp_{a∈A_i} l_a − logsumexp_{p∈P_i} l_p,
        P_i = {k⁺_i} ∪ (with ``"positive"``) the filled slots with id = query_ids[i].
    A fully excluded bank gives loss_i = 0; so does a bank whose every slot is a positive.

    Returns: fp32 loss (0-d, or [N] with ``reduction="none"``). Gradients come back in the inputs'
    dtypes. Triton: one streaming pass over the bank (split into slot ranges across programs)
    saves two fp32 log-sum-exps per query; the backward recomputes the logits tile by tile
    (d query without atomics; d bank in a second sweep only when the bank requires grad).
    Extra memory is O(N·D).
    """
    _check_bank(query, bank)
    _check_positive(query, positive)
    n, num_slots = query.shape[0], bank.shape[0]
    check_choice("false_negatives", false_negatives, FALSE_NEGATIVE_MODES + (None,))
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    temperature = _check_temperature(temperature, query.device)
    query_ids, bank_ids = _check_ids(query_ids, bank_ids, n, num_slots, query.device)
    valid_mask, valid_count = _check_bank_valid(bank_valid, num_slots, query.device)
    if extra_negatives is not None:
        check_tensor("extra_negatives", extra_negatives, ndim=3, device=query.device)
        if extra_negatives.shape[0] != n or extra_negatives.shape[2] != query.shape[1]:
            raise ValueError(
                f"extra_negatives: expected shape ({n}, M, {query.shape[1]}), got {tuple(extra_negatives.shape)}"
            )
        if extra_negatives.dtype != query.dtype:
            raise TypeError(f"extra_negatives: dtype {extra_negatives.dtype} does not match query dtype {query.dtype}")
    fn_mode = false_negatives if query_ids is not None else None

    implemented = BANK_INFO_NCE_BACKENDS if query.dtype in KERNEL_DTYPES else ("reference",)
    chosen = resolve_backend(backend, query.device, "bank_info_nce", implemented)
    if chosen == "reference":
        # fp32 accumulation for half inputs, as the kernels; gradients flow back through the casts.
        up = _upcast_half
        return bank_info_nce_reference(
            up(query),
            up(positive),
            up(bank),
            temperature,
            normalize=normalize,
            query_ids=query_ids,
            bank_ids=bank_ids,
            false_negatives=fn_mode,
            bank_valid=valid_mask if valid_mask is not None else valid_count,
            extra_negatives=up(extra_negatives),
            reduction=reduction,
        ).float()

    loss, _, _ = _bank_info_nce_fwd_op(
        query,
        positive,
        bank,
        _kernel_temperature(temperature, query.device),
        extra_negatives,
        query_ids,
        bank_ids,
        valid_mask,
        valid_count,
        fn_mode,
        normalize,
        REDUCTION_CODES[reduction],
        None,
    )
    return loss


# ============================================================================ SupCon (several positives per query)


def bank_supcon(
    query: Tensor,
    bank: Tensor,
    query_labels: Tensor,
    bank_labels: Tensor,
    *,
    positive: Optional[Tensor] = None,
    temperature=0.1,
    normalize: bool = False,
    self_slots: Optional[Tensor] = None,
    bank_valid=None,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """Supervised contrastive loss against a bank: every filled slot with the query's label is a
    positive (SupCon's L_out, Khosla et al. 2020), in one streaming pass, never forming N×K logits.

    Args:
        query: [N, D] fp16 / bf16 / fp32 (fp64 on the reference backend); bank: [K, D], same dtype
            and device (it gets a gradient only when it requires one).
        query_labels [N], bank_labels [K]: integer class labels.
        positive: optional [N, D] explicit positive per query (e.g. the other view), always in P_i.
        temperature: τ > 0, a float or a learnable 0-d tensor (as :func:`bank_info_nce`).
        normalize: L2-normalise query, positive and bank inside the op (cosine similarities).
        self_slots: optional [N] integer slot of each query's own key in the bank (−1: none);
            that slot is in neither set (pytorch-metric-learning's "self comparisons").
        bank_valid: filled count or bool mask [K], as :func:`bank_info_nce`.
        reduction: ``"mean"`` over the queries that have at least one positive (0 if none),
            ``"sum"``, or ``"none"`` ([N]).

    Formula, per query i, with A_i = the filled slots except ``self_slots[i]`` (plus k⁺_i) and
    P_i = the members of A_i labelled ``query_labels[i]`` (plus k⁺_i), l = q·k/τ::

        loss_i = logsumexp_{a∈A_i} l_a − (1/|P_i|)·Σ_{p∈P_i} l_p      (0 when P_i is empty)

    Its gradient is d loss_i/d l_a = softmax_A(l)_a − 1[a∈P_i]/|P_i|. The Triton kernels keep an
    online log-sum-exp over A and a running Σ_P l and |P| per query, so memory is O(N·D) whatever
    the number of positives; :func:`bank_info_nce` with ``false_negatives="positive"`` is the
    other SupCon form, L_in (the log of the summed positive probabilities).
    """
    _check_bank(query, bank)
    n, num_slots = query.shape[0], bank.shape[0]
    if positive is not None:
        _check_positive(query, positive)
    check_tensor("query_labels", query_labels, ndim=1, dtypes=INDEX_DTYPES, device=query.device)
    check_tensor("bank_labels", bank_labels, ndim=1, dtypes=INDEX_DTYPES, device=query.device)
    if query_labels.shape[0] != n:
        raise ValueError(f"query_labels: length {query_labels.shape[0]} does not match the {n} queries")
    if bank_labels.shape[0] != num_slots:
        raise ValueError(f"bank_labels: length {bank_labels.shape[0]} does not match the {num_slots} bank slots")
    if self_slots is not None:
        check_tensor("self_slots", self_slots, ndim=1, dtypes=INDEX_DTYPES, device=query.device)
        if self_slots.shape[0] != n:
            raise ValueError(f"self_slots: length {self_slots.shape[0]} does not match the {n} queries")
        self_slots = self_slots.to(torch.int64).contiguous()
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    temperature = _check_temperature(temperature, query.device)
    valid_mask, valid_count = _check_bank_valid(bank_valid, num_slots, query.device)
    query_labels, bank_labels = query_labels.to(torch.int64).contiguous(), bank_labels.to(torch.int64).contiguous()

    implemented = BANK_SUPCON_BACKENDS if query.dtype in KERNEL_DTYPES else ("reference",)
    chosen = resolve_backend(backend, query.device, "bank_supcon", implemented)
    if chosen == "reference":
        up = _upcast_half
        return bank_supcon_reference(
            up(query),
            up(bank),
            query_labels,
            bank_labels,
            temperature,
            positive=up(positive),
            normalize=normalize,
            self_slots=self_slots,
            bank_valid=valid_mask if valid_mask is not None else valid_count,
            reduction=reduction,
        ).float()

    # With an explicit positive every query has one, so the mean is over all N, inside the op.
    in_op = reduction if reduction != "mean" or positive is not None else "none"
    loss, _, log_count = _bank_info_nce_fwd_op(
        query,
        positive,
        bank,
        _kernel_temperature(temperature, query.device),
        None,
        query_labels,
        bank_labels,
        valid_mask,
        valid_count,
        "supcon",
        normalize,
        REDUCTION_CODES[in_op],
        self_slots,
    )
    if in_op == reduction:
        return loss
    # log |P_i| is −inf exactly for the queries without positives: no host read.
    return loss.sum() / (log_count > float("-inf")).sum().clamp(min=1)


# ============================================================================ top-k and MoCHi


@kernel_op("negkernels::bank_topk", mutates_args=())
def _bank_topk_op(
    query: Tensor, bank: Tensor, k: int, valid_mask: Optional[Tensor], valid_count: int, normalize: bool
) -> tuple[Tensor, Tensor]:
    from ..triton.contrastive import bank_topk as bank_topk_launch

    return bank_topk_launch(query, bank, k, valid_mask, valid_count, normalize, triton_interpret())


@_bank_topk_op.register_fake
def _(query, bank, k, valid_mask, valid_count, normalize):
    return (
        query.new_empty((query.shape[0], k), dtype=torch.float32),
        query.new_empty((query.shape[0], k), dtype=torch.int64),
    )


def bank_topk(
    query: Tensor, bank: Tensor, k: int, *, normalize: bool = False, bank_valid=None, backend: Optional[str] = None
) -> tuple[Tensor, Tensor]:
    """The k most similar filled bank slots of each query (hard-negative mining), without N×K.

    Args:
        query: [N, D]; bank: [K, D] of the same dtype (fp16 / bf16 / fp32; fp64 on the reference).
        k: how many per query (the Triton kernel keeps up to 256; beyond that the reference runs).
        normalize: rank by cosine similarity instead of the dot product q·b.
        bank_valid: filled count or bool mask [K], as in :func:`bank_info_nce`.

    Returns: (similarities [N, k] fp32, largest first; slot indices [N, k] int64). Equal
    similarities are ordered by slot. Rows with fewer than k filled slots are padded with
    (−inf, −1). No gradient flows (mining selects, it does not train).
    """
    _check_bank(query, bank)
    k = check_int("k", k, minimum=0)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    from ..triton.contrastive import TOPK_MAX_K

    valid_mask, valid_count = _check_bank_valid(bank_valid, bank.shape[0], query.device)
    implemented = BANK_TOPK_BACKENDS if query.dtype in KERNEL_DTYPES and k <= TOPK_MAX_K else ("reference",)
    chosen = resolve_backend(backend, query.device, "bank_topk", implemented)
    if chosen == "reference":
        with torch.no_grad():
            values, indices = bank_topk_reference(
                _upcast_half(query),
                _upcast_half(bank),
                k,
                normalize=normalize,
                bank_valid=valid_mask if valid_mask is not None else valid_count,
            )
        return values.float(), indices
    return _bank_topk_op(query.detach(), bank.detach(), k, valid_mask, valid_count, normalize)


def mochi_negatives(
    query: Tensor,
    bank: Tensor,
    *,
    top_n: int,
    num_pair_mixes: int,
    num_query_mixes: int,
    bank_valid=None,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """MoCHi synthetic hard negatives (Kalantidis et al., 2020), detached, [N, num_pair_mixes + num_query_mixes, D].

    The top_n hardest negatives of each query are its most cosine-similar filled bank slots
    (:func:`bank_topk`). With q̂, n̂ the L2-normalised query and negatives:

        pair mixes:  normalize(α·n̂_i + (1 − α)·n̂_j),  i ≠ j drawn from the top_n, α ~ U(0, 1)
        query mixes: normalize(β·q̂ + (1 − β)·n̂_j),    j drawn from the top_n,      β ~ U(0, 0.5)

    Pass the result as ``extra_negatives`` to :func:`bank_info_nce`. Draws come from
    ``generator`` (on any device), so a seeded generator reproduces them exactly. With fewer
    than top_n filled slots the filled ones are used (with one, a pair mix is that negative);
    with none the result is [N, 0, D]. Output dtype: the query's.
    """
    _check_bank(query, bank)
    top_n = check_int("top_n", top_n, minimum=1)
    num_pair_mixes = check_int("num_pair_mixes", num_pair_mixes, minimum=0)
    num_query_mixes = check_int("num_query_mixes", num_query_mixes, minimum=0)
    valid_mask, valid_count = _check_bank_valid(bank_valid, bank.shape[0], query.device)
    filled = int(valid_mask.sum()) if valid_mask is not None else valid_count
    n, d = query.shape
    available = min(top_n, filled)
    if available == 0 or num_pair_mixes + num_query_mixes == 0:
        return query.new_zeros((n, 0, d))
    with torch.no_grad():
        _, hardest = bank_topk(query, bank, available, normalize=True, bank_valid=bank_valid, backend=backend)
        work = torch.float64 if query.dtype == torch.float64 else torch.float32
        q_hat = torch.nn.functional.normalize(query.to(work), dim=-1)
        negatives = torch.nn.functional.normalize(bank[hardest].to(work), dim=-1)  # [N, available, D]
        draw_device = generator.device if generator is not None else query.device

        def uniform(*shape):
            return torch.rand(*shape, generator=generator, device=draw_device).to(query.device)

        def pick(count):
            return (uniform(n, count) * available).long().clamp_max(available - 1)

        mixes = []
        if num_pair_mixes:
            first = pick(num_pair_mixes)
            # a second, different negative: shift by 1..available−1 (the same one when only one exists)
            shift = 1 + (uniform(n, num_pair_mixes) * max(available - 1, 1)).long().clamp_max(max(available - 2, 0))
            second = (first + shift) % available if available > 1 else first
            alpha = uniform(n, num_pair_mixes, 1)
            a = negatives.gather(1, first.unsqueeze(-1).expand(-1, -1, d))
            b = negatives.gather(1, second.unsqueeze(-1).expand(-1, -1, d))
            mixes.append(alpha * a + (1 - alpha) * b)
        if num_query_mixes:
            which = pick(num_query_mixes)
            beta = 0.5 * uniform(n, num_query_mixes, 1)
            c = negatives.gather(1, which.unsqueeze(-1).expand(-1, -1, d))
            mixes.append(beta * q_hat.unsqueeze(1) + (1 - beta) * c)
        out = torch.nn.functional.normalize(torch.cat(mixes, dim=1), dim=-1)
    return out.to(query.dtype)
