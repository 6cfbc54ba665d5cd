"""Log-probs and policy losses fused with the LM head: ``linear_token_logprobs``, ``linear_policy_loss``.

Oracle: ``hidden @ weight.T + bias`` in float64 followed by the float64 reference log-probs /
policy loss, differentiated by autograd. Half-precision inputs are held to the error of the same
computation run in their own precision (the reference backend, whose logits are rounded to bf16 /
fp16 like the kernel path's), and, with ``fp32_lm_head``, to fp32 accuracy.
"""

import pytest
import torch

import negkernels as nk
import negkernels.triton.logprobs as triton_logprobs
from negkernels._testing import old_logp_off_edges
from negkernels.reference.logprobs import LOSS_TYPES

from .helpers import TOLERANCES, assert_close, poisoned_allocations

BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
F32 = TOLERANCES[torch.float32]


def assert_grad_close(actual, expected, what):
    """fp32 gradients of the LM head are sums over tokens (d weight) or the vocabulary (d hidden)
    whose terms cancel: relative 1e-4, with an absolute floor of 2e-5 of the largest entry."""
    assert_close(actual, expected, rtol=1e-4, atol=2e-5 * expected.abs().max().item(), what=what)


def lm_head(n_lead, h, v, dtype=torch.float32, *, noncontiguous=False):
    """hidden [*n_lead, H], weight [V, H], bias [V]; logits of order a few units, like a real LM head."""
    if noncontiguous:  # hidden strided along H, weight stored transposed
        hidden = torch.randn(*n_lead, 2 * h)[..., ::2]
        weight = (torch.randn(h, v) / h**0.5 * 2).t()
    else:
        hidden = torch.randn(*n_lead, h)
        weight = torch.randn(v, h) / h**0.5 * 2
    return hidden.to(dtype), weight.to(dtype), (torch.randn(v) * 0.5).to(dtype)


def oracle_linear_logprobs(hidden, weight, bias, targets, temperature):
    """float64 log p(target) and entropy from the definitions, differentiable."""
    z = torch.nn.functional.linear(hidden, weight, bias) / temperature
    logp_all = z - torch.logsumexp(z, -1, keepdim=True)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    return logp, -(torch.where(p == 0, 0.0, p * logp_all)).sum(-1)


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def run_logprobs(hidden, weight, bias, targets, g_logp, g_ent, **kw):
    h, w, b = leaves(hidden, weight, bias)
    logp, ent = nk.linear_token_logprobs(h, w, targets, bias=b, return_entropy=True, **kw)
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp, ent, h.grad, w.grad, b.grad


def oracle_run(hidden, weight, bias, targets, g_logp, g_ent, temperature):
    """float64 (logp, entropy, d hidden, d weight, d bias) for the loss Σ g_logp·logp + g_ent·H,
    laid out like :func:`run_logprobs`."""
    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    logp, ent = oracle_linear_logprobs(h64, w64, b64, targets, temperature)
    (logp * g_logp.double() + ent * g_ent.double()).sum().backward()
    return logp, ent, h64.grad, w64.grad, b64.grad


def assert_within_low_precision_error(actual, low, exact, dtype, what, factor=2.0):
    """|actual − exact| ≤ factor·|low − exact| + one rounding of ``dtype`` at the scale of ``exact``
    (max norm): the kernel path is as accurate as the reference run in the input precision."""
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item()
    err_low = (low.double() - exact).abs().max().item()
    floor = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err <= factor * err_low + floor, f"{what}: error {err:.3g} vs reference-in-{dtype} error {err_low:.3g}"


