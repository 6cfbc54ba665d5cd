"""Token log-probs, entropy, policy losses and the fused loss from logits.

Oracles: log-probs and entropy from the definition (z − logsumexp z, −Σ p log p) in float64 with
autograd; the float64 policy-loss reference; hand-worked numbers; a padded ↔ packed round trip.
"""

import math

import pytest
import torch

import negkernels as nk
from negkernels._testing import old_logp_off_edges
from negkernels.reference.logprobs import AGGREGATIONS, KL_ESTIMATORS, LOSS_TYPES, policy_loss_reference

from .helpers import TOLERANCES, assert_close, poisoned_allocations

BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
F32 = TOLERANCES[torch.float32]


def oracle_logprobs(logits, targets, temperature=1.0):
    """float64 log p(target) and entropy straight from the definitions."""
    z = logits.double() / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    logp_all = z - lse
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(torch.where(p == 0, 0.0, p * logp_all)).sum(-1)
    return logp, entropy


def grad_tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else TOLERANCES[dtype]


def logp_tolerance(logits, temperature=1.0):
    """fp32 log-probs against float64: logp = z − lse cancels two terms of size max|z| + log V,
    so its absolute error scales with them (8 fp32 ulps of that size; ~1e-5 for logits of ±14)."""
    size = float(logits.float().abs().max()) / temperature + math.log(logits.shape[-1])
    return dict(rtol=1e-5, atol=max(1e-6, 8 * 2.0**-24 * size))


