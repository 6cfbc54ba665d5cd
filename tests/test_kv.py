"""KV-cache retention: scores, per-head and global selection, compaction, fused evict, retention mass.

Oracles: brute-force Python selections (sorted tuples, independent of the reference's torch
sorts); the float64 reference with autograd; explicit loops for compaction, pooling and the
retention mass; hand-worked scores and capacity losses.
"""

import math

import pytest
import torch

import negkernels as nk
from negkernels.reference.kv import (
    ATTENTION_SCORERS,
    retention_mass_reference,
    retention_scores_reference,
    select_retained_global_reference,
    select_retained_reference,
)

from .helpers import assert_close, poisoned_allocations

BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


# ============================================================================ brute-force oracles


def _row_order(scores_row, length, sink, window):
    """[(class, score key, index)] best first for one row: protected, then by score (NaN top), recent first."""
    s = len(scores_row)
    n_sink = min(sink, length)
    n_window = min(window, length - n_sink)
    items = []
    for i in range(min(length, s)):
        x = float(scores_row[i])
        klass = 2 if (i < n_sink or i >= length - n_window) else 1
        key = math.inf if math.isnan(x) else x
        nan = 1 if math.isnan(x) else 0
        items.append((klass, nan, key, i))
    return sorted(items, reverse=True)


def brute_select(scores, budget, sink=0, window=0, lengths=None):
    b, h, s = scores.shape
    m = min(budget, s)
    out = torch.full((b, h, m), -1, dtype=torch.int64)
    for bi in range(b):
        length = s if lengths is None else max(0, min(int(lengths[bi]), s))
        for hi in range(h):
            kept = sorted(item[-1] for item in _row_order(scores[bi, hi].tolist(), length, sink, window)[:m])
            out[bi, hi, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
    return out


def brute_select_global(scores, budget, sink, window, lengths, min_per_head):
    b, h, s = scores.shape
    m = min(budget, s)
    kept_sets = []
    for bi in range(b):
        length = s if lengths is None else max(0, min(int(lengths[bi]), s))
        pool = []
        for hi in range(h):
            order = _row_order(scores[bi, hi].tolist(), length, sink, window)
            for rank, (klass, nan, key, i) in enumerate(order):
                forced = 1 if (klass == 2 or rank < min_per_head) else 0
                pool.append((forced, nan, key, i, -hi))
        pool.sort(reverse=True)
        kept_sets.append({(-item[4], item[3]) for item in pool[: h * m]})
    return kept_sets


def random_scores(b, h, s, *, ties=True, specials=True):
    if ties:
        scores = torch.randint(-3, 4, (b, h, s)).float()
    else:
        scores = torch.randn(b, h, s)
    if specials and s > 4:
        flat = scores.view(-1)
        picks = torch.randperm(flat.numel())[:6]
        for p, value in zip(picks.tolist(), [math.nan, math.inf, -math.inf, -0.0, 0.0, math.nan]):
            flat[p] = value
    return scores


# ============================================================================ scores


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_retention_scores_parity_and_grad(backend, dtype):
    b, h, s, d = 2, 3, 45, 7
    log_beta = (-torch.rand(b, h, s) * 0.5).to(dtype).requires_grad_()
    positions = torch.randint(0, 1000, (b, h, 2 * s))[..., ::2]  # per-head positions, strided
    keys = torch.randn(b, h, s, d).to(dtype).requires_grad_()
    step = torch.tensor([1000, 1234])
    with poisoned_allocations():
        out = nk.retention_scores(log_beta, positions, step, keys=keys, key_norm_weight=0.3, backend=backend)
    lb64 = log_beta.detach().double().requires_grad_()
    k64 = keys.detach().double().requires_grad_()
    expected = (step.double().view(b, 1, 1) - positions.double()) * lb64 + 0.3 * torch.log(k64.norm(dim=-1))
    assert out.dtype == torch.float32
    assert_close(out, expected, rtol=1e-5, atol=1e-5, what="scores")
    g = torch.randn(b, h, s)
    out.backward(g)
    expected.backward(g.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_close(log_beta.grad, lb64.grad, **tol, what="d log_beta")
    assert_close(keys.grad, k64.grad, **tol, what="d keys")


@pytest.mark.parametrize("backend", BACKENDS)
def test_retention_scores_hand_worked_and_broadcast(backend):
    log_beta = torch.full((1, 2, 4), math.log(0.5))
    positions = torch.tensor([0, 1, 2, 3])  # shared by every head
    out = nk.retention_scores(log_beta, positions, 5, backend=backend)
    expected = torch.tensor([5.0, 4.0, 3.0, 2.0]) * math.log(0.5)  # β^(step − pos) in log space
    torch.testing.assert_close(out, expected.expand(1, 2, 4))
    out = nk.retention_scores(log_beta, positions.float() + 0.5, 5, backend=backend)
    torch.testing.assert_close(out, (expected - 0.5 * math.log(0.5)).expand(1, 2, 4))
    assert nk.retention_scores(torch.zeros(2, 3, 0), torch.zeros(0), 1, backend=backend).shape == (2, 3, 0)


def test_key_norm_and_keydiff_scores():
    keys = torch.tensor([[[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]]])
    torch.testing.assert_close(nk.key_norm_scores(keys), torch.tensor([[[-5.0, -1.0, -2.0]]]))
    # unit keys: (0.6, 0.8), (1, 0), (0, 1); anchor ∝ their mean (1.6, 1.8)/3
    anchor = torch.tensor([1.6, 1.8]) / math.hypot(1.6, 1.8)
    expected = -torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]) @ anchor
    torch.testing.assert_close(nk.keydiff_scores(keys), expected.view(1, 1, 3))


