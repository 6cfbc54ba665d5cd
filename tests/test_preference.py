"""Preference losses: every loss type against a scalar float64 oracle written from the formulas,
both backends against the reference (values, rewards, token gradients), hand-worked cases,
degenerate and unpaired batches, and the LM-head-fused form against materialised logits."""

from __future__ import annotations

import math

import pytest
import torch

import negkernels as nk
from negkernels.reference.preference import PREFERENCE_LOSS_TYPES

from .helpers import assert_close, poisoned_allocations

CPU_BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu", op="preference_loss")]
SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def scalar_oracle(loss_type, s_w, s_l, r_w, r_l, *, beta, eps=0.0, gamma=0.0, tau=0.05, z=0.0, lam_d=1.0, lam_u=1.0):
    """One pair's loss, in plain float64 math from each loss's definition (TRL's / the papers')."""
    h = r_w - r_l
    u = beta * h
    a, b = beta * r_w, beta * r_l
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(u) - eps * _log_sigmoid(-u)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(u) + eps * _log_sigmoid(-u)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - u)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        q = _sigmoid(u)
        return q * (math.log(q) - math.log(1 - eps)) + (1 - q) * (math.log(1 - q) - math.log(eps))
    if loss_type == "nca_pair":
        return -_log_sigmoid(a) - 0.5 * _log_sigmoid(-a) - 0.5 * _log_sigmoid(-b)
    if loss_type == "bco_pair":
        return -_log_sigmoid(a) - _log_sigmoid(-b)
    if loss_type == "sppo_hard":
        return (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - _sigmoid(a) + _sigmoid(b)
    if loss_type == "apo_down":
        return _sigmoid(a) + 1 - _sigmoid(u)
    if loss_type == "discopop":
        m = _sigmoid(u / tau)
        return -_log_sigmoid(u) * (1 - m) + m * math.exp(-u)
    if loss_type == "simpo":
        v = beta * (s_w - s_l) - gamma
        return -(1 - eps) * _log_sigmoid(v) - eps * _log_sigmoid(-v)
    if loss_type == "orpo":

        def log_odds(x):
            return x - math.log(-math.expm1(x))

        return -s_w - beta * _log_sigmoid(log_odds(s_w) - log_odds(s_l))
    if loss_type == "kto":
        return lam_d * (1 - _sigmoid(beta * (r_w - z))), lam_u * (1 - _sigmoid(beta * (z - r_l)))
    if loss_type == "npo":
        return (2 / beta) * math.log1p(math.exp(b))
    raise AssertionError(loss_type)


def _f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _options(loss_type: str) -> dict:
    return dict(loss_type=loss_type, beta=0.7, label_smoothing=0.13 if loss_type in SMOOTHED else 0.0)


def _tokens(b, t, *, noncontiguous=False, scale=1.5, dtype=torch.float64):
    """Token log-probs < 0 (optionally a strided view)."""
    if noncontiguous:
        return (-torch.rand(b, 2 * t, dtype=torch.float64) * scale)[:, ::2].to(dtype)
    return (-torch.rand(b, t, dtype=torch.float64) * scale).to(dtype)


def _masks(b, t):
    m = torch.rand(b, t) > 0.3
    m[:, 0] = True
    return m


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
def test_reference_matches_scalar_oracle(loss_type):
    b, t = 6, 23
    c, r, rc, rr = (_tokens(b, t) for _ in range(4))
    mc, mr = _masks(b, t), _masks(b, t)
    opts = _options(loss_type)
    out = nk.preference_loss(
        c, r, rc, rr, chosen_mask=mc, rejected_mask=mr, backend="reference", reduction="none", **opts
    )
    normalize = loss_type in ("simpo", "orpo")

    def value(x, m):
        total = float((x * m).sum())
        return total / max(int(m.sum()), 1) if normalize else total

    s_w = [value(c[i], mc[i]) for i in range(b)]
    s_l = [value(r[i], mr[i]) for i in range(b)]
    r_w = [s_w[i] - value(rc[i], mc[i]) for i in range(b)]
    r_l = [s_l[i] - value(rr[i], mr[i]) for i in range(b)]
    z = max(0.0, (sum(r_w) + sum(r_l)) / (2 * b))
    kw = dict(beta=opts["beta"], eps=opts["label_smoothing"], z=z)
    expected = [scalar_oracle(loss_type, s_w[i], s_l[i], r_w[i], r_l[i], **kw) for i in range(b)]
    if loss_type == "kto":
        expected = [e[0] for e in expected] + [e[1] for e in expected]
    assert_close(out.loss, _f64(expected), rtol=1e-10, atol=1e-12, what=loss_type)
    assert_close(out.chosen_logps, _f64(s_w), rtol=1e-12, atol=1e-12, what="chosen values")
    rewards = s_w if loss_type in ("simpo", "orpo") else r_w
    assert_close(out.chosen_rewards, opts["beta"] * _f64(rewards), rtol=1e-12, atol=1e-12, what="rewards")


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
def test_reference_gradient_matches_finite_differences(loss_type):
    b, t = 3, 5
    c = _tokens(b, t).requires_grad_()
    r = _tokens(b, t).requires_grad_()
    rc, rr = _tokens(b, t), _tokens(b, t)
    mc, mr = _masks(b, t), _masks(b, t)
    opts = _options(loss_type)  # npo's calibration weights are detached: tested on their own below
    # kto's batch reference point is a constant of the gradient: hold it fixed for gradcheck
    z = 0.05 if loss_type == "kto" else None

    def f(c, r):
        kw = dict(chosen_mask=mc, rejected_mask=mr, backend="reference", reduction="sum", kto_reference_point=z)
        return nk.preference_loss(c, r, rc, rr, **kw, **opts).loss

    torch.autograd.gradcheck(f, (c, r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
@pytest.mark.parametrize("layout", ["sums", "tokens", "tokens-noncontiguous", "per-token-reference"])
def test_backend_parity_with_float64_reference(backend, loss_type, layout):
    b, t_w, t_l = 7, 19, 33
    if layout == "sums":
        c, r = -torch.rand(b, dtype=torch.float64) * 40, -torch.rand(b, dtype=torch.float64) * 40
        rc, rr = -torch.rand(b, dtype=torch.float64) * 40, -torch.rand(b, dtype=torch.float64) * 40
        mc = mr = None
    else:
        nc = layout == "tokens-noncontiguous"
        c, r = _tokens(b, t_w, noncontiguous=nc), _tokens(b, t_l, noncontiguous=nc)
        mc, mr = _masks(b, t_w), _masks(b, t_l)
        if layout == "per-token-reference":
            rc, rr = _tokens(b, t_w), _tokens(b, t_l)
        else:
            rc, rr = (-torch.rand(b, dtype=torch.float64) * 20 for _ in range(2))
    opts = _options(loss_type) | dict(npo_token_calibration=loss_type == "npo" and layout == "per-token-reference")
    grad_out = torch.rand(2 * b if loss_type == "kto" else b, dtype=torch.float64) + 0.5

    def run(be, dtype):
        cc = c.to(dtype).requires_grad_()
        rr_ = r.to(dtype).requires_grad_()
        kw = dict(chosen_mask=mc, rejected_mask=mr, reduction="none", backend=be)
        out = nk.preference_loss(cc, rr_, rc.to(dtype), rr.to(dtype), **kw, **opts)
        gc, gr = torch.autograd.grad(out.loss, (cc, rr_), grad_out.to(out.loss.dtype), allow_unused=True)
        return out, gc, gr

    expected, egc, egr = run("reference", torch.float64)
    with poisoned_allocations():
        got, gc, gr = run(backend, torch.float32)
    tol = dict(rtol=2e-5, atol=2e-5 if loss_type not in ("ipo", "sppo_hard") else 2e-4)
    for name in ("loss", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps", "reward_margin"):
        assert_close(getattr(got, name), getattr(expected, name), **tol, what=name)
    if loss_type not in ("kto", "npo"):  # paired: the share of pairs whose chosen reward wins
        wins = (expected.chosen_rewards > expected.rejected_rewards).double().mean()
        assert_close(got.reward_accuracy, wins, rtol=0, atol=1e-6, what="reward accuracy")
        margin = (expected.chosen_rewards - expected.rejected_rewards).mean()
        assert_close(expected.reward_margin, margin, rtol=1e-12, atol=1e-12, what="reward margin")
    assert got.loss.dtype == torch.float32
    zero_c = torch.zeros_like(c)
    assert_close(gc if gc is not None else zero_c, egc if egc is not None else zero_c, **tol, what="d chosen")
    assert_close(gr, egr, **tol, what="d rejected")
    assert gr.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_get_gradients_in_their_dtype(backend, dtype):
    b, t = 4, 11
    c = _tokens(b, t).to(dtype).requires_grad_()
    r = _tokens(b, t).to(dtype).requires_grad_()
    rc, rr = _tokens(b, t).to(dtype), _tokens(b, t).to(dtype)
    out = nk.preference_loss(c, r, rc, rr, backend=backend, beta=0.3)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and c.grad.dtype == dtype and r.grad.dtype == dtype
    expected = nk.preference_loss(c.double(), r.double(), rc.double(), rr.double(), backend="reference", beta=0.3)
    assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6, what="loss on upcast inputs")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-9, 0.3, 0.4999])
def test_equal_log_ratios_give_log_two(backend, eps):
    # h = 0: −(1−ε)·log ½ − ε·log ½ = log 2 for any ε; d loss / d s_w = β·(ε − ½) per pair (mean over B)
    b, beta = 5, 0.4
    c = (-torch.rand(b) * 10).requires_grad_()
    ref = -torch.rand(b) * 10
    r = c.detach().clone().requires_grad_()
    out = nk.preference_loss(c, r, ref, ref, beta=beta, label_smoothing=eps, backend=backend)
    (gc, gr) = torch.autograd.grad(out.loss, (c, r))
    assert_close(out.loss, _f64(math.log(2)), rtol=1e-6, atol=1e-6, what="loss")
    assert_close(gc, torch.full((b,), beta * (eps - 0.5) / b), rtol=1e-5, atol=1e-7, what="d chosen")
    assert_close(gr, -gc, rtol=1e-6, atol=1e-8, what="d rejected")
    assert float(out.reward_accuracy) == 0.0 and abs(float(out.reward_margin)) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_robust_near_half_smoothing_stays_finite(backend):
    c, r = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5])
    ref = torch.tensor([-3.5, -1.2])
    out = nk.preference_loss(c, r, ref, ref, loss_type="robust", beta=1.0, label_smoothing=0.4999, backend=backend)
    u = [1.0 * ((c[i] - ref[i]) - (r[i] - ref[i])).item() for i in range(2)]
    expected = sum(scalar_oracle("robust", 0, 0, u[i], 0.0, beta=1.0, eps=0.4999) for i in range(2)) / 2
    assert math.isfinite(float(out.loss))
    assert_close(out.loss, _f64(expected), rtol=1e-4, atol=1e-5, what="robust at ε → ½")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ipo_at_its_minimum(backend):
    beta = 0.25  # the minimum is at h = 1/(2β) = 2
    c = torch.tensor([-3.0, -10.0], requires_grad=True)
    r = torch.tensor([-5.0, -12.0], requires_grad=True)
    ref = torch.tensor([-7.0, -1.0])
    out = nk.preference_loss(c, r, ref, ref, loss_type="ipo", beta=beta, backend=backend)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert torch.equal(c.grad, torch.zeros(2)) and torch.equal(r.grad, torch.zeros(2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_orpo_log_odds_keep_their_digits_as_p_goes_to_one(backend):
    # ℓ = −1e-7: 1 − e^ℓ ≈ 1e-7, lost to cancellation by log1p(−exp(ℓ)) in fp32 (exp(ℓ) rounds to 1)
    s_w = torch.tensor([-1e-7, -2e-6], requires_grad=True)
    s_l = torch.tensor([-0.5, -3.0], requires_grad=True)
    out = nk.preference_loss(s_w, s_l, loss_type="orpo", beta=0.1, length_normalize=False, backend=backend)
    out.loss.backward()
    expected = sum(scalar_oracle("orpo", s_w[i].item(), s_l[i].item(), 0, 0, beta=0.1) for i in range(2)) / 2
    assert_close(out.loss, _f64(expected), rtol=1e-5, atol=1e-6, what="orpo near ℓ = 0")
    assert torch.isfinite(s_w.grad).all() and torch.isfinite(s_l.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_degenerate_batches(backend):
    # B = 0: loss 0, empty rewards, empty gradients
    c = torch.zeros(0, 7, requires_grad=True)
    r = torch.zeros(0, 7, requires_grad=True)
    out = nk.preference_loss(c, r, torch.zeros(0), torch.zeros(0), backend=backend)
    out.loss.backward()
    assert float(out.loss) == 0.0 and out.chosen_rewards.shape == (0,) and c.grad.shape == (0, 7)
    # a fully masked response has value 0 and its pair still counts in the mean
    b, t = 3, 6
    c = (-torch.rand(b, t)).requires_grad_()
    r = -torch.rand(b, t)
    mc = torch.ones(b, t, dtype=torch.bool)
    mc[1] = False
    out = nk.preference_loss(
        c, r, torch.zeros(b), torch.zeros(b), chosen_mask=mc, backend=backend, reduction="none", length_normalize=True
    )
    out.loss.sum().backward()
    assert float(out.chosen_logps[1]) == 0.0
    assert out.loss.shape == (b,) and torch.isfinite(out.loss).all()
    assert torch.equal(c.grad[1], torch.zeros(t))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kto_unpaired_batches_and_reference_point(backend):
    b_w, b_l, beta = 3, 5, 0.5
    c, r = -torch.rand(b_w) * 5, -torch.rand(b_l) * 5
    rc, rr = -torch.rand(b_w) * 5, -torch.rand(b_l) * 5
    kw = dict(loss_type="kto", beta=beta, kto_desirable_weight=1.5, kto_undesirable_weight=0.7, backend=backend)
    out = nk.preference_loss(c, r, rc, rr, reduction="none", **kw)
    r_w, r_l = (c - rc).double(), (r - rr).double()
    z = max(0.0, float(torch.cat([r_w, r_l]).mean()))
    expected = [scalar_oracle("kto", 0, 0, float(x), 0.0, beta=beta, z=z, lam_d=1.5)[0] for x in r_w]
    expected += [scalar_oracle("kto", 0, 0, 0.0, float(x), beta=beta, z=z, lam_u=0.7)[1] for x in r_l]
    assert_close(out.loss, _f64(expected), rtol=1e-5, atol=1e-6, what="kto terms")
    assert math.isnan(float(out.reward_accuracy))  # unpaired: no pairs to compare
    given = nk.preference_loss(c, r, rc, rr, kto_reference_point=torch.tensor(0.25), **kw)
    expected = [scalar_oracle("kto", 0, 0, float(x), 0.0, beta=beta, z=0.25, lam_d=1.5)[0] for x in r_w]
    expected += [scalar_oracle("kto", 0, 0, 0.0, float(x), beta=beta, z=0.25, lam_u=0.7)[1] for x in r_l]
    assert_close(given.loss, _f64(sum(expected) / (b_w + b_l)), rtol=1e-5, atol=1e-6, what="given z")
    # no desirable example at all
    alone = nk.preference_loss(torch.zeros(0), r, torch.zeros(0), rr, kto_reference_point=0.25, **kw)
    assert_close(alone.loss, _f64(sum(expected[b_w:]) / b_l), rtol=1e-5, atol=1e-6, what="kto undesirable only")
    assert alone.chosen_rewards.shape == (0,)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_npo_rejected_only_and_token_calibration(backend):
    b, t, beta = 3, 9, 0.6
    r = _tokens(b, t, scale=3.0).float().requires_grad_()
    rr = _tokens(b, t, scale=3.0).float()
    m = _masks(b, t)
    plain = nk.preference_loss(None, r, None, rr, rejected_mask=m, loss_type="npo", beta=beta, backend=backend)
    ratio = ((r.detach() - rr) * m).sum(1).double()
    expected = sum((2 / beta) * math.log1p(math.exp(beta * float(x))) for x in ratio) / b
    assert_close(plain.loss, _f64(expected), rtol=1e-5, atol=1e-6, what="npo")
    assert plain.chosen_rewards.shape == (0,)
    # calibrated: r̃ = Σ p·(logπ − logπ_ref) / Σ p over kept tokens, p = π(token) (no gradient through p)
    out = nk.preference_loss(
        None, r, None, rr, rejected_mask=m, loss_type="npo", beta=beta, npo_token_calibration=True, backend=backend
    )
    out.loss.backward()
    p = r.detach().double().exp() * m
    ratio = (p * (r.detach().double() - rr.double())).sum(1) / p.sum(1)
    expected = sum((2 / beta) * math.log1p(math.exp(beta * float(x))) for x in ratio) / b
    assert_close(out.loss, _f64(expected), rtol=1e-5, atol=1e-6, what="calibrated npo")
    # d loss / d logπ_t = (1/B)·2σ(β r̃)·p_t / Σ p
    expected_grad = (2 * torch.sigmoid(beta * ratio))[:, None] * p / p.sum(1, keepdim=True) / b
    assert_close(r.grad, expected_grad, rtol=1e-5, atol=1e-7, what="calibrated gradient")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions(backend):
    b = 6
    c, r, rc, rr = (-torch.rand(b) * 8 for _ in range(4))
    per_pair = nk.preference_loss(c, r, rc, rr, reduction="none", backend=backend).loss
    total = nk.preference_loss(c, r, rc, rr, reduction="sum", backend=backend).loss
    mean = nk.preference_loss(c, r, rc, rr, backend=backend).loss
    assert per_pair.shape == (b,)
    assert_close(total, per_pair.sum(), rtol=1e-6, atol=1e-6, what="sum")
    assert_close(mean, per_pair.mean(), rtol=1e-6, atol=1e-6, what="mean")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo", "kto", "npo"])
def test_reduced_loss_and_summaries_over_many_row_blocks(backend, loss_type, reduction):
    # 37 pairs of 300 tokens: the Triton kernel takes 8 pairs a program (five programs, the last
    # one partly filled), so the mean, the gradient scale and the pair summaries span programs.
    b_w, b_l, t = 37, (29 if loss_type == "kto" else 37), 300
    c, r = _tokens(b_w, t, scale=0.2), _tokens(b_l, t, scale=0.2)
    rc, rr = c + 0.01 * torch.randn_like(c), r + 0.01 * torch.randn_like(r)
    mc, mr = _masks(b_w, t), _masks(b_l, t)
    opts = dict(loss_type=loss_type, beta=0.3, reduction=reduction, chosen_mask=mc, rejected_mask=mr)

    def run(be, dtype):
        cc, rr_ = c.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()
        chosen = None if loss_type == "npo" else cc
        out = nk.preference_loss(
            chosen,
            rr_,
            None if chosen is None else rc.to(dtype),
            rr.to(dtype),
            backend=be,
            **(opts if chosen is not None else opts | dict(chosen_mask=None)),
        )
        grads = torch.autograd.grad(3.0 * out.loss, (cc, rr_), allow_unused=True)
        return out, [g if g is not None else torch.zeros_like(cc) for g in grads]

    expected, expected_grads = run("reference", torch.float64)
    with poisoned_allocations():
        got, grads = run(backend, torch.float32)
    assert got.loss.shape == () and got.loss.dtype == torch.float32
    assert_close(got.loss, expected.loss, rtol=2e-5, atol=1e-6, what="loss")
    for g, e, name in zip(grads, expected_grads, ("d chosen", "d rejected")):
        assert_close(g, e, rtol=2e-5, atol=1e-7, what=name)
    if loss_type in ("kto", "npo"):
        assert math.isnan(float(got.reward_accuracy)) and math.isnan(float(got.reward_margin))
    else:
        wins = (expected.chosen_rewards > expected.rejected_rewards).double().mean()
        assert_close(got.reward_accuracy, wins, rtol=0, atol=1e-6, what="reward accuracy")
        assert_close(got.reward_margin, expected.reward_margin, rtol=2e-5, atol=1e-6, what="reward margin")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_twice(backend):
    # Per-example losses keep their gradient buffers; a mean or sum on the kernel hands its buffers
    # to the caller as the gradient (scaled in place), so a second backward raises rather than
    # returning a gradient scaled twice.
    c, r, rc, rr = (-torch.rand(3, 5) for _ in range(4))
    c.requires_grad_()
    per_pair = nk.preference_loss(c, r, rc, rr, reduction="none", backend=backend).loss.sum()
    (first,) = torch.autograd.grad(per_pair, c, retain_graph=True)
    (second,) = torch.autograd.grad(per_pair, c)
    assert torch.equal(first, second)
    mean = nk.preference_loss(c, r, rc, rr, backend=backend).loss
    (2 * mean).backward(retain_graph=True)
    assert_close(c.grad, 2 * first / 3, rtol=1e-6, atol=1e-7, what="d mean")
    if backend == "triton":
        with pytest.raises(RuntimeError, match="backpropagated twice"):
            mean.backward()


def test_config_object_equals_keywords():
    cfg = nk.PreferenceLossConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    c, r = -torch.rand(4, 5), -torch.rand(4, 5)
    a = nk.preference_loss(c, r, config=cfg, backend="reference")
    b = nk.preference_loss(c, r, loss_type="simpo", beta=2.0, simpo_gamma=0.5, backend="reference")
    assert torch.equal(a.loss, b.loss)
    assert cfg.length_normalize is True  # simpo's default


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="the custom op runs the kernel backends")
def test_opcheck_and_compile():
    from negkernels.ops.preference import _preference_loss_op

    c, r = -torch.rand(3, 4), -torch.rand(3, 5)
    ref = -torch.rand(3)
    mask = torch.rand(3, 5) > 0.3
    cases = (("sigmoid", None, "none"), ("kto", torch.tensor(0.1), "mean"), ("orpo", None, "sum"))
    for loss_type, z, reduction in cases:
        args = (c.requires_grad_(), r.requires_grad_(), ref, ref, None, mask, z, loss_type, reduction, 0.1, 0.0, 0.0)
        args += (False,)
        torch.library.opcheck(_preference_loss_op.op, args + (0.05, 1.0, 1.0, False, True, "triton"))

    @torch.compile(fullgraph=True, backend="eager")
    def step(c, r):
        return nk.preference_loss(c, r, ref, ref, rejected_mask=mask, backend="triton").loss

    torch._dynamo.reset()
    assert_close(
        step(c, r),
        nk.preference_loss(c, r, ref, ref, rejected_mask=mask, backend="triton").loss,
        rtol=0,
        atol=0,
        what="compiled",
    )


# LM-head-fused form: against the log-probs of materialised fp64 logits.


def _lm_batch(b=2, t=7, h=16, v=29, dtype=torch.float32):
    hidden = torch.randn(2 * b, t, h, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (2 * b, t))
    mask = torch.rand(2 * b, t) > 0.25
    mask[:, 0] = True
    targets[~mask] = -100  # ignore ids where the mask is 0, as TRL's labels
    return hidden, weight, targets, mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "orpo", "kto", "ipo"])