# ============================================================================ token_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 37), (5, 257), (2, 3, 1001)])
def test_token_logprobs_parity(backend, dtype, shape):
    logits = (torch.randn(shape) * 3).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1])
    temperature = 0.7
    x = logits.clone().requires_grad_()
    with poisoned_allocations():
        logp, entropy = nk.token_logprobs(x, targets, temperature=temperature, return_entropy=True, backend=backend)
    x64 = logits.double().requires_grad_()
    ref_logp, ref_entropy = oracle_logprobs(x64, targets, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert_close(logp, ref_logp, **logp_tolerance(logits, temperature), what="logp")
    assert_close(entropy, ref_entropy, **logp_tolerance(logits, temperature), what="entropy")
    g_logp, g_ent = torch.randn(shape[:-1]), torch.randn(shape[:-1])
    (logp * g_logp + entropy * g_ent).sum().backward()
    (ref_logp * g_logp.double() + ref_entropy * g_ent.double()).sum().backward()
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, **grad_tolerance(dtype), what="grad")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_token_logprobs_strided_views_and_inplace(backend):
    # logits[:, :-1] of a [B, T+1, V] tensor: rows are strided, read without a copy.
    full = torch.randn(3, 6, 41)
    targets = torch.randint(0, 41, (3, 5))
    view = full[:, :-1]
    x = full.clone().requires_grad_()
    logp = nk.token_logprobs(x[:, :-1], targets, backend=backend)
    ref = oracle_logprobs(view, targets)[0]
    assert_close(logp, ref, **F32, what="strided view")
    logp.sum().backward()
    x64 = full.double().requires_grad_()
    oracle_logprobs(x64[:, :-1], targets)[0].sum().backward()
    assert_close(x.grad, x64.grad, **grad_tolerance(torch.float32), what="strided grad")
    # Non-unit stride along V (a transposed tensor) takes the copy path.
    xt = torch.randn(29, 4).t()
    tt = torch.randint(0, 29, (4,))
    assert_close(nk.token_logprobs(xt, tt, backend=backend), oracle_logprobs(xt, tt)[0], **F32, what="transposed")
    # In-place backward: the gradient lands in the logits' storage.
    base = torch.randn(4, 33)
    t4 = torch.randint(0, 33, (4,))
    leaf = base.clone().requires_grad_()
    work = leaf * 1.0
    lp, ent = nk.token_logprobs(work, t4, return_entropy=True, inplace_backward=True, backend=backend)
    (lp.sum() + 0.5 * ent.sum()).backward()
    b64 = base.double().requires_grad_()
    r_lp, r_ent = oracle_logprobs(b64, t4)
    (r_lp.sum() + 0.5 * r_ent.sum()).backward()
    assert_close(leaf.grad, b64.grad, **grad_tolerance(torch.float32), what="in-place grad")
    assert_close(work.detach(), b64.grad, **grad_tolerance(torch.float32), what="storage now holds the gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_hand_worked(backend):
    # Uniform logits: log p = −log V and H = log V. One-hot-ish logits with −inf elsewhere: p = 1, H = 0.
    v = 50
    logits = torch.full((2, v), 3.25)
    logits[1] = -float("inf")
    logits[1, 7] = 2.0
    targets = torch.tensor([11, 7])
    logp, entropy = nk.token_logprobs(logits, targets, return_entropy=True, backend=backend)
    assert_close(logp, torch.tensor([-math.log(v), 0.0]), rtol=1e-6, atol=1e-6)
    assert_close(entropy, torch.tensor([math.log(v), 0.0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_degenerate_and_nan(backend):
    empty = nk.token_logprobs(torch.randn(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long), backend=backend)
    assert empty.shape == (0,)
    logits = torch.randn(3, 9)
    logits[1, 4] = float("nan")
    logp, entropy = nk.token_logprobs(logits, torch.tensor([0, 0, 0]), return_entropy=True, backend=backend)
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()
    assert torch.isnan(entropy[1]) and torch.isfinite(entropy[[0, 2]]).all()


def test_token_logprobs_bad_input():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="targets"):
        nk.token_logprobs(logits, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="targets"):
        nk.token_logprobs(logits, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="targets"):
        nk.token_logprobs(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="targets"):
        nk.token_logprobs(logits, torch.zeros(4))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            nk.token_logprobs(logits, torch.zeros(4, dtype=torch.long), temperature=bad)
    with pytest.raises(TypeError, match="logits"):
        nk.token_logprobs(logits.long(), torch.zeros(4, dtype=torch.long))
    # validate=False skips the one host check: a bad id then gives NaN, and nothing is read out of bounds.
    for backend in KERNEL_BACKENDS:
        logp = nk.token_logprobs(logits, torch.tensor([0, 10, -3, 9]), validate=False, backend=backend)
        assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all()
        old = torch.zeros(1, 4)
        out = nk.policy_loss_from_logits(
            logits.unsqueeze(0), torch.tensor([[0, 1, 10**6, 3]]), old, torch.ones(1), validate=False, backend=backend
        )
        assert torch.isnan(out.token_logp[0, 2]) and torch.isfinite(out.token_logp[0, [0, 1, 3]]).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_token_logprobs_opcheck_and_compile(backend):
    logits = torch.randn(3, 4, 19, requires_grad=True)
    targets = torch.randint(0, 19, (3, 4))
    torch.library.opcheck(torch.ops.negkernels.token_logprobs_fwd.default, (logits, targets, 0.9, 0, 19, True, False))
    torch._dynamo.reset()
    fn = torch.compile(
        lambda x, t: nk.token_logprobs(x, t, validate=False, backend=backend).sum(), backend="aot_eager", fullgraph=True
    )
    assert_close(fn(logits, targets), oracle_logprobs(logits, targets)[0].sum(), **F32)


# ============================================================================ policy_loss


def policy_inputs(b=4, t=9, *, per_token_adv=False, seed_mask=True):
    logp = torch.randn(b, t) * 0.5 - 1.5
    old = old_logp_off_edges(logp, logp + torch.randn(b, t) * 0.25)
    ref = logp + torch.randn(b, t) * 0.2
    adv = torch.randn(b, t) if per_token_adv else torch.randn(b)
    mask = torch.rand(b, t) > 0.25 if seed_mask else None
    if mask is not None:
        mask[0] = False  # a fully masked sequence
    return logp, old, ref, adv, mask


def run_both(backend, logp, old, adv, mask, **kw):
    """(kernel loss output, kernel grad, float64 reference output, reference grad)."""
    x = logp.clone().requires_grad_()
    with poisoned_allocations():
        out = nk.policy_loss(x, old, adv, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.loss, x)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    x64 = logp.double().requires_grad_()
    ref = nk.policy_loss(
        x64,
        old.double() if old is not None else None,
        adv.double() if adv is not None else None,
        mask,
        backend="reference",
        **kw64,
    )
    (g64,) = torch.autograd.grad(ref.loss, x64)
    return out, g, ref, g64


def check_outputs(out, g, ref, g64, what=""):
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref.loss, **F32, what=f"{what} loss")
    assert_close(g, g64, rtol=1e-5, atol=1e-7, what=f"{what} grad")
    for name in ("clip_fraction_low", "clip_fraction_high", "dual_clip_fraction", "approx_kl", "mean_ratio", "kl"):
        assert_close(getattr(out, name), getattr(ref, name), **F32, what=f"{what} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_parity(backend, loss_type, aggregation):
    logp, old, ref, adv, mask = policy_inputs(per_token_adv=loss_type == "sapo")
    kw = dict(
        loss_type=loss_type,
        aggregation=aggregation,
        ref_logp=ref,
        kl_coef=0.05,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=3.0 if loss_type in ("ppo", "gspo") else None,
        npo_beta=0.5,
    )
    if loss_type == "gspo":
        kw.update(clip_low=0.05, clip_high=0.08)  # GSPO's sequence ratios need a tight range to clip
    check_outputs(*run_both(backend, logp, old, adv, mask, **kw), what=f"{loss_type}/{aggregation}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_policy_loss_kl_estimators(backend, kl_estimator):
    logp, old, ref, adv, mask = policy_inputs()
    check_outputs(
        *run_both(backend, logp, old, adv, mask, ref_logp=ref, kl_coef=0.3, kl_estimator=kl_estimator),
        what=kl_estimator,
    )


def kl_part_oracle(logp, old, ref, mask, loss_type, kl_coef):
    """float64 from the definition: kl_coef · Σ_b (1/n_b) Σ_t m·r·k3(logp − ref) / (sequences with a
    token), r = ρ_t = exp(logp − old) or, for gspo, s_b = exp(mean_t log ρ) (both differentiated)."""
    x = logp.double().requires_grad_()
    m = mask.double()
    n = m.sum(-1)
    d = x - ref.double()
    k3 = torch.exp(-d) - 1 + d
    log_ratio = (x - old.double()) * m
    r = torch.exp(log_ratio) if loss_type != "gspo" else torch.exp(log_ratio.sum(-1) / n.clamp_min(1)).unsqueeze(-1)
    per_seq = (m * r * k3).sum(-1) / n.clamp_min(1)
    loss = kl_coef * per_seq.sum() / (n > 0).sum()
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "cispo", "npo"])
def test_policy_loss_kl_bias_correction(backend, loss_type):
    logp, old, ref, adv, mask = policy_inputs()
    kw = dict(
        loss_type=loss_type, aggregation="seq-mean-token-mean", ref_logp=ref, kl_coef=0.3, kl_bias_correction=True
    )
    out, g, want, g64 = run_both(backend, logp, old, adv, mask, **kw)
    check_outputs(out, g, want, g64, what=loss_type)
    if loss_type in ("ppo", "gspo"):
        # The KL part from its definition: the loss with it minus the loss without it.
        base, g_base, _, _ = run_both(backend, logp, old, adv, mask, **dict(kw, kl_coef=0.0))
        kl_loss, kl_grad = kl_part_oracle(logp, old, ref, mask, loss_type, 0.3)
        assert_close(out.loss - base.loss, kl_loss, rtol=1e-5, atol=1e-6, what="KL part of the loss")
        assert_close(g - g_base, kl_grad, rtol=1e-4, atol=1e-6, what="KL part of the gradient")
        plain = nk.policy_loss(logp, old, adv, mask, **dict(kw, kl_bias_correction=False), backend=backend)
        assert not torch.allclose(plain.loss, out.loss)  # the correction changes the loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sapo", "cispo"])
@pytest.mark.parametrize("kl", [False, True])
def test_sequence_ratio_sapo_and_cispo_match_their_definition(backend, loss_type, kl):
    """TRL's importance_sampling_level="sequence": s = exp(masked mean of log ρ) per sequence, with
    its full gradient, in place of ρ; written here as TRL writes it (a [B, 1] ratio broadcast)."""
    for _ in range(20):  # a draw where cispo's cap on s binds for some sequences but not all
        logp, old, ref, adv, mask = policy_inputs(b=6, t=11)
        m = mask.double()
        s_draw = torch.exp(((logp - old).double() * m).sum(-1) / m.sum(-1).clamp_min(1))
        capped = int((s_draw[m.sum(-1) > 0] > 1.01).sum())
        if 0 < capped < int((m.sum(-1) > 0).sum()):
            break
    kw = dict(
        loss_type=loss_type,
        ratio_level="sequence",
        aggregation="seq-mean-token-mean",
        clip_high=0.01,
        sapo_tau_pos=1.3,
        sapo_tau_neg=2.1,
    )
    if kl:
        kw.update(ref_logp=ref, kl_coef=0.3, kl_bias_correction=True)
    out, g, want, g64 = run_both(backend, logp, old, adv, mask, **kw)
    check_outputs(out, g, want, g64, what=f"{loss_type} at sequence level")
    x = logp.double().requires_grad_()
    m = mask.double()
    n = m.sum(-1, keepdim=True)
    s = torch.exp(((x - old.double()) * m).sum(-1, keepdim=True) / n.clamp_min(1))
    a = adv.double()[:, None]
    if loss_type == "sapo":
        tau = torch.where(a > 0, 1.3, 2.1)
        per_token = -(4 / tau) * torch.sigmoid(tau * (s - 1)) * a * torch.ones_like(x)
    else:
        per_token = -torch.clamp(s, max=1.01).detach() * a * x
    if kl:
        d = ref.double() - x
        per_token = per_token + 0.3 * (torch.exp(d) - d - 1) * s
    loss = ((per_token * m).sum(-1) / n.squeeze(-1).clamp_min(1)).sum() / (n.squeeze(-1) > 0).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert_close(out.loss, loss, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(g, grad * m, rtol=1e-4, atol=1e-7, what="grad")
    if loss_type == "cispo":
        assert 0 < float(out.clip_fraction_high) < 1  # the cap on s binds for some sequences


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_geo_mean_matches_its_definition(backend, per_token_adv):
    """GMPO from the paper's form: sgn(A)·min(sgn(A)·log ρ, sgn(A)·clip(log ρ, −low, high)), its
    masked mean exponentiated per sequence, times −(mean advantage), averaged over all B rows."""
    logp, old, ref, adv, mask = policy_inputs(b=6, t=13, per_token_adv=per_token_adv)
    if per_token_adv:
        adv[1, :4] = 0.0  # zero advantages contribute a zero log-ratio
    low, high = 0.15, 0.25
    kw = dict(
        loss_type="geo_mean",
        clip_low=low,
        clip_high=high,
        aggregation="seq-mean-token-mean",
        num_sequences=torch.tensor(6.0),
    )
    out, g, want, g64 = run_both(backend, logp, old, adv, mask, **kw)
    check_outputs(out, g, want, g64, what="geo_mean")
    x = logp.double().requires_grad_()
    m = mask.double()
    a = (adv if per_token_adv else adv[:, None].expand_as(logp)).double()
    lr = x - old.double()
    sgn = torch.sign(a)
    c = sgn * torch.minimum(sgn * lr, sgn * lr.clamp(-low, high))
    n = m.sum(-1)
    s = torch.exp((c * m).sum(-1) / n.clamp_min(1))
    a_bar = (a * m).sum(-1) / n.clamp_min(1)
    loss = (-a_bar * s).mean()
    (grad,) = torch.autograd.grad(loss, x)
    assert_close(out.loss, loss, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(g, grad * m, rtol=1e-4, atol=1e-7, what="grad")
    binds = ((a > 0) & (lr > high)) | ((a < 0) & (lr < -low))
    assert 0 < int((binds & mask).sum())  # the clip binds somewhere
    assert_close(out.clip_fraction_high, ((a > 0) & (lr > high) & mask).sum() / mask.sum(), rtol=1e-6, atol=1e-7)
    assert_close(out.clip_fraction_low, ((a < 0) & (lr < -low) & mask).sum() / mask.sum(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_estimator, clamp", [("k3", 0.01), ("k1", 0.15), ("k3+", 0.01)])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_policy_loss_kl_clamp(backend, kl_estimator, clamp, bias_correction):
    logp, old, ref, adv, mask = policy_inputs(b=5, t=11)
    kw = dict(
        loss_type="ppo",
        ref_logp=ref,
        kl_coef=0.7,
        kl_estimator=kl_estimator,
        kl_clamp=clamp,
        kl_bias_correction=bias_correction,
    )
    out, g, want, g64 = run_both(backend, logp, old, adv, mask, **kw)
    check_outputs(out, g, want, g64, what=f"{kl_estimator} clamped")
    # The KL part from the definition (token mean of kl_coef·[ρ·]clamp(k(d), −c, c), no gradient
    # outside the band), written with torch.where rather than torch.clamp.
    base, g_base, _, _ = run_both(backend, logp, old, adv, mask, **dict(kw, kl_coef=0.0))
    x = logp.double().requires_grad_()
    d = x - ref.double()
    k = d if kl_estimator == "k1" else torch.exp(-d) - 1 + d
    if kl_estimator == "k3+":  # the k3 value with the k2 gradient
        k = k.detach() + 0.5 * d * d - (0.5 * d * d).detach()
    inside = k.detach().abs() <= clamp
    assert 0 < int((~inside & mask).sum()) < int(mask.sum())  # the clamp binds on some tokens, not all
    k = torch.where(inside, k, torch.sign(k.detach()) * clamp)
    if bias_correction:
        k = k * torch.exp(x - old.double())
    m = mask.double()
    kl_loss = 0.7 * (m * k).sum() / m.sum()
    (kl_grad,) = torch.autograd.grad(kl_loss, x)
    assert_close(out.loss - base.loss, kl_loss, rtol=1e-5, atol=1e-6, what="KL part of the loss")
    assert_close(g - g_base, kl_grad, rtol=1e-4, atol=1e-7, what="KL part of the gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "loss_type, bias_correction", [("ppo", False), ("ppo", True), ("gspo", True), ("cispo", False)]
)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_kl_times_is_weights(backend, loss_type, bias_correction, level):
    logp, old, ref, adv, mask = policy_inputs(b=5, t=9)
    w = torch.rand(logp.shape if level == "token" else logp.shape[:1]) * 2.5
    kw = dict(
        loss_type=loss_type,
        ref_logp=ref,
        kl_coef=0.4,
        kl_estimator="abs",
        kl_bias_correction=bias_correction,
        is_weights=w,
        is_threshold=1.7,
        aggregation="seq-mean-token-mean",
    )
    out, g, want, g64 = run_both(backend, logp, old, adv, mask, **dict(kw, kl_times_is_weights=True))
    check_outputs(out, g, want, g64, what="kl × IS")
    # The KL part from the definition: kl_coef · mean_b mean_t min(w, 1.7) · [r ·] |logp − ref|.
    with_kl, g_with, _, _ = run_both(backend, logp, old, adv, mask, **dict(kw, kl_times_is_weights=True))
    without, g_without, _, _ = run_both(backend, logp, old, adv, mask, **dict(kw, kl_coef=0.0))
    x = logp.double().requires_grad_()
    m = mask.double()
    n = m.sum(-1)
    iw = (w if level == "token" else w[:, None].expand_as(logp)).double().clamp(max=1.7)
    k = (x - ref.double()).abs()
    if bias_correction:
        log_ratio = (x - old.double()) * m
        k = k * (
            torch.exp(log_ratio.sum(-1) / n.clamp_min(1))[:, None] if loss_type == "gspo" else torch.exp(log_ratio)
        )
    per_seq = (m * iw * k).sum(-1) / n.clamp_min(1)
    kl_loss = 0.4 * per_seq.sum() / (n > 0).sum()
    (kl_grad,) = torch.autograd.grad(kl_loss, x)
    assert_close(with_kl.loss - without.loss, kl_loss, rtol=1e-5, atol=1e-6, what="KL part")
    assert_close(g_with - g_without, kl_grad, rtol=1e-4, atol=1e-7, what="KL part of the gradient")
    plain = nk.policy_loss(logp, old, adv, mask, backend=backend, **kw)
    assert not torch.allclose(plain.loss, out.loss)  # by default the KL term is not importance-weighted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "sapo"])
def test_policy_loss_on_policy_and_column_advantages(backend, loss_type):
    """old_logp=None is old_logp = logp.detach(); [B, 1] advantages and IS weights are per sequence."""
    logp, old, ref, adv, mask = policy_inputs(b=5, t=7)
    iw = torch.rand(5) * 2
    kw = dict(loss_type=loss_type, ref_logp=ref, kl_coef=0.2, kl_bias_correction=True, is_weights=iw)
    got, g, _, _ = run_both(backend, logp, None, adv.unsqueeze(1), mask, **dict(kw, is_weights=iw.unsqueeze(1)))
    want, g_want, _, _ = run_both(backend, logp, logp.detach(), adv, mask, **kw)
    assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-7, what="loss")
    assert_close(g, g_want, rtol=1e-6, atol=1e-8, what="grad")
    assert float(got.mean_ratio) == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_mode", ["truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["ppo", "npo", "cispo"])
def test_policy_loss_importance_weights(backend, is_mode, level, loss_type):
    logp, old, ref, adv, mask = policy_inputs()
    shape = logp.shape if level == "token" else logp.shape[:1]
    weights = torch.rand(shape) * 3.0  # some above the threshold, some below its reciprocal
    check_outputs(
        *run_both(
            backend,
            logp,
            old,
            adv,
            mask,
            is_weights=weights,
            is_mode=is_mode,
            is_threshold=1.8,
            ref_logp=ref,
            loss_type=loss_type,
            cispo_two_sided=True,
        ),
        what=f"{is_mode}/{level}",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_options(backend):
    logp, old, ref, adv, mask = policy_inputs(per_token_adv=True)
    old = old_logp_off_edges(logp, logp + torch.randn_like(logp))  # ratios far outside the clip range
    for kw in (
        dict(delta=1.5),
        dict(dual_clip=2.0, delta=2.5),
        dict(loss_type="sapo", sapo_tau_pos=0.5, sapo_tau_neg=2.0),
        dict(loss_type="cispo"),
        dict(loss_type="cispo", cispo_two_sided=True),
        dict(aggregation="seq-mean-token-sum-norm", norm_constant=7.0),
        dict(mask=None),
    ):
        kw = {"mask": mask, **kw}
        m = kw.pop("mask")
        check_outputs(*run_both(backend, logp, old, adv, m, **kw), what=str(kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "npo"])
def test_policy_loss_packed_equals_padded(backend, loss_type):
    lengths = [5, 1, 0, 8, 3]
    b, t = len(lengths), max(lengths)
    logp, old, ref, _, _ = policy_inputs(b, t, seed_mask=False)
    adv = torch.randn(b)
    mask = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    inner = torch.rand(b, t) > 0.2
    cu = torch.tensor([0] + lengths).cumsum(0)
    pack = lambda x: x[mask]  # noqa: E731
    kw = dict(loss_type=loss_type, ref_logp=ref, kl_coef=0.1, aggregation="seq-mean-token-mean")
    padded = nk.policy_loss(logp.clone().requires_grad_(), old, adv, mask & inner, backend=backend, **kw)
    x = pack(logp).clone().requires_grad_()
    packed = nk.policy_loss(
        x, pack(old), adv, pack(mask & inner), cu_seqlens=cu, backend=backend, **{**kw, "ref_logp": pack(ref)}
    )
    assert_close(packed.loss, padded.loss, **F32, what="packed vs padded")
    assert_close(torch.stack(packed[1:7]), torch.stack(padded[1:7]), **F32, what="metrics")
    packed.loss.backward()
    x64 = logp.double().requires_grad_()
    policy_loss_reference(
        x64, old.double(), adv.double(), mask & inner, **{**kw, "ref_logp": ref.double()}
    ).loss.backward()
    assert_close(x.grad, x64.grad[mask], rtol=1e-5, atol=1e-7, what="packed grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_hand_worked(backend):
    # 1. Every token exactly on both clip boundaries (ρ = 1, clip range 0): the unclipped branch's
    #    gradient flows, loss = −mean(A), d/dlogp = −A/n.
    adv = torch.tensor([[1.5, -2.0, 0.5]])
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    out = nk.policy_loss(logp, logp.detach().clone(), adv, clip_low=0.0, clip_high=0.0, backend=backend)
    assert_close(out.loss, torch.tensor(-0.0), rtol=0, atol=1e-7)
    (g,) = torch.autograd.grad(out.loss, logp)
    assert_close(g, -adv / 3, rtol=1e-6, atol=1e-7)
    assert out.clip_fraction_low == 0 and out.clip_fraction_high == 0

    # 2. A negative advantage beyond the dual clip: ρ = e², A = −1, c = 3: PPO gives e² > 3, so the
    #    loss is the cap 3 with no gradient; the second token (ρ = 1) is untouched: loss −A = 1.
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-2.0, -1.0]])
    out = nk.policy_loss(logp, old, torch.tensor([-1.0]), dual_clip=3.0, aggregation="token-sum", backend=backend)
    assert_close(out.loss, torch.tensor(4.0), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(out.loss, logp)
    assert_close(g, torch.tensor([[0.0, 1.0]]), rtol=1e-6, atol=1e-7)
    assert_close(out.dual_clip_fraction, torch.tensor(0.5), rtol=0, atol=0)

    # 3. GSPO: log-ratios 0.1 and 0.3 give s = e^0.2 for both tokens; A = 1 in a wide range:
    #    loss = −s, each token's gradient −s/2.
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)
    out = nk.policy_loss(
        logp, torch.zeros(1, 2), torch.ones(1), loss_type="gspo", clip_low=0.5, clip_high=0.5, backend=backend
    )
    s = math.exp(0.2)
    assert_close(out.loss, torch.tensor(-s), rtol=1e-6, atol=1e-6)
    assert_close(torch.autograd.grad(out.loss, logp)[0], torch.tensor([[-s / 2, -s / 2]]), rtol=1e-6, atol=1e-7)

    # 4. NPO: Σ logp − Σ ref = −1.5, β = 2: loss (2/β)·log(1 + e^{−3}), seq-mean-token-sum.
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = nk.policy_loss(
        logp,
        logp.detach(),
        None,
        ref_logp=torch.tensor([[-0.5, -1.0]]),
        loss_type="npo",
        npo_beta=2.0,
        aggregation="seq-mean-token-sum",
        backend=backend,
    )
    assert_close(out.loss, torch.tensor(math.log1p(math.exp(-3.0))), rtol=1e-6, atol=1e-7)
    sig = 1 / (1 + math.exp(3.0))
    assert_close(torch.autograd.grad(out.loss, logp)[0], torch.full((1, 2), 2 * sig), rtol=1e-5, atol=1e-7)

    # 5. A fully masked sequence drops out of seq-mean-token-mean: the loss is the other sequence's
    #    token mean (GPG, A = 2: −2·mean(logp) = 3), not half of it, and its gradient is 0.
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.5]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = nk.policy_loss(
        logp,
        logp.detach(),
        torch.tensor([2.0, 5.0]),
        mask,
        loss_type="gpg",
        aggregation="seq-mean-token-mean",
        backend=backend,
    )
    assert_close(out.loss, torch.tensor(3.0), rtol=1e-6, atol=1e-6)
    assert_close(
        torch.autograd.grad(out.loss, logp)[0], torch.tensor([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_fully_masked_and_empty(backend, aggregation):
    logp, old, ref, adv, _ = policy_inputs()
    old[0, 0] = float("inf")  # padding garbage under the mask must not leak
    x = logp.clone().requires_grad_()
    out = nk.policy_loss(
        x, old, adv, torch.zeros_like(logp, dtype=torch.bool), aggregation=aggregation, backend=backend
    )
    assert out.loss.item() == 0.0 and all(v.item() == 0.0 for v in out[1:7])
    (g,) = torch.autograd.grad(out.loss, x)
    assert torch.equal(g, torch.zeros_like(g))
    e = torch.zeros(0, 5, requires_grad=True)
    out = nk.policy_loss(e, torch.zeros(0, 5), torch.zeros(0), aggregation=aggregation, backend=backend)
    assert out.loss.item() == 0.0
    assert torch.autograd.grad(out.loss, e)[0].shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_gradient_accumulation(backend, aggregation):
    # Two micro-batches with the global normaliser give the one-big-batch loss and gradient.
    logp, old, ref, adv, mask = policy_inputs(6, 7)
    mask[3] = True
    kw = dict(aggregation=aggregation, ref_logp=ref, kl_coef=0.1)
    x = logp.clone().requires_grad_()
    whole = nk.policy_loss(x, old, adv, mask, backend=backend, **kw)
    (g_whole,) = torch.autograd.grad(whole.loss, x)
    num_tokens = mask.sum()
    num_sequences = int(mask.any(-1).sum())
    y = logp.clone().requires_grad_()
    total = 0
    for part in (slice(0, 2), slice(2, 6)):
        out = nk.policy_loss(
            y[part],
            old[part],
            adv[part],
            mask[part],
            backend=backend,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            **{**kw, "ref_logp": ref[part]},
        )
        out.loss.backward()
        total = total + out.loss.detach()
    assert_close(total, whole.loss, **F32)
    assert_close(y.grad, g_whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_policy_loss_deterministic(backend):
    logp, old, ref, adv, mask = policy_inputs(16, 33)
    x = logp.clone().requires_grad_()
    first = nk.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, backend=backend)
    g1 = torch.autograd.grad(first.loss, x)[0]
    for _ in range(3):
        again = nk.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, backend=backend)
        assert torch.equal(again.loss, first.loss)
        assert torch.equal(torch.autograd.grad(again.loss, x)[0], g1)


def test_policy_loss_bad_input():
    logp, old, ref, adv, mask = policy_inputs()
    cases = [
        (dict(advantages=None), ValueError, "advantages"),
        (dict(loss_type="npo"), ValueError, "ref_logp"),
        (dict(kl_coef=0.1), ValueError, "ref_logp"),
        (dict(loss_type="trpo"), ValueError, "loss_type"),
        (dict(aggregation="mean"), ValueError, "aggregation"),
        (dict(kl_estimator="k4", ref_logp=ref), ValueError, "kl_estimator"),
        (dict(clip_low=-0.1), ValueError, "clip_low"),
        (dict(dual_clip=0.5), ValueError, "dual_clip"),
        (dict(old_logp=old[:, :-1]), ValueError, "old_logp"),
        (dict(advantages=adv[:-1]), ValueError, "advantages"),
        (dict(mask=mask[:-1]), ValueError, "mask"),
        (dict(is_weights=torch.rand(3)), ValueError, "is_weights"),
        (dict(is_threshold=0.0, is_weights=torch.rand(4)), ValueError, "is_threshold"),
        (dict(num_tokens=0), ValueError, "num_tokens"),
    ]
    for override, exc, name in cases:
        kw = dict(old_logp=old, advantages=adv, mask=mask)
        kw.update(override)
        with pytest.raises(exc, match=name):
            nk.policy_loss(logp, kw.pop("old_logp"), kw.pop("advantages"), kw.pop("mask"), **kw)
    flat = logp.reshape(-1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        nk.policy_loss(flat, flat, torch.zeros(2), cu_seqlens=torch.tensor([0, 5, 30]))
    with pytest.raises(ValueError, match="norm_constant"):
        nk.policy_loss(
            flat, flat, torch.zeros(2), cu_seqlens=torch.tensor([0, 5, 36]), aggregation="seq-mean-token-sum-norm"
        )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_policy_loss_opcheck(backend):
    logp, old, ref, adv, mask = policy_inputs()
    codes, scalars = nk.PolicyLossConfig(dual_clip=3.0, kl_coef=0.1).kernel_args(
        use_kl=True,
        use_is=False,
        adv_per_token=False,
        iw_per_token=False,
        compute_grad=True,
        num_sequences=4,
        seq_len=9,
        max_len=9,
        norm_constant=1.0,
    )
    args = (
        logp.reshape(-1).requires_grad_(),
        old.reshape(-1),
        adv,
        mask.reshape(-1).view(torch.uint8),
        ref.reshape(-1),
        None,
        None,
        torch.tensor(11.0),
        codes,
        scalars,
        backend,
    )
    torch.library.opcheck(torch.ops.negkernels.policy_loss.default, args)


# ============================================================================ from logits


def from_logits_case(b=3, t=6, v=45, dtype=torch.float32):
    logits = (torch.randn(b, t, v) * 2).to(dtype)
    targets = torch.randint(0, v, (b, t))
    with torch.no_grad():
        base = oracle_logprobs(logits, targets)[0].float()
    old = old_logp_off_edges(base, base + torch.randn(b, t) * 0.3)
    ref = base + torch.randn(b, t) * 0.2
    mask = torch.rand(b, t) > 0.2
    mask[min(1, b - 1)] = False
    return logits, targets, old, ref, torch.randn(b), mask


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_policy_loss_from_logits_parity(backend, loss_type, inplace):
    logits, targets, old, ref, adv, mask = from_logits_case()
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
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0 if inplace else leaf
    with poisoned_allocations():
        out = nk.policy_loss_from_logits(x, targets, old, adv, mask, inplace_backward=inplace, backend=backend, **kw)
    out.loss.backward()
    x64 = logits.double().requires_grad_()
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_out = nk.policy_loss_from_logits(x64, targets, old.double(), adv.double(), mask, backend="reference", **kw64)
    ref_out.loss.backward()
    assert_close(out.loss, ref_out.loss, **F32, what="loss")
    assert_close(leaf.grad, x64.grad, rtol=1e-4, atol=1e-7, what="logits grad")
    for name in (
        "clip_fraction_low",
        "clip_fraction_high",
        "dual_clip_fraction",
        "approx_kl",
        "mean_ratio",
        "kl",
        "entropy",
    ):
        assert_close(getattr(out, name), getattr(ref_out, name), **F32, what=name)
    assert_close(out.token_logp, ref_out.token_logp, **F32, what="token_logp")
    assert_close(out.token_entropy, ref_out.token_entropy, **F32, what="token_entropy")
    assert not out.token_logp.requires_grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "cispo", "gspo"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_policy_loss_from_logits_kl_bias_correction_and_on_policy(backend, loss_type, on_policy):
    """The fused kernel's bias-corrected KL and its on-policy ratio (old_logp=None: ρ = 1 computed
    in the kernel from the row's own log-prob) against the float64 reference of the same call."""
    logits, targets, old, ref, adv, mask = from_logits_case(b=4, t=5, v=53)
    kw = dict(
        loss_type=loss_type,
        ref_logp=ref,
        kl_coef=0.4,
        kl_bias_correction=True,
        return_entropy=True,
        aggregation="token-mean",
    )
    old_in = None if on_policy else old
    leaf = logits.clone().requires_grad_()
    with poisoned_allocations():
        out = nk.policy_loss_from_logits(leaf, targets, old_in, adv.unsqueeze(1), mask, backend=backend, **kw)
    out.loss.backward()
    x64 = logits.double().requires_grad_()
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    want = nk.policy_loss_from_logits(
        x64, targets, None if on_policy else old.double(), adv.double(), mask, backend="reference", **kw64
    )
    want.loss.backward()
    assert_close(out.loss, want.loss, **F32, what="loss")
    assert_close(leaf.grad, x64.grad, rtol=1e-4, atol=1e-7, what="logits grad")
    for name in ("kl", "mean_ratio", "approx_kl", "clip_fraction_high"):
        assert_close(getattr(out, name), getattr(want, name), **F32, what=name)
    if on_policy:
        assert float(out.mean_ratio) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_policy_loss_from_logits_kl_times_is_weights(backend):
    logits, targets, old, ref, adv, mask = from_logits_case(b=3, t=6, v=37)
    w = torch.rand(targets.shape) * 2
    kw = dict(loss_type="ppo", ref_logp=ref, kl_coef=0.5, kl_estimator="abs", is_weights=w, kl_times_is_weights=True)
    check_from_logits_against_float64(backend, logits, targets, old, adv, mask, **kw)


def check_from_logits_against_float64(backend, logits, targets, old, adv, mask, **kw):
    """The kernel's loss, KL metric and logits gradient against the float64 reference of the same call."""
    leaf = logits.clone().requires_grad_()
    with poisoned_allocations():
        out = nk.policy_loss_from_logits(leaf, targets, old, adv, mask, backend=backend, **kw)
    out.loss.backward()
    x64 = logits.double().requires_grad_()
    want = nk.policy_loss_from_logits(
        x64,
        targets,
        old.double(),
        adv.double(),
        mask,
        backend="reference",
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
    )
    want.loss.backward()
    assert_close(out.loss, want.loss, **F32, what="loss")
    assert_close(out.kl, want.kl, **F32, what="kl")
    assert_close(leaf.grad, x64.grad, rtol=1e-4, atol=1e-7, what="logits grad")
    return want


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_policy_loss_from_logits_kl_clamp(backend):
    logits, targets, old, ref, adv, mask = from_logits_case(b=3, t=6, v=37)
    ref = ref + torch.randn_like(ref)  # far from the policy: the clamp binds on some tokens
    kw = dict(loss_type="ppo", ref_logp=ref, kl_coef=0.5, kl_clamp=0.3, kl_bias_correction=True)
    want = check_from_logits_against_float64(backend, logits, targets, old, adv, mask, **kw)
    unclamped = nk.policy_loss_from_logits(
        logits.double(),
        targets,
        old.double(),
        adv.double(),
        mask,
        backend="reference",
        **dict(kw, ref_logp=ref.double(), kl_clamp=None),
    )
    assert not torch.allclose(unclamped.kl, want.kl)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_loss_from_logits_half_precision_and_views(backend, dtype):
    logits, targets, old, ref, adv, mask = from_logits_case(2, 7, 131, dtype)
    full = torch.cat([logits, logits[:, :1]], dim=1)  # [B, T+1, V]: the model's output before the shift
    leaf = full.clone().requires_grad_()
    out = nk.policy_loss_from_logits(leaf[:, :-1], targets, old, adv, mask, backend=backend)
    out.loss.backward()
    x64 = full.double().requires_grad_()
    nk.policy_loss_from_logits(
        x64[:, :-1], targets, old.double(), adv.double(), mask, backend="reference"
    ).loss.backward()
    assert leaf.grad.dtype == dtype
    assert_close(leaf.grad, x64.grad, **TOLERANCES[dtype], what="half-precision logits grad")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
def test_policy_loss_from_logits_packed_and_scaled_grad(backend, loss_type):
    logits, targets, old, ref, adv, mask = from_logits_case(1, 11, 23)
    cu = torch.tensor([0, 4, 4, 11])
    seq_adv = torch.randn(3)
    kw = dict(cu_seqlens=cu, aggregation="seq-mean-token-mean", loss_type=loss_type)
    x = logits[0].clone().requires_grad_()
    mask = torch.rand(11) > 0.3
    out = nk.policy_loss_from_logits(x, targets[0], old[0], seq_adv, mask, backend=backend, **kw)
    (out.loss * 2.5).backward()  # an incoming gradient other than 1 rescales the stored gradient
    x64 = logits[0].double().requires_grad_()
    ref_out = nk.policy_loss_from_logits(
        x64, targets[0], old[0].double(), seq_adv.double(), mask, backend="reference", **kw
    )
    (ref_out.loss * 2.5).backward()
    assert_close(out.loss, ref_out.loss, **F32, what="packed loss")
    assert_close(x.grad, x64.grad, rtol=1e-4, atol=1e-7, what="packed grad")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("masking", ["mask", "none", "all-masked", "given-count"])
def test_policy_loss_from_logits_normalisers(backend, aggregation, masking, monkeypatch):
    """Every aggregation's normaliser, whether the kernel counts the tokens itself (token-mean and
    token-sum of this call: counted in several steps here) or the host gives it."""
    import negkernels.triton.logprobs as triton_logprobs

    monkeypatch.setattr(triton_logprobs, "MASK_COUNT_BLOCK", 16)  # 35 rows: three counting steps
    logits, targets, old, ref, adv, mask = from_logits_case(5, 7, 19)
    mask = {"mask": mask, "none": None, "all-masked": torch.zeros_like(mask), "given-count": mask}[masking]
    given = dict(num_tokens=torch.tensor(9.0), num_sequences=3) if masking == "given-count" else {}
    kw = dict(aggregation=aggregation, clip_low=0.1, clip_high=0.15, **given)
    x = logits.clone().requires_grad_()
    with poisoned_allocations():
        out = nk.policy_loss_from_logits(x, targets, old, adv, mask, backend=backend, **kw)
    (out.loss * 1.5).backward()
    x64 = logits.double().requires_grad_()
    ref_out = nk.policy_loss_from_logits(x64, targets, old.double(), adv.double(), mask, backend="reference", **kw)
    (ref_out.loss * 1.5).backward()
    assert_close(out.loss, ref_out.loss, **F32, what="loss")
    assert_close(x.grad, x64.grad, rtol=1e-4, atol=1e-7, what="logits grad")
    assert_close(out.mean_ratio, ref_out.mean_ratio, **F32, what="mean_ratio")


def test_policy_loss_from_logits_bad_input():
    logits, targets, old, ref, adv, mask = from_logits_case()
    with pytest.raises(ValueError, match="logits"):
        nk.policy_loss_from_logits(logits[0], targets, old, adv, mask)
    with pytest.raises(ValueError, match="targets"):
        nk.policy_loss_from_logits(logits, targets + 100, old, adv, mask)
    with pytest.raises(ValueError, match="old_logp"):
        nk.policy_loss_from_logits(logits, targets, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="entropy_coef"):
        nk.policy_loss_from_logits(logits, targets, old, adv, mask, entropy_coef=float("nan"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_policy_losses_compile_fullgraph(backend):
    torch._dynamo.reset()
    logp, old, ref, adv, mask = policy_inputs()
    x = logp.clone().requires_grad_()
    fn = torch.compile(
        lambda x: nk.policy_loss(x, old, adv, mask, backend=backend).loss, backend="aot_eager", fullgraph=True
    )
    loss = fn(x)
    loss.backward()
    x64 = logp.double().requires_grad_()
    ref_loss = policy_loss_reference(x64, old.double(), adv.double(), mask).loss
    ref_loss.backward()
    assert_close(loss, ref_loss, **F32)
    assert_close(x.grad, x64.grad, rtol=1e-5, atol=1e-7)
    logits, targets, old, ref, adv, mask = from_logits_case()
    y = logits.clone().requires_grad_()
    fn = torch.compile(
        lambda y: nk.policy_loss_from_logits(y, targets, old, adv, mask, validate=False, backend=backend).loss * 3.0,
        backend="aot_eager",
        fullgraph=True,
    )
    fn(y).backward()
    y64 = logits.double().requires_grad_()
    (
        nk.policy_loss_from_logits(y64, targets, old.double(), adv.double(), mask, backend="reference").loss * 3.0
    ).backward()
    assert_close(y.grad, y64.grad, rtol=1e-4, atol=1e-7)


def test_policy_loss_module():
    logp, old, ref, adv, mask = policy_inputs()
    loss_fn = nk.PolicyLoss(
        loss_type="cispo", clip_high=0.5, kl_coef=0.1, aggregation="seq-mean-token-sum", backend="reference"
    )
    assert "cispo" in repr(loss_fn)
    out = loss_fn(logp, old, adv, mask, ref_logp=ref)
    direct = policy_loss_reference(
        logp.double(),
        old.double(),
        adv.double(),
        mask,
        loss_type="cispo",
        clip_high=0.5,
        kl_coef=0.1,
        ref_logp=ref.double(),
        aggregation="seq-mean-token-sum",
    )
    assert_close(out.loss, direct.loss, **F32)
    # A per-call option overrides the stored one.
    assert_close(
        loss_fn(logp, old, adv, mask, ref_logp=ref, kl_coef=0.0).loss,
        policy_loss_reference(
            logp.double(),
            old.double(),
            adv.double(),
            mask,
            loss_type="cispo",
            clip_high=0.5,
            aggregation="seq-mean-token-sum",
        ).loss,
        **F32,
    )
    logits, targets, old_l, _, adv_l, mask_l = from_logits_case()
    got = loss_fn.from_logits(logits, targets, old_l, adv_l, mask_l, kl_coef=0.0)
    assert torch.isfinite(got.loss) and got.token_logp.shape == targets.shape
    with pytest.raises(TypeError, match="unknown options"):
        nk.PolicyLoss(clip=0.2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kl_estimator", ["k3", "k3+"])
def test_small_kl_values_keep_their_precision(backend, kl_estimator):
    # Policies a step apart: log-ratios ~1e-3, so ρ − 1 − log ρ and the k3 estimate are ~5e-7.
    # e^x − 1 − x evaluated directly in fp32 loses ~10% of that; the kernels must not.
    logp = torch.randn(6, 50) * 0.5 - 2
    old = logp + 1e-3 * torch.randn_like(logp)
    ref = logp + 1e-3 * torch.randn_like(logp)
    out = nk.policy_loss(
        logp, old, torch.randn(6), ref_logp=ref, kl_coef=1.0, kl_estimator=kl_estimator, backend=backend
    )
    ref_out = policy_loss_reference(
        logp.double(),
        old.double(),
        torch.zeros(6, dtype=torch.float64),
        ref_logp=ref.double(),
        kl_coef=1.0,
        kl_estimator=kl_estimator,
        loss_type="gpg",
    )
    assert_close(out.approx_kl, ref_out.metrics[3], rtol=1e-4, atol=0, what="approx_kl")
    assert_close(out.kl, ref_out.metrics[5], rtol=1e-4, atol=0, what="kl")


# ============================================================================ fused backward scale


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_backward_scales_by_the_incoming_gradient_on_the_device(backend, inplace):
    # The fused forward writes d loss / d logits for an incoming gradient of 1; the backward
    # scales it on the device (no host read). Scales of 1, −2.5 and 0 against the float64 oracle.
    logits, targets, old, ref, adv, mask = from_logits_case(b=2, t=5, v=37)
    want_leaf = logits.double().requires_grad_()
    want = nk.policy_loss_from_logits(want_leaf, targets, old.double(), adv.double(), mask, backend="reference").loss
    (want_grad,) = torch.autograd.grad(want, want_leaf)
    for scale in (1.0, -2.5, 0.0):
        leaf = logits.clone().requires_grad_()
        x = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf it may overwrite
        out = nk.policy_loss_from_logits(x, targets, old, adv, mask, inplace_backward=inplace, backend=backend)
        (out.loss * scale).backward()
        assert_close(leaf.grad, want_grad * scale, **TOLERANCES[torch.float32], what=f"scale {scale}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_backward_twice_raises(backend):
    logits, targets, old, ref, adv, mask = from_logits_case(b=2, t=5, v=37)
    leaf = logits.clone().requires_grad_()
    out = nk.policy_loss_from_logits(leaf, targets, old, adv, mask, backend=backend)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        out.loss.backward()


def test_covariance_token_mask_top_and_band_against_a_loop():
    logp, _, _, _, mask = policy_inputs(b=5, t=13)
    adv = torch.randn(5, 13)
    cells = [(b, t) for b in range(5) for t in range(13) if mask[b, t]]
    a_mean = sum(float(adv[c]) for c in cells) / len(cells)
    l_mean = sum(float(logp[c]) for c in cells) / len(cells)
    cov = {c: (float(adv[c]) - a_mean) * (float(logp[c]) - l_mean) for c in cells}
    k = max(1, int(len(cells) * 0.15))
    top = nk.covariance_token_mask(logp, adv, mask, fraction=0.15)
    want = sorted(cells, key=lambda c: -cov[c])[:k]
    assert top.dtype == torch.bool and sorted(map(tuple, top.nonzero().tolist())) == sorted(want)
    exclude = torch.rand(5, 13) < 0.3
    band = (-0.2, 0.3)
    candidates = [c for c in cells if band[0] < cov[c] < band[1] and not exclude[c]]  # row-major
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(7))
    drawn = nk.covariance_token_mask(
        logp, adv, mask, fraction=0.15, band=band, exclude=exclude, generator=torch.Generator().manual_seed(7)
    )
    assert sorted(map(tuple, drawn.nonzero().tolist())) == sorted(candidates[int(i)] for i in order[:k])
    assert int(drawn.sum()) == min(k, len(candidates)) > 0
    # nothing unmasked, or nothing in the band: nothing picked
    assert not nk.covariance_token_mask(logp, adv, torch.zeros_like(mask), fraction=0.5).any()
    assert not nk.covariance_token_mask(logp, adv, mask, fraction=0.5, band=(50.0, 60.0)).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fraction=0.0), "fraction"),
        (dict(fraction=float("nan")), "fraction"),
        (dict(fraction=0.1, advantages=torch.randn(3, 4)), "advantages"),
        (dict(fraction=0.1, mask=torch.ones(3, 4, dtype=torch.bool)), "mask"),
        (dict(fraction=0.1, band=(0.0, 1.0), exclude=torch.ones(4, dtype=torch.bool)), "exclude"),
        (dict(fraction=0.1, band=(0.0, float("inf"))), "band"),
    ],
)
def test_covariance_token_mask_bad_input(kwargs, match):
    args = dict(logp=torch.randn(4, 3), advantages=torch.randn(4, 3), mask=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nk.covariance_token_mask(args.pop("logp"), args.pop("advantages"), args.pop("mask"), **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_cap_below_one(backend):
    """cispo's cap hi = 1 + clip_high may lie below 1 (TRL's default epsilon_high = 0.2 is the cap)."""
    logp, old, ref, adv, mask = policy_inputs()
    out, g, want, g64 = run_both(backend, logp, old, adv, mask, loss_type="cispo", clip_high=-0.8)
    check_outputs(out, g, want, g64, what="cispo, cap 0.2")
    rho = torch.exp(logp.double() - old.double())
    m = mask.double()
    expected = (-(rho.clamp(max=0.2) * adv.double()[:, None] * logp.double()) * m).sum() / m.sum()
    assert_close(out.loss, expected, rtol=1e-5, atol=1e-6, what="loss")
    assert float(out.clip_fraction_high) > 0.9  # nearly every ratio is above 0.2
