"""Liger-Kernel's fused-linear GRPO, cross-entropy and preference losses, with negkernels underneath.

Code written for Liger switches by its import::

    # from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from negkernels.integrations.liger import FusedLinearGRPOLoss as LigerFusedLinearGRPOLoss

Same constructor, same ``forward(_input, lin_weight, selected_token_ids, attention_mask,
advantages, bias, ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias,
vllm_is_ratio, num_items_in_batch)``, same return: ``(loss, metrics)`` with ``metrics`` the KL
mean (only when ``beta != 0``) and the clipped-token fraction, both over the batch's unmasked
tokens. ``_input`` is [B, T, H]; the loss runs through :func:`negkernels.linear_policy_loss`
(one fused pass; no ``chunk_size`` or ``compiled`` needed, both accepted and ignored).

``FusedLinearCrossEntropyLoss`` does the same for ``LigerFusedLinearCrossEntropyLoss``
(``forward(lin_weight, _input, target, bias)``, weight first as Liger's), and
``FusedLinearDPOLoss`` / ``FusedLinearSimPOLoss`` / ``FusedLinearCPOLoss`` for Liger's
fused-linear preference losses (on :func:`negkernels.linear_preference_loss`).

Liger's semantics kept: without ``ref_per_token_logps`` the reference log-probs come from
``ref_input`` / ``ref_weight`` / ``ref_bias`` with no gradient (``use_ref_model``), and without a
reference model the KL is 0; ``old_per_token_logps=None`` is on-policy; ``vllm_is_ratio``
multiplies the policy term (at sequence level, each sequence's term by the mean ratio over its
tokens, which is what Liger's broadcast amounts to); dapo and cispo divide by ``num_items_in_batch`` / world size when
given, else by the batch's unmasked tokens (summed over ranks). Not supported (raises):
``loss_type="vespo"``, and ``"luspo"`` other than at sequence level without a KL term (Liger
weighs the per-token terms of padded positions too once they are per token).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.logprobs import PolicyLossConfig, linear_policy_loss, linear_token_logprobs
from ..ops.preference import PreferenceLossConfig, linear_preference_loss
from ._distributed import world_size as _world_size
from ._dpo import DPO_LOSS_OPTIONS, dpo_config
from ._weights import per_sequence_weights

__all__ = [
    "FusedLinearGRPOLoss",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearDPOLoss",
    "FusedLinearSimPOLoss",
    "FusedLinearCPOLoss",
]

_NO_CAP = float(torch.finfo(torch.float32).max)  # IS weights multiply the policy term uncapped
_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


class FusedLinearGRPOLoss(torch.nn.Module):
    """``LigerFusedLinearGRPOLoss``'s interface over :func:`negkernels.linear_policy_loss`."""

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: Optional[float] = None,
        use_bias_correction_kl: bool = False,
        **vespo_options,
    ):
        super().__init__()
        if loss_type not in _LOSS_TYPES:
            raise ValueError(
                f"loss_type: {loss_type!r} is not supported (choose from {_LOSS_TYPES}; vespo has no fused form)"
            )
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level: expected 'token' or 'sequence', got {importance_sampling_level!r}"
            )
        sequence = importance_sampling_level == "sequence"
        if sequence and loss_type in ("cispo", "sapo"):
            raise ValueError(f"importance_sampling_level: 'sequence' is not supported for loss_type={loss_type!r}")
        if loss_type == "luspo" and (not sequence or (beta != 0.0 and use_ref_model)):
            raise NotImplementedError(
                "loss_type='luspo' is supported at importance_sampling_level='sequence' with "
                "beta=0 only: otherwise Liger's per-token terms are weighed at padded "
                "positions too"
            )
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length: required for loss_type='dr_grpo'")
        if loss_type == "cispo" and epsilon_high < 1.0:
            raise ValueError(f"epsilon_high: cispo's cap on the ratio must be >= 1, got {epsilon_high}")
        unknown = set(vespo_options) - {"vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"}
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        self.beta, self.use_ref_model, self.temperature = float(beta), use_ref_model, temperature
        self.loss_type, self.importance_sampling_level = loss_type, importance_sampling_level
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.compiled, self.chunk_size = compiled, chunk_size  # accepted for compatibility; nothing to tune

        options = dict(
            is_mode="truncate", is_threshold=_NO_CAP, kl_estimator="k3", kl_bias_correction=bool(use_bias_correction_kl)
        )
        if loss_type == "cispo":
            options.update(loss_type="cispo", clip_high=epsilon_high - 1.0)
        elif loss_type == "sapo":
            options.update(loss_type="sapo", sapo_tau_pos=sapo_temperature_pos, sapo_tau_neg=sapo_temperature_neg)
        else:
            options.update(
                loss_type="gspo" if sequence else "ppo", clip_low=epsilon_low, clip_high=epsilon_high, delta=delta
            )
        options["aggregation"] = {
            "grpo": "seq-mean-token-mean",
            "sapo": "seq-mean-token-mean",
            "bnpo": "token-mean",
            "dapo": "token-mean",
            "cispo": "token-mean",
            "dr_grpo": "seq-mean-token-sum-norm",
            "luspo": "seq-mean-token-sum",
        }[loss_type]
        if loss_type == "dr_grpo":
            options["norm_constant"] = float(max_completion_length)
        self._options = options
        self._configs: dict[bool, PolicyLossConfig] = {}

    def _config(self, with_kl: bool) -> PolicyLossConfig:
        if with_kl not in self._configs:
            self._configs[with_kl] = PolicyLossConfig(**self._options, kl_coef=self.beta if with_kl else 0.0)
        return self._configs[with_kl]

    def forward(
        self,
        _input: Tensor,
        lin_weight: Tensor,
        selected_token_ids: Tensor,
        attention_mask: Tensor,
        advantages: Tensor,
        bias: Optional[Tensor] = None,
        ref_per_token_logps: Optional[Tensor] = None,
        old_per_token_logps: Optional[Tensor] = None,
        ref_input: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None,
        ref_bias: Optional[Tensor] = None,
        vllm_is_ratio: Optional[Tensor] = None,
        num_items_in_batch=None,
    ):
        mask = attention_mask.bool()
        batch = selected_token_ids.shape[0]
        ref = None
        if self.beta != 0.0 and self.use_ref_model:
            ref = ref_per_token_logps
            if ref is None:
                if ref_input is None:
                    raise ValueError("ref_per_token_logps / ref_input: one is required with use_ref_model")
                with torch.no_grad():
                    ref = linear_token_logprobs(
                        ref_input,
                        lin_weight if ref_weight is None else ref_weight,
                        selected_token_ids,
                        bias=ref_bias,
                        temperature=self.temperature,
                    )
        normaliser = {}
        if self.loss_type in ("dapo", "cispo"):
            if num_items_in_batch is not None:
                tokens = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
            else:
                tokens = mask.sum(dtype=torch.float32)
                if _world_size() > 1:
                    tokens = tokens.clone()
                    torch.distributed.all_reduce(tokens)
            normaliser["num_tokens"] = (tokens / _world_size()).clamp(min=1.0)
        elif self.loss_type == "bnpo":
            normaliser["num_tokens"] = mask.sum(dtype=torch.float32).clamp(min=1.0)
        else:
            normaliser["num_sequences"] = batch  # Liger divides by B: fully masked rows count
        weights = None
        if vllm_is_ratio is not None:
            weights = vllm_is_ratio.float()
            if weights.dim() == 1:
                weights = weights.unsqueeze(1)
            if self.importance_sampling_level == "sequence":
                weights = per_sequence_weights(weights, mask, over_padding=self.loss_type == "luspo")
            else:
                weights = weights.expand(mask.shape).contiguous()
        out = linear_policy_loss(
            _input,
            lin_weight,
            selected_token_ids,
            old_per_token_logps,
            advantages,
            mask,
            bias=bias,
            temperature=self.temperature,
            ref_logp=ref,
            is_weights=weights,
            validate=False,
            config=self._config(ref is not None),
            **normaliser,
        )
        metrics = []
        if self.beta != 0.0:
            metrics.append(out.kl if ref is not None else out.kl.new_zeros(()))
        metrics.append(self._clip_fraction(out, old_per_token_logps, advantages, mask))
        return out.loss, tuple(metrics)

    def _clip_fraction(self, out, old, advantages, mask) -> Tensor:
        """Liger's clipped-token fraction (over the unmasked tokens) from the fused pass's log-probs."""
        if self.loss_type == "sapo":
            return out.loss.new_zeros(())
        log_ratio = torch.zeros_like(out.token_logp) if old is None else out.token_logp - old
        maskf = mask.float()
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef = torch.exp(log_ratio)
        adv = advantages.reshape(advantages.shape[0], -1)
        if self.loss_type == "cispo":
            clipped = (coef > self.epsilon_high) & (adv > 0)
        else:
            clipped = ((coef < 1 - self.epsilon_low) & (adv < 0)) | ((coef > 1 + self.epsilon_high) & (adv > 0))
        return (clipped.expand(mask.shape) * maskf).sum() / maskf.sum().clamp(min=1.0)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """``LigerFusedLinearCrossEntropyLoss`` on :func:`negkernels.linear_token_logprobs`: the
    cross-entropy of the LM head's logits without the logits.

    Same constructor and ``forward(lin_weight, _input, target, bias=None)``: ``_input`` [N, H],
    ``lin_weight`` [V, H], ``target`` [N] with ``ignore_index`` entries left out; ``reduction``
    ``"mean"`` (over the kept tokens, or Σ ce_weight[target] with class weights ``ce_weight``),
    ``"sum"`` or ``"none"`` ([N], 0 at ignored tokens); fp32 for any input dtype and 0 when every
    token is ignored, as Liger's. ``accum_dtype`` is accepted (the products
    accumulate in fp32 here either way). Raises, naming the option, for what has no exact form
    here: ``label_smoothing``, ``lse_square_scale`` (z-loss), ``softcap``, ``return_z_loss``,
    ``use_token_scaling``, ``return_token_accuracy`` and ``return_predicted_tokens``.
    """

    def __init__(
        self,
        ce_weight: Optional[Tensor] = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: Optional[float] = None,
        return_z_loss: bool = False,
        accum_dtype: Optional[torch.dtype] = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
    ):
        super().__init__()
        unsupported = dict(
            lse_square_scale=lse_square_scale != 0.0,
            label_smoothing=label_smoothing != 0.0,
            softcap=softcap is not None,
            return_z_loss=bool(return_z_loss),
            use_token_scaling=bool(use_token_scaling),
            return_token_accuracy=bool(return_token_accuracy),
            return_predicted_tokens=bool(return_predicted_tokens),
        )
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"{name}: not supported by negkernels' fused cross-entropy (use Liger's for it)")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        if ce_weight is not None and (not isinstance(ce_weight, Tensor) or ce_weight.dim() != 1):
            raise ValueError("ce_weight: expected a 1-d tensor of class weights")
        self.ce_weight = ce_weight
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if target.shape != _input.shape[:-1]:
            raise ValueError(f"target: shape {tuple(target.shape)} does not match _input {tuple(_input.shape)}")
        kept = target != self.ignore_index
        logp = linear_token_logprobs(_input, lin_weight, torch.where(kept, target, 0), bias=bias)
        weight = kept.to(logp.dtype)
        if self.ce_weight is not None:
            if self.ce_weight.shape[0] != lin_weight.shape[0]:
                raise ValueError(
                    f"ce_weight: {self.ce_weight.shape[0]} classes for a vocabulary of {lin_weight.shape[0]}"
                )
            weight = weight * self.ce_weight.to(device=logp.device, dtype=logp.dtype)[torch.where(kept, target, 0)]
        token_loss = -torch.where(kept, logp, 0.0) * weight
        if self.reduction == "none":
            return token_loss
        total = token_loss.sum()
        if self.reduction == "mean":  # no kept token: 0, as Liger's (torch's cross_entropy gives NaN)
            total = total / weight.sum().clamp_min(torch.finfo(total.dtype).tiny)
        return total


