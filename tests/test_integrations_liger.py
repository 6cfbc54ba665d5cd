"""The Liger adapters against the real liger_kernel: FusedLinearGRPOLoss against
LigerFusedLinearGRPOLoss, FusedLinearCrossEntropyLoss against LigerFusedLinearCrossEntropyLoss,
FusedLinearDPOLoss / SimPOLoss / CPOLoss against Liger's fused-linear preference losses.

Oracle: Liger's own chunked loss (its PyTorch path, ``compiled=False``, runs on a CPU), called
with the same arguments; loss, metrics and the gradients of the input, weight and bias must
agree to fp32 tolerance. Shapes are odd and masks ragged, with a fully masked row.
"""

import liger_kernel.chunked_loss as liger  # the test extra installs it: a missing peer fails, never skips
import pytest
import torch

from negkernels.integrations.liger import (  # noqa: E402
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearGRPOLoss,
    FusedLinearSimPOLoss,
)

from .helpers import assert_close  # noqa: E402


def batch(b=5, t=7, h=24, v=53):
    hidden = torch.randn(b, t, h) * 0.5
    weight = torch.randn(v, h) * 0.3
    bias = torch.randn(v) * 0.1
    ids = torch.randint(0, v, (b, t))
    mask = (torch.rand(b, t) > 0.25).long()
    mask[1] = 0  # a fully masked row
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, ids[..., None])[..., 0]
    old = logp + torch.randn(b, t) * 0.1
    ref = logp + torch.randn(b, t) * 0.1
    return hidden, weight, bias, ids, mask, torch.randn(b), old, ref


def run(module, hidden, weight, bias, *args, **kwargs):
    h, w, bb = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss, metrics = module(h, w, *args[:1], args[1], args[2], bb, *args[3:], **kwargs)
    loss.backward()
    return loss.detach(), [m.detach() for m in metrics], h.grad, w.grad, bb.grad


OPTIONS = {
    "dapo": dict(loss_type="dapo"),
    "grpo": dict(loss_type="grpo", epsilon_high=0.28),
    "bnpo": dict(loss_type="bnpo", delta=1.1),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=9),
    "cispo": dict(loss_type="cispo", epsilon_high=1.05),
    "sapo": dict(loss_type="sapo"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.03, epsilon_high=0.04),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.0),
    "bias-corrected KL": dict(loss_type="dapo", use_bias_correction_kl=True, beta=0.2),
    "no KL": dict(loss_type="bnpo", beta=0.0),
    "temperature": dict(loss_type="grpo", temperature=0.7),
}


@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("inputs", ["ref logps", "ref model", "on-policy", "vllm ratios", "num_items"])
def test_matches_liger(case, inputs):
    hidden, weight, bias, ids, mask, adv, old, ref = batch()
    options = dict(OPTIONS[case])
    call = dict(ref_per_token_logps=ref, old_per_token_logps=old)
    if inputs == "ref model":  # reference log-probs from a second head, no gradient
        call = dict(
            old_per_token_logps=old,
            ref_input=hidden + 0.05 * torch.randn_like(hidden),
            ref_weight=weight * 1.1,
            ref_bias=bias,
        )
    elif inputs == "on-policy":
        call = dict(ref_per_token_logps=ref)
    elif inputs == "vllm ratios":
        call["vllm_is_ratio"] = 0.5 + torch.rand(ids.shape)
    elif inputs == "num_items":
        call["num_items_in_batch"] = torch.tensor(float(mask.sum() + 17))
    theirs = run(
        liger.LigerFusedLinearGRPOLoss(compiled=False, chunk_size=2, **options),
        hidden,
        weight,
        bias,
        ids,
        mask,
        adv,
        **call,
    )
    ours = run(FusedLinearGRPOLoss(**options), hidden, weight, bias, ids, mask, adv, **call)
    assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6, what="loss")
    assert len(ours[1]) == len(theirs[1])
    for i, (a, b) in enumerate(zip(ours[1], theirs[1])):
        assert_close(a, b, rtol=1e-5, atol=1e-6, what=f"metric {i}")
    for name, a, b in zip(("d input", "d weight", "d bias"), ours[2:], theirs[2:]):
        assert_close(a, b, rtol=1e-4, atol=1e-6, what=name)


