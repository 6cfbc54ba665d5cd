"""GPU parity, determinism and compile tests (marker ``gpu``; they run when CUDA is present)."""

import pytest
import torch

import negkernels as nk
from negkernels.reference.advantages import ESTIMATORS, SCALES, group_advantages_reference

from .helpers import OUTPUT_TOLERANCE, assert_close, poisoned_allocations, upcast

pytestmark = pytest.mark.gpu


def gpu_backends():
    return [b for b in ("triton", "cuda") if b in nk.available_backends("cuda", op="group_advantages")]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("grouping", ["uniform", "ragged"])
@pytest.mark.parametrize("n", [1, 1000, 131072, 300001])
def test_gpu_parity(estimator, scale, grouping, n):
    rewards = torch.randn(n, device="cuda") * 3 + 0.5
    if grouping == "uniform":
        g = 1 if n == 1 else (8 if n < 131072 else 64)
        n = n - n % g
        rewards = rewards[:n]
        ids = torch.arange(n, device="cuda") // g
        kwargs = dict(group_size=g)
    else:
        ids = torch.randint(0, max(1, n // 37), (n,), device="cuda")
        kwargs = dict(group_index=ids)
    num_groups = int(ids.max()) + 1
    ref, mean, std, count = group_advantages_reference(upcast(rewards), ids, num_groups, estimator, scale, 1e-6, 1.0, 1)
    for backend in gpu_backends():
        with poisoned_allocations():
            adv, stats = nk.group_advantages(
                rewards, estimator=estimator, scale=scale, return_stats=True, backend=backend, **kwargs
            )
        assert_close(adv, ref, **OUTPUT_TOLERANCE, what=backend)
        assert_close(stats.mean, mean, **OUTPUT_TOLERANCE, what=f"{backend} mean")
        assert_close(stats.std, std, **OUTPUT_TOLERANCE, what=f"{backend} std")
        assert torch.equal(stats.count.cpu(), count.cpu())


@pytest.mark.parametrize("scale", ["group", "whiten"])
def test_gpu_deterministic(scale):
    rewards = torch.randn(262144, device="cuda")
    ids = torch.randint(0, 4096, (262144,), device="cuda")
    for backend in gpu_backends():
        first = nk.group_advantages(rewards, ids, scale=scale, backend=backend)
        for _ in range(5):
            assert torch.equal(first, nk.group_advantages(rewards, ids, scale=scale, backend=backend)), backend


def test_gpu_backends_agree_bitwise():
    rewards = torch.randn(65536, device="cuda")
    ids = torch.randint(0, 1000, (65536,), device="cuda")
    outs = [nk.group_advantages(rewards, ids, backend=b) for b in gpu_backends()]
    for o in outs[1:]:
        assert_close(o, outs[0], rtol=1e-6, atol=1e-7)


def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda r: nk.group_advantages(r, group_size=16) * 2, fullgraph=True)
    r = torch.randn(4096, device="cuda")
    assert_close(fn(r), nk.group_advantages(r, group_size=16, backend="reference") * 2, **OUTPUT_TOLERANCE)


@pytest.mark.parametrize("mode", ["disco", "disco_b"])
@pytest.mark.parametrize("n", [7, 131072, 300001])
def test_gpu_discriminative_kernel_parity(mode, n):
    """The one-launch DisCO kernel (grid barrier over every SM) against the float64 reference."""
    scores = (torch.randn(n, device="cuda") * 2).requires_grad_()
    correct = torch.rand(n, device="cuda") > 0.5
    ids = torch.randint(0, max(1, n // 9), (n,), device="cuda")
    weights = torch.rand(n, device="cuda") + 0.1
    with poisoned_allocations():
        loss = nk.group_discriminative_loss(scores, correct, ids, tau=0.7, mode=mode, weights=weights, backend="triton")
    loss.backward()
    x64 = upcast(scores.detach()).requires_grad_()
    want = nk.group_discriminative_loss(
        x64, correct, ids, tau=0.7, mode=mode, weights=weights.double(), backend="reference"
    )
    want.backward()
    assert_close(loss, want, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(scores.grad, x64.grad, rtol=1e-5, atol=1e-9, what="d scores")
