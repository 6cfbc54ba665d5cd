"""Token log-probs, entropy and policy losses: public API, custom ops and autograd.

Layering: :func:`token_logprobs`, :func:`policy_loss`, :func:`policy_loss_from_logits`,
:func:`linear_token_logprobs`, :func:`linear_policy_loss` (validation, normalisers, process
groups) → the custom ops ``negkernels::token_logprobs_fwd`` / ``_bwd``, ``negkernels::policy_loss``,
``negkernels::policy_loss_from_logits``, ``negkernels::linear_token_logprobs_fwd`` / ``_bwd`` and
``negkernels::linear_policy_loss`` (fake + autograd + backend routing) → the Triton or CUDA
launchers. The ``reference`` backend is plain differentiable PyTorch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._backend import register_op, resolve_backend
from .._kernel_op import bounded_memo, config_of, kernel_op, no_grads_after, plain_eager_call
from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_cu_seqlens,
    check_finite_float,
    check_int,
    check_tensor,
)
from ..reference.logprobs import (
    AGGREGATION_CODE,
    AGGREGATIONS,
    IS_CODE,
    IS_MODES,
    KL_CODE,
    KL_ESTIMATORS,
    LOSS_CODE,
    LOSS_TYPES,
    POLICY_LOSS_PARTIALS,
    Aggregation,
    IsMode,
    KlEstimator,
    linear_logits_reference,
    linear_token_logprobs_reference,
    policy_loss_reference,
    token_logprobs_grad_reference,
    token_logprobs_partials_reference,
    token_logprobs_reference,
)

TOKEN_LOGPROBS_BACKENDS = register_op("token_logprobs", ("reference", "triton"))
POLICY_LOSS_BACKENDS = register_op("policy_loss", ("reference", "triton", "cuda"))
POLICY_LOSS_FROM_LOGITS_BACKENDS = register_op("policy_loss_from_logits", ("reference", "triton"))
TOKEN_LOCAL_LOSSES = ("ppo", "cispo", "sapo", "gpg")
RATIO_LEVELS = ("token", "sequence")
SEQUENCE_RATIO_LOSSES = ("sapo", "cispo")


class PolicyLossOutput(NamedTuple):
    """The loss and, from the same pass, its metrics (0-d fp32 means over the unmasked tokens)."""

    loss: Tensor
    clip_fraction_low: Tensor  # A < 0 and ρ < 1 − clip_low (cispo: ρ < 1 − clip_low, two-sided only)
    clip_fraction_high: Tensor  # A > 0 and ρ > 1 + clip_high (cispo: ρ > 1 + clip_high)
    dual_clip_fraction: Tensor  # A < 0 and the dual-clip cap −c·A is the loss
    approx_kl: Tensor  # mean of ρ − 1 − log ρ, an unbiased estimate of KL(π_old ‖ π)
    mean_ratio: Tensor  # mean of ρ = exp(logp − old_logp)
    kl: Tensor  # mean of the KL-penalty estimate against ref_logp (0 without ref_logp)
    entropy: Optional[Tensor] = None  # mean token entropy (from logits, with return_entropy)
    token_logp: Optional[Tensor] = None  # per-token log-probs, detached (from logits)
    token_entropy: Optional[Tensor] = None  # per-token entropy, detached (from logits, with return_entropy)


# ============================================================================ token log-probs


@functools.cache
def _triton_kernels():
    """``negkernels.triton.logprobs``, imported on the first Triton call (only that backend needs
    Triton); cached, since an import statement costs a hot path more than a cached call."""
    from ..triton import logprobs

    return logprobs


def _row_view(x: Tensor) -> tuple[Tensor, int, int, int]:
    """[..., V] → (tensor, outer stride, inner stride, inner size) addressing rows without a copy
    when the last dim has unit stride and there are at most two leading dims (e.g. logits[:, :-1])."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x.dim() == 2:
        return x, 0, x.stride(0), max(x.shape[0], 1)
    return x, x.stride(0), x.stride(1), max(x.shape[1], 1)


def _rows_in_own_storage(x: Tensor) -> bool:
    """True when :func:`_row_view` addresses ``x`` without a copy, so a kernel can write into it.

    An in-place backward into a copy would return the caller's unwritten logits as the gradient:
    where this is False the in-place options fall back to an out-of-place gradient buffer.
    """
    if x.dim() == 0 or x.stride(-1) != 1:
        return False
    if x.dim() > 3:
        try:
            x.view(-1, x.shape[-2], x.shape[-1])
        except RuntimeError:
            return False
    return True


@kernel_op("negkernels::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd_op(
    logits: Tensor,
    targets: Tensor,
    temperature: float,
    vocab_start: int,
    vocab_total: int,
    with_entropy: bool,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of the vocabulary slice [vocab_start, vocab_start + V) of a vocabulary of vocab_total ids."""
    from ..triton.logprobs import token_logprobs_fwd

    rows = targets.numel()
    x, so, si, inner = _row_view(logits)
    logp, entropy, lse = token_logprobs_fwd(
        x,
        so,
        si,
        inner,
        rows,
        logits.shape[-1],
        targets.contiguous(),
        temperature,
        vocab_start,
        with_entropy,
        vocab_total,
    )
    lead = targets.shape
    return logp.view(lead), entropy.view(lead) if with_entropy else entropy, lse.view(lead)


@_token_logprobs_fwd_op.register_fake
def _(logits, targets, temperature, vocab_start, vocab_total, with_entropy, inplace_backward):
    out = logits.new_empty(targets.shape, dtype=torch.float32)
    ent = logits.new_empty(targets.shape if with_entropy else (0,), dtype=torch.float32)
    return out, ent, out.clone()


def _bwd_launch(grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, vocab_start, out):
    from ..triton.logprobs import token_logprobs_bwd

    x, so, si, inner = _row_view(logits)
    o, oso, osi, _ = _row_view(out)
    token_logprobs_bwd(
        grad_logp.reshape(-1) if grad_logp is not None else None,
        grad_entropy.reshape(-1) if grad_entropy is not None else None,
        x,
        so,
        si,
        inner,
        o,
        oso,
        osi,
        targets.numel(),
        logits.shape[-1],
        targets.contiguous(),
        lse.reshape(-1).contiguous(),
        entropy.reshape(-1).contiguous() if entropy is not None else None,
        temperature,
        vocab_start,
    )
    return out


@kernel_op("negkernels::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd_op(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    temperature: float,
    vocab_start: int,
) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _bwd_launch(grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, vocab_start, out)
    return out


@_token_logprobs_bwd_op.register_fake
def _(grad_logp, grad_entropy, logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@kernel_op("negkernels::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _token_logprobs_bwd_inplace_op(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    temperature: float,
    vocab_start: int,
) -> None:
    # Each element is read before it is overwritten by the same thread: logits become their gradient.
    _bwd_launch(grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, vocab_start, logits)


def _token_logprobs_setup(ctx, inputs, output):
    logits, targets, temperature, vocab_start, vocab_total, with_entropy, inplace = inputs
    logp, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
    ctx.temperature, ctx.vocab_start, ctx.inplace = temperature, vocab_start, inplace
    ctx.mark_non_differentiable(lse)


def _token_logprobs_backward(ctx, grad_logp, grad_entropy, grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    if entropy is None:
        grad_entropy = None
    if ctx.inplace:
        _token_logprobs_bwd_inplace_op(
            grad_logp, grad_entropy, logits, targets, lse, entropy, ctx.temperature, ctx.vocab_start
        )
        grad = logits
    else:
        grad = _token_logprobs_bwd_op(
            grad_logp, grad_entropy, logits, targets, lse, entropy, ctx.temperature, ctx.vocab_start
        )
    return no_grads_after(ctx, grad)


_token_logprobs_fwd_op.register_autograd(
    _token_logprobs_backward, setup_context=_token_logprobs_setup, differentiable=1
)


def _combine_vocab_partials(
    logp_r: Tensor, ent_r: Tensor, lse_r: Tensor, targets: Tensor, vocab_start: int, local_vocab: int, group
) -> tuple[Tensor, Tensor, Tensor]:
    """Each rank's slice statistics (log p_t or 0, H_r, lse_r) → the global (log p_t, H, lse) on every rank.

    lse = log Σ_r e^{lse_r}; log p_t = z_t − lse; H = Σ_r w_r·(H_r − log w_r) with w_r = e^{lse_r − lse}
    (no large terms cancel). Three all-reduces of [N]-sized tensors.
    """
    import torch.distributed as dist

    lse_max = lse_r.clone()
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    local = targets.long() - vocab_start
    owned = (local >= 0) & (local < local_vocab)
    z_t = torch.where(owned, logp_r + lse_r, torch.zeros_like(lse_r))
    stacked = torch.stack([torch.exp(lse_r - shift), z_t])
    dist.all_reduce(stacked, group=group)
    lse = shift + torch.log(stacked[0])
    logp = stacked[1] - lse
    w = torch.exp(lse_r - lse)
    entropy = torch.where(w > 0, w * (ent_r - torch.log(w)), torch.zeros_like(w))
    dist.all_reduce(entropy, group=group)
    return logp, entropy, lse


class _VocabParallelTokenLogprobs(torch.autograd.Function):
    """Each rank holds logits for the vocabulary slice [vocab_start, vocab_start + V_r).

    Forward: per-slice (log p_t or 0, H_r, lse_r), combined by :func:`_combine_vocab_partials`.
    Backward: every rank's slice gradient from the global lse and H; no communication.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, vocab_start, vocab_total, with_entropy, group, backend):
        if backend == "reference":
            logp_r, ent_r, lse_r = token_logprobs_partials_reference(
                logits, targets, temperature, vocab_start, vocab_total
            )
        else:
            logp_r, ent_r, lse_r = _token_logprobs_fwd_op(
                logits, targets, temperature, vocab_start, vocab_total, True, False
            )
        logp, entropy, lse = _combine_vocab_partials(
            logp_r, ent_r, lse_r, targets, vocab_start, logits.shape[-1], group
        )
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.args = (temperature, vocab_start, backend)
        ctx.with_entropy = with_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, vocab_start, backend = ctx.args
        if not ctx.with_entropy:
            grad_entropy = None
        if backend == "reference":
            grad = token_logprobs_grad_reference(
                grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, vocab_start
            )
        else:
            grad = _token_logprobs_bwd_op(
                grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, vocab_start
            )
        return grad, None, None, None, None, None, None, None


def _check_targets(targets: Tensor, logits: Tensor, name: str = "targets") -> None:
    check_tensor(name, targets, dtypes=INDEX_DTYPES, device=logits.device)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name}: shape {tuple(targets.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )


def _check_target_range(targets: Tensor, vocab: int, name: str = "targets") -> None:
    if targets.numel():
        lo, hi = (int(v) for v in torch.aminmax(targets.reshape(-1)))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name}: ids must lie in [0, {vocab}), found {lo if lo < 0 else hi}")


