"""Reference group-normalized advantages and group discriminative objectives.

Readable PyTorch, one formula per line; the oracle for the Triton and CUDA kernels. Arguments are
already validated by the public functions in :mod:`negkernels.ops.advantages`.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "ngrpo", "reinforce_pp_baseline")
SCALES = ("group", "batch", "none", "whiten")
DEFAULT_SCALE = {
    "grpo": "group",
    "dr_grpo": "none",
    "rloo": "none",
    "ngrpo": "group",
    "reinforce_pp_baseline": "whiten",
}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _unbiased_std(m2: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # Fewer than two samples: the spread is defined as 0 (a group of one has no variance to scale by).
    return torch.where(count >= 2, (m2 / (count - 1).clamp_min(1)).sqrt(), torch.zeros_like(m2))


def global_moments(x: torch.Tensor, process_group=None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean and unbiased std of all elements of ``x`` over every rank of ``process_group``.

    ``weights`` (same shape, ≥ 0) are frequency weights: element i counts ``weights[i]`` times, so
    the mean is Σw·x / Σw and the variance Σw·(x − mean)² / (Σw − 1) (the std is 0 when Σw < 2, as
    for a group of one). A weight of 0 leaves an element out, NaN included.

    Returns a tensor ``[mean, std]`` in ``x``'s dtype. Two passes (mean, then squared deviations),
    each one all-reduce, so the result does not suffer the cancellation of ``E[x²] − E[x]²``.
    """
    if weights is None:
        count = torch.tensor([float(x.numel())], dtype=x.dtype, device=x.device)
        total = x.sum().reshape(1)
    else:
        weights = weights.to(x.dtype)
        # where, not a product: a left-out element may be NaN (an unvalidated id), and 0·NaN is NaN.
        x = torch.where(weights > 0, x, torch.zeros_like(x))
        count = weights.sum().reshape(1)
        total = (weights * x).sum().reshape(1)
    if process_group is not None:
        import torch.distributed as dist

        packed = torch.cat([count, total])
        dist.all_reduce(packed, group=process_group)
        count, total = packed[:1], packed[1:]
    mean = total / count.clamp_min(1) if weights is None else total / torch.where(count > 0, count, 1)
    deviation2 = (x - mean) ** 2
    m2 = (deviation2 if weights is None else weights * deviation2).sum().reshape(1)
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(m2, group=process_group)
    return torch.cat([mean, _unbiased_std(m2, count)])