# ============================================================================ linear_token_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, h, v, chunk", [((37,), 19, 101, None), ((2, 9), 24, 77, 4), ((5,), 33, 130, 2)])
def test_linear_token_logprobs_fp32_parity(backend, lead, h, v, chunk):
    hidden, weight, bias = lm_head(lead, h, v)
    targets = torch.randint(0, v, lead)
    g_logp, g_ent = torch.randn(lead), torch.randn(lead)
    with poisoned_allocations():
        got = run_logprobs(
            hidden, weight, bias, targets, g_logp, g_ent, temperature=0.7, chunk_size=chunk, backend=backend
        )
    logp, ent, *grads64 = oracle_run(hidden, weight, bias, targets, g_logp, g_ent, 0.7)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].shape == targets.shape
    assert_close(got[0], logp, **F32, what="logp")
    assert_close(got[1], ent, **F32, what="entropy")
    for name, g, ref in zip(("d hidden", "d weight", "d bias"), got[2:], grads64):
        assert g.dtype == torch.float32
        assert_grad_close(g, ref, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp32_lm_head", [False, True])
def test_linear_token_logprobs_half_precision(backend, dtype, fp32_lm_head):
    n, h, v = 29, 40, 97
    hidden, weight, bias = lm_head((n,), h, v, dtype, noncontiguous=True)
    targets = torch.randint(0, v, (n,))
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    got = run_logprobs(
        hidden, weight, bias, targets, g_logp, g_ent, fp32_lm_head=fp32_lm_head, chunk_size=8, backend=backend
    )
    low = run_logprobs(hidden, weight, bias, targets, g_logp, g_ent, fp32_lm_head=fp32_lm_head, backend="reference")
    logp, ent, *grads64 = oracle_run(hidden, weight, bias, targets, g_logp, g_ent, 1.0)
    if fp32_lm_head:
        # Products of half-precision values are exact in fp32: the log-probs keep fp32 accuracy.
        assert_close(got[0], logp, rtol=2e-5, atol=2e-5, what="logp with an fp32 LM head")
        assert_close(got[1], ent, rtol=2e-5, atol=2e-5, what="entropy with an fp32 LM head")
    else:
        assert_within_low_precision_error(got[0], low[0], logp, dtype, "logp")
        assert_within_low_precision_error(got[1], low[1], ent, dtype, "entropy")
    for i, (name, ref) in enumerate(zip(("d hidden", "d weight", "d bias"), grads64)):
        assert got[2 + i].dtype == dtype
        assert_within_low_precision_error(got[2 + i], low[2 + i], ref, dtype, name, factor=3.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 5])
def test_linear_token_logprobs_backward_in_vocabulary_slices(backend, dtype, chunk, monkeypatch):
    # A workspace so small that the backward walks the vocabulary in slices of 16 (101 = 6·16 + 5),
    # over one chunk of all tokens (each slice's d weight in one product) or over chunks of 5
    # (an fp32 accumulator per slice); d hidden is summed over the slices in fp32.
    n, h, v = 23, 24, 101
    tokens = chunk or n
    monkeypatch.setattr(triton_logprobs, "LINEAR_WORKSPACE_BYTES", tokens * torch.finfo(dtype).bits // 8 * 20)
    assert triton_logprobs.linear_vocab_slice(tokens, v, torch.finfo(dtype).bits // 8) == 16
    hidden, weight, bias = lm_head((n,), h, v, dtype)
    targets = torch.randint(0, v, (n,))
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    with poisoned_allocations():
        got = run_logprobs(
            hidden, weight, bias, targets, g_logp, g_ent, temperature=1.3, chunk_size=chunk, backend=backend
        )
    grads64 = oracle_run(hidden, weight, bias, targets, g_logp, g_ent, 1.3)[2:]
    if dtype == torch.float32:
        for name, g, ref in zip(("d hidden", "d weight", "d bias"), got[2:], grads64):
            assert_grad_close(g, ref, name)
    else:
        low = run_logprobs(hidden, weight, bias, targets, g_logp, g_ent, temperature=1.3, backend="reference")
        for i, (name, ref) in enumerate(zip(("d hidden", "d weight", "d bias"), grads64)):
            assert_within_low_precision_error(got[2 + i], low[2 + i], ref, dtype, name)


def test_fp32_lm_head_is_more_accurate_than_half_logits():
    # The discriminating check of the option: bf16-rounded logits miss the float64 log-probs by
    # far more than fp32 logits do.
    hidden, weight, bias = lm_head((64,), 128, 211, torch.bfloat16)
    hidden = hidden * 4
    targets = torch.randint(0, 211, (64,))
    exact = oracle_linear_logprobs(hidden.double(), weight.double(), bias.double(), targets, 1.0)[0]
    errs = {}
    for fp32 in (False, True):
        lp = nk.linear_token_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            fp32_lm_head=fp32,
            chunk_size=16,
            backend=KERNEL_BACKENDS[0] if KERNEL_BACKENDS else "reference",
        )
        errs[fp32] = (lp.double() - exact).abs().max().item()
    assert errs[True] < 1e-4 < errs[False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_without_bias_and_partial_grads(backend):
    hidden, weight, _ = lm_head((3, 5), 12, 31)
    targets = torch.randint(0, 31, (3, 5))
    w = weight.clone().requires_grad_()  # hidden is a constant: only d weight is asked for
    logp = nk.linear_token_logprobs(hidden, w, targets, chunk_size=4, backend=backend)
    logp.sum().backward()
    w64 = weight.double().requires_grad_()
    ref = oracle_linear_logprobs(hidden.double(), w64, None, targets, 1.0)[0]
    ref.sum().backward()
    assert_close(logp, ref, **F32, what="logp")
    assert_grad_close(w.grad, w64.grad, "d weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_degenerate_and_nan(backend):
    hidden, weight, bias = lm_head((0,), 8, 13)
    h, w = leaves(hidden, weight)
    logp, ent = nk.linear_token_logprobs(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True, backend=backend)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(weight))
    # NaN in one token's hidden state reaches that token's outputs and no other token's.
    hidden, weight, bias = lm_head((6,), 8, 13)
    hidden[2, 3] = float("nan")
    logp, ent = nk.linear_token_logprobs(
        hidden, weight, torch.randint(0, 13, (6,)), bias=bias, return_entropy=True, chunk_size=4, backend=backend
    )
    assert logp[2].isnan() and ent[2].isnan()
    assert torch.isfinite(logp[[0, 1, 3, 4, 5]]).all() and torch.isfinite(ent[[0, 1, 3, 4, 5]]).all()


def test_linear_token_logprobs_bad_input():
    hidden, weight, bias = lm_head((4,), 8, 13)
    targets = torch.randint(0, 13, (4,))
    cases = [
        (dict(hidden=hidden[0]), ValueError, "hidden"),
        (dict(hidden=hidden.long()), TypeError, "hidden"),
        (dict(weight=weight[:, :7]), ValueError, "weight"),
        (dict(weight=weight[:0]), ValueError, "weight"),
        (dict(weight=weight.half()), TypeError, "weight"),
        (dict(bias=bias[:5]), ValueError, "bias"),
        (dict(bias=bias.double()), TypeError, "bias"),
        (dict(targets=targets[:3]), ValueError, "targets"),
        (dict(targets=targets.float()), TypeError, "targets"),
        (dict(targets=targets + 13), ValueError, "targets"),
        (dict(targets=targets - 14), ValueError, "targets"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), TypeError, "chunk_size"),
    ]
    for change, exc, name in cases:
        kw = dict(hidden=hidden, weight=weight, targets=targets, bias=bias)
        kw.update(change)
        with pytest.raises(exc, match=name):
            nk.linear_token_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)
    if KERNEL_BACKENDS:
        with pytest.raises(TypeError, match="float64"):
            nk.linear_token_logprobs(hidden.double(), weight.double(), targets, backend="triton")