def _global_vocab(local: int, process_group) -> tuple[int, int]:
    """(vocab_start of this rank, global vocabulary size) for contiguous slices in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    sizes: list = [None] * world  # filled with each rank's int
    dist.all_gather_object(sizes, local, group=process_group)
    rank = dist.get_rank(process_group)
    return sum(sizes[:rank]), sum(sizes)


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    process_group=None,
    validate: bool = True,
    backend: Optional[str] = None,
):
    """Log-probabilities of the chosen tokens (and entropies) from logits, in one streaming pass.

    Args:
        logits: [..., V] fp16/bf16/fp32 (fp64 on the reference backend). Rows need unit stride
            along V; up to two leading dims may be strided views (``logits[:, :-1]``) without a copy.
        targets: [...] int32/int64 token ids in [0, V) (global ids with ``process_group``).
        temperature: T > 0; the distribution is softmax(logits / T).
        return_entropy: also return H = −Σ_j p_j log p_j of that distribution.
        inplace_backward: the backward writes the logits' gradient into the logits' storage
            (saves a logits-sized buffer; the logits are destroyed, so nothing else may need them).
            Kernel backends only; the reference ignores it. Logits whose rows the kernel cannot
            address in their own storage (a strided last dim, leading dims that do not flatten
            into a view) get an out-of-place gradient instead.
        process_group: vocab-parallel logits: rank r holds the r-th contiguous slice of the
            vocabulary, in rank order; results equal the single-process ones on every rank.
        validate: check the target range on the host (one synchronisation). Without it the
            kernels give NaN for an id outside the vocabulary and read nothing out of bounds.
        backend: ``None`` (automatic), ``"reference"`` or ``"triton"``.

    Returns:
        logp [...] fp32 = z_t − log Σ_j e^{z_j} with z = logits / T (and entropy [...] fp32).
        Differentiable in ``logits`` through both; the gradient comes back in the logits' dtype:
        d/dz_j = g_logp·(1[j=t] − p_j) − g_H·p_j·(log p_j + H), divided by T.

    The Triton kernel keeps an online max, sum-exp and Σ p·z per row and saves only the row's
    log-sum-exp for the backward, which recomputes p: no fp32 or full-size log-softmax ever exists.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    _check_targets(targets, logits)
    temperature = check_finite_float("temperature", temperature, minimum=0.0, exclusive=True)
    chosen = resolve_backend(backend, logits.device, "token_logprobs", TOKEN_LOGPROBS_BACKENDS)
    if chosen != "reference" and logits.dtype == torch.float64:
        raise TypeError("logits: float64 logits run on backend='reference' only")
    if process_group is not None:
        vocab_start, vocab = _global_vocab(logits.shape[-1], process_group)
        if validate:
            _check_target_range(targets, vocab)
        logp, entropy = _VocabParallelTokenLogprobs.apply(
            logits, targets, temperature, vocab_start, vocab, return_entropy, process_group, chosen
        )
        return (logp, entropy) if return_entropy else logp
    if validate:
        _check_target_range(targets, logits.shape[-1])
    if chosen == "reference":
        return token_logprobs_reference(logits, targets, temperature, return_entropy)
    logp, entropy, _ = _token_logprobs_fwd_op(
        logits,
        targets,
        temperature,
        0,
        logits.shape[-1],
        return_entropy,
        inplace_backward and _rows_in_own_storage(logits),
    )
    return (logp, entropy) if return_entropy else logp


# ============================================================================ policy loss


def _dense(x: Optional[Tensor]) -> Optional[Tensor]:
    """Contiguous, in any shape: the kernels read per-token inputs flat, by token index (a reshape
    would cost the host an op for nothing)."""
    return None if x is None else x.contiguous()


def _sum_over_ranks(x: Tensor, process_group) -> Tensor:
    """``x`` summed over the ranks of ``process_group`` (``x`` itself without one); never in place."""
    if process_group is None:
        return x
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x, group=process_group)
    return x


def _per_sequence_column(x: Optional[Tensor], like: Tensor, cu_seqlens: Optional[Tensor]) -> Optional[Tensor]:
    """Per-sequence values given as a [B, 1] column (TRL's and verl's advantages) → [B] (a view)."""
    if (
        x is not None
        and cu_seqlens is None
        and x.dim() == 2
        and x.shape[1] == 1
        and like.dim() == 2
        and like.shape[1] != 1
        and x.shape[0] == like.shape[0]
    ):
        return x.view(-1) if x.is_contiguous() else x.reshape(-1)
    return x


def _on_policy_donor(targets: Tensor) -> Tensor:
    """A float tensor of the targets' shape and device that stands in for a missing ``old_logp`` in
    the shape checks and counts (never read: a 0-d value expanded, no allocation of its size)."""
    return torch.empty((), device=targets.device).expand(targets.shape)


def _old_logp_or_donor(old_logp: Optional[Tensor], targets: Tensor, device) -> Tensor:
    """``old_logp`` checked against the targets, or (None: on-policy) a stand-in of their shape."""
    if old_logp is None:
        return _on_policy_donor(targets)
    check_tensor("old_logp", old_logp, dtypes=FLOAT_DTYPES, device=device)
    if old_logp.shape != targets.shape:
        raise ValueError(f"old_logp: shape {tuple(old_logp.shape)} must equal targets' {tuple(targets.shape)}")
    return old_logp


def _check_mask_values(mask: Optional[Tensor]) -> None:
    """A non-bool mask must hold only 0 and 1 (one host read; a bool mask needs none): a weight
    such as 0.5 would otherwise count as 1."""
    if mask is not None and mask.dtype != torch.bool and mask.numel():
        if bool(((mask != 0) & (mask != 1)).any()):
            bad = mask[(mask != 0) & (mask != 1)].reshape(-1)[0].item()
            raise ValueError(
                f"mask: must hold only 0 and 1 (or be bool), found {bad}: weighted masks are not supported"
            )


def _check_policy_inputs(
    logp, old_logp, advantages, mask, cu_seqlens, max_seqlen, ref_logp, is_weights, cfg: PolicyLossConfig, validate=True
):
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES)
    if old_logp is not logp:  # from logits, old_logp stands in for logp: checked once
        check_tensor("old_logp", old_logp, dtypes=FLOAT_DTYPES)
    device = logp.device
    packed = cu_seqlens is not None
    if packed:
        if logp.dim() != 1:
            raise ValueError(f"logp: with cu_seqlens expected packed [N] log-probs, got shape {tuple(logp.shape)}")
        if max_seqlen is None or validate:
            longest = check_cu_seqlens(cu_seqlens, logp.numel(), device)
        else:
            # Trusted layout, no host read: the kernels clamp every offset into [0, N] and sweep
            # max_seqlen tokens, so a bad layout gives a wrong loss, never a bad access.
            check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
            if cu_seqlens.numel() < 1:
                raise ValueError("cu_seqlens: needs at least one entry (0)")
            longest = 0
        num_seq = cu_seqlens.numel() - 1
        if max_seqlen is None:
            max_seqlen = longest
        else:
            check_int("max_seqlen", max_seqlen, minimum=0)
            if longest > max_seqlen:
                raise ValueError(f"max_seqlen: {max_seqlen} is shorter than the longest sequence")
        seq_len = 0
    else:
        if logp.dim() != 2:
            raise ValueError(f"logp: expected [B, T] (or packed [N] with cu_seqlens), got shape {tuple(logp.shape)}")
        num_seq, seq_len = logp.shape
        max_seqlen = seq_len
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is None or t is logp:
            continue
        check_tensor(name, t, dtypes=FLOAT_DTYPES, device=device)
        if t.shape != logp.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} must equal logp's {tuple(logp.shape)}")
    if mask is not None:
        check_tensor("mask", mask, device=device)
        if mask.shape != logp.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} must equal logp's {tuple(logp.shape)}")
        if validate:
            _check_mask_values(mask)
    per_token = {}
    for name, t in (("advantages", advantages), ("is_weights", is_weights)):
        if t is None:
            continue
        check_tensor(name, t, dtypes=FLOAT_DTYPES, device=device)
        if t.shape == logp.shape:
            per_token[name] = True
        elif tuple(t.shape) == (num_seq,):
            per_token[name] = False
        else:
            raise ValueError(
                f"{name}: expected per-token shape {tuple(logp.shape)} or per-sequence ({num_seq},), "
                f"got {tuple(t.shape)}"
            )
    if advantages is None and cfg.loss_type != "npo":
        raise ValueError(f"advantages: required for loss_type={cfg.loss_type!r}")
    cfg.check_references(ref_logp)
    return num_seq, seq_len, max_seqlen, per_token


def _sequence_counts(mask: Optional[Tensor], logp: Tensor, cu_seqlens: Optional[Tensor]) -> Tensor:
    """Unmasked tokens per sequence [B] (fp32)."""
    if cu_seqlens is None:
        if mask is None:
            return torch.full((logp.shape[0],), float(logp.shape[1]), device=logp.device)
        return (mask != 0).sum(-1).float()
    if mask is None:
        return (cu_seqlens[1:] - cu_seqlens[:-1]).float()
    csum = torch.cat([torch.zeros(1, device=logp.device, dtype=torch.float64), (mask != 0).double().cumsum(0)])
    return (csum[cu_seqlens[1:].long()] - csum[cu_seqlens[:-1].long()]).float()


def _normaliser(aggregation, mask, logp, cu_seqlens, num_tokens, num_sequences, process_group, counts=None):
    """The scalar divisor of the aggregated loss, as a 0-d fp32 tensor on logp's device.
    ``counts``: unmasked tokens per sequence when the caller already has them."""
    device = logp.device
    if aggregation == "token-sum":
        return torch.ones((), device=device)
    given = num_tokens if aggregation == "token-mean" else num_sequences
    name = "num_tokens" if aggregation == "token-mean" else "num_sequences"
    if given is not None:
        if isinstance(given, Tensor):
            if given.numel() != 1 or given.is_complex() or given.dtype == torch.bool:
                raise ValueError(
                    f"{name}: expected a number or a one-element real tensor, got "
                    f"{given.dtype} of shape {tuple(given.shape)}"
                )
            value = given.detach().to(device=device, dtype=torch.float32).reshape(())
            # Read on the device, not the host: a value that is not a positive finite count makes
            # the loss NaN instead of a silently huge or sign-flipped loss.
            return torch.where((value > 0) & torch.isfinite(value), value, float("nan"))
        return torch.tensor(check_finite_float(name, given, minimum=0.0, exclusive=True), device=device)
    if aggregation == "token-mean":
        if mask is None:
            value = torch.tensor(float(logp.numel()), device=device)
        else:  # a bool mask counts in one op; a 0/1 number mask is compared first
            value = (mask if mask.dtype == torch.bool else mask != 0).sum(dtype=torch.float32)
    else:
        counts = counts if counts is not None else _sequence_counts(mask, logp, cu_seqlens)
        value = (counts > 0).sum(dtype=torch.float32)
    # With nothing to count every token weight is 0 anyway; 1 keeps 0/0 out of the loss.
    return _sum_over_ranks(value, process_group).clamp_min(1.0)