def test_attention_scores_against_loops():
    b, hq, hkv, w, s, kernel = 2, 6, 2, 3, 11, 5
    attn = torch.rand(b, hq, w, s).double()
    group = hq // hkv
    got = {m: nk.attention_scores(attn, hkv, m, pool_kernel=kernel) for m in ATTENTION_SCORERS}
    prefix = s - w
    for bi in range(b):
        tova_all = [sum(attn[bi, hh, -1, j].item() for hh in range(hq)) / hq for j in range(s)]
        for g in range(hkv):
            heads = range(g * group, (g + 1) * group)
            mean = [sum(attn[bi, hh, q, j].item() for hh in heads for q in range(w)) / (group * w) for j in range(s)]
            for j in range(s):
                window = [mean[i] for i in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= i < s]
                assert got["snapkv_whole_row"][bi, g, j].item() == pytest.approx(sum(window) / len(window), rel=1e-12)
                if j < prefix:  # SnapKV: the prefix alone, zero padding counted in every window
                    inside = [mean[i] for i in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= i < prefix]
                    assert got["snapkv"][bi, g, j].item() == pytest.approx(sum(inside) / kernel, rel=1e-12)
                else:
                    assert got["snapkv"][bi, g, j].item() == math.inf
                assert got["tova"][bi, g, j].item() == pytest.approx(tova_all[j], rel=1e-12)
                assert got["tova_grouped"][bi, g, j].item() == pytest.approx(
                    sum(attn[bi, hh, -1, j].item() for hh in heads) / group, rel=1e-12
                )
                total = sum(attn[bi, hh, q, j].item() for hh in heads for q in range(w)) / group
                assert got["h2o"][bi, g, j].item() == pytest.approx(total, rel=1e-12)
                seen = sum(1 for q in range(w) if j <= s - w + q)  # causal: query s − w + q sees j ≤ s − w + q
                assert got["h2o_normalized"][bi, g, j].item() == pytest.approx(total / seen, rel=1e-12)


# ============================================================================ selection