def test_linear_preference_loss_matches_materialised_logits(backend, loss_type):
    hidden, weight, targets, mask = _lm_batch()
    bias = torch.randn(weight.shape[0]) * 0.1
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    opts = _options(loss_type)

    def oracle(hid, w, bb):
        logp = torch.log_softmax(hid.double() @ w.double().T + bb.double(), -1)
        return logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    logp = oracle(h64, w64, bias)
    with torch.no_grad():
        ref = oracle(ref_hidden, weight, bias)
    keep = mask
    expected = nk.preference_loss(
        *logp.chunk(2), *ref.chunk(2), chosen_mask=keep[:2], rejected_mask=keep[2:], backend="reference", **opts
    )
    expected.loss.backward()
    expected_nll = -(logp[:2] * keep[:2]).sum().item() / keep[:2].sum().item()

    hid = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    got = nk.linear_preference_loss(hid, w, targets, mask, bias=bias, ref_hidden=ref_hidden, backend=backend, **opts)
    got.loss.backward()
    assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-5, what="loss")
    assert_close(got.chosen_rewards, expected.chosen_rewards, rtol=1e-4, atol=1e-5, what="rewards")
    assert_close(got.chosen_nll, _f64(expected_nll), rtol=1e-5, atol=1e-5, what="chosen NLL")
    assert_close(hid.grad, h64.grad, rtol=1e-4, atol=1e-5, what="d hidden")
    assert_close(w.grad, w64.grad, rtol=1e-4, atol=1e-5, what="d weight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_preference_loss_with_precomputed_reference_sums(backend):
    hidden, weight, targets, mask = _lm_batch()
    ref_c, ref_r = -torch.rand(2) * 20, -torch.rand(2) * 20
    got = nk.linear_preference_loss(hidden, weight, targets, mask, ref_c, ref_r, backend=backend, beta=0.2)
    logp = nk.linear_token_logprobs(hidden, weight, targets.clamp_min(0), backend="reference")
    expected = nk.preference_loss(
        *logp.chunk(2), ref_c, ref_r, chosen_mask=mask[:2], rejected_mask=mask[2:], beta=0.2, backend="reference"
    )
    assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6, what="loss")