def _call_counts_itself(cfg, num_tokens, num_sequences, process_group) -> bool:
    """True when the normaliser is this call's own count (none given, no ranks to sum over; a
    token-sum has none), which the kernels can take themselves with no host op."""
    given = num_tokens if cfg.aggregation == "token-mean" else num_sequences
    return process_group is None and (given is None or cfg.aggregation == "token-sum")


@kernel_op("negkernels::policy_loss", mutates_args=())
def _policy_loss_op(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    ref_logp: Optional[Tensor],
    is_weights: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    normaliser: Optional[Tensor],
    codes: list[int],
    scalars: list[float],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, stats [8] = the 6 metrics (means over the unmasked tokens, in
    :class:`PolicyLossOutput` order), the unmasked tokens, 1 / normaliser; d Σℓ / d logp [N] fp32
    (or [0]) before normalisation). ``logp`` is contiguous, of any shape; every other per-token input is read
    flat. ``codes`` and ``scalars`` are :class:`PolicyKernelCodes` and :class:`PolicyKernelScalars`;
    ``normaliser`` None: this call's own, from the kernel's per-sequence counts (no extra pass)."""
    c, sc = _codes(codes), _scalars(scalars)
    if backend == "cuda":
        from .._cuda_ext import policy_loss_fwd

        partial, grad = policy_loss_fwd(logp, old_logp, advantages, mask, ref_logp, is_weights, cu_seqlens, c, sc)
        return (*_finalize_partials(partial, normaliser, c.aggregation), grad)
    return _triton_kernels().policy_loss_fwd(
        logp, old_logp, advantages, mask, ref_logp, is_weights, cu_seqlens, normaliser, c, sc
    )


def _finalize_partials(partial: Tensor, normaliser: Optional[Tensor], aggregation: int):
    """The host's version of the Triton kernel's last step (the CUDA kernel writes only the
    [B, 8] per-sequence partials): fixed-order sums → (loss, stats [8])."""
    sums = partial.sum(0)
    count = sums[1]
    if normaliser is not None:
        denom = normaliser
    elif aggregation == Aggregation.TOKEN_SUM:
        denom = torch.ones((), device=partial.device)
    elif aggregation == Aggregation.TOKEN_MEAN:
        denom = count.clamp_min(1.0)
    else:
        denom = (partial[:, 1] > 0).sum(dtype=torch.float32).clamp_min(1.0)
    scale = denom.reciprocal()
    return sums[0] * scale, torch.cat([sums[2:] / count.clamp_min(1.0), torch.stack([count, scale])])


@_policy_loss_op.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, is_weights, cu_seqlens, normaliser, codes, scalars, backend):
    c = _codes(codes)
    f32 = dict(dtype=torch.float32)
    return (
        logp.new_empty((), **f32),
        logp.new_empty((POLICY_LOSS_PARTIALS,), **f32),
        logp.new_empty((logp.numel() if c.compute_grad else 0,), **f32),
    )


def _policy_loss_setup(ctx, inputs, output):
    ctx.logp_dtype, ctx.logp_shape = inputs[0].dtype, inputs[0].shape
    ctx.save_for_backward(output[2], output[1])
    ctx.mark_non_differentiable(*output[1:])


def _policy_loss_backward(ctx, grad_loss, *unused):
    if not ctx.needs_input_grad[0]:  # only a constant input required grad: no gradient was computed
        return no_grads_after(ctx)
    grad, stats = ctx.saved_tensors
    grad = grad * (grad_loss * stats[7])  # stats[7] = 1 / normaliser
    if grad.dtype != ctx.logp_dtype:
        grad = grad.to(ctx.logp_dtype)
    return no_grads_after(ctx, grad.view(ctx.logp_shape))


_policy_loss_op.register_autograd(_policy_loss_backward, setup_context=_policy_loss_setup, differentiable=1)


def _global_metrics(metrics: Tensor, count: Tensor, process_group) -> Tensor:
    """This rank's metric means over its ``count`` unmasked tokens → the means over every rank's."""
    sums = _sum_over_ranks(torch.cat([count.reshape(1), metrics * count]), process_group)
    return sums[1:] / sums[0].clamp_min(1.0)


def _output(loss, metrics, **extra) -> PolicyLossOutput:
    return PolicyLossOutput(loss, *metrics.unbind(0), **extra)


class PolicyKernelCodes(NamedTuple):
    """The integer arguments of the policy-loss kernels (one ``int[]`` of the custom ops, read
    by name; ``csrc/logprobs.h`` indexes the same list with ``PolicyCodeSlot``)."""

    loss: int  # LossType
    kl: int  # KlEstimator (NONE without ref_logp)
    kl_bias_correction: int  # the KL term times the importance ratio
    kl_times_is_weights: int  # the KL term times the rollout IS weight too
    aggregation: int  # Aggregation
    is_mode: int  # IsMode (NONE without is_weights)
    cispo_two_sided: int
    sequence_ratio: int  # sapo / cispo on the sequence ratio s instead of each token's ρ
    adv_per_token: int
    iw_per_token: int
    on_policy: int  # from logits: old_logp is the token's own log-prob (no old_logp input)
    compute_grad: int
    num_sequences: int
    seq_len: int  # padded [B, T]: T; packed: 0
    max_len: int  # the longest sequence (bounds the kernels' sweeps)


class PolicyKernelScalars(NamedTuple):
    """The float arguments of the policy-loss kernels (one ``float[]``; ``PolicyScalarSlot`` in C++).
    Disabled options are +inf, so they need no compile-time variant."""

    lo: float  # 1 − clip_low (geo_mean: −clip_low, a bound on log ρ)
    hi: float  # 1 + clip_high (geo_mean: clip_high)
    delta: float
    dual_clip: float
    tau_pos: float
    tau_neg: float
    npo_beta: float
    kl_coef: float  # 0 without ref_logp
    kl_clamp: float  # +inf: no clamp
    is_hi: float
    is_lo: float
    norm_constant: float
    temperature: float  # from logits only
    entropy_coef: float  # from logits only


def _codes(codes) -> PolicyKernelCodes:
    """The ``int[]`` of a custom op by name (kernel_args already gives the named tuple; the
    dispatcher gives a list)."""
    return codes if type(codes) is PolicyKernelCodes else PolicyKernelCodes(*codes)


def _scalars(scalars) -> PolicyKernelScalars:
    return scalars if type(scalars) is PolicyKernelScalars else PolicyKernelScalars(*scalars)


def _optional_above(name: str, value, minimum: float) -> Optional[float]:
    return None if value is None else check_finite_float(name, value, minimum=minimum, exclusive=True)


@dataclass(frozen=True)
class PolicyLossConfig:
    """Every option of the policy losses, validated once at construction.

    :func:`policy_loss`, :func:`policy_loss_from_logits`, :func:`linear_policy_loss` and
    :class:`negkernels.PolicyLoss` take these fields as keyword arguments (or a ready
    ``config=``); see :func:`policy_loss` for what each one means. A config turns itself into the
    kernels' integer codes and float scalars (:meth:`kernel_args`), so a new option is one field
    here plus its use in the kernels.
    """

    loss_type: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    delta: Optional[float] = None
    cispo_two_sided: bool = False
    ratio_level: str = "token"  # "sequence": sapo / cispo on the sequence ratio
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    npo_beta: float = 0.1
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_bias_correction: bool = False
    kl_times_is_weights: bool = False
    kl_clamp: Optional[float] = None  # default: no clamp
    is_mode: str = "truncate"
    is_threshold: float = 2.0
    is_threshold_low: Optional[float] = None  # default 1 / is_threshold
    aggregation: str = "token-mean"
    norm_constant: Optional[float] = None  # default T (padded input)

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("is_mode", self.is_mode, IS_MODES)
        check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        if self.ratio_level == "sequence" and self.loss_type not in SEQUENCE_RATIO_LOSSES:
            hint = " (ppo on the sequence ratio is loss_type='gspo')" if self.loss_type == "ppo" else ""
            raise ValueError(
                f"ratio_level: 'sequence' applies to {SEQUENCE_RATIO_LOSSES}, not loss_type={self.loss_type!r}{hint}"
            )
        for name in ("cispo_two_sided", "kl_bias_correction", "kl_times_is_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {type(getattr(self, name)).__name__}")
        is_threshold = check_finite_float("is_threshold", self.is_threshold, minimum=0.0, exclusive=True)
        low = 1.0 / is_threshold if self.is_threshold_low is None else self.is_threshold_low
        checked = dict(
            clip_low=check_finite_float("clip_low", self.clip_low, minimum=0.0),
            # cispo's cap hi = 1 + clip_high may sit below 1 (TRL's epsilon_high is that cap itself)
            clip_high=check_finite_float(
                "clip_high",
                self.clip_high,
                minimum=-1.0 if self.loss_type == "cispo" else 0.0,
                exclusive=self.loss_type == "cispo",
            ),
            dual_clip=_optional_above("dual_clip", self.dual_clip, 1.0),
            delta=_optional_above("delta", self.delta, 1.0),
            sapo_tau_pos=check_finite_float("sapo_tau_pos", self.sapo_tau_pos, minimum=0.0, exclusive=True),
            sapo_tau_neg=check_finite_float("sapo_tau_neg", self.sapo_tau_neg, minimum=0.0, exclusive=True),
            npo_beta=check_finite_float("npo_beta", self.npo_beta, minimum=0.0, exclusive=True),
            kl_coef=check_finite_float("kl_coef", self.kl_coef),
            kl_clamp=_optional_above("kl_clamp", self.kl_clamp, 0.0),
            is_threshold=is_threshold,
            is_threshold_low=check_finite_float("is_threshold_low", low, minimum=0.0),
            norm_constant=_optional_above("norm_constant", self.norm_constant, 0.0),
        )
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_kernel_args_cache", {})  # not a field: outside eq, hash and repr

    @classmethod
    def of(cls, config: Optional["PolicyLossConfig"], options: dict) -> "PolicyLossConfig":
        """``config`` or one built from keyword ``options`` (not both); equal options share one
        validated instance."""
        return config_of(cls, config, options, _CONFIGS, _DEFAULT_CONFIG)

    @property
    def token_local(self) -> bool:
        """Each token's term depends on that token alone (the from-logits kernel's one-pass form)."""
        return self.loss_type in TOKEN_LOCAL_LOSSES and self.ratio_level == "token"

    def resolved_norm_constant(self, seq_len: int, packed: bool) -> float:
        if self.norm_constant is not None:
            return self.norm_constant
        if self.aggregation == "seq-mean-token-sum-norm" and packed:
            raise ValueError("norm_constant: required for aggregation='seq-mean-token-sum-norm' with cu_seqlens")
        return float(max(seq_len, 1)) if not packed else 1.0  # T = 0: no tokens, any value

    def check_references(self, ref_logp: Optional[Tensor]) -> None:
        if self.kl_coef != 0.0 and ref_logp is None:
            raise ValueError("ref_logp: required when kl_coef != 0")
        if self.loss_type == "npo" and ref_logp is None:
            raise ValueError("ref_logp: required for loss_type='npo'")

    def reference_options(self) -> dict:
        """The keyword arguments of :func:`~negkernels.reference.logprobs.policy_loss_reference`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def kernel_args(
        self,
        *,
        use_kl: bool,
        use_is: bool,
        adv_per_token: bool,
        iw_per_token: bool,
        compute_grad: bool,
        num_sequences: int,
        seq_len: int,
        max_len: int,
        norm_constant: float,
        temperature: float = 1.0,
        entropy_coef: float = 0.0,
        on_policy: bool = False,
    ) -> tuple[PolicyKernelCodes, PolicyKernelScalars]:
        """The kernels' ``codes`` and ``scalars`` (the custom ops' ``int[]`` and ``float[]``) for one
        call; a training loop asks for the same ones every step, so they are kept per config."""
        key = (
            use_kl,
            use_is,
            adv_per_token,
            iw_per_token,
            compute_grad,
            num_sequences,
            seq_len,
            max_len,
            norm_constant,
            temperature,
            entropy_coef,
            on_policy,
        )
        if torch.compiler.is_compiling():
            return self._build_kernel_args(*key)
        # set in __post_init__, outside the dataclass's fields
        cache = self._kernel_args_cache  # type: ignore[attr-defined]
        return bounded_memo(cache, key, lambda: self._build_kernel_args(*key), 64)

    def _build_kernel_args(
        self,
        use_kl,
        use_is,
        adv_per_token,
        iw_per_token,
        compute_grad,
        num_sequences,
        seq_len,
        max_len,
        norm_constant,
        temperature,
        entropy_coef,
        on_policy,
    ):
        codes = PolicyKernelCodes(
            loss=int(LOSS_CODE[self.loss_type]),
            kl=int(KL_CODE[self.kl_estimator] if use_kl else KlEstimator.NONE),
            kl_bias_correction=int(self.kl_bias_correction and use_kl),
            kl_times_is_weights=int(self.kl_times_is_weights and use_kl and use_is),
            aggregation=int(AGGREGATION_CODE[self.aggregation]),
            is_mode=int(IS_CODE[self.is_mode] if use_is else IsMode.NONE),
            cispo_two_sided=int(self.cispo_two_sided),
            sequence_ratio=int(self.ratio_level == "sequence"),
            adv_per_token=int(adv_per_token),
            iw_per_token=int(iw_per_token),
            on_policy=int(on_policy),
            compute_grad=int(compute_grad),
            num_sequences=num_sequences,
            seq_len=seq_len,
            max_len=max_len,
        )
        inf = math.inf
        if self.loss_type == "geo_mean":  # clips log ρ: the band in log space
            lo, hi = -self.clip_low, self.clip_high
        else:
            lo, hi = 1.0 - self.clip_low, 1.0 + self.clip_high
        scalars = PolicyKernelScalars(
            lo=lo,
            hi=hi,
            delta=inf if self.delta is None else self.delta,
            dual_clip=inf if self.dual_clip is None else self.dual_clip,
            tau_pos=self.sapo_tau_pos,
            tau_neg=self.sapo_tau_neg,
            npo_beta=self.npo_beta,
            kl_coef=self.kl_coef if use_kl else 0.0,
            kl_clamp=inf if self.kl_clamp is None else self.kl_clamp,
            is_hi=self.is_threshold,
            is_lo=self.is_threshold_low,
            norm_constant=norm_constant,
            temperature=temperature,
            entropy_coef=entropy_coef,
        )
        return codes, scalars


