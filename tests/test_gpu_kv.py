"""GPU parity and capture tests of the kv family (marker ``gpu``): Triton and CUDA kernels against
the reference at real sizes, and the fused evict inside a CUDA graph."""

import pytest
import torch

import negkernels as nk
from negkernels.reference.kv import retention_mass_reference, retention_scores_reference, select_retained_reference

from .helpers import assert_close

pytestmark = pytest.mark.gpu


def kernel_backends(op):
    return [b for b in ("triton", "cuda") if b in nk.available_backends("cuda", op=op)]


@pytest.mark.parametrize("backend", kernel_backends("select_retained"))
@pytest.mark.parametrize(
    "b,h,s,budget,sink,window",
    [(2, 8, 131072, 4096, 4, 64), (1, 8, 32768, 2048, 0, 0), (3, 5, 1001, 999, 1, 1), (4, 2, 70000, 1, 0, 1)],
)
def test_gpu_select_retained_parity(backend, b, h, s, budget, sink, window):
    scores = torch.randint(-1000, 1000, (b, h, s), device="cuda").float() / 7  # many ties
    scores.view(-1)[torch.randint(0, scores.numel(), (5,))] = float("nan")
    lengths = torch.randint(0, s + 1, (b,), device="cuda")
    for lens in (None, lengths):
        out = nk.select_retained(scores, budget, sink=sink, window=window, lengths=lens, backend=backend)
        assert torch.equal(out, select_retained_reference(scores, budget, sink, window, lens))


@pytest.mark.parametrize(
    "b,h,s,budget,sink,window,min_per_head", [(2, 8, 32768, 2048, 4, 64, 128), (3, 5, 1001, 999, 1, 1, 0)]
)
def test_gpu_select_retained_global_parity_and_graph_capture(b, h, s, budget, sink, window, min_per_head):
    scores = torch.randint(-1000, 1000, (b, h, s), device="cuda").float() / 7  # many ties
    lengths = torch.randint(0, s + 1, (b,), device="cuda")
    kwargs = dict(sink=sink, window=window, lengths=lengths, mode="global", min_per_head=min_per_head)
    got = nk.select_retained(scores, budget, backend="triton", **kwargs)
    want = nk.select_retained(scores, budget, backend="reference", **kwargs)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    # no host synchronisation: the whole selection replays from a CUDA graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = nk.select_retained(scores, budget, backend="triton", **kwargs)
    graph.replay()
    for x, y in zip(captured, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", kernel_backends("evict"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_evict_parity_and_graph_capture(backend, dtype):
    b, h, s, d, budget = 2, 4, 20000, 128, 1000
    keys, values = (
        torch.randn(b, h, s, d, device="cuda", dtype=dtype),
        torch.randn(b, h, s, d, device="cuda", dtype=dtype),
    )
    log_beta = torch.nn.functional.logsigmoid(torch.randn(b, h, s, device="cuda") + 3).to(dtype)
    positions = torch.randint(0, 3 * s, (b, h, s), device="cuda")
    step = torch.tensor([3 * s, 3 * s + 17], device="cuda")
    kept = nk.evict(keys, values, log_beta, positions, step, budget, sink=4, window=32, backend=backend)
    indices = select_retained_reference(retention_scores_reference(log_beta, positions, step), budget, 4, 32)
    assert torch.equal(kept.indices, indices)
    gather = indices[..., None].expand(b, h, budget, d)
    assert torch.equal(kept.keys, keys.gather(2, gather)) and torch.equal(kept.values, values.gather(2, gather))
    assert torch.equal(kept.positions, positions.gather(2, indices))
    # no host synchronisation: the whole evict replays from a CUDA graph
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nk.evict(keys, values, log_beta, positions, step, budget, sink=4, window=32, backend=backend)
        with torch.cuda.graph(graph, stream=stream):
            captured = nk.evict(keys, values, log_beta, positions, step, budget, sink=4, window=32, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    log_beta.copy_(log_beta.flip(-1))
    graph.replay()
    torch.cuda.synchronize()
    expected = select_retained_reference(retention_scores_reference(log_beta, positions, step), budget, 4, 32)
    assert torch.equal(captured.indices, expected)


def test_gpu_compact_in_place_large():
    b, h, s, d = 2, 8, 50000, 128
    keys = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    indices = nk.select_retained(torch.randn(b, h, s, device="cuda"), 30000)
    gather = indices[..., None].expand(b, h, 30000, d)
    expected_k, expected_v = keys.gather(2, gather), values.gather(2, gather)
    k, v = nk.compact_kv_(keys, values, indices, backend="triton")
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


@pytest.mark.parametrize("packed", [False, True])
def test_gpu_retention_mass_parity(packed):
    t = 5000
    lb = (torch.nn.functional.logsigmoid(torch.randn(4, t, device="cuda") + 3)).requires_grad_()
    cu = torch.tensor([0, 1234, 1234, 4000, t], device="cuda") if packed else None
    mass = nk.retention_mass(lb, cu, backend="triton")
    upstream = torch.randn(4, t, device="cuda")
    (g,) = torch.autograd.grad(mass, lb, upstream)
    lb64 = lb.detach().double().requires_grad_()
    ref = retention_mass_reference(lb64, cu)
    (g64,) = torch.autograd.grad(ref, lb64, upstream.double())
    assert_close(mass, ref, rtol=1e-5, atol=1e-5, what="mass")
    assert_close(g, g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item(), what="d log_beta")