def group_advantages_reference(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
    virtual_max_reward: float = 1.0,
    num_virtual: int = 1,
    positive_scale: float | torch.Tensor = 1.0,
    negative_scale: float | torch.Tensor = 1.0,
    batch_stats: torch.Tensor | None = None,
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-normalized advantages. See :func:`negkernels.group_advantages` for the formulas.

    ``group_ids`` int64 [N] in [0, num_groups). ``batch_stats`` (optional [2] = mean, std) replaces
    the batch statistics ("batch": of the rewards; "whiten": of the numerators).
    Returns float64 (advantages [N], group mean [G], group std [G]) and group count [G] int64.
    """
    # Always float64: rewards are one scalar per sequence, and fp32 group sums lose a small spread
    # around a large offset (the kernels use exact fixed-point sums for the same reason).
    dtype = torch.float64
    ids = group_ids.long()
    valid = (ids >= 0) & (ids < num_groups)
    if ids.numel() and not bool(valid.all()):
        # Unvalidated ids outside [0, num_groups): NaN advantages for those rewards, which take no
        # part in any statistic (as on the kernel backends).
        def kept(x):
            return x[valid] if isinstance(x, torch.Tensor) and x.dim() == 1 and x.numel() == ids.numel() else x

        adv, mean, std, count = group_advantages_reference(
            rewards[valid],
            ids[valid],
            num_groups,
            estimator,
            scale,
            eps,
            virtual_max_reward,
            num_virtual,
            kept(positive_scale),
            kept(negative_scale),
            batch_stats,
            process_group,
        )
        full = torch.full(ids.shape, float("nan"), dtype=dtype, device=adv.device)
        return full.masked_scatter(valid, adv), mean, std, count
    r = rewards.to(dtype)
    zeros = torch.zeros(num_groups, dtype=dtype, device=r.device)
    count = torch.zeros(num_groups, dtype=torch.int64, device=r.device).index_add_(0, ids, torch.ones_like(ids))
    n_g = count.to(dtype)
    mean = zeros.clone().index_add_(0, ids, r) / n_g.clamp_min(1)
    d = r - mean[ids]
    m2 = zeros.clone().index_add_(0, ids, d * d)
    std = _unbiased_std(m2, n_g)
    n = n_g[ids]
    # A group of one has no baseline: advantage 0. NGRPO's group augmented with num_virtual rewards
    # has 1 + num_virtual members, so an all-wrong singleton still learns.
    singleton = (n < 2) & (estimator != "ngrpo")

    if estimator == "rloo":
        # n/(n−1)·(r − μ) = r − (mean of the other n−1 rewards)
        a = torch.where(singleton, d * 0, n / (n - 1).clamp_min(1) * d)
    elif estimator == "ngrpo":
        k, v = float(num_virtual), float(virtual_max_reward)
        mean_aug = (n_g * mean + k * v) / (n_g + k)
        m2_aug = m2 + n_g * (mean - mean_aug) ** 2 + k * (v - mean_aug) ** 2
        std_aug = (m2_aug / (n_g + k - 1).clamp_min(1)).sqrt()
        a = torch.where(singleton, d * 0, r - mean_aug[ids])
    else:
        a = torch.where(singleton, d * 0, d)

    if scale == "group":
        divisor = (std_aug if estimator == "ngrpo" else std)[ids] + eps
    elif scale == "batch":
        stats = batch_stats.to(dtype) if batch_stats is not None else global_moments(r, process_group)
        divisor = stats[1] + eps
    elif scale == "whiten":
        stats = batch_stats.to(dtype) if batch_stats is not None else global_moments(a, process_group)
        a = a - stats[0]
        divisor = stats[1] + eps
    else:
        divisor = torch.ones((), dtype=dtype, device=r.device)

    base = a / divisor
    base = torch.where(singleton, d * 0, base)
    pos = positive_scale.to(dtype) if isinstance(positive_scale, torch.Tensor) else positive_scale
    neg = negative_scale.to(dtype) if isinstance(negative_scale, torch.Tensor) else negative_scale
    adv = torch.where(base > 0, base * pos, torch.where(base < 0, base * neg, base))
    return adv, mean, std, count


def drpo_positive_weights(
    lengths: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor,
    max_length: float,
    lam: float = 1.0,
    num_groups: int | None = None,
) -> torch.Tensor:
    """DRPO's length weights: per group, softmax over the correct samples of (1 − len/max_len)/λ.

    Returns float32 (float64 for float64 ``lengths``) weights [N]: 0 for incorrect samples, and
    summing to 1 over the correct samples of every group that has one. Shorter correct answers
    get more weight.
    """
    dtype = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    ids = group_index.long()
    if num_groups is None:
        num_groups = int(ids.max()) + 1 if ids.numel() else 0
    pos = correct.bool()
    logit = (1.0 - lengths.to(dtype) / max_length) / lam
    neg_inf = torch.full_like(logit, float("-inf"))
    logit = torch.where(pos, logit, neg_inf)
    gmax = torch.full((num_groups,), float("-inf"), dtype=dtype, device=logit.device)
    gmax = gmax.scatter_reduce(0, ids, logit, reduce="amax", include_self=True)
    shifted = torch.where(pos, logit - gmax[ids], neg_inf)
    e = shifted.exp()
    denom = torch.zeros(num_groups, dtype=dtype, device=e.device).index_add_(0, ids, e)
    return torch.where(pos, e / denom[ids].clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(e))


def group_discriminative_loss_reference(
    scores: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    tau: float = 10.0,
    mode: str = "disco",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DisCO / DisCO-b objective over ragged groups; see :func:`negkernels.group_discriminative_loss`."""
    dtype = _compute_dtype(scores)
    s = scores.to(dtype)
    ids = group_ids.long()
    pos = correct.bool()
    negm = ~pos
    dev = s.device
    zeros = torch.zeros(num_groups, dtype=dtype, device=dev)
    n_pos = torch.zeros(num_groups, dtype=torch.int64, device=dev).index_add_(0, ids, pos.long())
    n_neg = torch.zeros(num_groups, dtype=torch.int64, device=dev).index_add_(0, ids, negm.long())
    n_all = n_pos + n_neg
    w = torch.ones_like(s) if weights is None else weights.to(dtype)
    w_pos = torch.where(pos, w, torch.zeros_like(w))
    pos_term = zeros.clone().index_add_(0, ids, w_pos * s) / zeros.clone().index_add_(0, ids, w_pos).clamp_min(
        torch.finfo(dtype).tiny
    )
    if mode == "disco":
        # τ·logΣexp(s/τ) over S−, stabilised by the group's max negative score
        neg_scaled = torch.where(negm, s / tau, torch.full_like(s, float("-inf")))
        gmax = torch.full((num_groups,), float("-inf"), dtype=dtype, device=dev)
        gmax = gmax.scatter_reduce(0, ids, neg_scaled, reduce="amax", include_self=True)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax)).detach()
        e = torch.where(negm, (neg_scaled - gmax[ids]).exp(), torch.zeros_like(s))
        neg_sum = zeros.clone().index_add_(0, ids, e)
        neg_term = tau * (neg_sum.clamp_min(torch.finfo(dtype).tiny).log() + gmax)
    else:
        neg_term = zeros.clone().index_add_(0, ids, torch.where(negm, s, torch.zeros_like(s))) / n_neg.to(
            dtype
        ).clamp_min(1)
    valid = (n_pos > 0) & (n_neg > 0)
    objective = torch.where(valid, pos_term - neg_term, zeros)
    present = (n_all > 0).sum().clamp_min(1).to(dtype)
    return -objective.sum() / present