# Validated configs by their keyword options: a training loop passes the same options every step.
_CONFIGS: dict[tuple, PolicyLossConfig] = {}
_DEFAULT_CONFIG = PolicyLossConfig()


POLICY_OPTIONS = frozenset(f.name for f in fields(PolicyLossConfig))


def policy_loss(
    logp: Tensor,
    old_logp: Optional[Tensor],
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    ref_logp: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    num_tokens=None,
    num_sequences=None,
    process_group=None,
    validate: bool = True,
    backend: Optional[str] = None,
    config: Optional[PolicyLossConfig] = None,
    **options,
) -> PolicyLossOutput:
    """The PPO/GRPO family of policy losses on token log-probs, forward and backward in one fused pass.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask`` [B, T], or packed [N] with ``cu_seqlens``
    [B+1] (``max_seqlen`` avoids a host sync); ``advantages`` and ``is_weights`` per token (the
    shape of ``logp``) or per sequence [B] (or [B, 1]). ``old_logp=None`` means on-policy:
    old_logp = sg(logp), so ρ = 1 with gradient ρ (TRL's ``num_iterations=1``). Any float dtype;
    ``mask`` bool or 0/1 numbers (a non-bool mask is checked for other values with one host read
    unless ``validate=False``; weighted masks are rejected, not rounded). Only ``logp`` receives a
    gradient (in its dtype); everything else is a constant.

    With ρ = exp(logp − old_logp), A the advantage, lo = 1 − clip_low, hi = 1 + clip_high, the
    per-token policy term is
        ``"ppo"``:   −min(min(ρ, δ)·A, clip(ρ, lo, hi)·A); with ``dual_clip`` c and A < 0 capped at −c·A
        ``"gspo"``:  the same with ρ replaced by s = exp(mean_t log ρ) over the sequence's unmasked
                     tokens, differentiated in the token form sg(s)·exp(logp − sg(logp))
        ``"cispo"``: −sg(min(ρ, hi))·A·logp (``cispo_two_sided``: sg(clip(ρ, lo, hi)))
        ``"sapo"``:  −(4/τ)·σ(τ(ρ − 1))·A, τ = ``sapo_tau_pos`` if A > 0 else ``sapo_tau_neg``
        ``"gpg"``:   −A·logp
        ``"npo"``:   (2/β)·log(1 + exp(β·Σ_t(logp − ref_logp))) per sequence, shared equally by
                     its unmasked tokens (advantages unused)
        ``"geo_mean"``: GMPO (verl's ``geo_mean``): −Ā·s per token, s = exp(mean_t c_t) with
                     c_t = log ρ_t clipped in log space to [−clip_low, clip_high] on the pessimistic
                     side (above for A_t > 0, below for A_t < 0; 0 where A_t = 0), Ā the
                     sequence's mean advantage; token form as gspo (delta and dual_clip unused).
                     verl's loss is seq-mean-token-mean over all B rows (``num_sequences=B``)
    ``ratio_level="sequence"`` puts sapo and cispo on the sequence ratio s instead of ρ (TRL's
    ``importance_sampling_level="sequence"``; gspo is ppo's): sapo in token form as gspo, cispo as
    −sg(min(s, hi))·A·logp; the bias-corrected KL then uses s as well. cispo's cap hi may lie
    below 1 (clip_high > −1).
    At a clip boundary the unclipped branch (and its gradient) is taken.
    Rollout importance weights w (``is_weights``, detached) multiply the policy term:
    ``is_mode="truncate"`` uses min(w, is_threshold); ``"mask"`` zeroes w outside
    [is_threshold_low (default 1/is_threshold), is_threshold]. With ``kl_coef`` a KL penalty
    kl_coef·k(logp, ref_logp) is added per token (``kl_estimator`` k1, k2, k3, abs, or k3+ =
    k3 value with the k2 gradient). ``kl_clamp`` c clamps the estimate to [−c, c], with no gradient
    outside (verl's ``low_var_kl`` is k3 clamped at c = 10). ``kl_times_is_weights`` multiplies it by
    the rollout IS weight as the policy term (verl's kl_cov, whose penalty is part of its policy
    loss; by default the KL term is not importance-weighted, as in TRL). ``kl_bias_correction``
    multiplies that term by the importance ratio ρ (gspo: the sequence ratio s), with its gradient
    (TRL's ``use_bias_correction_kl``); the ``kl`` metric is then the mean of the product.

    Aggregation over unmasked tokens ℓ_t:
        ``"token-mean"``              Σ ℓ / num_tokens
        ``"token-sum"``               Σ ℓ
        ``"seq-mean-token-mean"``     Σ_b (Σ_t ℓ / n_b) / num_sequences
        ``"seq-mean-token-sum"``      Σ_b Σ_t ℓ / num_sequences
        ``"seq-mean-token-sum-norm"`` Σ_b Σ_t ℓ / (num_sequences · norm_constant)  (Dr. GRPO;
                                      norm_constant defaults to T)
    num_tokens (unmasked tokens) and num_sequences (sequences with an unmasked token) default to
    this call's counts; pass the global ones (ints or 0-d tensors) for gradient accumulation, or a
    ``process_group`` to all-reduce them. An int or float must be positive and finite (else
    ValueError); a tensor is not read on the host, so a non-positive or non-finite one makes the
    loss NaN. Each rank's loss is then its share of the global loss:
    the sum over ranks and micro-batches of the losses (and gradients) equals the one-big-batch
    result (with DDP, which averages gradients, multiply the loss by the world size).

    Returns:
        :class:`PolicyLossOutput`: the 0-d fp32 loss first, then metrics over the unmasked tokens
        (all-reduced with ``process_group``). Fully masked or empty input gives 0, never NaN.

    Deterministic: the Triton and CUDA kernels reduce per-sequence partials in a fixed order.
    """
    cfg = PolicyLossConfig.of(config, options)
    packed = cu_seqlens is not None
    if old_logp is None:  # on-policy: ρ = 1, with its gradient
        old_logp = logp.detach()
    if advantages is not None and advantages.dim() == 2:
        advantages = _per_sequence_column(advantages, logp, cu_seqlens)
    if is_weights is not None and is_weights.dim() == 2:
        is_weights = _per_sequence_column(is_weights, logp, cu_seqlens)
    num_seq, seq_len, max_len, per_token = _check_policy_inputs(
        logp, old_logp, advantages, mask, cu_seqlens, max_seqlen, ref_logp, is_weights, cfg, validate
    )
    norm = cfg.resolved_norm_constant(seq_len, packed)
    chosen = resolve_backend(backend, logp.device, "policy_loss", POLICY_LOSS_BACKENDS)
    if chosen != "reference" and _call_counts_itself(cfg, num_tokens, num_sequences, process_group):
        denom = None  # the kernel's own counts give it, with no pass over the mask
    else:
        denom = _normaliser(cfg.aggregation, mask, logp, cu_seqlens, num_tokens, num_sequences, process_group)
    if chosen == "reference":
        # denom is the one normaliser this aggregation uses (token-sum ignores both).
        out = policy_loss_reference(
            logp,
            old_logp,
            advantages,
            mask,
            cu_seqlens=cu_seqlens,
            ref_logp=ref_logp,
            is_weights=is_weights,
            num_tokens=denom,
            num_sequences=denom,
            **dict(cfg.reference_options(), norm_constant=norm),
        )
        if process_group is None:
            metrics = out.metrics
        else:
            metrics = _reference_global_metrics(out.metrics, mask, logp, process_group)
        return _output(out.loss, metrics.float() if logp.dtype != torch.float64 else metrics)
    if advantages is None:  # npo ignores advantages; the kernel still reads one per sequence
        advantages, per_token["advantages"] = logp.new_zeros(num_seq, dtype=torch.float32), False
    codes, scalars = cfg.kernel_args(
        use_kl=ref_logp is not None,
        use_is=is_weights is not None,
        adv_per_token=per_token.get("advantages", False),
        iw_per_token=per_token.get("is_weights", False),
        compute_grad=logp.requires_grad and torch.is_grad_enabled(),
        num_sequences=num_seq,
        seq_len=seq_len,
        max_len=max_len,
        norm_constant=norm,
    )
    loss, stats, _ = _policy_loss_op(
        # logp keeps its shape (contiguous: the kernel reads it flat): a reshape would put a view
        # node in the autograd graph, which costs the backward more than the op itself.
        logp.contiguous(),
        _dense(old_logp),
        _dense(advantages),
        _bool_mask(mask),
        _dense(ref_logp),
        _dense(is_weights),
        cu_seqlens.contiguous() if cu_seqlens is not None else None,
        denom,
        codes,
        scalars,
        chosen,
    )
    if process_group is None:
        return PolicyLossOutput(loss, *stats.unbind(0)[:6])
    return _output(loss, _global_metrics(stats[:6], stats[6], process_group))


