"""GPU parity, memory and compile tests of the log-probs and policy loss fused with the LM head (marker ``gpu``)."""

import pytest
import torch

import negkernels as nk

from .helpers import poisoned_allocations
from .test_linear_logprobs import (
    assert_grad_close,
    assert_within_low_precision_error,
    lm_head,
    oracle_linear_logprobs,
    policy_case,
    reference_linear_loss,
    run_linear_loss,
)

pytestmark = pytest.mark.gpu


def to_cuda(*xs):
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.parametrize("fp32_lm_head", [False, True])
def test_gpu_linear_token_logprobs_bf16(fp32_lm_head):
    n, h, v = 1031, 1024, 32003
    hidden, weight, bias = to_cuda(*lm_head((n,), h, v, torch.bfloat16))
    targets = torch.randint(0, v, (n,), device="cuda")
    kw = dict(bias=bias, return_entropy=True, fp32_lm_head=fp32_lm_head)
    with poisoned_allocations():
        logp, ent = nk.linear_token_logprobs(hidden, weight, targets, chunk_size=300, backend="triton", **kw)
    low_logp, low_ent = nk.linear_token_logprobs(hidden, weight, targets, backend="reference", **kw)
    exact_logp, exact_ent = oracle_linear_logprobs(hidden.double(), weight.double(), bias.double(), targets, 1.0)
    if fp32_lm_head:
        torch.testing.assert_close(logp.double(), exact_logp, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ent.double(), exact_ent, rtol=1e-4, atol=1e-4)
    else:
        assert_within_low_precision_error(logp, low_logp, exact_logp, torch.bfloat16, "logp")
        assert_within_low_precision_error(ent, low_ent, exact_ent, torch.bfloat16, "entropy")


@pytest.mark.parametrize("loss_type, two_pass", [("ppo", False), ("ppo", True), ("gspo", True)])
def test_gpu_linear_policy_loss_fp32(loss_type, two_pass):
    # fp32 inputs (no TF32): every value and gradient to fp32 accuracy at a realistic vocabulary.
    torch.backends.cuda.matmul.allow_tf32 = False
    case = to_cuda(*policy_case(4, 97, 256, 50257))
    hidden, weight, bias, targets, old, ref, adv, mask = case
    kw = dict(
        loss_type=loss_type,
        ref_logp=ref,
        kl_coef=0.05,
        entropy_coef=0.01,
        return_entropy=True,
        aggregation="seq-mean-token-mean",
    )
    got = run_linear_loss(
        hidden, weight, bias, targets, old, adv, mask, chunk_size=100, fp32_weight_grad=two_pass, backend="triton", **kw
    )
    want = reference_linear_loss(hidden, weight, bias, targets, old, adv, mask, **kw)
    torch.testing.assert_close(got[0].loss.double(), want[0].loss, rtol=1e-5, atol=1e-6)
    for name, g, r in zip(("d hidden", "d weight", "d bias"), got[1:], want[1:]):
        assert_grad_close(g, r, name)


def test_gpu_linear_policy_loss_bf16_against_bf16_reference():
    case = to_cuda(*policy_case(4, 255, 512, 32003, torch.bfloat16))
    hidden, weight, bias, targets, old, ref, adv, mask = case
    got = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, clip_high=0.28, backend="triton")
    low = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, clip_high=0.28, backend="reference")
    want = reference_linear_loss(hidden, weight, bias, targets, old, adv, mask, clip_high=0.28)
    assert_within_low_precision_error(got[0].loss, low[0].loss, want[0].loss, torch.bfloat16, "loss")
    for i, name in enumerate(("d hidden", "d weight", "d bias")):
        assert_within_low_precision_error(got[1 + i], low[1 + i], want[1 + i], torch.bfloat16, name, factor=3.0)
    # The two-pass route (vocabulary slices, fp32 accumulation; torch.addmm with out_dtype on CUDA).
    exact = run_linear_loss(
        hidden, weight, bias, targets, old, adv, mask, clip_high=0.28, fp32_weight_grad=True, backend="triton"
    )
    for i, name in enumerate(("d hidden", "d weight", "d bias")):
        assert_within_low_precision_error(exact[1 + i], low[1 + i], want[1 + i], torch.bfloat16, f"two-pass {name}")


def test_gpu_linear_grpo_memory_at_the_benchmark_shape():
    # 8192 tokens, H = 4096, V = 151936, bf16: every byte allocated beyond the inputs, the weight's
    # and the hidden states' gradients included, stays under 2.0 GB (the logits alone would be 2.5 GB).
    b, t, h, v = 8, 1024, 4096, 151936
    hidden = torch.randn(b, t, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda") / h**0.5 * 2).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (b, t), device="cuda")
    old = torch.full((b, t), -12.0, device="cuda") + 0.1 * torch.randn(b, t, device="cuda")
    adv, mask = torch.randn(b, device="cuda"), torch.rand(b, t, device="cuda") > 0.1
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = nk.linear_policy_loss(
        hidden, weight, targets, old, adv, mask, clip_high=0.28, validate=False, backend="triton"
    )
    dh, dw = torch.autograd.grad(out.loss, (hidden, weight))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 2.0e9, f"peak extra memory {extra / 1e9:.2f} GB"
    assert torch.isfinite(out.loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    # The loss agrees with the bf16 reference on a slice of the batch (the full one needs 14 GB).
    rows = slice(0, 1)
    sub = nk.linear_policy_loss(
        hidden[rows].detach(),
        weight.detach(),
        targets[rows],
        old[rows],
        adv[rows],
        mask[rows],
        clip_high=0.28,
        backend="reference",
    )
    sub_k = nk.linear_policy_loss(
        hidden[rows].detach(),
        weight.detach(),
        targets[rows],
        old[rows],
        adv[rows],
        mask[rows],
        clip_high=0.28,
        backend="triton",
    )
    torch.testing.assert_close(sub_k.loss, sub.loss, rtol=2e-2, atol=1e-3)


def test_gpu_linear_policy_loss_compile_and_determinism():
    torch._dynamo.reset()
    case = to_cuda(*policy_case(2, 64, 128, 4099, torch.bfloat16))
    hidden, weight, bias, targets, old, ref, adv, mask = case
    a = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, chunk_size=50, backend="triton")
    b = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, chunk_size=50, backend="triton")
    assert torch.equal(a[0].loss, b[0].loss) and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    h, w = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    fn = torch.compile(
        lambda h, w: (
            nk.linear_policy_loss(
                h, w, targets, old, adv, mask, bias=bias, chunk_size=50, validate=False, backend="triton"
            ).loss
        ),
        fullgraph=True,
    )
    fn(h, w).backward()
    torch.testing.assert_close(w.grad, a[2])
    torch.testing.assert_close(h.grad, a[1])