# ============================================================================ linear_policy_loss


def policy_case(b=3, t=6, h=16, v=45, dtype=torch.float32):
    hidden, weight, bias = lm_head((b, t), h, v, dtype)
    targets = torch.randint(0, v, (b, t))
    with torch.no_grad():
        base = oracle_linear_logprobs(hidden.double(), weight.double(), bias.double(), targets, 1.0)[0].float()
    old = old_logp_off_edges(base, base + torch.randn(b, t) * 0.3)
    ref = base + torch.randn(b, t) * 0.2
    mask = torch.rand(b, t) > 0.2
    mask[min(1, b - 1)] = False
    return hidden, weight, bias, targets, old, ref, torch.randn(b), mask


def reference_linear_loss(hidden, weight, bias, targets, old, adv, mask, scale=1.0, **kw):
    """float64: logits = hidden·weightᵀ + bias, then the reference policy_loss_from_logits; grads by autograd."""
    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    logits = torch.nn.functional.linear(h64, w64, b64)
    out = nk.policy_loss_from_logits(
        logits, targets, old.double(), adv.double() if adv is not None else None, mask, backend="reference", **kw64
    )
    (out.loss * scale).backward()
    return out, h64.grad, w64.grad, b64.grad


def run_linear_loss(hidden, weight, bias, targets, old, adv, mask, scale=1.0, **kw):
    h, w, b = leaves(hidden, weight, bias)
    out = nk.linear_policy_loss(h, w, targets, old, adv, mask, bias=b, **kw)
    (out.loss * scale).backward()
    return out, h.grad, w.grad, b.grad


