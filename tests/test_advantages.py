"""Group advantages and group discriminative objectives: every backend against float64 oracles."""

from __future__ import annotations

import math

import pytest
import torch

import negkernels as nk
from negkernels.reference.advantages import DEFAULT_SCALE, ESTIMATORS, SCALES, group_advantages_reference

from .helpers import OUTPUT_TOLERANCE, assert_close, fresh, poisoned_allocations, upcast

CPU_BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]


def loop_oracle(rewards, ids, estimator, scale, eps=1e-6, vmax=1.0, k=1, pos=1.0, neg=1.0):
    """Per-group Python loop written from the formulas alone (independent of the reference)."""
    r = [float(x) for x in upcast(rewards)]
    ids = [int(g) for g in ids]
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)

    def stat(xs):
        mean = sum(xs) / len(xs)
        return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0

    num = [0.0] * len(r)
    div = [1.0] * len(r)
    for members in groups.values():
        vals = [r[i] for i in members]
        n = len(vals)
        mu, sd = stat(vals)
        aug_mu, aug_sd = stat(vals + [vmax] * k)
        for i in members:
            if n < 2 and estimator != "ngrpo":  # the augmented group of ngrpo has 1 + k members
                num[i] = 0.0
            elif estimator == "rloo":
                num[i] = r[i] - sum(vals[j] for j in range(n) if members[j] != i) / (n - 1)
            elif estimator == "ngrpo":
                num[i] = r[i] - aug_mu
            else:
                num[i] = r[i] - mu
            div[i] = (aug_sd if estimator == "ngrpo" else sd) + eps
    if scale == "batch":
        div = [stat(r)[1] + eps] * len(r)
    elif scale == "whiten":
        m, s = stat(num)
        num = [a - m for a in num]
        div = [s + eps] * len(r)
    elif scale == "none":
        div = [1.0] * len(r)
    out = []
    for i in range(len(r)):
        b = 0.0 if len(groups[ids[i]]) < 2 and estimator != "ngrpo" else num[i] / div[i]
        out.append(b * pos if b > 0 else b * neg if b < 0 else b)
    return torch.tensor(out, dtype=torch.float64)


