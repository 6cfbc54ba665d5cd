"""``PolicyLoss``: the policy-loss options held once, applied to log-probs, logits or hidden states."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor, nn

from ..ops.logprobs import (
    POLICY_OPTIONS,
    PolicyLossConfig,
    PolicyLossOutput,
    linear_policy_loss,
    policy_loss,
    policy_loss_from_logits,
)

# Per-call options a module may also hold (the rest of the call is per-batch data).
_CALL_OPTIONS = ("validate", "backend")


class PolicyLoss(nn.Module):
    """Holds a :class:`~negkernels.ops.logprobs.PolicyLossConfig` (loss type, clip ranges, KL, IS
    mode, aggregation; validated here, at construction) and optionally ``backend`` / ``validate``;
    ``forward`` takes per-batch log-probs, ``from_logits`` per-batch logits, ``from_hidden`` the last
    hidden states and the LM head (:func:`negkernels.linear_policy_loss`). Per-call keyword
    arguments (``ref_logp``, ``is_weights``, ``cu_seqlens``, normalisers, ``process_group``, or any
    option) override the stored ones.

    >>> loss_fn = PolicyLoss(loss_type="ppo", clip_low=0.2, clip_high=0.28, kl_coef=1e-3)
    >>> out = loss_fn(logp, old_logp, advantages, mask, ref_logp=ref_logp)
    """

    def __init__(self, config: Optional[PolicyLossConfig] = None, **options):
        super().__init__()
        unknown = sorted(set(options) - POLICY_OPTIONS - set(_CALL_OPTIONS))
        if unknown:
            raise TypeError(
                f"PolicyLoss: unknown options {unknown}; expected some of "
                f"{sorted(POLICY_OPTIONS) + list(_CALL_OPTIONS)}"
            )
        self.config = PolicyLossConfig.of(config, {k: v for k, v in options.items() if k in POLICY_OPTIONS})
        self.call_options = {k: v for k, v in options.items() if k in _CALL_OPTIONS}

    def _arguments(self, kwargs: dict) -> dict:
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in POLICY_OPTIONS}
        config = dataclasses.replace(self.config, **overrides) if overrides else self.config
        return {**self.call_options, **kwargs, "config": config}

    def forward(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        **kwargs,
    ) -> PolicyLossOutput:
        return policy_loss(logp, old_logp, advantages, mask, **self._arguments(kwargs))

    def from_logits(
        self,
        logits: Tensor,
        targets: Tensor,
        old_logp: Tensor,
        advantages: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        **kwargs,
    ) -> PolicyLossOutput:
        return policy_loss_from_logits(logits, targets, old_logp, advantages, mask, **self._arguments(kwargs))

    def from_hidden(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        old_logp: Tensor,
        advantages: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        **kwargs,
    ) -> PolicyLossOutput:
        return linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, **self._arguments(kwargs))

    def extra_repr(self) -> str:
        defaults = PolicyLossConfig()
        changed = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if getattr(self.config, f.name) != getattr(defaults, f.name)
        }
        return ", ".join(f"{k}={v!r}" for k, v in {**changed, **self.call_options}.items())
