"""``PolicyLoss``: the policy-loss options held once, applied to log-probs, logits or hidden states."""

from __future__ import annotations

import inspect
from typing import Optional

from torch import Tensor, nn

from ..ops.logprobs import PolicyLossOutput, linear_policy_loss, policy_loss, policy_loss_from_logits

# Options that configure the loss (the rest of the signature is per-batch data).
_OPTIONS = tuple(
    name for name, p in inspect.signature(policy_loss).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("cu_seqlens", "max_seqlen", "ref_logp", "is_weights",
                                                                  "num_tokens", "num_sequences", "process_group")
)


class PolicyLoss(nn.Module):
    """Holds the options of :func:`negkernels.policy_loss` (loss type, clip ranges, KL, IS mode,
    aggregation, backend); ``forward`` takes per-batch log-probs, ``from_logits`` per-batch logits,
    ``from_hidden`` the last hidden states and the LM head (:func:`negkernels.linear_policy_loss`).
    Per-call keyword arguments (``ref_logp``, ``is_weights``, ``cu_seqlens``, normalisers,
    ``process_group``, or any option) override the stored ones.

    >>> loss_fn = PolicyLoss(loss_type="ppo", clip_low=0.2, clip_high=0.28, kl_coef=1e-3)
    >>> out = loss_fn(logp, old_logp, advantages, mask, ref_logp=ref_logp)
    """

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"PolicyLoss: unknown options {unknown}; expected some of {list(_OPTIONS)}")
        self.options = dict(options)

    def forward(self, logp: Tensor, old_logp: Tensor, advantages: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                **kwargs) -> PolicyLossOutput:
        return policy_loss(logp, old_logp, advantages, mask, **{**self.options, **kwargs})

    def from_logits(self, logits: Tensor, targets: Tensor, old_logp: Tensor, advantages: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None, **kwargs) -> PolicyLossOutput:
        return policy_loss_from_logits(logits, targets, old_logp, advantages, mask, **{**self.options, **kwargs})

    def from_hidden(self, hidden: Tensor, weight: Tensor, targets: Tensor, old_logp: Tensor,
                    advantages: Optional[Tensor] = None, mask: Optional[Tensor] = None, **kwargs) -> PolicyLossOutput:
        return linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
