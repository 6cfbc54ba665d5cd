"""GPU parity, determinism and compile tests of the logprobs family (marker ``gpu``)."""

import pytest
import torch

import negkernels as nk
from negkernels._testing import old_logp_off_edges
from negkernels.reference.logprobs import AGGREGATIONS, KL_ESTIMATORS, LOSS_TYPES

from .helpers import TOLERANCES, assert_close, poisoned_allocations
from .test_logprobs import oracle_logprobs

pytestmark = pytest.mark.gpu
F32 = TOLERANCES[torch.float32]


def loss_backends():
    return [b for b in ("triton", "cuda") if b in nk.available_backends("cuda", op="policy_loss")]


@pytest.mark.parametrize("vocab", [50257, 151936, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_token_logprobs(vocab, dtype):
    logits = (torch.randn(2, 33, vocab, device="cuda") * 4).to(dtype)
    targets = torch.randint(0, vocab, (2, 33), device="cuda")
    x = logits.clone().requires_grad_()
    with poisoned_allocations():
        logp, entropy = nk.token_logprobs(x, targets, temperature=0.9, return_entropy=True, backend="triton")
    x64 = logits.double().requires_grad_()
    ref_logp, ref_entropy = oracle_logprobs(x64, targets, 0.9)
    assert_close(logp, ref_logp, **F32, what="logp")
    assert_close(entropy, ref_entropy, rtol=1e-5, atol=2e-5, what="entropy")
    (logp.sum() - 0.1 * entropy.sum()).backward()
    (ref_logp.sum() - 0.1 * ref_entropy.sum()).backward()
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else TOLERANCES[dtype]
    assert_close(x.grad, x64.grad, **tol, what="grad")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gpu_policy_loss(loss_type, aggregation):
    b, t = 37, 1000
    logp = torch.randn(b, t, device="cuda") * 0.5 - 2
    old = old_logp_off_edges(logp, logp + torch.randn(b, t, device="cuda") * 0.2)
    ref = logp + torch.randn(b, t, device="cuda") * 0.2
    adv = torch.randn(b, device="cuda")
    mask = torch.rand(b, t, device="cuda") > 0.2
    mask[3] = False
    kw = dict(
        loss_type=loss_type,
        aggregation=aggregation,
        ref_logp=ref,
        kl_coef=0.05,
        dual_clip=3.0,
        is_weights=torch.rand(b, t, device="cuda") * 2,
    )
    x64 = logp.double().requires_grad_()
    ref_out = nk.policy_loss(
        x64,
        old.double(),
        adv.double(),
        mask,
        backend="reference",
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
    )
    (g64,) = torch.autograd.grad(ref_out.loss, x64)
    for backend in loss_backends():
        x = logp.clone().requires_grad_()
        out = nk.policy_loss(x, old, adv, mask, backend=backend, **kw)
        (g,) = torch.autograd.grad(out.loss, x)
        assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6, what=f"{backend} loss")
        assert_close(g, g64, rtol=1e-5, atol=1e-9, what=f"{backend} grad")
        assert_close(torch.stack(out[1:7]), torch.stack(ref_out[1:7]), **F32, what=f"{backend} metrics")


@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_gpu_policy_loss_deterministic_and_backends_agree(kl_estimator):
    logp = torch.randn(1024, 8192, device="cuda") * 0.3 - 2
    old = logp + torch.randn_like(logp) * 0.1
    ref = logp + torch.randn_like(logp) * 0.1
    adv = torch.randn(1024, device="cuda")
    mask = torch.rand_like(logp) > 0.1
    losses = []
    for backend in loss_backends():
        x = logp.clone().requires_grad_()
        first = nk.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator=kl_estimator, backend=backend)
        g = torch.autograd.grad(first.loss, x)[0]
        for _ in range(3):
            again = nk.policy_loss(
                x, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator=kl_estimator, backend=backend
            )
            assert torch.equal(again.loss, first.loss), backend
            assert torch.equal(torch.autograd.grad(again.loss, x)[0], g), backend
        losses.append(first.loss)
    for other in losses[1:]:
        assert_close(other, losses[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["ppo", "cispo", "sapo", "gpg", "gspo"])
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_policy_loss_from_logits(loss_type, inplace):
    b, t, v = 2, 65, 151936
    logits = torch.randn(b, t, v, device="cuda").to(torch.bfloat16)
    targets = torch.randint(0, v, (b, t), device="cuda")
    with torch.no_grad():
        base = oracle_logprobs(logits, targets)[0].float()
    old = old_logp_off_edges(base, base + torch.randn(b, t, device="cuda") * 0.2)
    adv = torch.randn(b, device="cuda")
    mask = torch.rand(b, t, device="cuda") > 0.2
    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    out = nk.policy_loss_from_logits(
        x, targets, old, adv, mask, loss_type=loss_type, return_entropy=True, inplace_backward=inplace, backend="triton"
    )
    out.loss.backward()
    x64 = logits.double().requires_grad_()
    ref = nk.policy_loss_from_logits(
        x64, targets, old.double(), adv.double(), mask, loss_type=loss_type, return_entropy=True, backend="reference"
    )
    ref.loss.backward()
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=1e-5, what="entropy")
    assert_close(leaf.grad, x64.grad, **TOLERANCES[torch.bfloat16], what="grad")


def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    logp = torch.randn(8, 100, device="cuda", requires_grad=True)
    old = logp.detach() + 0.1
    adv = torch.randn(8, device="cuda")
    fn = torch.compile(lambda x: nk.policy_loss(x, old, adv, backend="triton").loss * 2, fullgraph=True)
    out = fn(logp)
    out.backward()
    ref = nk.policy_loss(logp.detach().double().requires_grad_(), old.double(), adv.double(), backend="reference")
    assert_close(out, ref.loss * 2, **F32)