def _reference_global_metrics(local_metrics: Tensor, mask, logp, process_group) -> Tensor:
    count = (
        (mask != 0).sum().to(local_metrics.dtype)
        if mask is not None
        else torch.tensor(float(logp.numel()), dtype=local_metrics.dtype, device=logp.device)
    )
    sums = _sum_over_ranks(torch.cat([count.reshape(1), local_metrics * count]), process_group)
    return sums[1:] / sums[0].clamp_min(1.0)


def _bool_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None:
        return None
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.contiguous().view(torch.uint8)


# ============================================================================ from logits


def _token_weights(aggregation, mask, logp_like, cu_seqlens, denom, norm_constant, counts):
    """Per-token aggregation weight m_t·c_b / normaliser [N] (fp32): the loss is Σ weight·ℓ.
    ``counts``: unmasked tokens per sequence (needed by seq-mean-token-mean only)."""
    m = (mask != 0).float() if mask is not None else torch.ones(logp_like.shape, device=logp_like.device)
    if aggregation == "seq-mean-token-mean":
        counts = counts.clamp_min(1)
        if cu_seqlens is None:
            m = m / counts.unsqueeze(-1)
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            m = m / torch.repeat_interleave(counts, lengths, output_size=m.numel())
    elif aggregation == "seq-mean-token-sum-norm":
        m = m / norm_constant
    return (m / denom).reshape(-1).contiguous()


def _per_token_values(x: Optional[Tensor], per_token: bool, targets: Tensor, cu_seqlens) -> Optional[Tensor]:
    """Per-token [N] fp32 values from per-token or per-sequence ones."""
    if x is None:
        return None
    if per_token:
        return x.reshape(-1).float().contiguous()
    if cu_seqlens is None:
        return x.float().unsqueeze(-1).expand(targets.shape).reshape(-1).contiguous()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(x.float(), lengths, output_size=targets.numel()).contiguous()


def _fused_policy_loss_from_logits(
    logits,
    targets,
    old_logp,
    advantages,
    token_weight,
    mask,
    normaliser,
    ref_logp,
    is_weights,
    codes,
    scalars,
    with_entropy,
    grad,
):
    c, sc = _codes(codes), _scalars(scalars)
    x, so, si, inner = _row_view(logits)
    if grad is logits:
        g, gso, gsi = x, so, si
    elif x is logits and grad.is_contiguous() and logits.is_contiguous() and grad.shape == logits.shape:
        g, gso, gsi = grad, so, si  # the usual buffer: laid out as the logits are, no second view
    else:
        g, gso, gsi, _ = _row_view(grad)
    row_scale = 1.0 / sc.norm_constant if c.aggregation == Aggregation.SEQ_MEAN_TOKEN_SUM_NORM else 1.0
    logp, entropy, loss, stats = _triton_kernels().policy_loss_from_logits_fwd(
        x,
        so,
        si,
        inner,
        g,
        gso,
        gsi,
        targets.numel(),
        logits.shape[-1],
        targets.contiguous(),
        old_logp,
        advantages,
        token_weight,
        ref_logp,
        is_weights,
        c,
        sc,
        with_entropy,
        mask=mask,
        normaliser=normaliser,
        row_scale=row_scale,
        out_shape=targets.shape,
    )
    return loss, stats, logp, entropy


@kernel_op("negkernels::policy_loss_from_logits", mutates_args=())
def _policy_loss_from_logits_op(
    logits: Tensor,
    targets: Tensor,
    old_logp: Optional[Tensor],
    advantages: Tensor,
    token_weight: Optional[Tensor],
    mask: Optional[Tensor],
    normaliser: Optional[Tensor],
    ref_logp: Optional[Tensor],
    is_weights: Optional[Tensor],
    codes: list[int],
    scalars: list[float],
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Σ weight·(ℓ − entropy_coef·H), stats [8] = the 6 metrics and the entropy (means over the
    unmasked tokens) and their count, logp [N], entropy [N], d loss / d logits (empty unless
    compute_grad)); logp and entropy have the shape of ``targets``; the loss and stats come from
    the kernel's last program, in a fixed order.
    ``normaliser`` None (token-mean and token-sum only): this call's own, counted by the kernel."""
    compute_grad = _codes(codes).compute_grad
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty((0,))
    out = _fused_policy_loss_from_logits(
        logits,
        targets,
        old_logp,
        advantages,
        token_weight,
        mask,
        normaliser,
        ref_logp,
        is_weights,
        codes,
        scalars,
        with_entropy,
        grad if compute_grad else logits,
    )
    return (*out, grad)


def _scaled_by_incoming(ctx, grad: Tensor, grad_loss: Tensor) -> Tensor:
    """``grad``·``grad_loss`` for a gradient buffer the forward wrote for an incoming gradient of 1.

    From the direct eager entrance (``ctx.direct_call``, the buffer is this op's alone): in place,
    by a kernel that reads the scale on the device and does nothing when it is 1
    (``loss.backward()``), so the usual case costs no pass over the gradient and no host read.
    The buffer then belongs to the caller as its gradient, so a second backward through the same
    forward raises. Otherwise (traced, or called as ``torch.ops.negkernels.*``): a plain product."""
    if not grad.numel():
        return grad
    if not getattr(ctx, "direct_call", False) or not plain_eager_call((grad_loss,)):  # grad: this op's own
        return grad * grad_loss.to(grad.dtype)
    scale_rows_unless_one = _triton_kernels().scale_rows_unless_one
    if grad_loss.dtype != torch.float32 or grad_loss.dim():
        grad_loss = grad_loss.float().reshape(())
    cols = grad.shape[-1] if grad.dim() else 1
    rows = grad.numel() // max(cols, 1)
    if grad.is_contiguous():  # the usual buffer: rows of one 2-D view, no view to build
        scale_rows_unless_one(grad, 0, cols, rows, rows, cols, grad_loss)
        return grad
    if not _rows_in_own_storage(grad):
        return grad * grad_loss.to(grad.dtype)
    view, so, si, inner = _row_view(grad)
    scale_rows_unless_one(view, so, si, inner, rows, cols, grad_loss)
    return grad


class _InplacePolicyLossFromLogits(torch.autograd.Function):
    """``inplace_backward``: the fused kernel writes the gradient over the logits during the forward
    (each element is read by the online pass and by the gradient sweep before that sweep overwrites
    it); the backward hands the logits' storage back as their gradient. Eager mode only: the write
    is invisible to autograd and to torch.compile, which is what saves the logits-sized buffer."""

    @staticmethod
    def forward(ctx, logits, *args):
        loss, stats, logp, entropy = _fused_policy_loss_from_logits(logits, *args, logits)
        ctx.direct_call = True
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(stats, logp, entropy)
        return loss, stats, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = _single_use(ctx)
        return no_grads_after(ctx, _scaled_by_incoming(ctx, grad, grad_loss))


@_policy_loss_from_logits_op.register_fake
def _(
    logits,
    targets,
    old_logp,
    advantages,
    token_weight,
    mask,
    normaliser,
    ref_logp,
    is_weights,
    codes,
    scalars,
    with_entropy,
):
    grad = (
        torch.empty_like(logits, memory_format=torch.contiguous_format)
        if _codes(codes).compute_grad
        else logits.new_empty((0,))
    )
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty((8,), dtype=torch.float32),
        logits.new_empty(targets.shape, dtype=torch.float32),
        logits.new_empty(targets.shape, dtype=torch.float32),
        grad,
    )


def _from_logits_setup(ctx, inputs, output):
    ctx.save_for_backward(output[4])
    ctx.mark_non_differentiable(*output[1:])