METRIC_NAMES = (
    "clip_fraction_low",
    "clip_fraction_high",
    "dual_clip_fraction",
    "approx_kl",
    "mean_ratio",
    "kl",
    "entropy",
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_linear_policy_loss_parity(backend, loss_type):
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case()
    kw = dict(
        loss_type=loss_type,
        ref_logp=ref,
        kl_coef=0.05,
        entropy_coef=0.01,
        return_entropy=True,
        temperature=0.8,
        aggregation="seq-mean-token-mean",
        dual_clip=2.5,
        is_weights=torch.rand(3) * 2,
    )
    with poisoned_allocations():
        got = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, chunk_size=5, backend=backend, **kw)
    want = reference_linear_loss(hidden, weight, bias, targets, old, adv, mask, **kw)
    assert_close(got[0].loss, want[0].loss, **F32, what="loss")
    for name in METRIC_NAMES:
        assert_close(getattr(got[0], name), getattr(want[0], name), **F32, what=name)
    assert_close(got[0].token_logp, want[0].token_logp, **F32, what="token_logp")
    assert_close(got[0].token_entropy, want[0].token_entropy, **F32, what="token_entropy")
    for name, g, r in zip(("d hidden", "d weight", "d bias"), got[1:], want[1:]):
        assert g.dtype == torch.float32
        assert_grad_close(g, r, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_linear_policy_loss_on_policy_with_bias_corrected_kl(backend, loss_type):
    """TRL's num_iterations=1 step: old_logp=None (ρ = 1 with its gradient), the KL term times ρ,
    advantages as a [B, 1] column; against the float64 reference given old_logp = logp."""
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case(4, 5, 12, 37)
    kw = dict(
        loss_type=loss_type,
        ref_logp=ref,
        kl_coef=0.3,
        kl_bias_correction=True,
        return_entropy=True,
        entropy_coef=0.02,
        aggregation="seq-mean-token-mean",
    )
    with poisoned_allocations():
        got = run_linear_loss(
            hidden, weight, bias, targets, None, adv.unsqueeze(1), mask, chunk_size=7, backend=backend, **kw
        )
    with torch.no_grad():
        on_policy_old = oracle_linear_logprobs(hidden.double(), weight.double(), bias.double(), targets, 1.0)[0]
    want = reference_linear_loss(hidden, weight, bias, targets, on_policy_old.float(), adv, mask, **kw)
    assert_close(got[0].loss, want[0].loss, **F32, what="loss")
    for name in METRIC_NAMES:
        assert_close(getattr(got[0], name), getattr(want[0], name), **F32, what=name)
    for name, g, r in zip(("d hidden", "d weight", "d bias"), got[1:], want[1:]):
        assert_grad_close(g, r, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_linear_policy_loss_packed_and_scaled_grad(backend, loss_type):
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case(1, 11, 10, 23)
    cu = torch.tensor([0, 4, 4, 11])
    kw = dict(cu_seqlens=cu, aggregation="seq-mean-token-sum-norm", norm_constant=7.0, loss_type=loss_type)
    mask = torch.rand(11) > 0.3
    seq_adv = torch.randn(3)
    # An incoming gradient other than 1 rescales the gradients made in the forward.
    got = run_linear_loss(
        hidden[0], weight, bias, targets[0], old[0], seq_adv, mask, scale=-2.5, chunk_size=3, backend=backend, **kw
    )
    want = reference_linear_loss(hidden[0], weight, bias, targets[0], old[0], seq_adv, mask, scale=-2.5, **kw)
    assert_close(got[0].loss, want[0].loss, **F32, what="packed loss")
    for name, g, r in zip(("d hidden", "d weight", "d bias"), got[1:], want[1:]):
        assert_grad_close(g, r, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_policy_loss_half_precision(backend, dtype):
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case(4, 7, 32, 131, dtype)
    kw = dict(clip_high=0.28, entropy_coef=0.01)
    got = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, chunk_size=6, backend=backend, **kw)
    low = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, backend="reference", **kw)
    want = reference_linear_loss(hidden, weight, bias, targets, old, adv, mask, **kw)
    assert_within_low_precision_error(got[0].loss, low[0].loss, want[0].loss, dtype, "loss")
    for i, name in enumerate(("d hidden", "d weight", "d bias")):
        assert got[1 + i].dtype == dtype
        assert_within_low_precision_error(got[1 + i], low[1 + i], want[1 + i], dtype, name, factor=3.0)
    # The two-pass route: d weight accumulated in fp32 over every token.
    two_pass = run_linear_loss(
        hidden, weight, bias, targets, old, adv, mask, fp32_weight_grad=True, chunk_size=6, backend=backend, **kw
    )
    assert_within_low_precision_error(two_pass[0].loss, low[0].loss, want[0].loss, dtype, "two-pass loss")
    for i, name in enumerate(("d hidden", "d weight", "d bias")):
        assert_within_low_precision_error(two_pass[1 + i], low[1 + i], want[1 + i], dtype, f"two-pass {name}")
    # With an fp32 LM head the loss keeps fp32 accuracy.
    exact = run_linear_loss(
        hidden, weight, bias, targets, old, adv, mask, fp32_lm_head=True, chunk_size=6, backend=backend, **kw
    )
    assert_close(exact[0].loss, want[0].loss, rtol=1e-4, atol=1e-6, what="loss with an fp32 LM head")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_linear_policy_loss_fully_masked_and_empty(backend, aggregation):
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case(2, 5, 8, 17)
    got = run_linear_loss(
        hidden,
        weight,
        bias,
        targets,
        old,
        adv,
        torch.zeros_like(mask),
        chunk_size=3,
        aggregation=aggregation,
        backend=backend,
    )
    assert got[0].loss.item() == 0.0
    for g in got[1:]:
        assert torch.equal(g, torch.zeros_like(g))
    empty = run_linear_loss(
        hidden[:, :0],
        weight,
        bias,
        targets[:, :0],
        old[:, :0],
        adv,
        mask[:, :0],
        aggregation=aggregation,
        backend=backend,
    )
    assert empty[0].loss.item() == 0.0 and empty[1].shape == (2, 0, 8)
    assert torch.equal(empty[2], torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_policy_loss_no_grad_and_accumulation(backend):
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case()
    with torch.no_grad():
        out = nk.linear_policy_loss(hidden, weight, targets, old, adv, mask, bias=bias, backend=backend)
    want = reference_linear_loss(hidden, weight, bias, targets, old, adv, mask)
    assert_close(out.loss, want[0].loss, **F32, what="loss without grad")
    # Two backward passes accumulate into .grad like any other op.
    w = weight.clone().requires_grad_()
    for _ in range(2):
        nk.linear_policy_loss(
            hidden, w, targets, old, adv, mask, bias=bias, chunk_size=4, backend=backend
        ).loss.backward()
    assert_grad_close(w.grad, 2 * want[2], "accumulated d weight")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_linear_policy_loss_deterministic(backend):
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case(4, 9, 16, 67)
    a = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, chunk_size=5, backend=backend)
    b = run_linear_loss(hidden, weight, bias, targets, old, adv, mask, chunk_size=5, backend=backend)
    assert torch.equal(a[0].loss, b[0].loss)
    for x, y in zip(a[1:], b[1:]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "npo"])