# ---------------------------------------------------------------------------------------------
# Preference losses: LigerFusedLinearDPOLoss, LigerFusedLinearSimPOLoss, LigerFusedLinearCPOLoss
# ---------------------------------------------------------------------------------------------

# Liger's DPO loss types: TRL's, less the two that divide by the completion length.
_DPO_LOSS_TYPES = tuple(t for t in DPO_LOSS_OPTIONS if t not in ("ipo", "sigmoid_norm"))


class _FusedLinearPreferenceLoss(torch.nn.Module):
    """Liger's fused-linear preference layout on :func:`negkernels.linear_preference_loss`.

    ``_input`` [2B, T, H] holds the B chosen responses then the B rejected ones, ``target``
    [2B, T] their next-token ids with ``ignore_index`` where a token does not count. Returns
    Liger's ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards, rejected_rewards))``: loss = preference loss (mean over pairs) +
    ``alpha`` · NLL, the NLL the mean over every kept chosen token (0 without
    ``compute_nll_loss``); the logits means are over every position and vocabulary entry of the
    chosen (rejected) rows, computed from the hidden states as h·mean(W) + mean(b), exactly."""

    def __init__(self, ignore_index: int, alpha: float, compute_nll_loss: bool, config: PreferenceLossConfig):
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.alpha = float(alpha)
        self.compute_nll_loss = bool(compute_nll_loss)
        self.config = config

    def forward(
        self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Optional[Tensor] = None
    ) -> tuple[Tensor, tuple]:
        return self._loss(lin_weight, _input, target, bias)

    def _loss(self, lin_weight, _input, target, bias, **reference) -> tuple[Tensor, tuple]:
        if _input.dim() != 3 or _input.shape[0] % 2:
            raise ValueError(f"_input: expected [2B, T, H] (B chosen rows, then B rejected), got {tuple(_input.shape)}")
        mask = target != self.ignore_index
        out = linear_preference_loss(_input, lin_weight, target, mask, bias=bias, config=self.config, **reference)
        nll = out.chosen_nll if self.compute_nll_loss else out.loss.new_zeros(())
        with torch.no_grad():
            # in the input's dtype (fp32 accumulation): no fp32 copy of the hidden states for a metric
            mean_row = lin_weight.float().mean(0).to(_input.dtype)
            mean_logits = (_input @ mean_row).float() + (bias.float().mean() if bias is not None else 0.0)
            chosen_mean, rejected_mean = (half.mean() for half in mean_logits.chunk(2))
        loss = out.loss + self.alpha * nll if self.compute_nll_loss else out.loss
        return loss, (
            out.chosen_logps,
            out.rejected_logps,
            chosen_mean,
            rejected_mean,
            nll.detach(),
            out.chosen_rewards,
            out.rejected_rewards,
        )