def ragged_ids(n, num_ids, *, gaps=True):
    """Group ids in random order with random sizes, some ids unused."""
    ids = torch.randint(0, num_ids, (n,))
    if gaps:
        ids = torch.where(ids == 1, torch.full_like(ids, num_ids - 1), ids)  # id 1 never used
    return ids


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
def test_reference_matches_loop_oracle(estimator, scale):
    r = fresh((53,), torch.float64)
    ids = ragged_ids(53, 9)
    adv, *_ = group_advantages_reference(r, ids, 9, estimator, scale, 1e-6, 0.8, 2, 1.5, 0.5)
    expected = loop_oracle(r, ids, estimator, scale, vmax=0.8, k=2, pos=1.5, neg=0.5)
    assert_close(adv, expected, rtol=1e-12, atol=1e-12, what=f"{estimator}/{scale}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("grouping", ["uniform", "ragged"])
def test_parity_with_float64_reference(backend, estimator, scale, grouping):
    n = 91
    rewards = fresh((n,), noncontiguous=True, scale=2.0, offset=0.3)
    if grouping == "uniform":
        kwargs = dict(group_size=7)
        ids = torch.arange(n) // 7
        num_groups = 13
    else:
        ids = ragged_ids(n, 12)
        kwargs = dict(group_index=ids.to(torch.int32))
        num_groups = 12
    with poisoned_allocations():
        adv, stats = nk.group_advantages(
            rewards,
            estimator=estimator,
            scale=scale,
            return_stats=True,
            virtual_max_reward=1.7,
            num_virtual=3,
            backend=backend,
            **kwargs,
        )
    ref, mean, std, count = group_advantages_reference(upcast(rewards), ids, num_groups, estimator, scale, 1e-6, 1.7, 3)
    assert adv.dtype == torch.float32 and stats.mean.dtype == torch.float32 and stats.count.dtype == torch.int64
    assert_close(adv, ref, **OUTPUT_TOLERANCE, what="advantages")
    assert_close(stats.mean, mean, **OUTPUT_TOLERANCE, what="group mean")
    assert_close(stats.std, std, **OUTPUT_TOLERANCE, what="group std")
    assert torch.equal(stats.count, count)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_input_dtypes(backend, dtype):
    rewards = fresh((40,), dtype)
    adv = nk.group_advantages(rewards, group_size=8, backend=backend)
    ref = group_advantages_reference(upcast(rewards), torch.arange(40) // 8, 5)[0]
    assert adv.dtype == torch.float32
    assert_close(adv, ref, **OUTPUT_TOLERANCE, what=str(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_uniform_groups_take_the_segmented_path(backend):
    from negkernels.triton.advantages import MAX_UNIFORM_GROUP

    g = MAX_UNIFORM_GROUP + 3
    rewards = fresh((2 * g,))
    adv = nk.group_advantages(rewards, group_size=g, backend=backend)
    ref = group_advantages_reference(upcast(rewards), torch.arange(2 * g) // g, 2)[0]
    assert_close(adv, ref, **OUTPUT_TOLERANCE)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_worked_examples(backend):
    # NGRPO, G=8, all rewards 0, one virtual reward 1: μ' = 1/9, σ' = 1/3 → every advantage −1/3.
    adv = nk.group_advantages(torch.zeros(8), group_size=8, estimator="ngrpo", eps=1e-12, backend=backend)
    torch.testing.assert_close(adv, torch.full((8,), -1 / 3))
    # GRPO on [1, 0, 0, 1]: μ = 1/2, σ = sqrt(1/3) → ±(1/2)·sqrt(3).
    adv = nk.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, eps=1e-12, backend=backend)
    torch.testing.assert_close(adv, torch.tensor([1, -1, -1, 1.0]) * math.sqrt(3) / 2)
    # RLOO on [1, 0, 0]: r − mean of the others = 1, −1/2, −1/2.
    adv = nk.group_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3, estimator="rloo", backend=backend)
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5]))
    # Dr. GRPO with asymmetric scaling: (r − μ)·{2 if > 0, 0.25 if < 0}.
    adv = nk.group_advantages(
        torch.tensor([3.0, 1.0]),
        group_size=2,
        estimator="dr_grpo",
        positive_scale=2.0,
        negative_scale=0.25,
        backend=backend,
    )
    torch.testing.assert_close(adv, torch.tensor([2.0, -0.25]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ngrpo_groups_of_one_learn_from_their_augmented_group(backend):
    # One reward 0 and one virtual reward 1: μ' = 1/2, σ' = sqrt(1/2) → −1/√2. With two virtual
    # rewards: {0, 1, 1}, μ' = 2/3, σ' = 1/√3 → −2/√3. A correct singleton (r = 1 = vmax) gets 0.
    for k, want in [(1, -1 / math.sqrt(2)), (2, -2 / math.sqrt(3))]:
        adv = nk.group_advantages(
            torch.zeros(3), group_size=1, estimator="ngrpo", num_virtual=k, eps=1e-12, backend=backend
        )
        torch.testing.assert_close(adv, torch.full((3,), want))
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0])
    ids = torch.tensor([2, 0, 1, 1])  # ragged: two singletons and a pair
    adv = nk.group_advantages(rewards, ids, estimator="ngrpo", eps=1e-12, backend=backend)
    # the pair {0, 0} + virtual 1: μ' = 1/3, σ' = 1/√3 → −1/√3 each
    torch.testing.assert_close(adv, torch.tensor([-1 / math.sqrt(2), 0.0, -1 / math.sqrt(3), -1 / math.sqrt(3)]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_sample_sign_scales(backend):
    rewards = fresh((30,))
    ids = ragged_ids(30, 5)
    pos, neg = torch.rand(30) + 0.5, torch.rand(30)
    adv = nk.group_advantages(rewards, ids, positive_scale=pos, negative_scale=neg, backend=backend)
    base = group_advantages_reference(upcast(rewards), ids, 5)[0]
    expected = torch.where(base > 0, base * pos.double(), base * neg.double())
    assert_close(adv, expected, **OUTPUT_TOLERANCE)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_degenerate_inputs(backend):
    # Groups of one give 0; empty groups (gaps) report count 0.
    rewards = fresh((6,))
    ids = torch.tensor([0, 3, 3, 5, 5, 5])
    adv, stats = nk.group_advantages(rewards, ids, return_stats=True, backend=backend)
    assert adv[0] == 0
    assert stats.count.tolist() == [1, 0, 0, 2, 0, 3]
    assert stats.mean[1] == 0 and stats.std[0] == 0
    # zero-variance share over the 3 non-empty groups: only the singleton has std 0
    torch.testing.assert_close(stats.zero_variance_fraction, torch.tensor(1 / 3))
    # Constant group: zero variance, advantage 0.
    adv, stats = nk.group_advantages(torch.full((4,), 2.5), group_size=4, return_stats=True, backend=backend)
    assert torch.equal(adv, torch.zeros(4)) and stats.zero_variance_fraction == 1
    # Empty batch.
    empty = nk.group_advantages(torch.empty(0), group_size=4, backend=backend)
    assert empty.shape == (0,)
    empty, stats = nk.group_advantages(
        torch.empty(0), torch.empty(0, dtype=torch.long), num_groups=3, return_stats=True, backend=backend
    )
    assert empty.shape == (0,) and stats.count.tolist() == [0, 0, 0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates_to_its_group_only(backend):
    rewards = fresh((12,))
    rewards[5] = float("nan")
    adv = nk.group_advantages(rewards, group_size=4, backend=backend)
    assert adv[4:8].isnan().all()
    assert torch.isfinite(adv[:4]).all() and torch.isfinite(adv[8:]).all()
    adv = nk.group_advantages(rewards, group_size=4, scale="batch", backend=backend)
    assert adv.isnan().all()  # the batch spread itself is NaN


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_offset_small_spread(backend):
    # Rewards far from zero with a tiny spread: the fixed-point sums must not lose the spread.
    rewards = (1000.0 + 1e-2 * torch.randn(64)).float()
    ids = ragged_ids(64, 4, gaps=False)
    adv = nk.group_advantages(rewards, ids, backend=backend)
    ref = group_advantages_reference(upcast(rewards), ids, 4)[0]
    assert_close(adv, ref, rtol=1e-4, atol=1e-4)


def test_default_scales():
    assert DEFAULT_SCALE == {
        "grpo": "group",
        "dr_grpo": "none",
        "rloo": "none",
        "ngrpo": "group",
        "reinforce_pp_baseline": "whiten",
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", ["reinforce_pp_baseline", "grpo", "rloo"])
def test_whiten_weights_are_frequency_weights_of_the_batch_moments(backend, estimator):
    n = 37
    rewards = fresh((n,))
    ids = ragged_ids(n, 9)
    weights = torch.randint(1, 40, (n,)).double()  # response lengths, say
    weights[5] = 0.0  # a reward that joins no batch statistic still gets its advantage
    got = nk.group_advantages(
        rewards, ids, estimator=estimator, scale="whiten", whiten_weights=weights, positive_scale=1.5, backend=backend
    )
    # oracle: the loop oracle's numerators, then the weighted moments written out in Python floats
    a = [float(x) for x in loop_oracle(rewards, ids, estimator, "none")]
    w = [float(x) for x in weights]
    total = sum(w)
    mean = sum(wi * ai for wi, ai in zip(w, a)) / total
    std = math.sqrt(sum(wi * (ai - mean) ** 2 for wi, ai in zip(w, a)) / (total - 1))
    sizes = torch.bincount(ids)
    want = [0.0 if sizes[g] < 2 else (ai - mean) / (std + 1e-6) for ai, g in zip(a, ids.tolist())]
    want = torch.tensor([x * 1.5 if x > 0 else x for x in want], dtype=torch.float64)
    assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unit_whiten_weights_equal_the_unweighted_whitening(backend):
    rewards, ids = fresh((50,)), ragged_ids(50, 11)
    plain = nk.group_advantages(rewards, ids, scale="whiten", backend=backend)
    unit = nk.group_advantages(rewards, ids, scale="whiten", whiten_weights=torch.ones(50), backend=backend)
    assert_close(unit, plain, atol=1e-6, rtol=1e-6)


def test_whiten_weights_leave_out_unvalidated_out_of_range_ids():
    rewards, ids = fresh((12,)), torch.arange(12) // 3
    weights = torch.rand(12) + 0.5
    bad = ids.clone()
    bad[4] = 9  # outside num_groups=4, unvalidated
    got = nk.group_advantages(
        rewards,
        bad,
        scale="whiten",
        estimator="reinforce_pp_baseline",
        num_groups=4,
        validate=False,
        whiten_weights=weights,
        backend="reference",
    )
    assert torch.isnan(got[4])
    keep = torch.arange(12) != 4
    want = nk.group_advantages(
        rewards[keep],
        ids[keep],
        scale="whiten",
        estimator="reinforce_pp_baseline",
        num_groups=4,
        whiten_weights=weights[keep],
        backend="reference",
    )
    assert_close(got[keep], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=torch.randn(4, 2), group_size=2), "rewards"),
        (dict(rewards=torch.arange(4), group_size=2), "rewards"),
        (dict(rewards=[1.0, 2.0], group_size=2), "rewards"),
        (dict(rewards=torch.randn(6), group_size=4), "group_size"),
        (dict(rewards=torch.randn(6), group_size=0), "group_size"),
        (dict(rewards=torch.randn(6)), "group_index / group_size"),
        (
            dict(rewards=torch.randn(6), group_size=2, group_index=torch.zeros(6, dtype=torch.long)),
            "group_index / group_size",
        ),
        (dict(rewards=torch.randn(6), group_index=torch.zeros(5, dtype=torch.long)), "group_index"),
        (dict(rewards=torch.randn(6), group_index=torch.zeros(6)), "group_index"),
        (dict(rewards=torch.randn(3), group_index=torch.tensor([0, -1, 2])), "group_index"),
        (dict(rewards=torch.randn(3), group_index=torch.tensor([0, 4, 2]), num_groups=3), "group_index"),
        (dict(rewards=torch.randn(4), group_size=2, estimator="ppo"), "estimator"),
        (dict(rewards=torch.randn(4), group_size=2, scale="global"), "scale"),
        (dict(rewards=torch.randn(4), group_size=2, eps=float("nan")), "eps"),
        (dict(rewards=torch.randn(4), group_size=2, eps=-1.0), "eps"),
        (dict(rewards=torch.randn(4), group_size=2, estimator="ngrpo", num_virtual=0), "num_virtual"),
        (dict(rewards=torch.randn(4), group_size=2, virtual_max_reward=float("inf")), "virtual_max_reward"),
        (dict(rewards=torch.randn(4), group_size=2, positive_scale=torch.ones(3)), "positive_scale"),
        (dict(rewards=torch.randn(4), group_size=2, negative_scale=float("nan")), "negative_scale"),
        (dict(rewards=torch.randn(4), group_size=2, backend="tpu"), "backend"),
        (dict(rewards=torch.randn(4), group_size=2, scale="group", whiten_weights=torch.ones(4)), "whiten_weights"),
        (dict(rewards=torch.randn(4), group_size=2, scale="whiten", whiten_weights=torch.ones(3)), "whiten_weights"),
        (
            dict(rewards=torch.randn(4), group_size=2, scale="whiten", whiten_weights=torch.ones(4, dtype=torch.long)),
            "whiten_weights",
        ),
        (dict(rewards=torch.randn(4), group_size=2, scale="whiten", whiten_weights=-torch.ones(4)), "whiten_weights"),
        (
            dict(rewards=torch.randn(4), group_size=2, scale="whiten", whiten_weights=torch.full((4,), float("inf"))),
            "whiten_weights",
        ),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nk.group_advantages(**kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    rewards = fresh((200,))
    ids = ragged_ids(200, 17)
    a = nk.group_advantages(rewards, ids, scale="whiten", backend=backend)
    b = nk.group_advantages(rewards, ids, scale="whiten", backend=backend)
    assert torch.equal(a, b)


def test_output_carries_no_gradient():
    rewards = fresh((8,)).requires_grad_()
    adv = nk.group_advantages(rewards, group_size=4)
    assert not adv.requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    from negkernels.ops.advantages import _group_advantages_op

    rewards = fresh((24,))
    ids = ragged_ids(24, 5, gaps=False)
    for args in [
        (rewards, None, 6, 4, "grpo", "group", 1e-6, 1.0, 1, 1.0, 1.0, None, None, None, backend),
        (rewards, ids, 0, 5, "ngrpo", "whiten", 1e-6, 1.0, 2, 1.0, 0.5, torch.rand(24), None, None, backend),
        (
            rewards,
            ids,
            0,
            5,
            "rloo",
            "batch",
            1e-6,
            1.0,
            1,
            1.0,
            1.0,
            None,
            None,
            torch.tensor([0.1, 2.0], dtype=torch.float64),
            backend,
        ),
    ]:
        torch.library.opcheck(_group_advantages_op.op, args)


def test_compile_fullgraph():
    torch._dynamo.reset()

    def step(r, ids):
        return nk.group_advantages(r, ids, num_groups=6, validate=False, backend="reference") * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    r, ids = fresh((30,)), ragged_ids(30, 6, gaps=False)
    assert_close(compiled(r, ids), step(r, ids), **OUTPUT_TOLERANCE)


# --------------------------------------------------------------------------------------------
# DisCO / DRPO


def disco_loop_oracle(scores, correct, ids, tau, mode, weights=None):
    s = upcast(scores).tolist()
    w = [1.0] * len(s) if weights is None else upcast(weights).tolist()
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(ids.tolist()):
        groups.setdefault(g, []).append(i)
    total = 0.0
    for members in groups.values():
        pos = [i for i in members if correct[i]]
        neg = [i for i in members if not correct[i]]
        if not pos or not neg:
            continue
        p = sum(w[i] * s[i] for i in pos) / sum(w[i] for i in pos)
        if mode == "disco":
            q = tau * math.log(sum(math.exp(s[i] / tau) for i in neg))
        else:
            q = sum(s[i] for i in neg) / len(neg)
        total += p - q
    return -total / len(groups)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["disco", "disco_b"])
@pytest.mark.parametrize("weighted", [False, True])
def test_discriminative_loss_matches_loop_oracle(backend, mode, weighted):
    n = 37
    scores = fresh((n,), scale=3.0)
    correct = torch.rand(n) > 0.5
    ids = ragged_ids(n, 8)
    weights = torch.rand(n) + 0.1 if weighted else None
    with poisoned_allocations():
        loss = nk.group_discriminative_loss(scores, correct, ids, tau=0.7, mode=mode, weights=weights, backend=backend)
    expected = disco_loop_oracle(scores, correct, ids, 0.7, mode, weights)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected) <= 1e-5 * max(1.0, abs(expected))


@pytest.mark.parametrize("mode", ["disco", "disco_b"])
def test_discriminative_loss_gradcheck(mode):
    n = 14
    scores = fresh((n,), torch.float64).requires_grad_()
    correct = torch.tensor([True, False] * 7)
    ids = torch.tensor([0, 0, 0, 2, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5])
    weights = torch.rand(n, dtype=torch.float64) + 0.1
    torch.autograd.gradcheck(
        lambda s: nk.group_discriminative_loss(
            s, correct, ids, tau=2.0, mode=mode, weights=weights, backend="reference"
        ),
        (scores,),
    )


def test_discriminative_loss_edge_cases():
    scores = fresh((6,)).requires_grad_()
    # No group has both kinds: loss 0 and zero gradient, never NaN.
    loss = nk.group_discriminative_loss(scores, torch.tensor([True] * 6), torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert loss.item() == 0 and torch.equal(scores.grad, torch.zeros(6))
    # Gradient comes back in the scores' dtype.
    s16 = fresh((6,), torch.bfloat16).requires_grad_()
    nk.group_discriminative_loss(s16, torch.tensor([True, False] * 3), torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    assert s16.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="tau"):
        nk.group_discriminative_loss(scores, torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.long), tau=0.0)
    with pytest.raises(TypeError, match="correct"):
        nk.group_discriminative_loss(scores, torch.ones(6), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="mode"):
        nk.group_discriminative_loss(
            scores, torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.long), mode="x"
        )
    with pytest.raises(nk.BackendUnavailable, match="cuda"):
        nk.group_discriminative_loss(
            scores, torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.long), backend="cuda"
        )
    with pytest.raises(ValueError, match="group_index"):
        nk.group_discriminative_loss(
            scores, torch.ones(6, dtype=torch.bool), torch.tensor([0, 1, 2, 3, 4, 5]), num_groups=3
        )


