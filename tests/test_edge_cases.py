"""Non-finite, degenerate and unvalidated input: the answers the README promises, on every backend.

Oracles: the float64 definitions with the offending entries removed by hand (a masked token is
as if absent, a −inf logit as if the vocabulary lacked it), closed forms (β⁰ = 1), brute-force
sorts, and the reference backend itself once its own answer is pinned down by a closed form.
"""

from __future__ import annotations

import math

import pytest
import torch

import negkernels as nk
from negkernels.reference.logprobs import LOSS_TYPES

from .helpers import TOLERANCES, assert_close

BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
F32 = TOLERANCES[torch.float32]
NAN, INF = float("nan"), float("inf")


def _oracle_logp_entropy(logits):
    z = logits.double()
    logp_all = z - torch.logsumexp(z, -1, keepdim=True)
    p = logp_all.exp()
    return logp_all, -(torch.where(p == 0, 0.0, p * logp_all)).sum(-1)


# ============================================================================ in-place backward


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["strided-vocab", "4d-unflattenable"])
def test_inplace_backward_gives_the_right_gradient_for_any_layout(backend, layout):
    # Rows the kernel cannot address in place (a strided last dim; leading dims that do not flatten
    # into a view) must fall back to an out-of-place gradient, not return the unwritten logits.
    if layout == "strided-vocab":
        base = torch.randn(3, 4, 3 * 29)
        view = lambda x: x[..., ::3]  # noqa: E731
        targets = torch.randint(0, 29, (3, 4))
    else:
        base = torch.randn(4, 3, 5, 23)
        view = lambda x: x.transpose(0, 1)  # noqa: E731  [3, 4, 5, 23], dims 0-1 do not flatten
        targets = torch.randint(0, 23, (3, 4, 5))
    leaf = base.clone().requires_grad_()
    logp, entropy = nk.token_logprobs(view(leaf), targets, return_entropy=True, inplace_backward=True, backend=backend)
    (logp.sum() + 0.3 * entropy.sum()).backward()
    b64 = base.double().requires_grad_()
    logp_all, ent64 = _oracle_logp_entropy(view(b64))
    (logp_all.gather(-1, targets.unsqueeze(-1)).sum() + 0.3 * ent64.sum()).backward()
    assert_close(leaf.grad, b64.grad, rtol=1e-4, atol=1e-6, what=f"token_logprobs in place, {layout}")

    if layout == "strided-vocab":
        old = -3.3 + 0.1 * torch.randn(3, 4)
        adv = torch.randn(3)
        leaf = base.clone().requires_grad_()
        nk.policy_loss_from_logits(
            view(leaf), targets, old, adv, inplace_backward=True, backend=backend
        ).loss.backward()
        b64 = base.double().requires_grad_()
        nk.policy_loss_from_logits(view(b64), targets, old.double(), adv.double(), backend="reference").loss.backward()
        assert_close(leaf.grad, b64.grad, rtol=1e-4, atol=1e-6, what="fused loss in place, strided vocab")


# ============================================================================ NaN reaches the loss


def _loss(backend, logp, old, adv, mask=None, loss_type="ppo", **kw):
    if loss_type == "npo":
        kw.setdefault("ref_logp", old)
    return nk.policy_loss(logp, old, adv, mask, loss_type=loss_type, backend=backend, **kw).loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_in_unmasked_data_reaches_the_policy_loss(backend, loss_type):
    logp = torch.tensor([[-1.0, -1.2, -0.7]])
    old = torch.tensor([[-1.1, -1.0, -0.9]])
    adv = torch.ones(1)
    bad_logp = logp.clone()
    bad_logp[0, 1] = NAN
    assert torch.isnan(_loss(backend, bad_logp, old, adv, loss_type=loss_type))
    if loss_type not in ("gpg", "npo"):  # gpg never reads old_logp; npo reads ref_logp instead
        bad_old = old.clone()
        bad_old[0, 1] = NAN
        assert torch.isnan(_loss(backend, logp, bad_old, adv, loss_type=loss_type))
    # Under the mask the same NaN is padding and must not reach the loss.
    mask = torch.tensor([[True, False, True]])
    assert torch.isfinite(_loss(backend, bad_logp, old, adv, mask, loss_type=loss_type))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "cispo", "gspo", "npo"])