def test_unsupported_options_raise_naming_them():
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearGRPOLoss(loss_type="vespo")
    with pytest.raises(NotImplementedError, match="luspo"):
        FusedLinearGRPOLoss(loss_type="luspo")
    with pytest.raises(ValueError, match="max_completion_length"):
        FusedLinearGRPOLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        FusedLinearGRPOLoss(loss_type="cispo", importance_sampling_level="sequence")


# ------------------------------------------------------------------ fused linear cross-entropy

import liger_kernel.transformers as liger_transformers  # noqa: E402

from negkernels.integrations.liger import FusedLinearCrossEntropyLoss  # noqa: E402


def cross_entropy_batch(n=29, h=20, v=61, ignore_index=-100):
    hidden = torch.randn(n, h) * 0.7
    weight = torch.randn(v, h) * 0.4
    bias = torch.randn(v) * 0.2
    target = torch.randint(0, v, (n,))
    target[torch.rand(n) < 0.25] = ignore_index
    return hidden, weight, bias, target


def run_cross_entropy(module, hidden, weight, bias, target):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    loss = module(w, h, target, b)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), h.grad, w.grad, b.grad if b is not None else None


class TorchCrossEntropy(torch.nn.Module):
    """The oracle of the oracle: torch's cross-entropy on materialised float64 logits."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, weight, hidden, target, bias=None):
        logits = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)
        kwargs = dict(self.kwargs)
        if kwargs.get("weight") is not None:
            kwargs["weight"] = kwargs["weight"].double()
        return torch.nn.functional.cross_entropy(logits, target, **kwargs).float()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, dict(ignore_index=7), dict(class_weights=True), dict(no_bias=True)])
def test_fused_linear_cross_entropy_matches_liger(reduction, options):
    options = dict(options)
    ignore_index = options.pop("ignore_index", -100)
    hidden, weight, bias, target = cross_entropy_batch(ignore_index=ignore_index)
    if options.pop("no_bias", False):
        bias = None
    kwargs = dict(ignore_index=ignore_index, reduction=reduction)
    class_weights = torch.rand(weight.shape[0]) + 0.5 if options.pop("class_weights", False) else None
    ours = run_cross_entropy(
        FusedLinearCrossEntropyLoss(ce_weight=class_weights, **kwargs), hidden, weight, bias, target
    )
    oracles = [TorchCrossEntropy(weight=class_weights, **kwargs)]
    if class_weights is None:  # Liger's class-weighted kernel does not run under Triton's interpreter
        oracles.append(liger_transformers.LigerFusedLinearCrossEntropyLoss(**kwargs))
    for oracle in oracles:
        theirs = run_cross_entropy(oracle, hidden, weight, bias, target)
        assert ours[0].shape == theirs[0].shape and ours[0].dtype == theirs[0].dtype
        for what, a, b in zip(("loss", "d input", "d weight", "d bias"), ours, theirs):
            if b is not None:
                assert_close(a, b, rtol=2e-5, atol=2e-6, what=f"{what} vs {type(oracle).__name__}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_linear_cross_entropy_dtype_and_all_ignored_as_liger(dtype):
    hidden, weight, bias, target = (x.to(dtype) if x.is_floating_point() else x for x in cross_entropy_batch(n=9))
    target[:] = -100
    for module in (FusedLinearCrossEntropyLoss(), liger_transformers.LigerFusedLinearCrossEntropyLoss()):
        loss = module(weight, hidden, target, bias)
        assert loss.dtype == torch.float32 and float(loss) == 0.0, type(module).__name__
    target = torch.randint(0, weight.shape[0], (9,))
    ours = FusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, target, bias)
    theirs = liger_transformers.LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, target, bias)
    assert ours.dtype == theirs.dtype == torch.float32
    tol = 5e-2 if dtype == torch.bfloat16 else 2e-5  # bf16 logits round differently inside each
    assert_close(ours, theirs, rtol=tol, atol=tol, what="per-token loss")


@pytest.mark.parametrize(
    "option, value",
    [
        ("label_smoothing", 0.1),
        ("lse_square_scale", 1e-4),
        ("softcap", 30.0),
        ("return_z_loss", True),
        ("use_token_scaling", True),
        ("return_token_accuracy", True),
        ("return_predicted_tokens", True),
        ("reduction", "batchmean"),
    ],
)
def test_fused_linear_cross_entropy_rejects_what_it_cannot_do(option, value):
    with pytest.raises(ValueError, match=option):
        FusedLinearCrossEntropyLoss(**{option: value})


# Preference losses: Liger's [chosen; rejected] batch with ignore_index targets.


def preference_batch(pairs=3, t=9, h=24, v=53):
    hidden = torch.randn(2 * pairs, t, h) * 0.5
    weight = torch.randn(v, h) * 0.3
    bias = torch.randn(v) * 0.1
    target = torch.randint(0, v, (2 * pairs, t))
    target[:, :3] = -100  # the prompt
    target[1, 6:] = -100  # a shorter chosen response
    target[2 * pairs - 1, 4:] = -100  # and a shorter rejected one
    ref = (hidden + 0.1 * torch.randn_like(hidden), weight + 0.05 * torch.randn_like(weight), bias.clone())
    return hidden, weight, bias, target, ref


def run_preference(module, hidden, weight, bias, target, *extra):
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss, outputs = module(w, h, target, b, *extra)
    loss.backward()
    return loss.detach(), [o.detach() for o in outputs], h.grad, w.grad, b.grad


PREFERENCE_NAMES = ("loss", "chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll")
PREFERENCE_NAMES += ("chosen_rewards", "rejected_rewards")
DPO_OPTIONS = {
    **{
        loss_type: dict(loss_type=loss_type, label_smoothing=0.1 if loss_type in ("robust", "exo_pair") else 0.0)
        for loss_type in ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard")
        + ("apo_zero", "apo_down", "discopop")
    },
    "average_log_prob, beta": dict(average_log_prob=True, beta=0.5),
    "with the NLL": dict(compute_nll_loss=True, alpha=0.5),
    "no reference model": dict(use_ref_model=False, compute_nll_loss=True, average_log_prob=True),
}
PREFERENCE_CASES = {
    **{f"dpo {name}": (liger.LigerFusedLinearDPOLoss, FusedLinearDPOLoss, o) for name, o in DPO_OPTIONS.items()},
    "simpo": (liger.LigerFusedLinearSimPOLoss, FusedLinearSimPOLoss, {}),
    "simpo smoothed, no NLL": (
        liger.LigerFusedLinearSimPOLoss,
        FusedLinearSimPOLoss,
        dict(label_smoothing=0.2, gamma=1.0, beta=2.0, compute_nll_loss=False),
    ),
    "cpo": (liger.LigerFusedLinearCPOLoss, FusedLinearCPOLoss, {}),
    "cpo averaged, smoothed": (
        liger.LigerFusedLinearCPOLoss,
        FusedLinearCPOLoss,
        dict(average_log_prob=True, label_smoothing=0.1, alpha=0.3),
    ),
}


@pytest.mark.parametrize("case", list(PREFERENCE_CASES))
def test_preference_losses_match_liger(case):
    theirs_cls, ours_cls, options = PREFERENCE_CASES[case]
    hidden, weight, bias, target, ref = preference_batch()
    extra = ref if ours_cls is FusedLinearDPOLoss and options.get("use_ref_model", True) else ()
    theirs = run_preference(theirs_cls(compiled=False, **options), hidden, weight, bias, target, *extra)
    ours = run_preference(ours_cls(**options), hidden, weight, bias, target, *extra)
    (loss, outputs, *grads), (their_loss, their_outputs, *their_grads) = ours, theirs
    assert len(outputs) == len(their_outputs) == 7
    for name, a, b in zip(PREFERENCE_NAMES, [loss, *outputs], [their_loss, *their_outputs]):
        assert a.shape == b.shape, name
        assert_close(a, b, rtol=2e-5, atol=2e-6, what=name)
    for name, a, b in zip(("d input", "d weight", "d bias"), grads, their_grads):
        assert_close(a, b, rtol=2e-5, atol=2e-6, what=name)


def test_preference_losses_reject_what_liger_rejects():
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearDPOLoss(loss_type="ipo")  # Liger's DPO has no IPO (use negkernels.preference_loss)
    with pytest.raises(ValueError, match="ref_input"):
        hidden, weight, bias, target, _ = preference_batch()
        FusedLinearDPOLoss()(weight, hidden, target, bias)
    with pytest.raises(ValueError, match="_input"):
        FusedLinearSimPOLoss()(weight, hidden[:5], target[:5], bias)
