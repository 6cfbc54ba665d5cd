"""InfoNCE against a memory bank, top-k hard negatives, MoCHi mixes and the ring-buffer bank.

Oracles: the float64 reference (concatenated logits + masked log-sum-exp, with autograd);
hand-worked losses; least-squares reconstruction of MoCHi mixes from the hardest negatives; a
Python list model of the ring buffer.
"""

import itertools
import math

import pytest
import torch

import negkernels as nk
from negkernels.reference.contrastive import bank_info_nce_reference, bank_topk_reference

from .helpers import assert_close, poisoned_allocations

BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


def assert_close_scaled(actual, expected, rtol, what):
    """|a − e| ≤ rtol·(|e| + 1e-2·max|e|): relative, with a floor for entries that cancel to ~0."""
    expected = expected.detach().double()
    floor = 1e-2 * expected.abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=rtol * floor + 1e-12, what=what)


def grad_rtol(dtype, d=24):
    # fp32's rounding of a logit grows with the dot product's length D (linearly at worst), and
    # the softmax carries it into every gradient: at D = 530 one entry in ~10^4 of d query landed
    # 2.7x past the D-free tolerance. The half dtypes' input rounding dwarfs that.
    scale = max(1.0, d / 128) if dtype == torch.float32 else 1.0
    return {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype] * scale


def assert_bank_and_tau_grads(opts, dtype, bank, bank64, tau, tau64, d=24):
    """d bank (None unless the bank requires grad) and d temperature (with a learnable τ) against float64."""
    rtol = grad_rtol(dtype, d)
    if opts.get("bank_grad"):
        assert_close_scaled(bank.grad, bank64.grad, rtol, "d bank")
    else:
        assert bank.grad is None
    if opts.get("learnable_tau"):
        assert_close_scaled(tau.grad, tau64.grad, 1e-4 if dtype == torch.float32 else rtol, "d temperature")


def make_inputs(n, k, d, m, dtype, *, noncontiguous=False, scale=1.0):
    def draw(*shape):
        if noncontiguous:
            return (torch.randn(*shape[:-1], 2 * shape[-1]) * scale)[..., 1::2].to(dtype)
        return (torch.randn(*shape) * scale).to(dtype)

    return draw(n, d), draw(n, d), draw(k, d), draw(n, m, d) if m else None


# Each case covers several options at once; together they cover every option and combination
# that changes the kernel's code path.
CASES = {
    "plain": dict(),
    "exclude-ids-filled-count": dict(false_negatives="exclude", ids=True, bank_valid=61),
    "positive-ids-mask": dict(false_negatives="positive", ids=True, bank_valid="mask"),
    "ignore-ids-normalize": dict(false_negatives=None, ids=True, normalize=True),
    "normalize-positive-extras": dict(normalize=True, false_negatives="positive", ids=True, extra=3),
    "extras-learnable-tau": dict(extra=4, learnable_tau=True, bank_valid=77),
    "normalize-tau-bankgrad-noncontig": dict(
        normalize=True, learnable_tau=True, bank_grad=True, noncontiguous=True, ids=True, bank_valid="mask"
    ),
    "bankgrad-exclude-extras-grad": dict(bank_grad=True, ids=True, extra=2, extra_grad=True),
}


def run_case(case, backend, dtype, n=37, k=101, d=24, reduction="none"):
    opts = CASES[case]
    q, p, b, e = make_inputs(
        n,
        k,
        d,
        opts.get("extra", 0),
        dtype,
        noncontiguous=opts.get("noncontiguous", False),
        scale=1.0 if opts.get("normalize") else 0.4,
    )
    kwargs = dict(normalize=opts.get("normalize", False), false_negatives=opts.get("false_negatives", "exclude"))
    if opts.get("ids"):
        # few distinct ids so that every mode has false negatives to act on
        kwargs.update(query_ids=torch.randint(0, 6, (n,)), bank_ids=torch.randint(0, 6, (k,)))
    valid = opts.get("bank_valid")
    kwargs["bank_valid"] = torch.rand(k) > 0.3 if valid == "mask" else valid
    tau_value = 0.3 + 0.2 * torch.rand(()).item()
    tau = torch.tensor(tau_value, requires_grad=True) if opts.get("learnable_tau") else tau_value

    q_, p_ = q.clone().requires_grad_(), p.clone().requires_grad_()
    b_ = b.clone().requires_grad_(opts.get("bank_grad", False))
    e_ = e.clone().requires_grad_(opts.get("extra_grad", False)) if e is not None else None
    with poisoned_allocations():
        loss = nk.bank_info_nce(
            q_, p_, b_, temperature=tau, extra_negatives=e_, reduction=reduction, backend=backend, **kwargs
        )
    grad_out = torch.rand(loss.shape) + 0.5
    (loss * grad_out).sum().backward()

    tau64 = torch.tensor(tau_value, dtype=torch.float64, requires_grad=True) if opts.get("learnable_tau") else tau_value
    q64, p64, b64 = (x.double().requires_grad_() for x in (q, p, b))
    e64 = e.double().requires_grad_() if e is not None else None
    ref = bank_info_nce_reference(q64, p64, b64, tau64, extra_negatives=e64, reduction=reduction, **kwargs)
    (ref * grad_out.double()).sum().backward()

    assert loss.dtype == torch.float32
    assert_close_scaled(loss, ref, 1e-5, "loss")
    rtol = grad_rtol(dtype, d)
    for name, got, want in [("d query", q_, q64), ("d positive", p_, p64)]:
        assert got.grad.dtype == dtype
        assert_close_scaled(got.grad, want.grad, rtol, name)
    assert_bank_and_tau_grads(opts, dtype, b_, b64, tau, tau64, d)
    if opts.get("extra_grad"):
        assert_close_scaled(e_.grad, e64.grad, rtol, "d extras")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bank_info_nce_parity_fp32(backend, case):
    run_case(case, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case", ["positive-ids-mask", "normalize-tau-bankgrad-noncontig", "bankgrad-exclude-extras-grad"]
)
def test_bank_info_nce_parity_half(backend, dtype, case):
    run_case(case, backend, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (17, 64, 16), (65, 150, 33), (3, 200, 130)])