SELECT_CASES = [
    # (b, h, s, budget, sink, window, lengths)
    (2, 3, 37, 10, 2, 3, None),
    (1, 1, 1, 1, 0, 0, None),
    (3, 2, 50, 13, 0, 0, [50, 7, 0]),
    (2, 5, 70, 70, 1, 1, None),  # budget = S: keep everything
    (1, 2, 33, 100, 0, 0, [40]),  # budget > S, length clamped
    (2, 2, 29, 0, 0, 0, None),  # budget 0
    (2, 3, 64, 8, 0, 8, [64, 30]),  # only the window
    (1, 3, 300, 17, 4, 4, [257]),  # several blocks per row on the interpreter
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_retained_against_brute_force(backend, case):
    b, h, s, budget, sink, window, lengths = case
    scores = random_scores(b, h, s, ties=bool(torch.randint(0, 2, ()).item()))
    noncontig = torch.empty(b, h, s, 2)
    noncontig[..., 1] = scores
    scores = noncontig[..., 1]
    lengths_t = torch.tensor(lengths) if lengths is not None else None
    with poisoned_allocations():
        out = nk.select_retained(scores, budget, sink=sink, window=window, lengths=lengths_t, backend=backend)
    expected = brute_select(scores, budget, sink, window, lengths)
    assert out.dtype == torch.int64 and out.shape == expected.shape
    assert torch.equal(out, expected), (out, expected)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed or TRITON_INTERPRET is off")
@pytest.mark.parametrize(
    "case, splits, ties",
    [
        ((2, 3, 37, 10, 2, 3, None), 3, True),
        ((3, 2, 50, 13, 0, 0, [50, 7, 0]), 3, True),
        ((2, 3, 64, 8, 0, 8, [64, 30]), 3, False),  # only the window
        ((2, 2, 29, 0, 0, 0, None), 3, False),  # budget 0
        ((1, 1, 300, 17, 4, 4, [257]), 19, True),  # more splits than one block of their histograms
        ((1, 2, 300, 40, 1, 2, None), 19, False),
    ],
)
def test_select_retained_split_rows_against_brute_force(monkeypatch, case, splits, ties):
    # Rows shared by several programs (the few-long-rows launch): every split's histograms
    # give all programs the same digits, and each split's first slot counts what came before.
    import negkernels.triton.kv as tk

    monkeypatch.setattr(tk, "select_splits", lambda rows, seq, sms: splits)
    b, h, s, budget, sink, window, lengths = case
    scores = random_scores(b, h, s, ties=ties)
    lengths_t = torch.tensor(lengths) if lengths is not None else None
    with poisoned_allocations():
        out = nk.select_retained(scores, budget, sink=sink, window=window, lengths=lengths_t, backend="triton")
    assert torch.equal(out, brute_select(scores, budget, sink, window, lengths)), (out, scores)
    keys, values = torch.randn(b, h, s, 8).bfloat16(), torch.randn(b, h, s, 8).bfloat16()
    log_beta = (-torch.rand(b, h, s) * 0.05).bfloat16()
    positions = torch.randint(0, 300, (b, h, s))
    with poisoned_allocations():
        kept = nk.evict(
            keys,
            values,
            log_beta,
            positions,
            301,
            budget,
            sink=sink,
            window=window,
            lengths=lengths_t,
            backend="triton",
        )
    indices = brute_select(
        retention_scores_reference(log_beta, positions, 301, keys, 0.0), budget, sink, window, lengths
    )
    assert torch.equal(kept.indices, indices)
    assert torch.equal(kept.keys, loop_compact(keys, indices))


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_retained_hand_worked(backend):
    scores = torch.tensor([[[5.0, 1.0, 3.0, 3.0, 0.0, 3.0, 2.0]]])
    # budget 4, sink 1, window 1: keeps 0 and 6, then the best two of 1..5: 3.0 at 2, 3, 5 → the recent 3 and 5
    out = nk.select_retained(scores, 4, sink=1, window=1, backend=backend)
    assert out.tolist() == [[[0, 3, 5, 6]]]
    out = nk.select_retained(scores, 3, lengths=torch.tensor([2]), backend=backend)
    assert out.tolist() == [[[0, 1, -1]]]
    assert nk.select_retained(torch.zeros(1, 2, 0), 5, backend=backend).shape == (1, 2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("min_per_head", [0, 2, 6])
def test_select_retained_global_against_brute_force(min_per_head, backend):
    b, h, s, budget, sink, window = 3, 4, 23, 6, 1, 2
    scores = random_scores(b, h, s)
    scores[0, 0] += 100  # one head dominates: the floor decides what the others keep
    lengths = torch.tensor([23, 5, 0])
    with poisoned_allocations():
        sel = nk.select_retained(
            scores,
            budget,
            sink=sink,
            window=window,
            lengths=lengths,
            mode="global",
            min_per_head=min_per_head,
            backend=backend,
        )
    expected = brute_select_global(scores, budget, sink, window, lengths, min_per_head)
    cu = sel.cu_seqlens.long()
    assert cu[0] == 0 and torch.equal(cu[1:] - cu[:-1], sel.counts.reshape(-1))
    for bi in range(b):
        got = set()
        for hi in range(h):
            seg = sel.indices[cu[bi * h + hi] : cu[bi * h + hi + 1]]
            assert torch.all(seg[1:] > seg[:-1]), "indices ascending within a head"
            got |= {(hi, int(i)) for i in seg}
        assert got == expected[bi]
    assert torch.all(sel.indices[cu[-1] :] == -1)
    assert sel.counts[0].sum() == h * budget
    assert torch.all(sel.counts[1] == 5) and torch.all(sel.counts[2] == 0)
    assert torch.all(sel.counts[0] >= min(min_per_head, budget))


def _global_sets(sel, b, h):
    cu = sel.cu_seqlens.long()
    return [
        {(hi, int(i)) for hi in range(h) for i in sel.indices[cu[bi * h + hi] : cu[bi * h + hi + 1]]} for bi in range(b)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_retained_global_ties_go_to_recent_then_lower_head(backend):
    # head 0: [−2, −2], head 1: [0, −2], budget 1 (two pairs kept): (1, 0) by score, then of the
    # three −2 ties the most recent token, t = 1, of the lower head, 0.
    scores = torch.tensor([[[-2.0, -2.0], [0.0, -2.0]]])
    sel = nk.select_retained(scores, 1, mode="global", backend=backend)
    assert _global_sets(sel, 1, 2) == [{(1, 0), (0, 1)}]
    assert sel.counts.tolist() == [[1, 1]] and sel.indices.tolist() == [1, 0]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_select_retained_global_kernel_on_many_small_rows(backend):
    # heavy ties, NaN and ±inf, short and empty sequences, every option
    gen = torch.Generator().manual_seed(7)
    for trial in range(30):
        b, h, s = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 4), (1, 6), (1, 37)))
        budget = int(torch.randint(1, s + 3, (), generator=gen))
        sink, window = (int(torch.randint(0, 3, (), generator=gen)) for _ in range(2))
        if sink + window > budget:
            sink = window = 0
        min_per_head = int(torch.randint(0, budget + 1, (), generator=gen))
        scores = torch.randint(-2, 3, (b, h, s), generator=gen).float()
        scores.view(-1)[torch.randint(0, b * h * s, (3,), generator=gen)] = torch.tensor(
            [float("nan"), float("inf"), -float("inf")]
        )
        lengths = torch.randint(0, s + 2, (b,), generator=gen) if trial % 2 else None
        kwargs = dict(sink=sink, window=window, lengths=lengths, mode="global", min_per_head=min_per_head)
        with poisoned_allocations():
            got = nk.select_retained(scores, budget, backend=backend, **kwargs)
        want = nk.select_retained(scores, budget, backend="reference", **kwargs)
        for name, x, y in zip(got._fields, got, want):
            assert torch.equal(x, y), (trial, name, x, y)
        assert _global_sets(got, b, h) == brute_select_global(scores, budget, sink, window, lengths, min_per_head)