def test_nan_reaches_the_fused_losses(backend, loss_type):
    kw = dict(ref_logp=torch.full((1, 2), -2.0)) if loss_type == "npo" else {}
    logits = torch.randn(1, 2, 7)
    targets = torch.zeros(1, 2, dtype=torch.long)
    old = torch.full((1, 2), -2.0)
    bad_logits = logits.clone()
    bad_logits[0, 0, 3] = NAN
    out = nk.policy_loss_from_logits(
        bad_logits, targets, old, torch.ones(1), loss_type=loss_type, backend=backend, **kw
    )
    assert torch.isnan(out.loss)
    if loss_type != "npo":
        bad_old = old.clone()
        bad_old[0, 1] = NAN
        out = nk.policy_loss_from_logits(logits, targets, bad_old, torch.ones(1), loss_type=loss_type, backend=backend)
        assert torch.isnan(out.loss)
    hidden, weight = torch.randn(1, 2, 4), torch.randn(7, 4)
    bad_hidden = hidden.clone()
    bad_hidden[0, 1, 2] = NAN
    out = nk.linear_policy_loss(
        bad_hidden, weight, targets, old, torch.ones(1), loss_type=loss_type, backend=backend, **kw
    )
    assert torch.isnan(out.loss)


# ============================================================================ padding under the mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("pad", [-INF, INF, NAN])
def test_padding_under_the_mask_never_reaches_the_gradient(backend, loss_type, pad):
    # Masked positions hold ±inf / NaN in every input; the loss and gradient must equal those with
    # the padding replaced by ordinary numbers.
    b, t = 3, 6
    logp = -torch.rand(b, t) - 0.2
    old = logp + 0.1 * torch.randn(b, t)
    ref = logp + 0.1 * torch.randn(b, t)
    adv = torch.randn(b, t)
    iw = torch.rand(b, t) + 0.5
    mask = torch.rand(b, t) > 0.4
    mask[:, 0] = True
    padded = [torch.where(mask, x, torch.full_like(x, pad)) for x in (old, ref, adv, iw)]
    kw = dict(loss_type=loss_type, kl_coef=0.05, kl_estimator="k3", is_mode="truncate", backend=backend)

    def run(lp_values, old_, ref_, adv_, iw_):
        lp = lp_values.clone().requires_grad_()
        loss = nk.policy_loss(lp, old_, adv_, mask, ref_logp=ref_, is_weights=iw_, **kw).loss
        loss.backward()
        return loss.detach(), lp.grad

    lp_padded = torch.where(mask, logp, torch.full_like(logp, pad))
    loss, grad = run(lp_padded, *padded)
    expected_loss, expected_grad = run(logp, old, ref, adv, iw)
    assert torch.isfinite(grad).all() and torch.isfinite(loss)
    assert_close(loss, expected_loss, **F32, what="loss")
    assert_close(grad, expected_grad, **F32, what="gradient")
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_constants_receive_no_gradient(backend):
    logp = (-torch.rand(2, 5)).requires_grad_()
    old = (logp.detach() + 0.1).requires_grad_()
    adv = torch.randn(2, requires_grad=True)
    ref = (logp.detach() - 0.1).requires_grad_()
    for loss_type in LOSS_TYPES:
        out = nk.policy_loss(logp, old, adv, ref_logp=ref, kl_coef=0.1, loss_type=loss_type, backend=backend)
        grads = torch.autograd.grad(out.loss, [logp, old, adv, ref], allow_unused=True)
        assert grads[0] is not None and all(g is None for g in grads[1:]), loss_type