def test_kernel_path_never_allocates_the_logits(backend, loss_type, monkeypatch):
    # Every tensor the kernel path creates is at most one chunk of logits, the weight or the
    # hidden states: far below the N×V logits.
    n, h, v, chunk = 48, 16, 600, 8
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case(4, n // 4, h, v)
    sizes = []
    for name in ("empty", "empty_like", "zeros", "zeros_like", "mm", "addmm", "matmul", "cat", "stack"):
        real = getattr(torch, name)

        def recording(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            sizes.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,)))
            return out

        monkeypatch.setattr(torch, name, recording)
    got = run_linear_loss(
        hidden,
        weight,
        bias,
        targets,
        old,
        adv,
        mask,
        ref_logp=ref,
        loss_type=loss_type,
        return_entropy=True,
        chunk_size=chunk,
        backend=backend,
    )
    monkeypatch.undo()
    assert sizes and max(sizes) <= max(chunk * v, v * h, n * h) < n * v
    want = reference_linear_loss(
        hidden, weight, bias, targets, old, adv, mask, ref_logp=ref, loss_type=loss_type, return_entropy=True
    )
    assert_grad_close(got[2], want[2], "d weight")


def test_linear_policy_loss_bad_input():
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case()
    with pytest.raises(ValueError, match="hidden"):
        nk.linear_policy_loss(hidden[0], weight, targets[0], old[0], adv, mask[0])  # [T, H] without cu_seqlens
    with pytest.raises(ValueError, match="targets"):
        nk.linear_policy_loss(hidden, weight, targets + 45, old, adv, mask)
    with pytest.raises(ValueError, match="old_logp"):
        nk.linear_policy_loss(hidden, weight, targets, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="weight"):
        nk.linear_policy_loss(hidden, weight[:, :5], targets, old, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        nk.linear_policy_loss(hidden, weight, targets, old, None, mask)
    with pytest.raises(ValueError, match="entropy_coef"):
        nk.linear_policy_loss(hidden, weight, targets, old, adv, mask, entropy_coef=float("nan"))
    with pytest.raises(ValueError, match="clip_low"):
        nk.linear_policy_loss(hidden, weight, targets, old, adv, mask, clip_low=-0.1)


def test_policy_loss_module_from_hidden():
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case()
    loss_fn = nk.PolicyLoss(loss_type="cispo", clip_high=0.5, aggregation="seq-mean-token-sum", backend="reference")
    got = loss_fn.from_hidden(hidden, weight, targets, old, adv, mask, bias=bias)
    want = reference_linear_loss(
        hidden,
        weight,
        bias,
        targets,
        old,
        adv,
        mask,
        loss_type="cispo",
        clip_high=0.5,
        aggregation="seq-mean-token-sum",
    )
    assert_close(got.loss, want[0].loss, **F32, what="PolicyLoss.from_hidden")


# ============================================================================ custom ops


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_linear_ops_opcheck(backend):
    hidden, weight, bias = lm_head((7,), 8, 19)
    targets = torch.randint(0, 19, (7,))
    h, w, b = leaves(hidden, weight, bias)
    torch.library.opcheck(
        torch.ops.negkernels.linear_token_logprobs_fwd.default, (h, w, b, targets, 0.9, 0, 19, True, False, 3)
    )
    lse = torch.logsumexp(torch.nn.functional.linear(hidden, weight, bias) / 0.9, -1)
    ent = torch.rand(7)
    torch.library.opcheck(
        torch.ops.negkernels.linear_token_logprobs_bwd.default,
        (torch.randn(7), torch.randn(7), hidden, weight, bias, targets, lse, ent, 0.9, 0, False, 3, True, True, True),
    )
    old = torch.randn(7) - 3
    codes, scalars = nk.PolicyLossConfig().kernel_args(
        use_kl=False,
        use_is=False,
        adv_per_token=True,
        iw_per_token=True,
        compute_grad=True,
        num_sequences=1,
        seq_len=7,
        max_len=7,
        norm_constant=1.0,
        entropy_coef=0.01,
    )
    args = (
        h,
        w,
        b,
        targets,
        old,
        torch.randn(7),
        torch.rand(7),
        None,
        None,
        codes,
        scalars,
        True,
        False,
        3,
        [True, True, True],
    )
    torch.library.opcheck(torch.ops.negkernels.linear_policy_loss.default, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_linear_ops_compile_fullgraph(backend):
    torch._dynamo.reset()
    hidden, weight, bias, targets, old, ref, adv, mask = policy_case()
    h, w, b = leaves(hidden, weight, bias)
    fn = torch.compile(
        lambda h, w, b: (
            nk.linear_policy_loss(
                h, w, targets, old, adv, mask, bias=b, chunk_size=4, validate=False, backend=backend
            ).loss
            * 3.0
        ),
        backend="aot_eager",
        fullgraph=True,
    )
    fn(h, w, b).backward()
    want = reference_linear_loss(hidden, weight, bias, targets, old, adv, mask, scale=3.0)
    for name, g, r in zip(("d hidden", "d weight", "d bias"), (h.grad, w.grad, b.grad), want[1:]):
        assert_grad_close(g, r, name)
    h, w = leaves(hidden, weight)
    fn = torch.compile(
        lambda h, w: nk.linear_token_logprobs(h, w, targets, validate=False, backend=backend).sum(),
        backend="aot_eager",
        fullgraph=True,
    )
    fn(h, w).backward()
    h64, w64 = leaves(hidden, weight, dtype=torch.float64)
    oracle_linear_logprobs(h64, w64, None, targets, 1.0)[0].sum().backward()
    assert_grad_close(w.grad, w64.grad, "compiled d weight")


def test_fp32_lm_head_products_are_chosen_from_the_operator_registry():
    # The choice is fixed by the installed torch's operators, never by catching an exception (an
    # out-of-memory error once switched the fp32 path off for the rest of the process).
    from negkernels.triton import logprobs as lk

    registry = all("dtype_out" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    assert lk.MM_OUT_DTYPE is registry
    assert not hasattr(lk, "_with_out_dtype") and not hasattr(lk, "_MM_OUT_DTYPE")