def _single_use(ctx) -> tuple:
    """The saved gradient buffers of a fused op, once: its backward hands them over to the caller."""
    if getattr(ctx, "direct_call", False):
        if getattr(ctx, "used", False):
            raise RuntimeError(
                "negkernels: a fused loss was backpropagated twice (retain_graph=True); its "
                "backward hands its gradient buffer to the caller, so run the forward again"
            )
        ctx.used = True
    return ctx.saved_tensors


def _from_logits_backward(ctx, grad_loss, *unused):
    (grad,) = _single_use(ctx)
    return no_grads_after(ctx, _scaled_by_incoming(ctx, grad, grad_loss))


_policy_loss_from_logits_op.register_autograd(_from_logits_backward, setup_context=_from_logits_setup, differentiable=1)


def covariance_token_mask(
    logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    fraction: float,
    band: Optional[tuple[float, float]] = None,
    exclude: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Tokens picked by the covariance of advantage and log-prob: Clip-Cov and KL-Cov (Cui et al.,
    "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models", 2025).

    With n unmasked tokens, cov_t = (A_t − Ā)·(logp_t − mean logp), both means over them, and
    k = max(1, ⌊fraction·n⌋):

    - ``band=None``: the k tokens of largest cov (KL-Cov; ties as :func:`torch.topk`).
    - ``band=(lower, upper)``: k tokens drawn uniformly without replacement from the unmasked ones
      with lower < cov < upper that ``exclude`` (bool, shape of ``logp``) leaves in (all of them
      when fewer qualify): Clip-Cov. The draw is :func:`torch.randperm` over the candidates in
      row-major order, on ``generator`` (default torch's global CPU generator, as verl's
      ``clip_cov``, so a seeded run picks the same tokens).

    ``logp``, ``advantages`` [B, T] (or any shape, the same for both), ``mask`` bool or 0/1 of that
    shape. Returns a bool tensor of that shape, no gradient; no unmasked token picks nothing.
    Reads k on the host (one synchronisation), as the subset's size must be known.
    """
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES)
    check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES, device=logp.device)
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages: shape {tuple(advantages.shape)} differs from logp {tuple(logp.shape)}")
    fraction = check_finite_float("fraction", fraction, minimum=0.0, exclusive=True)
    if mask is not None:
        check_tensor("mask", mask, device=logp.device)
        if mask.shape != logp.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} must equal logp's {tuple(logp.shape)}")
        _check_mask_values(mask)
    valid = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask != 0
    picked = torch.zeros_like(valid)
    with torch.no_grad():
        lp, adv = logp.detach(), advantages.detach()
        count = int(valid.sum())
        if count == 0:
            return picked
        k = max(1, int(count * fraction))
        a, lv = adv[valid], lp[valid]
        cov = (a - a.mean()) * (lv - lv.mean())
        flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        if band is None:
            chosen = flat[torch.topk(cov, min(k, count), largest=True).indices]
        else:
            lower, upper = (check_finite_float("band", float(x)) for x in band)
            keep = (cov > lower) & (cov < upper)
            if exclude is not None:
                if exclude.shape != logp.shape:
                    raise ValueError(f"exclude: shape {tuple(exclude.shape)} differs from logp {tuple(logp.shape)}")
                keep = keep & ~exclude.to(device=logp.device, dtype=torch.bool)[valid]
            candidates = flat[keep]
            if candidates.numel() == 0:
                return picked
            order = torch.randperm(candidates.numel(), generator=generator)
            chosen = candidates[order[:k].to(candidates.device)]
        picked.view(-1)[chosen] = True
    return picked


def policy_loss_from_logits(
    logits: Tensor,
    targets: Tensor,
    old_logp: Optional[Tensor],
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_coef: float = 0.0,
    inplace_backward: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    ref_logp: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    num_tokens=None,
    num_sequences=None,
    process_group=None,
    validate: bool = True,
    backend: Optional[str] = None,
    config: Optional[PolicyLossConfig] = None,
    **options,
) -> PolicyLossOutput:
    """End to end: logits → log-probs (+ entropy) → :func:`policy_loss`, fused.

    ``logits`` [B, T, V] (or packed [N, V] with ``cu_seqlens``), any float dtype; ``targets`` [B, T]
    (or [N]) ids in [0, V); every other argument as in :func:`policy_loss`, with logp = log
    softmax(logits / temperature)[targets]. ``entropy_coef`` subtracts entropy_coef·H aggregated
    like the loss (an entropy bonus).

    For the token-local losses (ppo, cispo, sapo, gpg) the Triton kernel computes each row's
    log-sum-exp, the loss gradient and the logits' gradient in one sweep during the forward, so
    forward + backward read the logits once from memory and write their gradient once; the
    backward only rescales it when the incoming gradient is not 1. With ``inplace_backward`` that
    gradient overwrites the logits (no logits-sized buffer at all). The sequence-level losses
    (gspo, npo, geo_mean) need the whole sequence's log-probs first: they run :func:`token_logprobs` and
    :func:`policy_loss` as two differentiable ops.

    Returns :class:`PolicyLossOutput` with ``token_logp`` (detached, shape of ``targets``) and,
    with ``return_entropy``, ``token_entropy`` and the mean ``entropy`` over unmasked tokens.
    The loss is meant to end the graph: the per-token outputs are detached.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    packed = cu_seqlens is not None
    expected = 2 if packed else 3
    if logits.dim() != expected or logits.shape[-1] == 0:
        raise ValueError(
            f"logits: expected {'[N, V]' if packed else '[B, T, V]'} with V >= 1, got {tuple(logits.shape)}"
        )
    _check_targets(targets, logits)
    temperature = check_finite_float("temperature", temperature, minimum=0.0, exclusive=True)
    entropy_coef = check_finite_float("entropy_coef", entropy_coef)
    like = _old_logp_or_donor(old_logp, targets, logits.device)
    advantages, is_weights = (
        _per_sequence_column(advantages, like, cu_seqlens),
        _per_sequence_column(is_weights, like, cu_seqlens),
    )
    cfg = PolicyLossConfig.of(config, options)
    num_seq, seq_len, max_len, per_token = _check_policy_inputs(
        like, like, advantages, mask, cu_seqlens, max_seqlen, ref_logp, is_weights, cfg, validate
    )
    norm = cfg.resolved_norm_constant(seq_len, packed)
    chosen = resolve_backend(backend, logits.device, "policy_loss_from_logits", POLICY_LOSS_FROM_LOGITS_BACKENDS)
    if chosen != "reference" and logits.dtype == torch.float64:
        raise TypeError("logits: float64 logits run on backend='reference' only")
    if validate:
        _check_target_range(targets, logits.shape[-1])
    want_entropy = return_entropy or entropy_coef != 0.0
    counts = _sequence_counts(mask, like, cu_seqlens) if cfg.aggregation.startswith("seq-mean") else None
    fused = chosen != "reference" and cfg.token_local
    if (
        fused
        and cfg.aggregation in ("token-mean", "token-sum")
        and _call_counts_itself(cfg, num_tokens, num_sequences, process_group)
    ):
        denom = None  # the kernel counts this call's tokens itself: no host op
    else:
        denom = _normaliser(cfg.aggregation, mask, like, cu_seqlens, num_tokens, num_sequences, process_group, counts)

    if not fused:
        tl_backend = "reference" if chosen == "reference" else "triton"
        got = token_logprobs(
            logits,
            targets,
            temperature=temperature,
            return_entropy=want_entropy,
            inplace_backward=inplace_backward,
            validate=False,
            backend=tl_backend,
        )
        logp, entropy = got if want_entropy else (got, None)
        return _loss_from_token_logprobs(
            logp,
            entropy,
            old_logp,
            advantages,
            mask,
            cu_seqlens,
            max_len,
            ref_logp,
            is_weights,
            denom,
            counts,
            cfg,
            norm,
            entropy_coef,
            return_entropy,
            process_group,
            chosen if chosen == "reference" else "triton",
        )

    # Only seq-mean-token-mean needs per-token weights from the host (1 / each sequence's count);
    # otherwise the kernel weighs a row by the mask, the normaliser and norm_constant itself.
    weight = (
        _token_weights(cfg.aggregation, mask, like, cu_seqlens, denom, norm, counts)
        if cfg.aggregation == "seq-mean-token-mean"
        else None
    )
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    inplace = inplace_backward and compute_grad and _rows_in_own_storage(logits)
    # Per-sequence values of padded rows are read by row // T in the kernel; packed ones are
    # expanded to their tokens here.
    adv_per_token = per_token.get("advantages", False) or packed
    iw_per_token = per_token.get("is_weights", False) or packed or is_weights is None
    codes, scalars = cfg.kernel_args(
        use_kl=ref_logp is not None,
        use_is=is_weights is not None,
        adv_per_token=adv_per_token,
        iw_per_token=iw_per_token,
        compute_grad=compute_grad,
        num_sequences=num_seq,
        seq_len=seq_len,
        max_len=max_len,
        norm_constant=norm,
        temperature=temperature,
        entropy_coef=entropy_coef,
        on_policy=old_logp is None,
    )

    def values(x, per_token_here, per_token_given):
        if x is None or not per_token_here or per_token_given:
            return _dense(x)
        return _per_token_values(x, False, targets, cu_seqlens)

    op = _InplacePolicyLossFromLogits.apply if inplace else _policy_loss_from_logits_op
    loss, stats, logp, entropy, *_ = op(
        logits,
        targets,
        _dense(old_logp),
        values(advantages, adv_per_token, per_token.get("advantages", False)),
        weight,
        _bool_mask(mask) if weight is None else None,
        denom,
        _dense(ref_logp),
        values(is_weights, iw_per_token, per_token.get("is_weights", False)),
        codes,
        scalars,
        want_entropy,
    )
    return _fused_output(loss, stats, logp, entropy, targets, return_entropy, process_group)


def _fused_output(loss, stats, logp, entropy, targets, return_entropy, process_group) -> PolicyLossOutput:
    """The fused kernels' per-token outputs and stats (6 metric means, the mean entropy, the
    count) → :class:`PolicyLossOutput`."""
    means = _global_metrics(stats[:7], stats[7], process_group) if process_group is not None else stats
    values = means.unbind(0)
    if logp.shape != targets.shape:  # the LM-head op's are flat
        logp, entropy = logp.view(targets.shape), entropy.view(targets.shape)
    clip_low, clip_high, dual_clip, approx_kl, mean_ratio, kl = values[:6]
    return PolicyLossOutput(
        loss,
        clip_low,
        clip_high,
        dual_clip,
        approx_kl,
        mean_ratio,
        kl,
        entropy=values[6] if return_entropy else None,
        token_logp=logp,
        token_entropy=entropy if return_entropy else None,
    )


def _loss_from_token_logprobs(
    logp,
    entropy,
    old_logp,
    advantages,
    mask,
    cu_seqlens,
    max_len,
    ref_logp,
    is_weights,
    denom,
    counts,
    cfg: PolicyLossConfig,
    norm: float,
    entropy_coef,
    return_entropy,
    process_group,
    backend,
) -> PolicyLossOutput:
    """The unfused second half: differentiable token log-probs (and entropies) → :func:`policy_loss`,
    minus entropy_coef·H aggregated like the loss."""
    packed = cu_seqlens is not None
    out = policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_len if packed else None,
        ref_logp=ref_logp,
        is_weights=is_weights,
        num_tokens=denom,
        num_sequences=denom,
        process_group=process_group,
        validate=False,
        backend=backend,
        config=cfg,
    )
    loss = out.loss
    mean_entropy = None
    if entropy is not None:
        if entropy_coef != 0.0:
            weight = _token_weights(cfg.aggregation, mask, logp, cu_seqlens, denom, norm, counts)
            loss = loss - entropy_coef * (weight.to(entropy.dtype) * entropy.reshape(-1)).sum()
        mean_entropy = _masked_mean(entropy.detach(), mask, process_group)
    return out._replace(
        loss=loss,
        entropy=mean_entropy if return_entropy else None,
        token_logp=logp.detach(),
        token_entropy=entropy.detach() if return_entropy and entropy is not None else None,
    )


