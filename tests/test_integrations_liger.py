"""FusedLinearGRPOLoss against the real liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss.

Oracle: Liger's own chunked loss (its PyTorch path, ``compiled=False``, runs on a CPU), called
with the same arguments; loss, metrics and the gradients of the input, weight and bias must
agree to fp32 tolerance. Shapes are odd and masks ragged, with a fully masked row.
"""

import pytest
import torch

liger = pytest.importorskip("liger_kernel.chunked_loss")

from negkernels.integrations.liger import FusedLinearGRPOLoss  # noqa: E402

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
        call = dict(old_per_token_logps=old, ref_input=hidden + 0.05 * torch.randn_like(hidden),
                    ref_weight=weight * 1.1, ref_bias=bias)
    elif inputs == "on-policy":
        call = dict(ref_per_token_logps=ref)
    elif inputs == "vllm ratios":
        call["vllm_is_ratio"] = 0.5 + torch.rand(ids.shape)
    elif inputs == "num_items":
        call["num_items_in_batch"] = torch.tensor(float(mask.sum() + 17))
    theirs = run(liger.LigerFusedLinearGRPOLoss(compiled=False, chunk_size=2, **options), hidden, weight, bias, ids,
                 mask, adv, **call)
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
