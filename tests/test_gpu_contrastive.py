"""GPU parity, memory, determinism and compile tests of the contrastive family (marker ``gpu``)."""

import pytest
import torch

import negkernels as nk
from negkernels.reference.contrastive import bank_info_nce_reference, bank_topk_reference

from .helpers import assert_close
from .test_contrastive import CASES, assert_close_scaled

pytestmark = pytest.mark.gpu


def _tensor_core_rtol(dtype):
    # bf16/fp16 operands on tensor cores: the gradient's matmul takes G rounded to the input dtype.
    return {torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float16: 6e-3}[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n,k,d", [(300, 5000, 128), (77, 1031, 256), (129, 700, 40), (65, 900, 520), (33, 300, 1024)])
def test_gpu_bank_info_nce_parity(case, dtype, n, k, d):
    opts = CASES[case]
    gen = lambda *s: torch.nn.functional.normalize(torch.randn(*s, device="cuda"), dim=-1).to(dtype)  # noqa: E731
    q, p, b = gen(n, d), gen(n, d), gen(k, d)
    if opts.get("noncontiguous"):
        q = torch.nn.functional.normalize(torch.randn(n, 2 * d, device="cuda"), dim=-1).to(dtype)[:, ::2]
    e = gen(n, opts["extra"], d) if opts.get("extra") else None
    kw = dict(normalize=opts.get("normalize", False), false_negatives=opts.get("false_negatives", "exclude"))
    if opts.get("ids"):
        kw.update(
            query_ids=torch.randint(0, 40, (n,), device="cuda"), bank_ids=torch.randint(0, 40, (k,), device="cuda")
        )
    valid = opts.get("bank_valid")
    kw["bank_valid"] = torch.rand(k, device="cuda") > 0.3 if valid == "mask" else (k * 3 // 5 if valid else None)
    tau = torch.tensor(0.07, device="cuda", requires_grad=True) if opts.get("learnable_tau") else 0.07
    xs = [
        q.clone().requires_grad_(),
        p.clone().requires_grad_(),
        b.clone().requires_grad_(opts.get("bank_grad", False)),
    ]
    ex = e.clone().requires_grad_(opts.get("extra_grad", False)) if e is not None else None
    loss = nk.bank_info_nce(*xs, temperature=tau, extra_negatives=ex, reduction="none", backend="triton", **kw)
    g = torch.rand(n, device="cuda")
    (loss * g).sum().backward()
    tau64 = (
        torch.tensor(0.07, dtype=torch.float64, device="cuda", requires_grad=True)
        if opts.get("learnable_tau")
        else 0.07
    )
    r = [x.detach().double().requires_grad_(x.requires_grad) for x in xs]
    re = ex.detach().double().requires_grad_(ex.requires_grad) if ex is not None else None
    ref = bank_info_nce_reference(*r, tau64, extra_negatives=re, reduction="none", **kw)
    (ref * g.double()).sum().backward()
    assert_close_scaled(loss, ref, 1e-5, "loss")
    rtol = _tensor_core_rtol(dtype)
    for name, a, c in [
        ("d query", xs[0], r[0]),
        ("d positive", xs[1], r[1]),
        ("d bank", xs[2], r[2]),
        ("d extras", ex, re),
    ]:
        if c is not None and c.grad is not None:
            assert_close_scaled(a.grad, c.grad, rtol, name)
    if opts.get("learnable_tau"):
        assert_close_scaled(tau.grad, tau64.grad, max(rtol, 1e-4), "d temperature")


def test_gpu_bank_info_nce_memory_is_linear_in_queries():
    # N4096 K65536 D128 bf16: the N×K logits would be 0.5 GB in bf16 and 1 GB in fp32.
    n, k, d = 4096, 65536, 128
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    p = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    bank = torch.randn(k, d, device="cuda", dtype=torch.bfloat16)
    nk.bank_info_nce(q, p, bank, normalize=True, backend="triton").backward()  # compile outside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = nk.bank_info_nce(q, p, bank, normalize=True, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # O(N·D): the gradients, and the split partials of d(query) (a few fp32 copies of it)
    assert extra < 64 * n * d + (1 << 20), f"{extra / 2**20:.1f} MB beyond the inputs"


def test_gpu_bank_info_nce_deterministic_and_compiled():
    q = torch.randn(500, 64, device="cuda", dtype=torch.bfloat16)
    p = torch.randn(500, 64, device="cuda", dtype=torch.bfloat16)
    bank = torch.randn(3000, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
    tau = torch.tensor(0.1, device="cuda", requires_grad=True)
    runs = []
    for _ in range(2):
        x = q.clone().requires_grad_()
        loss = nk.bank_info_nce(x, p, bank, temperature=tau, backend="triton")
        gq, gb, gt = torch.autograd.grad(loss, (x, bank, tau))
        runs.append((loss, gq, gb, gt))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    fn = torch.compile(
        lambda x: nk.bank_info_nce(x, p, bank.detach(), temperature=tau, backend="triton") * 2, fullgraph=True
    )
    x = q.clone().requires_grad_()
    (gx,) = torch.autograd.grad(fn(x), x)
    y = q.clone().requires_grad_()
    (gy,) = torch.autograd.grad(nk.bank_info_nce(y, p, bank.detach(), temperature=tau, backend="triton") * 2, y)
    torch.testing.assert_close(gx, gy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 64, 200, 256])
@pytest.mark.parametrize("d", [128, 1024])
def test_gpu_bank_topk(dtype, k, d):
    n, slots = 333, 20011
    q = torch.randn(n, d, device="cuda").to(dtype)
    bank = torch.randn(slots, d, device="cuda").to(dtype)
    values, indices = nk.bank_topk(q, bank, k, bank_valid=slots - 7, backend="triton")
    ref_values, _ = bank_topk_reference(q.double(), bank.double(), k, bank_valid=slots - 7)
    assert_close(values, ref_values, rtol=1e-5, atol=1e-4, what="values")
    sims = q.double() @ bank.double().T
    assert_close(values, sims.gather(1, indices), rtol=1e-5, atol=1e-4, what="similarity at index")
    assert (indices < slots - 7).all()


def test_gpu_memory_bank_and_mochi():
    bank = nk.MemoryBank(1000, 64, dtype=torch.bfloat16, device="cuda", with_ids=True)
    for _ in range(3):
        bank.enqueue(
            torch.randn(384, 64, device="cuda", dtype=torch.bfloat16), ids=torch.randint(0, 100, (384,), device="cuda")
        )
    assert bank.valid == 1000 and bank.ptr == 152
    q = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(3)
    extra = nk.mochi_negatives(q, bank.buffer, top_n=32, num_pair_mixes=8, num_query_mixes=4, generator=gen)
    assert extra.shape == (64, 12, 64) and extra.dtype == torch.bfloat16
    loss = nk.bank_info_nce(
        q,
        q,
        bank.buffer,
        normalize=True,
        extra_negatives=extra,
        bank_valid=bank.valid,
        query_ids=torch.arange(64, device="cuda"),
        bank_ids=bank.ids,
        backend="triton",
    )
    ref = nk.bank_info_nce(
        q.double(),
        q.double(),
        bank.buffer.double(),
        normalize=True,
        extra_negatives=extra.double(),
        query_ids=torch.arange(64, device="cuda"),
        bank_ids=bank.ids,
        backend="reference",
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