@pytest.mark.parametrize("mode", ["disco", "disco_b"])
@pytest.mark.parametrize("case", ["ragged", "large groups", "bf16 strided", "unvalidated ids"])
def test_discriminative_kernel_gradient_against_float64(mode, case):
    """The Triton kernel's loss and its one-launch gradient against the float64 reference's autograd."""
    n, groups = (2053, 9) if case == "large groups" else (61, 13)
    scores = fresh(
        (n,),
        scale=2.0,
        noncontiguous=case == "bf16 strided",
        dtype=torch.bfloat16 if case == "bf16 strided" else torch.float32,
    )
    correct = torch.rand(n) > 0.4
    ids = ragged_ids(n, groups)
    weights = torch.rand(n) + 0.2
    kwargs = dict(tau=1.3, mode=mode, weights=weights)
    if case == "unvalidated ids":
        ids[[3, 17]] = torch.tensor([groups + 4, -2])
        kwargs.update(num_groups=groups, validate=False)
    x = scores.clone().requires_grad_()
    with poisoned_allocations():
        loss = nk.group_discriminative_loss(x, correct, ids, backend="triton", **kwargs)
    loss.backward()
    keep = (ids >= 0) & (ids < groups)
    x64 = upcast(scores).requires_grad_()
    want = nk.group_discriminative_loss(
        x64[keep],
        correct[keep],
        ids[keep],
        tau=1.3,
        mode=mode,
        weights=weights[keep].double(),
        num_groups=groups,
        backend="reference",
    )
    want.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == scores.dtype
    assert_close(loss, want, rtol=1e-5, atol=1e-6, what="loss")
    tol = 1e-2 if scores.dtype == torch.bfloat16 else 1e-6
    assert_close(x.grad, x64.grad, rtol=tol, atol=tol * 1e-2, what="d scores")
    if case == "unvalidated ids":
        assert x.grad[3] == 0 and x.grad[17] == 0
        ref = nk.group_discriminative_loss(scores, correct, ids, backend="reference", **kwargs)
        assert_close(ref, want, rtol=1e-5, atol=1e-6, what="reference with the same ids")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_discriminative_loss_degenerate_and_nan(backend):
    empty = torch.empty(0).requires_grad_()
    loss = nk.group_discriminative_loss(
        empty, torch.empty(0, dtype=torch.bool), torch.empty(0, dtype=torch.long), num_groups=4, backend=backend
    )
    loss.backward()
    assert float(loss.detach()) == 0 and empty.grad.shape == (0,)
    scores = fresh((8,)).requires_grad_()
    correct = torch.tensor([True, False, True, False, True, True, False, False])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # groups 2 (all correct) and 3 (all wrong) add 0
    loss = nk.group_discriminative_loss(scores, correct, ids, mode="disco_b", backend=backend)
    loss.backward()
    s = scores.detach()
    want = -((s[0] - s[1]) + (s[2] - s[3])) / 4
    torch.testing.assert_close(loss, want)
    assert torch.equal(scores.grad[4:], torch.zeros(4))
    nan = scores.detach().clone()
    nan[1] = float("nan")
    assert torch.isnan(nk.group_discriminative_loss(nan, correct, ids, backend=backend))


def test_discriminative_loss_compile_forward_backward():
    torch._dynamo.reset()
    correct = torch.tensor([True, False, True, False, False, True])
    ids = torch.tensor([0, 0, 1, 1, 1, 2])

    def loss_fn(s):
        return nk.group_discriminative_loss(s, correct, ids, num_groups=3, validate=False, tau=0.5)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    s1 = fresh((6,), torch.float64).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    compiled(s1).backward()
    loss_fn(s2).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_drpo_weights():
    lengths = torch.tensor([10, 50, 30, 80, 20, 40])
    correct = torch.tensor([True, True, False, True, False, False])
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    w = nk.drpo_positive_weights(lengths, correct, ids, max_length=100, lam=0.5)
    a, b = (1 - 0.1) / 0.5, (1 - 0.5) / 0.5
    torch.testing.assert_close(
        w,
        torch.tensor(
            [math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b)), 0, 1, 0, 0]
        ),
    )
    with pytest.raises(ValueError, match="max_length"):
        nk.drpo_positive_weights(lengths, correct, ids, max_length=0)