# ============================================================================ compaction and evict


def loop_compact(x, indices):
    out = torch.zeros(*indices.shape, *x.shape[3:], dtype=x.dtype)
    for bi in range(indices.shape[0]):
        for hi in range(indices.shape[1]):
            for j, i in enumerate(indices[bi, hi].tolist()):
                if i >= 0:
                    out[bi, hi, j] = x[bi, hi, i]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_kv_against_loops(backend, dtype):
    b, h, s, d, dv = 2, 3, 41, 9, 6
    keys = torch.randn(b, h, s, 2 * d).to(dtype)[..., ::2]  # strided head dim
    values = torch.randn(b, h, s, dv).to(dtype)
    positions = torch.randint(0, 10_000, (b, h, s))
    log_beta = -torch.rand(b, h, s)
    indices = nk.select_retained(torch.randn(b, h, s), 12, lengths=torch.tensor([41, 9]))
    with poisoned_allocations():
        k, v, pos, lb = nk.compact_kv(keys, values, indices, positions, log_beta, backend=backend)
    for got, src in ((k, keys), (v, values), (pos, positions), (lb, log_beta)):
        assert got.dtype == src.dtype
        assert torch.equal(got, loop_compact(src, indices))
    shared = torch.arange(s)  # broadcast positions
    _, _, pos = nk.compact_kv(keys, values, indices, shared, backend=backend)
    assert torch.equal(pos, loop_compact(shared.expand(b, h, s), indices))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_kv_gradient_scatters_back(backend):
    keys = torch.randn(2, 2, 19, 5, dtype=torch.float64 if backend == "reference" else torch.float32).requires_grad_()
    values = torch.randn(2, 2, 19, 4, dtype=keys.dtype).requires_grad_()
    indices = nk.select_retained(torch.randn(2, 2, 19), 7, lengths=torch.tensor([19, 3]))
    k, v = nk.compact_kv(keys, values, indices, backend=backend)
    gk, gv = torch.randn_like(k), torch.randn_like(v)
    (k * gk).sum().add((v * gv).sum()).backward()
    expected = torch.zeros_like(keys)
    for bi in range(2):
        for hi in range(2):
            for j, i in enumerate(indices[bi, hi].tolist()):
                if i >= 0:
                    expected[bi, hi, i] = gk[bi, hi, j]
    assert torch.equal(keys.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_kv_in_place(backend):
    b, h, s, d = 2, 3, 150, 8
    keys, values = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    positions = torch.randint(0, 999, (b, h, s))
    indices = nk.select_retained(torch.randn(b, h, s), 90, lengths=torch.tensor([150, 60]))
    expected = [loop_compact(x, indices) for x in (keys, values, positions)]
    k, v, pos = nk.compact_kv_(keys, values, indices, positions, backend=backend)
    assert k.data_ptr() == keys.data_ptr() and k.shape == (b, h, 90, d)
    for got, want in zip((k, v, pos), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_norm_weight", [0.0, 0.5])
def test_evict_equals_score_select_compact(backend, key_norm_weight):
    b, h, s, d = 2, 3, 77, 16
    keys, values = torch.randn(b, h, s, d).bfloat16(), torch.randn(b, h, s, d).bfloat16()
    log_beta = (-torch.rand(b, h, s) * 0.05).bfloat16()
    positions = torch.randint(0, 300, (b, h, s))
    step = torch.tensor([300, 310])
    lengths = torch.tensor([77, 40])
    with poisoned_allocations():
        kept = nk.evict(
            keys,
            values,
            log_beta,
            positions,
            step,
            20,
            sink=2,
            window=3,
            lengths=lengths,
            key_norm_weight=key_norm_weight,
            backend=backend,
        )
    scores = retention_scores_reference(log_beta, positions, step, keys, key_norm_weight)
    indices = brute_select(scores, 20, 2, 3, lengths)
    assert torch.equal(kept.indices, indices)
    for got, src in ((kept.keys, keys), (kept.values, values), (kept.log_beta, log_beta), (kept.positions, positions)):
        assert torch.equal(got, loop_compact(src, indices))
    everything = nk.evict(keys, values, log_beta, positions, 300, s + 5, backend=backend)
    assert torch.equal(everything.keys, keys) and torch.equal(everything.indices, torch.arange(s).expand(b, h, s))


# ============================================================================ retention mass


def loop_mass(log_beta_row, cu):
    t = len(log_beta_row)
    starts = [0] * t
    for a, z in zip(cu[:-1], cu[1:]):
        for i in range(a, z):
            starts[i] = a
    return [sum(math.exp((ti - i) * log_beta_row[i]) for i in range(starts[ti], ti + 1)) for ti in range(t)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_retention_mass_parity_and_grad(backend, packed):
    b, h, t = 2, 3, 150
    lb = (-torch.rand(b, h, t) * 0.2).requires_grad_()
    cu = torch.tensor([0, 37, 37, 101, 150]) if packed else None
    with poisoned_allocations():
        mass = nk.retention_mass(lb, cu, backend=backend)
    lb64 = lb.detach().double().requires_grad_()
    expected = retention_mass_reference(lb64, cu)
    row = loop_mass(lb64[1, 2].tolist(), cu.tolist() if packed else [0, t])
    torch.testing.assert_close(expected[1, 2], torch.tensor(row, dtype=torch.float64), rtol=1e-12, atol=0)
    assert mass.dtype == torch.float32
    assert_close(mass, expected, rtol=1e-5, atol=1e-6, what="mass")
    g = torch.randn(b, h, t)
    mass.backward(g)
    expected.backward(g.double())
    assert_close(lb.grad, lb64.grad, rtol=1e-4, atol=1e-4 * lb64.grad.abs().max().item(), what="d log_beta")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_retention_mass_long_rows_reach_every_tile_kind(backend, packed):
    # 1,000+ steps: the kernels' unmasked blocks, the backward's carried powers over several
    # reseeds (8 blocks of 64 each), sequence starts and ends inside blocks and on block edges,
    # gates near 1 (terms stay large over hundreds of steps), β = 1 and β = 0.
    t = 1153
    lb = torch.nn.functional.logsigmoid(torch.randn(2, t) * 2 + 5)
    lb[0, 100] = 0.0
    lb[1, 700] = -math.inf
    lb = lb.requires_grad_()
    cu = torch.tensor([0, 64, 611, 640, 1153]) if packed else None
    with poisoned_allocations():
        mass = nk.retention_mass(lb, cu, backend=backend)
    lb64 = lb.detach().double().requires_grad_()
    expected = retention_mass_reference(lb64, cu)
    assert_close(mass, expected, rtol=2e-5, atol=1e-6, what="mass")
    g = torch.randn(2, t)
    mass.backward(g)
    expected.backward(g.double())
    assert torch.isfinite(lb.grad).all()
    assert_close(lb.grad, lb64.grad, rtol=1e-4, atol=1e-5 * lb64.grad.abs().max().item(), what="d log_beta")


@pytest.mark.parametrize("backend", BACKENDS)
def test_retention_capacity_loss_hand_worked(backend):
    # β = 1 everywhere: mass_t = t (1-based), so the loss is mean_t max(0, t − budget)/t.
    t, budget = 10, 4.0
    loss = nk.retention_capacity_loss(torch.zeros(1, t), budget, backend=backend)
    expected = sum(max(0.0, k - budget) / k for k in range(1, t + 1)) / t
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # packed: two sequences of 3 and 7; positions restart at 1
    loss = nk.retention_capacity_loss(torch.zeros(t), 2.0, torch.tensor([0, 3, 10]), backend=backend)
    terms = [max(0.0, k - 2.0) / k for k in (1, 2, 3, 1, 2, 3, 4, 5, 6, 7)]
    assert loss.item() == pytest.approx(sum(terms) / t, rel=1e-6)
    lb = (-torch.rand(2, 40) * 0.1).requires_grad_()
    nk.retention_capacity_loss(lb, 5.0, backend=backend).backward()
    assert torch.all(lb.grad >= 0) and lb.grad.abs().sum() > 0  # a larger β only adds mass, so the loss grows
    assert nk.retention_capacity_loss(torch.zeros(3, 0), 1.0, backend=backend).item() == 0.0


# ============================================================================ bad input and machinery


def test_bad_input():
    scores = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="budget"):
        nk.select_retained(scores, -1)
    with pytest.raises(ValueError, match="sink \\+ window"):
        nk.select_retained(scores, 4, sink=3, window=2)
    with pytest.raises(ValueError, match="scores"):
        nk.select_retained(torch.randn(3, 10), 4)
    with pytest.raises(ValueError, match="lengths"):
        nk.select_retained(scores, 4, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="min_per_head"):
        nk.select_retained(scores, 4, mode="global", min_per_head=5)
    with pytest.raises(ValueError, match="mode"):
        nk.select_retained(scores, 4, mode="ragged")
    keys, values = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    with pytest.raises(ValueError, match="values"):
        nk.compact_kv(keys, torch.randn(2, 3, 9, 4), torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="indices"):
        nk.compact_kv(keys, values, torch.zeros(2, 3, 11, dtype=torch.long))
    with pytest.raises(TypeError, match="indices"):
        nk.compact_kv(keys, values, torch.zeros(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="extras\\[0\\]"):
        nk.compact_kv(keys, values, torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(5))
    with pytest.raises(ValueError, match="positions"):
        nk.retention_scores(scores, torch.zeros(4), 3)
    with pytest.raises(ValueError, match="step"):
        nk.retention_scores(scores, torch.zeros(10), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="log_beta"):
        nk.evict(keys, values, torch.randn(2, 3, 9), torch.zeros(10), 3, 4)
    with pytest.raises(ValueError, match="positions: expected a tensor on cpu"):
        nk.evict(keys, values, scores, torch.zeros(10, device="meta"), 3, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        nk.attention_scores(torch.rand(1, 6, 2, 5), 4)
    with pytest.raises(ValueError, match="pool_kernel"):
        nk.attention_scores(torch.rand(1, 6, 2, 5), 3, pool_kernel=4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        nk.retention_mass(torch.zeros(5), torch.tensor([0]))
    with pytest.raises(ValueError, match="budget"):
        nk.retention_capacity_loss(torch.zeros(5), -1.0)


def test_nan_scores_are_kept_first():
    scores = torch.tensor([[[0.5, math.nan, 2.0, -1.0]]])
    for backend in BACKENDS:
        assert nk.select_retained(scores, 1, backend=backend).tolist() == [[[1]]]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_and_compile(backend):
    b, h, s, d = 2, 2, 21, 4
    keys, values = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    log_beta, positions = -torch.rand(b, h, s), torch.arange(s).expand(b, h, s)
    scores = torch.randn(b, h, s)
    torch.library.opcheck(torch.ops.negkernels.select_retained.default, (scores, 7, 1, 1, None, backend))
    indices = nk.select_retained(scores, 7)
    torch.library.opcheck(torch.ops.negkernels.compact_kv.default, (keys, values, indices, [log_beta]))
    torch.library.opcheck(
        torch.ops.negkernels.evict.default,
        (keys, values, log_beta, positions.contiguous(), None, 30, 7, 1, 1, None, backend),
    )
    torch.library.opcheck(torch.ops.negkernels.retention_mass_fwd.default, (log_beta.requires_grad_(), None))

    def run(k, v, lb):
        return nk.evict(k, v, lb, positions, 30, 7, sink=1, backend=backend)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(keys, values, log_beta.detach()), run(keys, values, log_beta.detach())):
        assert torch.equal(got, want)


def test_reference_selection_is_its_own_oracle_too():
    # the torch-sort reference and the brute force agree on wide random rows (ties, NaN, ±inf)
    scores = random_scores(3, 4, 500)
    lengths = torch.tensor([500, 123, 1])
    assert torch.equal(select_retained_reference(scores, 64, 3, 5, lengths), brute_select(scores, 64, 3, 5, lengths))
    ind, counts, cu = select_retained_global_reference(scores, 10, 0, 0, None, 2)
    assert counts.sum() == 3 * 4 * 10