def test_bank_info_nce_shapes(backend, n, k, d):
    # odd sizes on both sides of the block sizes, one-element blocks, D above a power of two; the
    # bank splits into 1, 2 or 3 ranges whose partial results are merged
    run_case("bankgrad-exclude-extras-grad", backend, torch.float32, n=n, k=k, d=d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_example(backend):
    # τ = 1, q = e1: logits [q·k⁺, q·b1, q·b2, q·b3] = [1, 0, −1, 2].
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
    ids = dict(query_ids=torch.tensor([7]), bank_ids=torch.tensor([3, 3, 7]))
    e = math.e
    plain = nk.bank_info_nce(q, pos, bank, temperature=1.0, backend=backend)
    assert plain.item() == pytest.approx(-math.log(e / (e + 1 + 1 / e + e**2)), rel=1e-5)
    excluded = nk.bank_info_nce(q, pos, bank, temperature=1.0, false_negatives="exclude", backend=backend, **ids)
    assert excluded.item() == pytest.approx(-math.log(e / (e + 1 + 1 / e)), rel=1e-5)
    positive = nk.bank_info_nce(q, pos, bank, temperature=1.0, false_negatives="positive", backend=backend, **ids)
    assert positive.item() == pytest.approx(-math.log((e + e**2) / (e + 1 + 1 / e + e**2)), rel=1e-5)
    partly = nk.bank_info_nce(q, pos, bank, temperature=1.0, bank_valid=1, backend=backend)
    assert partly.item() == pytest.approx(-math.log(e / (e + 1)), rel=1e-5)
    # τ = 0.5 doubles every logit
    halved = nk.bank_info_nce(q, pos, bank, temperature=0.5, bank_valid=2, backend=backend)
    assert halved.item() == pytest.approx(-math.log(e**2 / (e**2 + 1 + e**-2)), rel=1e-5)
    # the gradient of the loss w.r.t. the query, by hand: (Σ_a p_a·k_a − k⁺)/τ
    q_ = q.clone().requires_grad_()
    nk.bank_info_nce(q_, pos, bank, temperature=1.0, bank_valid=2, backend=backend).backward()
    w = torch.tensor([e, 1.0, 1 / e]) / (e + 1 + 1 / e)
    keys = torch.cat([pos, bank[:2]])
    torch.testing.assert_close(q_.grad, (w @ keys - pos[0]).unsqueeze(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_banks(backend):
    n, k, d = 9, 40, 8
    q, p, b, _ = make_inputs(n, k, d, 0, torch.float32)
    q.requires_grad_()
    same = dict(query_ids=torch.zeros(n, dtype=torch.long), bank_ids=torch.zeros(k, dtype=torch.long))
    for kwargs in [
        dict(false_negatives="exclude", **same),  # every slot excluded
        dict(false_negatives="positive", **same),  # every slot a positive
        dict(bank_valid=0),
        dict(bank_valid=torch.zeros(k, dtype=torch.bool)),
    ]:
        q.grad = None
        loss = nk.bank_info_nce(q, p, b, reduction="none", backend=backend, **kwargs)
        torch.testing.assert_close(loss, torch.zeros(n), atol=1e-5, rtol=0)
        loss.sum().backward()
        torch.testing.assert_close(q.grad, torch.zeros(n, d), atol=1e-4, rtol=0)
    # an empty bank and an empty batch
    assert nk.bank_info_nce(q, p, b[:0], backend=backend).abs().item() < 1e-6
    empty = nk.bank_info_nce(q[:0], p[:0], b, backend=backend)
    assert empty.item() == 0.0
    assert nk.bank_info_nce(q[:0], p[:0], b, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unfilled_slots_are_never_read(backend):
    # NaN in the unfilled part of a bank must not reach the loss or any gradient.
    n, k, d = 6, 50, 12
    q, p, b, _ = make_inputs(n, k, d, 0, torch.float32)
    mask = torch.rand(k) > 0.5
    for valid, poisoned in [(20, torch.arange(k) >= 20), (mask, ~mask)]:
        bank = b.clone()
        bank[poisoned] = float("nan")
        bank.requires_grad_()
        q_ = q.clone().requires_grad_()
        loss = nk.bank_info_nce(q_, p, bank, bank_valid=valid, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(q_.grad).all()
        assert torch.isfinite(bank.grad).all() and (bank.grad[poisoned] == 0).all()
        clean = nk.bank_info_nce(q, p, b[~poisoned], backend=backend)
        torch.testing.assert_close(loss, clean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_used_data_propagates(backend):
    q, p, b, _ = make_inputs(4, 20, 8, 0, torch.float32)
    b[3, 2] = float("nan")
    loss = nk.bank_info_nce(q, p, b, reduction="none", backend=backend)
    assert torch.isnan(loss).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_float_vs_tensor_temperature(backend):
    q, p, b, _ = make_inputs(11, 30, 8, 0, torch.float32, scale=0.5)
    per_query = nk.bank_info_nce(q, p, b, temperature=0.2, reduction="none", backend=backend)
    torch.testing.assert_close(
        nk.bank_info_nce(q, p, b, temperature=0.2, reduction="sum", backend=backend), per_query.sum()
    )
    torch.testing.assert_close(
        nk.bank_info_nce(q, p, b, temperature=torch.tensor(0.2), backend=backend), per_query.mean()
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, reduction", [("plain", "mean"), ("normalize-tau-bankgrad-noncontig", "sum")])
def test_reduced_loss_over_many_queries(backend, case, reduction):
    # 1,100 queries: the kernel that merges the splits reduces over more than one 1,024-row
    # block; the backward reads the one incoming gradient at stride 0, times the mean's 1/N.
    run_case(case, backend, torch.float32, n=1100, k=20, d=8, reduction=reduction)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend):
    q, p, b, _ = make_inputs(40, 90, 16, 0, torch.float32)
    tau = torch.tensor(0.1, requires_grad=True)
    results = []
    for _ in range(2):
        q_ = q.clone().requires_grad_()
        loss = nk.bank_info_nce(q_, p, b, temperature=tau, backend=backend)
        loss.backward()
        results.append((loss.detach().clone(), q_.grad.clone(), tau.grad.clone()))
        tau.grad = None
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_never_allocate_the_logits_matrix(backend, monkeypatch):
    # Every tensor the kernel path allocates (outputs, partials, workspaces) is O(N·D + K·D), far
    # below the N×K logits that the reference builds.
    n, k, d = 40, 600, 8
    q, p, b, e = make_inputs(n, k, d, 2, torch.float32)
    sizes = []
    for name in ("empty", "empty_strided", "zeros", "full"):
        real = getattr(torch, name)

        def recording(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(torch, name, recording)
    q_ = q.clone().requires_grad_()
    b_ = b.clone().requires_grad_()
    nk.bank_info_nce(q_, p, b_, extra_negatives=e, normalize=True, backend=backend).backward()
    monkeypatch.undo()
    assert sizes and max(sizes) <= max(3 * n * d, k * d) < n * k


def test_bad_input():
    q, p, b, e = make_inputs(4, 10, 8, 2, torch.float32)
    ids = dict(query_ids=torch.arange(4), bank_ids=torch.arange(10))
    cases = [
        (dict(bank=b[:, :7]), ValueError, "bank"),
        (dict(bank=b.double()), TypeError, "bank"),
        (dict(positive=p[:3]), ValueError, "positive"),
        (dict(positive=p.half()), TypeError, "positive"),
        (dict(query=q.long()), TypeError, "query"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=torch.ones(2)), ValueError, "temperature"),
        (dict(query_ids=torch.arange(4)), ValueError, "query_ids and bank_ids"),
        (dict(ids=dict(query_ids=torch.arange(5), bank_ids=torch.arange(10))), ValueError, "query_ids"),
        (dict(ids=dict(query_ids=torch.arange(4), bank_ids=torch.arange(9))), ValueError, "bank_ids"),
        (dict(ids=dict(query_ids=torch.arange(4).float(), bank_ids=torch.arange(10))), TypeError, "query_ids"),
        (dict(false_negatives="drop", **ids), ValueError, "false_negatives"),
        (dict(bank_valid=11), ValueError, "bank_valid"),
        (dict(bank_valid=-1), ValueError, "bank_valid"),
        (dict(bank_valid=torch.ones(9, dtype=torch.bool)), ValueError, "bank_valid"),
        (dict(bank_valid=torch.ones(10)), ValueError, "bank_valid"),
        (dict(extra_negatives=e[:, :, :5]), ValueError, "extra_negatives"),
        (dict(extra_negatives=e.half()), TypeError, "extra_negatives"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cuda"), nk.BackendUnavailable, "cuda"),
    ]
    for change, error, name in cases:
        args = dict(query=q, positive=p, bank=b)
        kwargs = {}
        for key, value in change.items():
            if key in args:
                args[key] = value
            elif key == "ids":
                kwargs.update(value)
            else:
                kwargs[key] = value
        with pytest.raises(error, match=name):
            nk.bank_info_nce(args["query"], args["positive"], args["bank"], **kwargs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_and_compile(backend):
    q, p, b, e = make_inputs(5, 19, 16, 2, torch.float32)
    tau = torch.tensor(0.2)
    for reduction in (0, 2):  # per query, and the mean reduced inside the op
        args = (
            q.requires_grad_(),
            p,
            b,
            tau,
            e,
            torch.arange(5),
            torch.arange(19) % 5,
            None,
            15,
            "positive",
            True,
            reduction,
            None,
        )
        torch.library.opcheck(torch.ops.negkernels.bank_info_nce_fwd.default, args)
        # SupCon: no explicit positive, self slots
        args = (
            q,
            None,
            b,
            tau,
            None,
            torch.arange(5) % 3,
            torch.arange(19) % 3,
            None,
            15,
            "supcon",
            True,
            reduction,
            torch.tensor([0, 3, -1, 7, 14]),
        )
        torch.library.opcheck(torch.ops.negkernels.bank_info_nce_fwd.default, args)
    torch.library.opcheck(torch.ops.negkernels.bank_topk.default, (q.detach(), b, 4, None, 15, False))

    def step(query):
        return nk.bank_info_nce(query, p, b, temperature=0.2, bank_valid=15, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = q.detach().clone().requires_grad_()
    compiled(x).backward()
    y = q.detach().clone().requires_grad_()
    step(y).backward()
    torch.testing.assert_close(x.grad, y.grad)


# ============================================================================ bank_topk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "k,valid,normalize,dtype",
    [
        (5, None, False, torch.float32),
        (70, 100, True, torch.float32),
        (16, "mask", False, torch.bfloat16),
        (9, 4, True, torch.float32),
    ],
)
def test_bank_topk_parity(backend, dtype, k, valid, normalize):
    n, slots, d = 21, 131, 20
    q, _, b, _ = make_inputs(n, slots, d, 0, dtype)
    bank_valid = torch.rand(slots) > 0.5 if valid == "mask" else valid
    with poisoned_allocations():
        values, indices = nk.bank_topk(q, b, k, normalize=normalize, bank_valid=bank_valid, backend=backend)
    sims = bank_topk_reference(q.double(), b.double(), slots, normalize=normalize, bank_valid=bank_valid)[0]
    ref_values = sims[:, :k] if k <= slots else None
    ref_full = (
        (q.double() @ b.double().T)
        if not normalize
        else (torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(b.double(), dim=1).T)
    )
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert_close(values, ref_values, rtol=1e-5, atol=1e-5, what="values")
    found = indices >= 0
    filled = int(bank_valid.sum()) if isinstance(bank_valid, torch.Tensor) else (bank_valid or slots)
    assert found.sum(1).eq(min(k, filled)).all()
    # each index names a filled slot whose similarity is the value reported next to it
    got = ref_full.gather(1, indices.clamp_min(0))
    assert_close(values[found], got[found], rtol=1e-5, atol=1e-5, what="similarity at index")
    if isinstance(bank_valid, torch.Tensor):
        assert bank_valid[indices[found]].all()
    elif bank_valid is not None:
        assert (indices[found] < bank_valid).all()
    for row, ok in zip(indices, found):  # no slot twice
        assert row[ok].unique().numel() == int(ok.sum())
    assert torch.isneginf(values[~found]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_topk_ties_and_degenerate(backend):
    q = torch.ones(3, 4)
    b = torch.ones(10, 4)  # every similarity ties: slots come in order
    values, indices = nk.bank_topk(q, b, 4, backend=backend)
    assert (indices == torch.arange(4)).all()  # ties by the lower slot on every backend
    assert (values == 4.0).all()
    v, i = nk.bank_topk(q, b, 0, backend=backend)
    assert v.shape == i.shape == (3, 0)
    v, i = nk.bank_topk(q, b, 12, backend=backend)
    assert (i[:, 10:] == -1).all() and torch.isneginf(v[:, 10:]).all()
    v, i = nk.bank_topk(q[:0], b, 2, backend=backend)
    assert v.shape == (0, 2)
    with pytest.raises(ValueError, match="k"):
        nk.bank_topk(q, b, -1)
    with pytest.raises(ValueError, match="bank"):
        nk.bank_topk(q, b[:, :3], 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["near-floor", "rising-masked"])
def test_bank_topk_over_many_tiles(backend, order):
    # 420 slots: 7 tiles, cut into 3 splits of 3, 3 and 1 tiles, so the group maxima behind the
    # bound τ are merged across splits and the lists across tiles. "near-floor" gives the first
    # split's last tile one key just above the k-th best of its first two tiles (it belongs in
    # the answer); "rising" orders the bank by similarity to the queries, so every row's nearest
    # slots crowd into the last tiles. Oracle: a float64 stable sort of the similarities over
    # the filled slots.
    n, slots, d, k = 5, 420, 24, 60
    direction = torch.randn(d)
    q = direction + 0.3 * torch.randn(n, d)
    b = torch.randn(slots, d)
    if order == "near-floor":  # similarities exactly (row scale) × value
        q = torch.arange(1.0, n + 1)[:, None] * direction
        values = -torch.rand(slots) - 1
        values[:128] = torch.randperm(128) + 1.0  # the k-th best of the first 128 is 69
        values[128] = 69.5  # the new k-th best
        b = values[:, None] * direction
    if order == "rising-masked":
        b = b[(direction @ b.T).argsort()]
    bank_valid = torch.rand(slots) > 0.3 if order == "rising-masked" else None
    with poisoned_allocations():
        values, indices = nk.bank_topk(q, b, k, bank_valid=bank_valid, backend=backend)
    sims = q.double() @ b.double().T
    if bank_valid is not None:
        sims[:, ~bank_valid] = -math.inf
    expected = sims.sort(dim=1, descending=True, stable=True)
    assert_close(values, expected.values[:, :k], rtol=1e-6, atol=1e-6, what="values")
    assert (indices == expected.indices[:, :k]).all(), "slots (ties by the lower slot)"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["short-lists", "ties-past-short-lists", "crowded-tile", "nan-and-inf"])
def test_bank_topk_exact_path_and_many_rounds(backend, case, monkeypatch):
    # The bound-and-gather passes hand a block of rows to the exact sweep when a row's candidates
    # overflow its list (made short here, so that blocks of both kinds occur) or a similarity is
    # NaN. A tile holding every row's nearest slots costs the gather one round per candidate.
    # Oracle: the float64 reference (a stable sort: NaN first, ties by the lower slot, −inf
    # reported as missing).
    from negkernels.triton import contrastive as tc

    n, slots, d, k = 24, 420, 16, 5
    q = torch.randn(n, d)
    b = torch.randn(slots, d)
    if case.endswith("short-lists"):
        monkeypatch.setattr(tc, "topk_capacity", lambda block_k: 6)
    if case == "ties-past-short-lists":
        q, b = torch.randint(-1, 2, (n, d)).float(), torch.randint(-1, 2, (slots, d)).float()
    elif case == "crowded-tile":
        k = 40
        b[64:128] = q.mean(0) * 4 + 0.05 * torch.randn(64, d)  # one tile holds every row's nearest
    elif case == "nan-and-inf":
        b[77, 0] = math.inf  # +inf, −inf or (q = 0) NaN similarities with slot 77
        q[::3, 0] = 0.0
        q[1::3, 0] = -q[1::3, 0].abs()
    with poisoned_allocations():
        values, indices = nk.bank_topk(q, b, k, backend=backend)
    ref_values, ref_indices = bank_topk_reference(q.double(), b.double(), k)
    torch.testing.assert_close(values, ref_values.float(), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert (indices == ref_indices).all(), "slots"
    if case == "nan-and-inf":
        assert values[::3, 0].isnan().all() and (indices[::3, 0] == 77).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, d", [(torch.float32, 530), (torch.bfloat16, 1030)])
@pytest.mark.parametrize("case", ["plain", "normalize-tau-bankgrad-noncontig", "bankgrad-exclude-extras-grad"])
def test_bank_info_nce_wide_rows(backend, dtype, d, case):
    # D past 256 takes the smaller tiles that keep sm_90's shared memory enough (nce_tiles).
    run_case(case, backend, dtype, n=19, k=45, d=d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, d, k, normalize",
    [(torch.float32, 100, 200, True), (torch.bfloat16, 1030, 64, False), (torch.float16, 70, 256, False)],
)
def test_bank_topk_wide_rows_and_lists(backend, dtype, d, k, normalize):
    # Wide lists and rows walk the head dimension in chunks (topk_tiles); oracle: a float64 sort.
    q, _, b, _ = make_inputs(5, min(k + 40, 256), d, 0, dtype)  # one 256-slot tile: the interpreter sorts slowly
    values, indices = nk.bank_topk(q, b, k, normalize=normalize, backend=backend)
    q64, b64 = q.double(), b.double()
    if normalize:
        q64, b64 = torch.nn.functional.normalize(q64, dim=1), torch.nn.functional.normalize(b64, dim=1)
    sims = q64 @ b64.T
    expected = sims.sort(dim=1, descending=True, stable=True).values[:, :k]
    # The fp32 dot product's rounding grows with its length; at D = 1030 one value in a few
    # hundred lands 1e-5 past the float64 sort (measured over 200 draws: at most 2.2e-5).
    atol = 1e-5 * max(1.0, d / 256)
    assert_close(values, expected, rtol=1e-5, atol=atol, what="values")
    assert_close(values, sims.gather(1, indices), rtol=1e-5, atol=atol, what="similarity at index")
    assert all(row.unique().numel() == k for row in indices)


# ============================================================================ MoCHi


def _span_coefficients(target, a, c):
    """Least-squares x, y with target ≈ x·a + y·c, and the residual."""
    basis = torch.stack([a, c], dim=1)
    sol = torch.linalg.lstsq(basis, target.unsqueeze(1)).solution.squeeze(1)
    return sol[0].item(), sol[1].item(), (basis @ sol - target).norm().item()


def test_mochi_negatives_are_mixes_of_the_hardest():
    n, slots, d, top_n = 5, 60, 16, 4
    q = torch.randn(n, d, dtype=torch.float64)
    b = torch.randn(slots, d, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1234)
    mixes = nk.mochi_negatives(q, b, top_n=top_n, num_pair_mixes=6, num_query_mixes=5, bank_valid=45, generator=gen)
    assert mixes.shape == (n, 11, d)
    torch.testing.assert_close(mixes.norm(dim=-1), torch.ones(n, 11, dtype=torch.float64))
    _, hardest = bank_topk_reference(q, b, top_n, normalize=True, bank_valid=45)
    unit = torch.nn.functional.normalize
    for i in range(n):
        negs = unit(b[hardest[i]], dim=-1)
        qi = unit(q[i], dim=0)
        for h in mixes[i, :6]:  # α·n_a + (1 − α)·n_c for some pair of the hardest, α in (0, 1)
            fits = [_span_coefficients(h, negs[a], negs[c]) for a, c in itertools.combinations(range(top_n), 2)]
            x, y, res = min(fits, key=lambda f: f[2])
            assert res < 1e-9 and x > 0 and y > 0
        for h in mixes[i, 6:]:  # β·q + (1 − β)·n_j, β in (0, 0.5): the negative's weight is the larger
            fits = [_span_coefficients(h, qi, negs[j]) for j in range(top_n)]
            x, y, res = min(fits, key=lambda f: f[2])
            assert res < 1e-9 and 0 <= x <= y
    again = nk.mochi_negatives(
        q,
        b,
        top_n=top_n,
        num_pair_mixes=6,
        num_query_mixes=5,
        bank_valid=45,
        generator=torch.Generator().manual_seed(1234),
    )
    assert torch.equal(mixes, again)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mochi_negatives_feed_the_loss(backend):
    q, p, b, _ = make_inputs(7, 50, 16, 0, torch.float32)
    extra = nk.mochi_negatives(q, b, top_n=8, num_pair_mixes=3, num_query_mixes=2, backend=backend)
    assert not extra.requires_grad and extra.dtype == q.dtype
    loss = nk.bank_info_nce(q, p, b, extra_negatives=extra, normalize=True, backend=backend)
    ref = bank_info_nce_reference(
        q.double(), p.double(), b.double(), 0.07, normalize=True, extra_negatives=extra.double()
    )
    assert_close_scaled(loss, ref, 1e-5, "loss with MoCHi negatives")


def test_mochi_degenerate():
    q, _, b, _ = make_inputs(3, 10, 4, 0, torch.float32)
    assert nk.mochi_negatives(q, b, top_n=5, num_pair_mixes=2, num_query_mixes=2, bank_valid=0).shape == (3, 0, 4)
    one = nk.mochi_negatives(q, b, top_n=5, num_pair_mixes=2, num_query_mixes=0, bank_valid=1)
    torch.testing.assert_close(one, torch.nn.functional.normalize(b[:1], dim=-1).expand(3, 2, 4))
    with pytest.raises(ValueError, match="top_n"):
        nk.mochi_negatives(q, b, top_n=0, num_pair_mixes=1, num_query_mixes=1)


# ============================================================================ MemoryBank


def test_memory_bank_ring_buffer_matches_a_list_model():
    size, dim = 7, 3
    bank = nk.MemoryBank(size, dim, with_ids=True)
    everything, all_ids = [], []
    for batch in [2, 0, 4, 3, 9, 1, 16, 5]:
        keys = torch.randn(batch, dim)
        ids = torch.randint(0, 100, (batch,))
        mask = torch.rand(batch) > 0.3
        bank.enqueue(keys, ids=ids, mask=mask)
        everything += list(keys[mask])
        all_ids += list(ids[mask])
        total = len(everything)
        assert bank.total == total and bank.valid == min(total, size) and bank.ptr == total % size
        # key t lives in slot t mod size until overwritten: the newest `size` keys are in the bank
        for t in range(max(0, total - size), total):
            assert torch.equal(bank.buffer[t % size], everything[t])
            assert bank.ids[t % size] == all_ids[t]
    assert torch.equal(bank.filled(), bank.buffer)


def test_memory_bank_partly_filled_feeds_the_loss():
    bank = nk.MemoryBank(32, 8)
    assert (bank.buffer == 0).all() and bank.valid == 0  # never random vectors
    keys = torch.randn(10, 8)
    bank.enqueue(keys)
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    loss = nk.bank_info_nce(q, p, bank.buffer, bank_valid=bank.valid)
    torch.testing.assert_close(loss, bank_info_nce_reference(q, p, keys, 0.07))


def test_memory_bank_state_dict_resumes_bit_identically():
    stream = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 9, (5,))) for _ in range(9)]
    straight = nk.MemoryBank(12, 4, dtype=torch.float64, with_ids=True)
    for keys, ids in stream:
        straight.enqueue(keys, ids=ids)
    first = nk.MemoryBank(12, 4, dtype=torch.float64, with_ids=True)
    for keys, ids in stream[:4]:
        first.enqueue(keys, ids=ids)
    state = first.state_dict()
    resumed = nk.MemoryBank(12, 4, dtype=torch.float64, with_ids=True)
    resumed.load_state_dict(state)
    assert (resumed.ptr, resumed.valid, resumed.total) == (first.ptr, first.valid, first.total)
    for keys, ids in stream[4:]:
        resumed.enqueue(keys, ids=ids)
    assert torch.equal(resumed.buffer, straight.buffer) and torch.equal(resumed.ids, straight.ids)
    assert (resumed.ptr, resumed.valid, resumed.total) == (straight.ptr, straight.valid, straight.total)
    bad = dict(state)
    bad["_extra_state"] = {"total": 5, "ptr": 3, "valid": 5}
    with pytest.raises(ValueError, match="state_dict"):
        nk.MemoryBank(12, 4, dtype=torch.float64, with_ids=True).load_state_dict(bad)


def test_memory_bank_bad_input():
    bank = nk.MemoryBank(8, 4)
    with pytest.raises(ValueError, match="keys"):
        bank.enqueue(torch.randn(3, 5))
    with pytest.raises(TypeError, match="keys"):
        bank.enqueue(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="ids"):
        bank.enqueue(torch.randn(3, 4), ids=torch.arange(3))
    with pytest.raises(ValueError, match="mask"):
        bank.enqueue(torch.randn(3, 4), mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="ids"):
        nk.MemoryBank(8, 4, with_ids=True).enqueue(torch.randn(3, 4))
    with pytest.raises(ValueError, match="size"):
        nk.MemoryBank(0, 4)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="keys"):
            bank.enqueue(torch.randn(3, 4, device="cuda"))
    else:
        meta = nk.MemoryBank(8, 4, device="meta")
        with pytest.raises(ValueError, match="keys"):
            meta.enqueue(torch.randn(3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.0, -0.5, float("inf"), float("nan")])
def test_a_bad_tensor_temperature_makes_the_loss_nan_without_a_host_read(backend, tau):
    # A learnable τ is not read on the host (no synchronisation per step): a value that is not
    # positive and finite gives a NaN loss instead of an exception or a silently wrong loss.
    q, p, b, _ = make_inputs(4, 10, 8, 2, torch.float32)
    loss = nk.bank_info_nce(q, p, b, temperature=torch.tensor(tau), backend=backend)
    assert loss.isnan()
    ok = nk.bank_info_nce(q, p, b, temperature=torch.tensor(0.3), backend=backend)
    assert ok.isfinite()


# ============================================================================ bank_supcon (several positives)

SUPCON_CASES = {
    "labels-only": dict(),
    "self-slots-mask-normalize": dict(self_slots=True, bank_valid="mask", normalize=True),
    "positive-count-tau-bankgrad": dict(positive=True, bank_valid=70, learnable_tau=True, bank_grad=True),
    "all-options-noncontig": dict(
        positive=True,
        self_slots=True,
        bank_valid="mask",
        normalize=True,
        learnable_tau=True,
        bank_grad=True,
        noncontiguous=True,
    ),
}


def supcon_brute_force(q, b, ql, bl, tau, positive=None, self_slots=None, filled=None):
    """SupCon's L_out written out one query at a time, straight from the paper (float64)."""
    losses = []
    for i in range(q.shape[0]):
        keys = [
            j
            for j in range(b.shape[0])
            if (filled is None or filled[j]) and (self_slots is None or j != int(self_slots[i]))
        ]
        logits = [float(q[i] @ b[j]) / tau for j in keys]
        positives = [x for x, j in zip(logits, keys) if int(bl[j]) == int(ql[i])]
        if positive is not None:
            logits.append(float(q[i] @ positive[i]) / tau)
            positives.append(logits[-1])
        if not positives:
            losses.append(0.0)
            continue
        top = max(logits)
        lse = top + math.log(sum(math.exp(x - top) for x in logits))
        losses.append(lse - sum(positives) / len(positives))
    return torch.tensor(losses, dtype=torch.float64)


def run_supcon_case(case, backend, dtype, n=29, k=83, d=20, reduction="none"):
    opts = SUPCON_CASES[case]
    q, p, b, _ = make_inputs(
        n, k, d, 0, dtype, noncontiguous=opts.get("noncontiguous", False), scale=1.0 if opts.get("normalize") else 0.4
    )
    ql, bl = torch.randint(0, 5, (n,)), torch.randint(0, 5, (k,))
    ql[0] = 7  # a query without positives in the bank
    kwargs = dict(normalize=opts.get("normalize", False))
    if opts.get("self_slots"):
        kwargs["self_slots"] = torch.randint(-1, k, (n,))
    valid = opts.get("bank_valid")
    kwargs["bank_valid"] = torch.rand(k) > 0.3 if valid == "mask" else valid
    tau_value = 0.2 + 0.2 * torch.rand(()).item()
    tau = torch.tensor(tau_value, requires_grad=True) if opts.get("learnable_tau") else tau_value
    with_positive = opts.get("positive", False)
    q_, p_ = q.clone().requires_grad_(), p.clone().requires_grad_()
    b_ = b.clone().requires_grad_(opts.get("bank_grad", False))
    with poisoned_allocations():
        loss = nk.bank_supcon(
            q_,
            b_,
            ql,
            bl,
            positive=p_ if with_positive else None,
            temperature=tau,
            reduction=reduction,
            backend=backend,
            **kwargs,
        )
    grad_out = torch.rand(loss.shape) + 0.5
    (loss * grad_out).sum().backward()

    tau64 = torch.tensor(tau_value, dtype=torch.float64, requires_grad=True) if opts.get("learnable_tau") else tau_value
    q64, p64, b64 = (x.double().requires_grad_() for x in (q, p, b))
    ref = nk.reference.bank_supcon_reference(
        q64, b64, ql, bl, tau64, positive=p64 if with_positive else None, reduction=reduction, **kwargs
    )
    (ref * grad_out.double()).sum().backward()
    assert loss.dtype == torch.float32
    assert_close_scaled(loss, ref, 1e-5, "loss")
    rtol = grad_rtol(dtype)
    assert_close_scaled(q_.grad, q64.grad, rtol, "d query")
    if with_positive:
        assert_close_scaled(p_.grad, p64.grad, rtol, "d positive")
    else:
        assert p_.grad is None
    assert_bank_and_tau_grads(opts, dtype, b_, b64, tau, tau64)
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SUPCON_CASES))
def test_bank_supcon_parity_fp32(backend, case):
    loss = run_supcon_case(case, backend, torch.float32)
    if not SUPCON_CASES[case].get("positive"):
        assert loss[0].item() == 0.0  # no positive: no loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_supcon_parity_bf16_and_reduced(backend):
    run_supcon_case("all-options-noncontig", backend, torch.bfloat16)
    run_supcon_case("labels-only", backend, torch.float32, reduction="mean")
    run_supcon_case("positive-count-tau-bankgrad", backend, torch.float32, reduction="mean", n=70, k=200)
    run_supcon_case("self-slots-mask-normalize", backend, torch.float32, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_supcon_matches_the_formula_written_out(backend):
    n, k, d = 13, 45, 9
    q, p, b, _ = make_inputs(n, k, d, 0, torch.float64, scale=0.5)
    ql, bl = torch.randint(0, 4, (n,)), torch.randint(0, 4, (k,))
    ql[2] = 9
    self_slots = torch.randint(-1, k, (n,))
    filled = torch.rand(k) > 0.25
    for positive in (None, p):
        want = supcon_brute_force(q, b, ql, bl, 0.3, positive, self_slots, filled)
        dt = torch.float64 if backend == "reference" else torch.float32
        got = nk.bank_supcon(
            q.to(dt),
            b.to(dt),
            ql,
            bl,
            positive=positive.to(dt) if positive is not None else None,
            temperature=0.3,
            self_slots=self_slots,
            bank_valid=filled,
            reduction="none",
            backend=backend,
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        mean = nk.bank_supcon(
            q.to(dt),
            b.to(dt),
            ql,
            bl,
            positive=positive.to(dt) if positive is not None else None,
            temperature=0.3,
            self_slots=self_slots,
            bank_valid=filled,
            backend=backend,
        )
        has = (want != 0).sum() if positive is None else n
        torch.testing.assert_close(mean.double(), want.sum() / has, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_supcon_hand_worked_example(backend):
    # τ = 1, q = e1, bank logits [1, 0, −1, 2] with labels [A, B, A, B], query label A, slot 3 is the
    # query's own: A = {0, 1, 2}, P = {0, 2}; loss = log(e + 1 + 1/e) − (1 − 1)/2.
    q = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[1.0, 5.0], [0.0, 1.0], [-1.0, 2.0], [2.0, 0.0]])
    loss = nk.bank_supcon(
        q,
        b,
        torch.tensor([0]),
        torch.tensor([0, 1, 0, 1]),
        temperature=1.0,
        self_slots=torch.tensor([3]),
        backend=backend,
    )
    assert abs(loss.item() - math.log(math.e + 1 + 1 / math.e)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_supcon_degenerate(backend):
    n, k, d = 7, 30, 8
    q, p, b, _ = make_inputs(n, k, d, 0, torch.float32)
    q.requires_grad_()
    labels, bank_labels = torch.zeros(n, dtype=torch.long), torch.ones(k, dtype=torch.long)
    for kwargs in [dict(), dict(bank_valid=0), dict(bank_valid=torch.zeros(k, dtype=torch.bool))]:
        q.grad = None
        loss = nk.bank_supcon(q, b, labels, bank_labels, backend=backend, **kwargs)  # no positive anywhere
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(q.grad, torch.zeros(n, d))
    # every slot its own query's: A and P empty
    one = nk.bank_supcon(
        q[:1], b[:1], labels[:1], labels[:1], self_slots=torch.tensor([0]), reduction="none", backend=backend
    )
    assert one.item() == 0.0
    assert nk.bank_supcon(q, b[:0], labels, bank_labels[:0], backend=backend).item() == 0.0
    assert nk.bank_supcon(q[:0], b, labels[:0], bank_labels, backend=backend).item() == 0.0
    # with an explicit positive and nothing else, the loss is log 1 − l⁺ + l⁺ = 0
    alone = nk.bank_supcon(q, b, labels, bank_labels, positive=p, bank_valid=0, reduction="none", backend=backend)
    torch.testing.assert_close(alone, torch.zeros(n), atol=1e-6, rtol=0)


def test_bank_supcon_bad_input():
    q, p, b, _ = make_inputs(4, 10, 8, 0, torch.float32)
    ql, bl = torch.zeros(4, dtype=torch.long), torch.zeros(10, dtype=torch.long)
    for kwargs, error, name in [
        (dict(query_labels=ql[:3]), ValueError, "query_labels"),
        (dict(bank_labels=bl[:3]), ValueError, "bank_labels"),
        (dict(query_labels=ql.float()), TypeError, "query_labels"),
        (dict(self_slots=torch.zeros(3, dtype=torch.long)), ValueError, "self_slots"),
        (dict(positive=p[:2]), ValueError, "positive"),
        (dict(positive=p.double()), TypeError, "positive"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
    ]:
        args = dict(query_labels=ql, bank_labels=bl)
        args.update({key: kwargs.pop(key) for key in ("query_labels", "bank_labels") if key in kwargs})
        with pytest.raises(error, match=name):
            nk.bank_supcon(q, b, args["query_labels"], args["bank_labels"], **kwargs)