class FusedLinearDPOLoss(_FusedLinearPreferenceLoss):
    """``LigerFusedLinearDPOLoss`` on :func:`negkernels.linear_preference_loss`; Liger's
    constructor, ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None,
    ref_bias=None)`` and return (see the base class). ``use_ref_model``: the reference log-probs
    come from ``ref_input`` / ``ref_weight`` / ``ref_bias`` without gradient, else they are 0.
    ``average_log_prob`` takes each response's mean token log-prob instead of the sum. Loss types:
    Liger's ten (sigmoid, hinge, exo_pair, nca_pair, robust, bco_pair, sppo_hard, apo_zero,
    apo_down, discopop). ``compiled`` and ``chunk_size`` are accepted and ignored (one fused pass)."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
    ):
        if loss_type not in _DPO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {_DPO_LOSS_TYPES}, got {loss_type!r}")
        config = dpo_config(
            loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
            length_normalize=bool(average_log_prob),
        )
        super().__init__(ignore_index, alpha, compute_nll_loss, config)
        self.use_ref_model = bool(use_ref_model)

    def forward(  # Liger's DPO forward also takes the reference head
        self,
        lin_weight: Tensor,
        _input: Tensor,
        target: Tensor,
        bias: Optional[Tensor] = None,
        ref_input: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None,
        ref_bias: Optional[Tensor] = None,
    ) -> tuple[Tensor, tuple]:
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("ref_input: use_ref_model=True needs ref_input and ref_weight")
            reference = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
        else:  # no reference model: log-ratios against 0, as Liger's
            zeros = _input.new_zeros(_input.shape[0] // 2, dtype=torch.float32)
            reference = dict(ref_chosen_logp=zeros, ref_rejected_logp=zeros)
        return self._loss(lin_weight, _input, target, bias, **reference)


class FusedLinearSimPOLoss(_FusedLinearPreferenceLoss):
    """``LigerFusedLinearSimPOLoss``: −log σ(β(ℓ_w − ℓ_l) − γ) on each response's mean token
    log-prob (with ``label_smoothing``), plus ``alpha`` · NLL (on by default, as Liger's); Liger's
    constructor, ``forward(lin_weight, _input, target, bias=None)`` and return."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
    ):
        config = PreferenceLossConfig(
            loss_type="simpo", beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma, length_normalize=True
        )
        super().__init__(ignore_index, alpha, compute_nll_loss, config)


class FusedLinearCPOLoss(_FusedLinearPreferenceLoss):
    """``LigerFusedLinearCPOLoss``: CPO's −log σ(β(s_w − s_l)) on the policy's sequence log-probs
    (sums, or means with ``average_log_prob``; with ``label_smoothing``), plus ``alpha`` · NLL:
    SimPO's form with γ = 0. Liger's constructor, ``forward(lin_weight, _input, target,
    bias=None)`` and return."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ):
        config = PreferenceLossConfig(
            loss_type="simpo", beta=beta, label_smoothing=label_smoothing, length_normalize=bool(average_log_prob)
        )
        super().__init__(ignore_index, alpha, compute_nll_loss, config)
