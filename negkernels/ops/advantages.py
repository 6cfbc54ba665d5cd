"""Group-normalized advantages and group discriminative objectives: public API and custom ops.

Layering: :func:`group_advantages` (validation, process groups, statistics) → the custom op
``negkernels::group_advantages`` (fake + backend routing) → the reference, Triton or CUDA launcher.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._backend import register_op, resolve_backend
from .._fixedpoint import exponent_bound, headroom_bits
from .._kernel_op import kernel_op, no_grads_after
from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_finite_float,
    check_int,
    check_same_length,
    check_tensor,
)
from ..reference.advantages import (
    DEFAULT_SCALE,
    ESTIMATORS,
    SCALES,
    global_moments,
    group_advantages_reference,
    group_discriminative_loss_reference,
)
from ..reference.advantages import (
    drpo_positive_weights as _drpo_positive_weights_reference,
)

GROUP_ADVANTAGES_BACKENDS = register_op("group_advantages", ("reference", "triton", "cuda"))
DISCRIMINATIVE_LOSS_BACKENDS = register_op("group_discriminative_loss", ("reference", "triton"))
DISCRIMINATIVE_MODES = ("disco", "disco_b")


class GroupStats(NamedTuple):
    """Per-group statistics of the raw rewards, for logging."""

    mean: Tensor  # [G] fp32; 0 for groups with no member
    std: Tensor  # [G] fp32, unbiased; 0 for groups of fewer than two
    count: Tensor  # type: ignore[assignment]  # [G] int64 (shadows tuple.count, as the field's name should)
    zero_variance_fraction: Tensor  # 0-d fp32: share of non-empty groups whose std is 0


def _cuda_group_advantages(
    rewards, group_index, group_size, num_groups, estimator, scale, eps, vmax, k, pos, neg, pos_t, neg_t, batch_stats
):
    from .. import _cuda_ext

    _cuda_ext.load()  # registers torch.ops.negkernels_cuda
    stream = torch.cuda.current_stream(rewards.device).cuda_stream
    return torch.ops.negkernels_cuda.group_advantages(
        rewards.contiguous(),
        group_index.contiguous() if group_index is not None else None,
        group_size,
        num_groups,
        ESTIMATORS.index(estimator),
        SCALES.index(scale),
        eps,
        vmax,
        float(k),
        pos,
        neg,
        pos_t.float().contiguous() if pos_t is not None else None,
        neg_t.float().contiguous() if neg_t is not None else None,
        batch_stats.to(torch.float64).contiguous() if batch_stats is not None else None,
        headroom_bits(rewards.numel()),
        exponent_bound(vmax if estimator == "ngrpo" else 0.0),
        stream,
    )


@kernel_op("negkernels::group_advantages", mutates_args=())
def _group_advantages_op(
    rewards: Tensor,
    group_index: Optional[Tensor],
    group_size: int,
    num_groups: int,
    estimator: str,
    scale: str,
    eps: float,
    virtual_max_reward: float,
    num_virtual: int,
    positive_scale: float,
    negative_scale: float,
    positive_scale_tensor: Optional[Tensor],
    negative_scale_tensor: Optional[Tensor],
    batch_stats: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        from ..triton.advantages import group_advantages_fwd

        return group_advantages_fwd(
            rewards,
            group_index,
            group_size,
            num_groups,
            estimator,
            scale,
            eps,
            virtual_max_reward,
            num_virtual,
            positive_scale,
            negative_scale,
            positive_scale_tensor,
            negative_scale_tensor,
            batch_stats,
        )
    if backend == "cuda":
        return tuple(
            _cuda_group_advantages(
                rewards,
                group_index,
                group_size,
                num_groups,
                estimator,
                scale,
                eps,
                virtual_max_reward,
                num_virtual,
                positive_scale,
                negative_scale,
                positive_scale_tensor,
                negative_scale_tensor,
                batch_stats,
            )
        )
    if group_index is None:
        ids = torch.arange(rewards.numel(), device=rewards.device) // max(group_size, 1)
    else:
        ids = group_index
    adv, mean, std, count = group_advantages_reference(
        rewards,
        ids,
        num_groups,
        estimator,
        scale,
        eps,
        virtual_max_reward,
        num_virtual,
        positive_scale_tensor if positive_scale_tensor is not None else positive_scale,
        negative_scale_tensor if negative_scale_tensor is not None else negative_scale,
        batch_stats=batch_stats,
    )
    return adv.float(), mean.float(), std.float(), count


@_group_advantages_op.register_fake
def _(rewards, group_index, group_size, num_groups, *args):
    out = rewards.new_empty(rewards.shape, dtype=torch.float32)
    stat = rewards.new_empty((num_groups,), dtype=torch.float32)
    return out, stat, stat.clone(), rewards.new_empty((num_groups,), dtype=torch.int64)


def _sign_scale(name: str, value, n: int, device: torch.device) -> tuple[float, Optional[Tensor]]:
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return check_finite_float(name, float(value)), None
        check_tensor(name, value, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        check_same_length(name, value, n, "rewards")
        return 1.0, value
    return check_finite_float(name, value), None


def _checked_num_groups(group_index: Tensor, num_groups: Optional[int], validate: bool) -> int:
    """``num_groups``, by default ``max(group_index) + 1``; with ``validate`` (or no
    ``num_groups``) the ids are read on the host and a negative or too large one raises."""
    if num_groups is not None:
        check_int("num_groups", num_groups, minimum=0)
    if validate or num_groups is None:
        lo, hi = (int(v) for v in torch.aminmax(group_index)) if group_index.numel() else (0, -1)
        if lo < 0:
            raise ValueError(f"group_index: ids must be >= 0, found {lo}")
        if num_groups is None:
            return hi + 1
        if hi >= num_groups:
            raise ValueError(f"group_index: id {hi} is out of range for num_groups={num_groups}")
    return num_groups


def _in_range(group_index: Optional[Tensor], num_groups: int, weights: Optional[Tensor]) -> Optional[Tensor]:
    """Weights for batch statistics taken outside the kernel: a reward whose (unvalidated) id is
    out of range joins no statistic, as inside the kernels; ``None`` when every reward counts once."""
    if group_index is None:
        return weights
    joined = (group_index >= 0) & (group_index < num_groups)
    return joined.double() if weights is None else torch.where(joined, weights.double(), 0.0)


def group_advantages(
    rewards: Tensor,
    group_index: Optional[Tensor] = None,
    *,
    group_size: Optional[int] = None,
    estimator: str = "grpo",
    scale: Optional[str] = None,
    eps: float = 1e-6,
    virtual_max_reward: float = 1.0,
    num_virtual: int = 1,
    positive_scale: float | Tensor = 1.0,
    negative_scale: float | Tensor = 1.0,
    whiten_weights: Optional[Tensor] = None,
    process_group=None,
    return_stats: bool = False,
    num_groups: Optional[int] = None,
    validate: bool = True,
    backend: Optional[str] = None,
):
    """Group-normalized advantages for RL post-training (GRPO family), in one kernel launch.

    Args:
        rewards: [N] fp16/bf16/fp32/fp64, one scalar reward per sampled completion.
        group_index: [N] int32/int64 group id of each reward (any order, any group sizes, gaps
            allowed). Give exactly one of ``group_index`` and ``group_size``.
        group_size: G for contiguous groups ``rewards.view(-1, G)``; must divide N.
        estimator: with μ_g, σ_g the mean and unbiased std of group g (n_g members):
            ``"grpo"``          (r − μ_g) / (σ_g + eps)
            ``"dr_grpo"``       r − μ_g
            ``"rloo"``          n_g/(n_g − 1)·(r − μ_g)  (= r − mean of the other members)
            ``"ngrpo"``         (r − μ'_g) / (σ'_g + eps), μ', σ' over the group plus
                                ``num_virtual`` copies of ``virtual_max_reward``
            ``"reinforce_pp_baseline"``  r − μ_g, whitened over the batch
        scale: the divisor, overriding the estimator's default (in brackets above: grpo/ngrpo
            "group", dr_grpo/rloo "none", reinforce_pp_baseline "whiten"):
            ``"group"`` σ_g + eps (σ'_g for ngrpo); ``"batch"`` σ of the raw rewards over the whole
            batch + eps; ``"none"`` 1; ``"whiten"`` subtract the batch mean of the numerators and
            divide by their batch std + eps.
        whiten_weights: [N] fp16/bf16/fp32/fp64 ≥ 0, only with ``scale="whiten"``: the batch mean and
            std of the numerators weight reward i ``whiten_weights[i]`` times (frequency weights:
            mean Σw·a/Σw, variance Σw·(a − mean)²/(Σw − 1), std 0 when Σw < 2). The response
            lengths in tokens give the token-level whitening of verl's ``masked_whiten`` over
            a sequence reward repeated on every token. Default: every reward counts once.
        positive_scale, negative_scale: float or [N] tensor multiplying positive / negative
            advantages after normalization (W-REINFORCE's λ, confidence-modulated negatives).
        process_group: batch statistics ("batch", "whiten") over every rank of this group; each
            group of rewards must live on one rank. The batch statistics then cost one extra
            launch (and, under "whiten", one more for the numerators) and two all-reduces.
        return_stats: also return :class:`GroupStats`.
        num_groups: number of group ids (ids in [0, num_groups)); default ``max(group_index)+1``,
            which reads the ids on the host. Pass it (and ``validate=False``) to avoid any host sync.
        eps: > 0, added to every divisor, so a zero-variance group gets advantages 0.
        validate: check group ids (negative or ≥ num_groups raise) and whiten_weights on the host. Without it an
            id outside [0, num_groups) gives that reward a NaN advantage, and the reward joins
            no statistic (the batch's included); nothing is read or written out of bounds.
        backend: ``None`` (automatic), ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        advantages [N] fp32 (and :class:`GroupStats` with ``return_stats``). Groups of one get 0,
        except under ngrpo, whose augmented group of 1 + num_virtual members has a mean and spread.
        NaN rewards make their group's advantages NaN (and all of them under batch statistics).
        Advantages are constants of the policy gradient: the output carries no gradient.

    Statistics are deterministic: the Triton and CUDA kernels sum with integer atomics on
    fixed-point values (see ``negkernels/triton/advantages.py``).
    """
    check_tensor("rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES)
    rewards = rewards.detach()
    n = rewards.shape[0]
    device = rewards.device
    check_choice("estimator", estimator, ESTIMATORS)
    scale = DEFAULT_SCALE[estimator] if scale is None else check_choice("scale", scale, SCALES)
    # eps > 0: a zero-variance group (every completion right, say) has numerators 0 and σ = 0,
    # and only a positive eps turns 0/0 into the advantage 0.
    eps = check_finite_float("eps", eps, minimum=0.0, exclusive=True)
    virtual_max_reward = check_finite_float("virtual_max_reward", virtual_max_reward)
    num_virtual = check_int("num_virtual", num_virtual, minimum=1 if estimator == "ngrpo" else 0)
    pos, pos_t = _sign_scale("positive_scale", positive_scale, n, device)
    neg, neg_t = _sign_scale("negative_scale", negative_scale, n, device)
    if (group_index is None) == (group_size is None):
        raise ValueError("group_index / group_size: give exactly one of them")
    if group_size is not None:
        group_size = check_int("group_size", group_size, minimum=1)
        if n % group_size:
            raise ValueError(f"group_size: {group_size} does not divide the number of rewards {n}")
        if num_groups is not None and num_groups != n // group_size:
            raise ValueError(f"num_groups: {num_groups} contradicts group_size {group_size} with {n} rewards")
        num_groups = n // group_size
    else:
        assert group_index is not None  # exactly one of the two, checked above
        check_tensor("group_index", group_index, ndim=1, dtypes=INDEX_DTYPES, device=device)
        check_same_length("group_index", group_index, n, "rewards")
        num_groups = _checked_num_groups(group_index, num_groups, validate)
        group_size = 0
    chosen = resolve_backend(backend, device, "group_advantages", GROUP_ADVANTAGES_BACKENDS)

    if whiten_weights is not None:
        if scale != "whiten":
            raise ValueError(f"whiten_weights: only with scale='whiten' (scale is {scale!r})")
        check_tensor("whiten_weights", whiten_weights, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        check_same_length("whiten_weights", whiten_weights, n, "rewards")
        whiten_weights = whiten_weights.detach()
        if validate and n and not bool(torch.isfinite(whiten_weights).all() & (whiten_weights >= 0).all()):
            raise ValueError("whiten_weights: weights must be finite and >= 0")

    batch_stats = None
    if scale == "batch" and process_group is not None:
        batch_stats = global_moments(rewards.double(), process_group, _in_range(group_index, num_groups, None))
    elif scale == "whiten" and (process_group is not None or whiten_weights is not None):
        numerators = _group_advantages_op(
            rewards,
            group_index,
            group_size,
            num_groups,
            estimator,
            "none",
            eps,
            virtual_max_reward,
            num_virtual,
            1.0,
            1.0,
            None,
            None,
            None,
            chosen,
        )[0]
        batch_stats = global_moments(
            numerators.double(), process_group, _in_range(group_index, num_groups, whiten_weights)
        )

    adv, mean, std, count = _group_advantages_op(
        rewards,
        group_index,
        group_size,
        num_groups,
        estimator,
        scale,
        eps,
        virtual_max_reward,
        num_virtual,
        pos,
        neg,
        pos_t,
        neg_t,
        batch_stats,
        chosen,
    )
    if not return_stats:
        return adv
    nonempty = count > 0
    zero_var = ((std == 0) & nonempty).sum().float() / nonempty.sum().clamp_min(1).float()
    return adv, GroupStats(mean, std, count, zero_var)


def drpo_positive_weights(
    lengths: Tensor,
    correct: Tensor,
    group_index: Tensor,
    max_length: float,
    lam: float = 1.0,
    num_groups: Optional[int] = None,
) -> Tensor:
    """DRPO length weights for the positive term of :func:`group_discriminative_loss`.

    weights_i = softmax over the correct members j of i's group of (1 − length_j / max_length)/λ;
    0 for incorrect samples. ``lengths`` [N] (int or float), ``correct`` [N] bool, ``group_index``
    [N] int. Returns fp32 [N] (fp64 for fp64 lengths).
    """
    check_tensor("lengths", lengths, ndim=1)
    n = lengths.shape[0]
    check_tensor("correct", correct, ndim=1, device=lengths.device)
    check_same_length("correct", correct, n, "lengths")
    check_tensor("group_index", group_index, ndim=1, dtypes=INDEX_DTYPES, device=lengths.device)
    check_same_length("group_index", group_index, n, "lengths")
    max_length = check_finite_float("max_length", max_length, minimum=0.0, exclusive=True)
    lam = check_finite_float("lam", lam, minimum=0.0, exclusive=True)
    if n and int(group_index.min()) < 0:
        raise ValueError("group_index: ids must be >= 0")
    return _drpo_positive_weights_reference(lengths, correct, group_index, max_length, lam, num_groups)


@kernel_op("negkernels::group_discriminative_loss", mutates_args=())
def _discriminative_op(
    scores: Tensor,
    correct: Tensor,
    group_index: Tensor,
    weights: Optional[Tensor],
    num_groups: int,
    tau: float,
    mode: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d scores): the gradient comes with the forward, the backward only scales it."""
    if backend == "triton":
        from ..triton.advantages import group_discriminative_fwd

        return group_discriminative_fwd(scores, correct, group_index, weights, num_groups, tau, mode == "disco")
    # As in the kernel, a member whose (unvalidated) id is outside [0, num_groups) joins no group.
    inside = (group_index >= 0) & (group_index < num_groups)
    with torch.enable_grad():
        leaf = scores.detach().requires_grad_()
        loss = group_discriminative_loss_reference(
            leaf[inside],
            correct[inside],
            group_index[inside],
            num_groups,
            tau,
            mode,
            weights[inside] if weights is not None else None,
        )
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    if grad is None:  # no member inside
        grad = torch.zeros_like(leaf)
    return loss.detach(), grad.to(loss.dtype)


@_discriminative_op.register_fake
def _(scores, correct, group_index, weights, num_groups, tau, mode, backend):
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return scores.new_empty((), dtype=dtype), scores.new_empty(scores.shape, dtype=dtype)


def _discriminative_setup(ctx, inputs, output):
    ctx.scores_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _discriminative_backward(ctx, grad_loss, unused):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return no_grads_after(ctx)
    (grad,) = ctx.saved_tensors
    return no_grads_after(ctx, (grad * grad_loss).to(ctx.scores_dtype))


_discriminative_op.register_autograd(_discriminative_backward, setup_context=_discriminative_setup, differentiable=1)


def group_discriminative_loss(
    scores: Tensor,
    correct: Tensor,
    group_index: Tensor,
    *,
    tau: float = 10.0,
    mode: str = "disco",
    weights: Optional[Tensor] = None,
    num_groups: Optional[int] = None,
    validate: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """DisCO / DisCO-b discriminative objective over ragged groups, differentiable in ``scores``.

    For every group with both correct (S+) and incorrect (S−) members:
        ``"disco"``:   J = Σ_{S+} w·s / Σ_{S+} w − τ·log Σ_{S−} exp(s/τ)
        ``"disco_b"``: J = mean_{S+} s − mean_{S−} s
    (w = ``weights``, e.g. :func:`drpo_positive_weights`; all ones by default, giving mean_{S+} s.)
    loss = −Σ_valid J / (number of non-empty groups); groups lacking S+ or S− contribute 0.

    ``scores`` [N] float (sequence scores, e.g. mean token log-prob), ``correct`` [N] bool,
    ``group_index`` [N] int in [0, num_groups) (any order, any sizes), ``weights`` [N] ≥ 0 on
    the positives (constants: no gradient). ``num_groups`` defaults to ``max(group_index) + 1``
    and ``validate`` checks the ids, both on the host; with ``num_groups=..., validate=False``
    there is no host synchronisation, and an id outside [0, num_groups) joins no group (its
    gradient is 0). Returns a 0-d fp32 loss (fp64 for fp64 scores on the reference backend); the
    gradient comes back in ``scores``' dtype. Backends: ``"reference"`` (PyTorch, any device) and
    ``"triton"`` (one launch for the loss and its gradient; fp64 sums).
    """
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    n = scores.shape[0]
    check_tensor("correct", correct, ndim=1, dtypes=(torch.bool,), device=scores.device)
    check_same_length("correct", correct, n, "scores")
    check_tensor("group_index", group_index, ndim=1, dtypes=INDEX_DTYPES, device=scores.device)
    check_same_length("group_index", group_index, n, "scores")
    tau = check_finite_float("tau", tau, minimum=0.0, exclusive=True)
    check_choice("mode", mode, DISCRIMINATIVE_MODES)
    if weights is not None:
        check_tensor("weights", weights, ndim=1, dtypes=FLOAT_DTYPES, device=scores.device)
        check_same_length("weights", weights, n, "scores")
        weights = weights.detach()
    chosen = resolve_backend(backend, scores.device, "group_discriminative_loss", DISCRIMINATIVE_LOSS_BACKENDS)
    num_groups = _checked_num_groups(group_index, num_groups, validate)
    loss, _ = _discriminative_op(scores, correct, group_index, weights, num_groups, tau, mode, chosen)
    return loss