def _masked_mean(x: Tensor, mask: Optional[Tensor], process_group) -> Tensor:
    x = x.reshape(-1)
    x = x if x.dtype == torch.float64 else x.float()
    m = (mask.reshape(-1) != 0) if mask is not None else torch.ones_like(x, dtype=torch.bool)
    sums = _sum_over_ranks(torch.stack([torch.where(m, x, 0.0).sum(), m.sum().to(x.dtype)]), process_group)
    return sums[0] / sums[1].clamp_min(1.0)


# ============================================================================ fused with the LM head

LINEAR_BACKENDS = register_op("linear_token_logprobs", ("reference", "triton"))
register_op("linear_policy_loss", LINEAR_BACKENDS)


def _logits_dtype(hidden: Tensor, fp32_lm_head: bool) -> torch.dtype:
    return torch.float32 if fp32_lm_head else hidden.dtype


def _empty_like_or_none(x: Optional[Tensor], needed: bool, like: Tensor) -> Tensor:
    return (
        torch.empty_like(x if x is not None else like, memory_format=torch.contiguous_format)
        if needed
        else like.new_empty((0,))
    )


@kernel_op("negkernels::linear_token_logprobs_fwd", mutates_args=())
def _linear_token_logprobs_fwd_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    temperature: float,
    vocab_start: int,
    vocab_total: int,
    with_entropy: bool,
    fp32_lm_head: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H] (the vocabulary slice [vocab_start, vocab_start + V) of
    vocab_total ids) → (logp [N], entropy [N] or [0], lse [N]) of that slice, fp32."""
    from ..triton.logprobs import linear_token_logprobs_fwd

    return linear_token_logprobs_fwd(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        vocab_start,
        vocab_total,
        with_entropy,
        _logits_dtype(hidden, fp32_lm_head),
        chunk_size,
    )


@_linear_token_logprobs_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, vocab_start, vocab_total, with_entropy, fp32_lm_head, chunk_size):
    n = hidden.shape[0]
    out = hidden.new_empty((n,), dtype=torch.float32)
    return out, hidden.new_empty((n if with_entropy else 0,), dtype=torch.float32), out.clone()


@kernel_op("negkernels::linear_token_logprobs_bwd", mutates_args=())
def _linear_token_logprobs_bwd_op(
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    temperature: float,
    vocab_start: int,
    fp32_lm_head: bool,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden [N, H], d weight [V, H], d bias [V]), each [0] when not needed, in the inputs' dtypes."""
    from ..triton.logprobs import linear_token_logprobs_bwd

    return linear_token_logprobs_bwd(
        grad_logp.contiguous() if grad_logp is not None else None,
        grad_entropy.contiguous() if grad_entropy is not None else None,
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        temperature,
        vocab_start,
        _logits_dtype(hidden, fp32_lm_head),
        chunk_size,
        need_hidden,
        need_weight,
        need_bias and bias is not None,
    )


@_linear_token_logprobs_bwd_op.register_fake
def _(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    temperature,
    vocab_start,
    fp32_lm_head,
    chunk_size,
    need_hidden,
    need_weight,
    need_bias,
):
    return (
        _empty_like_or_none(hidden, need_hidden, hidden),
        _empty_like_or_none(weight, need_weight, weight),
        _empty_like_or_none(bias, need_bias and bias is not None, weight),
    )


def _linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, vocab_start, vocab_total, with_entropy, fp32_lm_head, chunk = inputs
    logp, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if with_entropy else None)
    ctx.args = (temperature, vocab_start, fp32_lm_head, chunk)
    ctx.mark_non_differentiable(lse)


def _linear_logprobs_grads(ctx, grad_logp, grad_entropy, with_entropy):
    """(d hidden, d weight, d bias), None where not asked for, from what the forward saved:
    hidden, weight, bias, targets, lse, entropy and ``ctx.args``."""
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_bias = bias is not None and need[2]
    dh, dw, db = _linear_token_logprobs_bwd_op(
        grad_logp,
        grad_entropy if with_entropy else None,
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        *ctx.args,
        need[0],
        need[1],
        need_bias,
    )
    return dh if need[0] else None, dw if need[1] else None, db if need_bias else None


def _linear_logprobs_backward(ctx, grad_logp, grad_entropy, grad_lse):
    with_entropy = ctx.saved_tensors[5] is not None
    return no_grads_after(ctx, *_linear_logprobs_grads(ctx, grad_logp, grad_entropy, with_entropy))


_linear_token_logprobs_fwd_op.register_autograd(
    _linear_logprobs_backward, setup_context=_linear_logprobs_setup, differentiable=3
)  # hidden, weight, bias


class _VocabParallelLinearTokenLogprobs(torch.autograd.Function):
    """Rank r holds the LM-head rows [vocab_start, vocab_start + V_r) and the full (replicated)
    hidden states. Forward: the slice's statistics, combined by :func:`_combine_vocab_partials`.
    Backward: the slice's d weight and d bias locally; d hidden summed over the ranks."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        temperature,
        vocab_start,
        vocab_total,
        with_entropy,
        fp32_lm_head,
        chunk,
        group,
    ):
        logp_r, ent_r, lse_r = _linear_token_logprobs_fwd_op(
            hidden, weight, bias, targets, temperature, vocab_start, vocab_total, True, fp32_lm_head, chunk
        )
        logp, entropy, lse = _combine_vocab_partials(logp_r, ent_r, lse_r, targets, vocab_start, weight.shape[0], group)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.args = (temperature, vocab_start, fp32_lm_head, chunk)
        ctx.with_entropy, ctx.group = with_entropy, group
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        import torch.distributed as dist

        dh, dw, db = _linear_logprobs_grads(ctx, grad_logp, grad_entropy, ctx.with_entropy)
        if dh is not None:
            dist.all_reduce(dh, group=ctx.group)
        return (dh, dw, db, *([None] * 8))


class _ReplicatedInput(torch.autograd.Function):
    """Identity whose backward sums the gradient over the ranks: the input feeds every rank's shard."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _check_linear_inputs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, leading: tuple[int, ...] | None = None
) -> None:
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if leading is not None:
        if hidden.dim() not in leading:
            want = " or ".join({2: "[N, H]", 3: "[B, T, H]"}[d] for d in leading)
            raise ValueError(f"hidden: expected {want}, got shape {tuple(hidden.shape)}")
    elif hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    check_tensor("weight", weight, ndim=2, device=hidden.device)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} must equal hidden's {hidden.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected [V, H] with V >= 1 and H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=hidden.device)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} must equal hidden's {hidden.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_tensor("targets", targets, dtypes=INDEX_DTYPES, device=hidden.device)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )


def _linear_backend(backend, hidden: Tensor, op: str) -> str:
    chosen = resolve_backend(backend, hidden.device, op, LINEAR_BACKENDS)
    if chosen != "reference" and hidden.dtype == torch.float64:
        if backend is not None:
            raise TypeError("hidden: float64 inputs run on backend='reference' only")
        chosen = "reference"
    return chosen


def _token_rows(hidden: Tensor) -> Tensor:
    """[..., H] → [N, H] (a view when possible; math.prod keeps N = 0 with H = 0 well defined)."""
    return hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])


def _chunk_arg(chunk_size) -> int:
    return 0 if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    fp32_lm_head: bool = False,
    chunk_size: Optional[int] = None,
    process_group=None,
    validate: bool = True,
    backend: Optional[str] = None,
):
    """Log-probs (and entropies) of the targets under the LM head, without the logits ever existing.

    Args:
        hidden: [N, H] or [B, T, H] fp16/bf16/fp32 (fp64 on the reference backend), the last
            hidden states.
        weight: [V, H] the LM head, same dtype; with ``process_group``, this rank's contiguous
            slice of the vocabulary (rank order).
        targets: ``hidden.shape[:-1]`` int32/int64 ids in [0, V) (global ids with ``process_group``).
        bias: optional [V], same dtype.
        temperature: T > 0; the distribution is softmax(z) with z = (hidden·weightᵀ + bias) / T.
        return_entropy: also return H = −Σ_j p_j log p_j.
        fp32_lm_head: keep the logits in fp32 (the half-precision products accumulate in fp32
            either way; this drops the rounding of each logit to bf16/fp16, e.g. to match a rollout
            engine that computes its LM head in fp32). The gradient matmuls stay in the inputs'
            dtype with fp32 accumulation.
        chunk_size: tokens per chunk (default: the most whose logits fit in 512 MiB).
        process_group: tensor-parallel LM head sharded over V; every rank passes the same
            ``hidden`` and gets the single-process results; d hidden is summed over the ranks.
        validate: check the target range on the host (one synchronisation).
        backend: ``None`` (automatic), ``"reference"`` or ``"triton"``.

    Returns:
        logp [targets.shape] fp32 = z_t − log Σ_j e^{z_j} (and entropy [targets.shape] fp32),
        differentiable in ``hidden``, ``weight`` and ``bias``; gradients in the inputs' dtype:
        with G = d loss / d logits (see :func:`token_logprobs`), d hidden = G·weight,
        d weight = Gᵀ·hidden, d bias = Σ_tokens G.

    The Triton backend computes the logits of one chunk of tokens at a time with cuBLAS into a
    reused buffer and streams it through the token log-prob kernel, keeping only each row's
    log-sum-exp. The backward walks the vocabulary in slices: it recomputes a slice's logits for
    all tokens, writes their gradient over them and multiplies it out, so each slice's d weight is
    one product over every token (fp32 accumulation) and d hidden is summed over slices in fp32.
    """
    _check_linear_inputs(hidden, weight, bias, targets)
    temperature = check_finite_float("temperature", temperature, minimum=0.0, exclusive=True)
    chunk = _chunk_arg(chunk_size)
    chosen = _linear_backend(backend, hidden, "linear_token_logprobs")
    vocab_start, vocab = (
        (0, weight.shape[0]) if process_group is None else _global_vocab(weight.shape[0], process_group)
    )
    if validate:
        _check_target_range(targets, vocab)
    if chosen == "reference":
        if process_group is None:
            return linear_token_logprobs_reference(
                hidden, weight, targets, bias, temperature, return_entropy, fp32_lm_head
            )
        logits = linear_logits_reference(_ReplicatedInput.apply(hidden, process_group), weight, bias, fp32_lm_head)
        return token_logprobs(
            logits,
            targets,
            temperature=temperature,
            return_entropy=return_entropy,
            process_group=process_group,
            validate=False,
            backend="reference",
        )
    h = _token_rows(hidden)
    t = targets.reshape(-1).contiguous()
    if process_group is not None:
        logp, entropy = _VocabParallelLinearTokenLogprobs.apply(
            h, weight, bias, t, temperature, vocab_start, vocab, return_entropy, fp32_lm_head, chunk, process_group
        )
    else:
        logp, entropy, _ = _linear_token_logprobs_fwd_op(
            h, weight, bias, t, temperature, 0, vocab, return_entropy, fp32_lm_head, chunk
        )
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp


@kernel_op("negkernels::linear_policy_loss", mutates_args=())
def _linear_policy_loss_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    old_logp: Optional[Tensor],
    advantages: Tensor,
    token_weight: Tensor,
    ref_logp: Optional[Tensor],
    is_weights: Optional[Tensor],
    codes: list[int],
    scalars: list[float],
    with_entropy: bool,
    fp32_lm_head: bool,
    chunk_size: int,
    need_grads: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Σ weight·(ℓ − entropy_coef·H), stats [8] as in ``negkernels::policy_loss_from_logits``,
    logp [N], entropy [N], d hidden, d weight, d bias for an incoming gradient of 1 (each [0] when
    not needed: ``need_grads`` = [hidden, weight, bias]))."""
    from ..triton.logprobs import linear_policy_loss_fwd

    need_hidden, need_weight, need_bias = need_grads
    logp, entropy, loss, stats, dh, dw, db = linear_policy_loss_fwd(
        hidden,
        weight,
        bias,
        targets,
        old_logp,
        advantages,
        token_weight,
        ref_logp,
        is_weights,
        logits_dtype=_logits_dtype(hidden, fp32_lm_head),
        chunk_size=chunk_size,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias and bias is not None,
        codes=_codes(codes),
        scalars=_scalars(scalars),
        with_entropy=with_entropy,
    )
    return loss, stats, logp, entropy, dh, dw, db


@_linear_policy_loss_op.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    old_logp,
    advantages,
    token_weight,
    ref_logp,
    is_weights,
    codes,
    scalars,
    with_entropy,
    fp32_lm_head,
    chunk_size,
    need_grads,
):
    need_hidden, need_weight, need_bias = need_grads
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return (
        hidden.new_empty((), **f32),
        hidden.new_empty((8,), **f32),
        hidden.new_empty((n,), **f32),
        hidden.new_empty((n,), **f32),
        _empty_like_or_none(hidden, need_hidden, hidden),
        _empty_like_or_none(weight, need_weight, weight),
        _empty_like_or_none(bias, need_bias and bias is not None, weight),
    )


def _linear_policy_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[4:])
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(*output[1:])


def _linear_policy_loss_backward(ctx, grad_loss, *unused):
    grads = _single_use(ctx)
    need = ctx.needs_input_grad
    # The forward produced the gradients for an incoming gradient of 1, the usual case when the
    # loss ends the graph; only another scale costs a pass over them.
    dh, dw, db = (_scaled_by_incoming(ctx, g, grad_loss) for g in grads)
    return no_grads_after(
        ctx, dh if need[0] else None, dw if need[1] else None, db if ctx.has_bias and need[2] else None
    )


_linear_policy_loss_op.register_autograd(
    _linear_policy_loss_backward, setup_context=_linear_policy_loss_setup, differentiable=3
)  # hidden, weight, bias


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Optional[Tensor],
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    fp32_lm_head: bool = False,
    fp32_weight_grad: bool = False,
    return_entropy: bool = False,
    entropy_coef: float = 0.0,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    ref_logp: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    num_tokens=None,
    num_sequences=None,
    process_group=None,
    data_parallel_group=None,
    chunk_size: Optional[int] = None,
    validate: bool = True,
    backend: Optional[str] = None,
    config: Optional[PolicyLossConfig] = None,
    **options,
) -> PolicyLossOutput:
    """End to end from the last hidden states: LM head → log-probs (+ entropy) → :func:`policy_loss`,
    fused so that the [tokens, V] logits never exist in memory.

    ``hidden`` [B, T, H] (or packed [N, H] with ``cu_seqlens``), ``weight`` [V, H] and optional
    ``bias`` [V] in one float dtype; ``targets`` ``hidden.shape[:-1]`` ids; logp = log
    softmax((hidden·weightᵀ + bias) / temperature)[targets]. ``fp32_lm_head`` and ``chunk_size`` as
    in :func:`linear_token_logprobs`; every loss option, ``entropy_coef`` and the returned
    :class:`PolicyLossOutput` as in :func:`policy_loss_from_logits`. Gradients flow to ``hidden``,
    ``weight`` and ``bias`` (in their dtype).

    ``process_group``: a tensor-parallel LM head, ``weight`` (and ``bias``) sharded over the
    vocabulary in rank order, the same tokens on every rank; results equal the single-process
    ones. ``data_parallel_group``: the group whose ranks hold different tokens, over which the
    loss normalisers and metrics are summed (``process_group`` of :func:`policy_loss`).

    For the token-local losses (ppo, cispo, sapo, gpg) without ``process_group``, the Triton
    backend computes each chunk's logits, their log-sum-exp, the loss and the logits' gradient in
    one sweep, then d hidden and d weight, all during the forward; the backward only rescales
    them when the incoming gradient is not 1. Peak extra memory: d weight, d hidden and one
    chunk of logits (512 MiB by default). d weight of a half-precision head is then accumulated
    in its dtype across token chunks (one rounding per chunk; an fp32 accumulator would cost
    4·V·H bytes). ``fp32_weight_grad=True`` (and the sequence-level losses gspo, npo and geo_mean, and
    ``process_group``) run :func:`linear_token_logprobs` then :func:`policy_loss` instead: the
    backward recomputes the logits slice by slice of the vocabulary, every slice's d weight is one
    product over all tokens with fp32 accumulation and d hidden is summed in fp32, for one more
    LM-head matmul.
    """
    packed = cu_seqlens is not None
    _check_linear_inputs(hidden, weight, bias, targets, leading=(2,) if packed else (3,))
    temperature = check_finite_float("temperature", temperature, minimum=0.0, exclusive=True)
    entropy_coef = check_finite_float("entropy_coef", entropy_coef)
    chunk = _chunk_arg(chunk_size)
    like = _old_logp_or_donor(old_logp, targets, hidden.device)
    advantages, is_weights = (
        _per_sequence_column(advantages, like, cu_seqlens),
        _per_sequence_column(is_weights, like, cu_seqlens),
    )
    cfg = PolicyLossConfig.of(config, options)
    num_seq, seq_len, max_len, per_token = _check_policy_inputs(
        like, like, advantages, mask, cu_seqlens, max_seqlen, ref_logp, is_weights, cfg, validate
    )
    norm = cfg.resolved_norm_constant(seq_len, packed)
    chosen = _linear_backend(backend, hidden, "linear_policy_loss")
    want_entropy = return_entropy or entropy_coef != 0.0
    counts = _sequence_counts(mask, like, cu_seqlens) if cfg.aggregation.startswith("seq-mean") else None
    denom = _normaliser(cfg.aggregation, mask, like, cu_seqlens, num_tokens, num_sequences, data_parallel_group, counts)

    two_pass = fp32_weight_grad or not cfg.token_local or process_group is not None
    if chosen == "reference" or two_pass:
        got = linear_token_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=temperature,
            return_entropy=want_entropy,
            fp32_lm_head=fp32_lm_head,
            chunk_size=chunk_size,
            process_group=process_group,
            validate=validate,
            backend=chosen,
        )
        logp, entropy = got if want_entropy else (got, None)
        return _loss_from_token_logprobs(
            logp,
            entropy,
            old_logp,
            advantages,
            mask,
            cu_seqlens,
            max_len,
            ref_logp,
            is_weights,
            denom,
            counts,
            cfg,
            norm,
            entropy_coef,
            return_entropy,
            data_parallel_group,
            chosen if chosen == "reference" else "triton",
        )

    if validate:
        _check_target_range(targets, weight.shape[0])
    token_weight = _token_weights(cfg.aggregation, mask, like, cu_seqlens, denom, norm, counts)
    grad_on = torch.is_grad_enabled()
    need = [
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    ]
    codes, scalars = cfg.kernel_args(
        use_kl=ref_logp is not None,
        use_is=is_weights is not None,
        adv_per_token=True,
        iw_per_token=True,
        compute_grad=any(need),
        num_sequences=num_seq,
        seq_len=seq_len,
        max_len=max_len,
        norm_constant=norm,
        temperature=temperature,
        entropy_coef=entropy_coef,
        on_policy=old_logp is None,
    )
    loss, stats, logp, entropy, *_ = _linear_policy_loss_op(
        # Flat per-token inputs: the chunks below slice them by token.
        _token_rows(hidden),
        weight,
        bias,
        targets.reshape(-1).contiguous(),
        old_logp.reshape(-1).float() if old_logp is not None else None,
        _per_token_values(advantages, per_token.get("advantages", False), targets, cu_seqlens),
        token_weight,
        ref_logp.reshape(-1).float() if ref_logp is not None else None,
        _per_token_values(is_weights, per_token.get("is_weights", False), targets, cu_seqlens),
        codes,
        scalars,
        want_entropy,
        fp32_lm_head,
        chunk,
        need,
    )
    return _fused_output(loss, stats, logp, entropy, targets, return_entropy, data_parallel_group)