# ============================================================================ token log-probs


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_with_an_impossible_token(backend):
    # A −inf logit is a token the distribution cannot produce: its gradient is 0 and the others'
    # are those of the row without it.
    finite = torch.randn(2, 6)
    logits = torch.cat([torch.full((2, 1), -INF), finite], 1).requires_grad_()
    targets = torch.tensor([2, 5])
    logp, entropy = nk.token_logprobs(logits, targets, return_entropy=True, backend=backend)
    (logp.sum() + 0.7 * entropy.sum()).backward()
    f64 = finite.double().requires_grad_()
    logp_all, ent64 = _oracle_logp_entropy(f64)
    (logp_all.gather(-1, (targets - 1).unsqueeze(-1)).sum() + 0.7 * ent64.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 0] == 0).all()
    assert_close(logits.grad[:, 1:], f64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_bad_target_gives_nan(backend):
    logits = torch.randn(4, 10)
    logp = nk.token_logprobs(logits, torch.tensor([0, 10, -3, 9]), validate=False, backend=backend)
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all()
    out = nk.policy_loss_from_logits(
        logits.unsqueeze(0),
        torch.tensor([[0, 1, 10**6, 3]]),
        torch.zeros(1, 4),
        torch.ones(1),
        validate=False,
        backend=backend,
    )
    assert torch.isnan(out.token_logp[0, 2]) and torch.isfinite(out.token_logp[0, [0, 1, 3]]).all()
    assert torch.isnan(out.loss)


# ============================================================================ normalisers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.0, -2.0, NAN, INF])
def test_a_normaliser_tensor_that_is_not_a_count_gives_nan(backend, value):
    # A tensor normaliser is not read on the host: a value that cannot be a token count makes the
    # loss NaN (never −1.7e38 or a sign flip).
    logp = -torch.rand(2, 4)
    out = nk.policy_loss(logp, logp + 0.1, torch.randn(2), num_tokens=torch.tensor(value), backend=backend)
    assert torch.isnan(out.loss)
    good = nk.policy_loss(logp, logp + 0.1, torch.ones(2), num_tokens=torch.tensor(4.0), backend=backend)
    assert_close(good.loss, nk.policy_loss(logp, logp + 0.1, torch.ones(2), num_tokens=4, backend=backend).loss, **F32)


# ============================================================================ advantages


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_group_gets_zero_advantages(backend):
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv = nk.group_advantages(rewards, group_size=4, backend=backend)
    assert (adv[:4] == 0).all()
    assert_close(
        adv[4:], torch.tensor([-1.0, 1.0, -1.0, 1.0]) * math.sqrt(3) / 2 / (1 + 1e-6 / math.sqrt(1 / 3)), **F32
    )


@pytest.mark.parametrize("scale", ["group", "batch", "whiten", "none"])
def test_unvalidated_bad_group_ids_give_nan_on_every_backend(scale):
    # Out-of-range ids (validate=False): NaN for those rewards, which join no statistic. Oracle: the
    # same call on the valid rewards alone.
    rewards = torch.rand(40)
    ids = torch.randint(0, 6, (40,))
    bad = torch.zeros(40, dtype=torch.bool)
    bad[[3, 17, 30]] = True
    ids_bad = torch.where(bad, torch.tensor([6, -1, 99])[torch.arange(40) % 3], ids)
    expected = nk.group_advantages(rewards[~bad].double(), ids[~bad], num_groups=6, scale=scale, backend="reference")
    for backend in BACKENDS:
        adv = nk.group_advantages(rewards, ids_bad, num_groups=6, validate=False, scale=scale, backend=backend)
        assert torch.isnan(adv[bad]).all(), backend
        assert_close(adv[~bad], expected, **F32, what=f"{backend}, {scale}")


# ============================================================================ contrastive


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [5, 16])
def test_bank_topk_breaks_ties_by_the_lower_slot(backend, k):
    # Small integers: many exactly equal similarities. Oracle: Python's sort of (−similarity, slot).
    query = torch.randint(-1, 2, (6, 4)).float()
    bank = torch.randint(-1, 2, (37, 4)).float()
    values, slots = nk.bank_topk(query, bank, k, backend=backend)
    sims = query.double() @ bank.double().t()
    for i in range(query.shape[0]):
        order = sorted(range(bank.shape[0]), key=lambda j: (-sims[i, j].item(), j))[:k]
        assert slots[i].tolist() == order
        assert values[i].tolist() == [sims[i, j].item() for j in order]


# ============================================================================ kv


@pytest.mark.parametrize("backend", BACKENDS)
def test_retention_mass_with_a_zero_gate(backend):
    # β = 0 (log β = −inf): the token counts β⁰ = 1 at its own step and 0 afterwards.
    log_beta = torch.log(torch.rand(2, 7) * 0.5 + 0.4)
    log_beta[0, 2] = -INF
    log_beta[1, 6] = -INF
    x = log_beta.clone().requires_grad_()
    mass = nk.retention_mass(x, backend=backend)
    g = torch.randn(2, 7)
    (mass * g).sum().backward()
    beta = log_beta.double().exp()
    expected = torch.zeros(2, 7, dtype=torch.float64)
    expected_grad = torch.zeros(2, 7, dtype=torch.float64)
    for r in range(2):
        for t in range(7):
            for i in range(t + 1):
                expected[r, t] += 1.0 if t == i else beta[r, i] ** (t - i)
                if t > i:  # d β^a / d log β = a·β^a
                    expected_grad[r, i] += g[r, t] * (t - i) * beta[r, i] ** (t - i)
    assert_close(mass, expected, **F32, what="mass")
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, expected_grad, **F32, what="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_compaction_indices_out_of_range_give_zeros(backend):
    keys, values = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 5)
    positions = torch.arange(8).expand(2, 3, 8).contiguous()
    indices = torch.tensor([1, 8, 300, -1, -7, 6]).expand(2, 3, 6).contiguous()
    keys.requires_grad_()
    k, v, p = nk.compact_kv(keys, values, indices, positions, validate=False, backend=backend)
    (k * torch.arange(1.0, 5.0)).sum().backward()  # the gradient scatters back to the in-range slots only
    expected_grad = torch.zeros(2, 3, 8, 4)
    expected_grad[:, :, [1, 6]] = torch.arange(1.0, 5.0)
    assert torch.equal(keys.grad, expected_grad)
    keys = keys.detach()
    good = torch.tensor([True, False, False, False, False, True])
    assert (k[:, :, ~good] == 0).all() and (v[:, :, ~good] == 0).all() and (p[:, :, ~good] == 0).all()
    assert torch.equal(k[:, :, good], keys[:, :, [1, 6]]) and torch.equal(p[:, :, good], positions[:, :, [1, 6]])
