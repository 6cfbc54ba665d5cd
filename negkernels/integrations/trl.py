"""``NegkernelsGRPOTrainer`` and ``NegkernelsDPOTrainer``: TRL's ``GRPOTrainer`` and
``DPOTrainer`` with their losses fused with the LM head.

The migration is the class name::

    from negkernels.integrations.trl import NegkernelsGRPOTrainer as GRPOTrainer
    from negkernels.integrations.trl import NegkernelsDPOTrainer as DPOTrainer

``NegkernelsDPOTrainer``'s loss types and fallbacks are in its class docstring. What follows is
the GRPO trainer.

Same constructor, same ``GRPOConfig``, same logged metrics. Generation, rewards, advantages,
the reference model and the vLLM importance-sampling ratios stay TRL's; the training loss is
:func:`negkernels.linear_policy_loss` on the backbone's last hidden states and the LM head, so the
[batch, completion, vocabulary] logits never exist and the log-probs, entropies, loss and the LM
head's gradients come out of one fused pass. With ``num_iterations=1`` the step is on-policy
(``old_logp=None``), as in TRL, with no second LM-head pass.

TRL's options and how they map (``docs``: the README's "Swap it into your trainer"):

================================  ==========================================================
``loss_type``                     aggregation                    (policy term)
``grpo`` / ``sapo``               seq-mean-token-mean, every row counted (ppo / sapo)
``bnpo``                          token-mean
``dr_grpo``                       seq-mean-token-sum-norm, norm_constant = max_completion_length
``dapo`` / ``cispo``              token-mean over num_items_in_batch / processes · GA / steps_per_generation
``luspo``                         seq-mean-token-sum, every row counted
``importance_sampling_level``     ``"sequence"`` → loss_type gspo (grpo, bnpo, dr_grpo, dapo, luspo);
                                  sapo / cispo: ratio_level="sequence"
``epsilon`` / ``epsilon_high``    clip_low / clip_high (cispo: clip_high = epsilon_high − 1)
``delta``                         delta;  ``beta`` → kl_coef with k3 against ``ref_per_token_logps``
``use_bias_correction_kl``        kl_bias_correction (the KL term times ρ, or s for gspo)
``temperature``                   temperature (divided by the model's constant logit scale)
``entropy_coef``, adaptive entropy  entropy_coef of the fused pass (token-mean losses without an
                                  entropy mask), else a second differentiable LM-head pass for H;
                                  TRL's adaptive controller, the same rule and logged coefficient
``top_entropy_quantile``,         per-token weights on the policy term (is_weights); they need the
``off_policy_mask_threshold``     entropies / log-probs first: one extra forward-only LM-head pass
vLLM importance sampling          TRL's ``importance_sampling_ratio`` times the policy term
gradient accumulation             folded into the normalisers, so the loss is TRL's divided by GA
================================  ==========================================================

Run by TRL's own loss instead (a warning says which and why, once): ``loss_type="vespo"``; MoE
router auxiliary losses; multimodal inputs; models whose logits the
fused head cannot reproduce exactly (a soft cap).
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Optional

import torch
import trl
from torch import Tensor
from trl import DPOTrainer, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from ..ops.logprobs import PolicyLossConfig, linear_policy_loss, linear_token_logprobs
from ..ops.preference import preference_loss
from ._dpo import DPO_LOSS_OPTIONS, dpo_config
from ._weights import per_sequence_weights
from .transformers import LMHead, lm_head

__all__ = ["NegkernelsDPOTrainer", "NegkernelsGRPOTrainer"]

# The trainers override GRPOTrainer._compute_loss and DPOTrainer._compute_loss and read the
# batch's keys by TRL's names: both are TRL internals, so a release outside the tested series
# gets a warning, not silence.
TESTED_TRL = "1.16"
if ".".join(trl.__version__.split(".")[:2]) != TESTED_TRL:
    warnings.warn(
        f"negkernels.integrations.trl is tested against trl {TESTED_TRL}.x; trl {trl.__version__} is "
        "installed: compare a few steps against trl.GRPOTrainer / trl.DPOTrainer before relying on it",
        stacklevel=2,
    )

# A cap the IS weights never reach: the masks and TRL's ratios multiply the policy term as they are.
_NO_CAP = float(torch.finfo(torch.float32).max)
_GRPO_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_MULTIMODAL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_sizes",
    "spatial_shapes",
    "num_tiles",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _add_hidden_state_forward(model) -> None:
    """``model(..., negkernels_hidden_states=True)`` returns the backbone's last hidden states.

    Called through the model (and any DDP / FSDP wrapper around it), so the wrappers' hooks run
    as for a normal forward; without the flag the forward is the one it replaces."""
    inner = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, negkernels_hidden_states: bool = False, **kwargs):
        if not negkernels_hidden_states:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        return out.last_hidden_state

    model.forward = types.MethodType(forward, model)


def _head_operands(trainer, model, target, **model_inputs) -> tuple[Tensor, Tensor, Optional[Tensor], LMHead]:
    """(the backbone's last hidden states, LM head weight, bias, the head) in the dtype TRL's own
    head runs in: fp32 when asked, else the autocast dtype of mixed precision (as autocast would
    cast it), else the weight's. ``model`` is called (hooks of any wrapper run), ``target`` is
    the unwrapped model whose head is read."""
    with trainer.accelerator.autocast():
        hidden = model(**model_inputs, negkernels_hidden_states=True)
        device_type = hidden.device.type
        # GRPOConfig has cast_lm_head_to_fp32; DPOConfig does not (its head runs in the model's dtype)
        if getattr(trainer.args, "cast_lm_head_to_fp32", False):
            head_dtype = torch.float32
        elif torch.is_autocast_enabled(device_type):
            head_dtype = torch.get_autocast_dtype(device_type)
        else:
            head_dtype = None
    head = lm_head(target)
    weight, bias = head.weight, head.bias
    head_dtype = head_dtype or weight.dtype
    bias = bias.to(head_dtype) if bias is not None else None
    return hidden.to(head_dtype), weight.to(head_dtype), bias, head


def _loss_config(trainer) -> tuple[Optional[PolicyLossConfig], Optional[str]]:
    """(the config of every step, None) or (None, why TRL's own loss runs instead)."""
    args = trainer.args
    loss_type, level = trainer.loss_type, trainer.importance_sampling_level
    if loss_type not in _GRPO_FAMILY + ("cispo", "sapo"):
        return None, f"loss_type={loss_type!r} has no fused form"
    if trainer.aux_loss_enabled:
        return None, "the MoE router auxiliary loss needs the model's own forward"
    options = dict(
        kl_coef=float(trainer.beta),
        kl_estimator="k3",
        kl_bias_correction=bool(args.use_bias_correction_kl) and trainer.beta != 0.0,
        is_mode="truncate",
        is_threshold=_NO_CAP,
    )
    if loss_type == "cispo":
        options.update(loss_type="cispo", clip_high=trainer.epsilon_high - 1.0, ratio_level=level)
    elif loss_type == "sapo":
        options.update(
            loss_type="sapo",
            sapo_tau_pos=float(args.sapo_temperature_pos),
            sapo_tau_neg=float(args.sapo_temperature_neg),
            ratio_level=level,
        )
    else:
        options.update(
            loss_type="gspo" if level == "sequence" else "ppo",
            clip_low=trainer.epsilon_low,
            clip_high=trainer.epsilon_high,
            delta=args.delta,
        )
    options["aggregation"] = {
        "grpo": "seq-mean-token-mean",
        "sapo": "seq-mean-token-mean",
        "bnpo": "token-mean",
        "dr_grpo": "seq-mean-token-sum-norm",
        "dapo": "token-mean",
        "cispo": "token-mean",
        "luspo": "seq-mean-token-sum",
    }[loss_type]
    if loss_type == "dr_grpo":
        options["norm_constant"] = float(trainer.max_completion_length)
    return PolicyLossConfig(**options), None


class NegkernelsGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is :func:`negkernels.linear_policy_loss`; see the module
    docstring for the option mapping and for what still runs TRL's own loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        target = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._negkernels_config, self._negkernels_fallback = _loss_config(self)
        if self._negkernels_fallback is None:
            try:
                lm_head(target)
            except ValueError as err:
                self._negkernels_config, self._negkernels_fallback = None, str(err)
        if self._negkernels_fallback is not None:
            warnings.warn(f"NegkernelsGRPOTrainer: TRL's own loss runs: {self._negkernels_fallback}", stacklevel=2)
        else:
            _add_hidden_state_forward(target)
        self._negkernels_target = target

    def _compute_loss(self, model, inputs):
        if self._negkernels_fallback is not None or any(inputs.get(k) is not None for k in _MULTIMODAL_INPUTS):
            return super()._compute_loss(model, inputs)
        cfg = self._negkernels_config
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1

        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        bool_mask = mask.bool()
        length = completion_ids.size(1)
        hidden, weight, bias, head = _head_operands(
            self, model, self._negkernels_target, input_ids=input_ids, attention_mask=attention_mask
        )
        hidden = hidden[:, -length - 1 : -1]
        temperature = head.temperature(self.temperature)

        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")  # None: on-policy (ρ = 1 with its gradient)
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        # TRL's entropy bonus: coef · (the mean entropy over the tokens the policy term acts on) / GA,
        # whatever the loss's normaliser. Under a token mean over exactly those tokens it folds
        # into the fused pass as entropy_coef (rescaled to the policy's normaliser); otherwise
        # the entropies come from a second, differentiable LM-head pass, which also serves the
        # masks below (they need this step's entropies and log-probs before the loss).
        coef = self._negkernels_entropy_coef()
        folded = coef != 0.0 and cfg.aggregation == "token-mean" and self.top_entropy_quantile >= 1.0
        bonus_pass = None
        if coef != 0.0 and not folded:
            bonus_pass = linear_token_logprobs(
                hidden,
                weight,
                completion_ids,
                bias=bias,
                temperature=temperature,
                return_entropy=True,
                fp32_lm_head=bool(self.args.cast_lm_head_to_fp32),
                validate=False,
            )
        weights, entropy_mask = self._policy_term_weights(
            inputs, hidden, weight, bias, completion_ids, temperature, mask, advantages, old, bonus_pass
        )

        batch = completion_ids.size(0)
        normaliser = {}
        if cfg.aggregation == "token-mean":
            if self.loss_type in ("dapo", "cispo"):
                # num_items_in_batch spans the generation batch: rescaled to one accumulation window
                tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
                if mode == "train":
                    tokens = tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            else:
                tokens = bool_mask.sum().float().clamp(min=1.0) * accumulation
            normaliser["num_tokens"] = tokens
        else:
            normaliser["num_sequences"] = batch * accumulation  # TRL counts fully masked rows too

        entropy_coef = 0.0
        if folded:
            entropy_coef = coef * float(normaliser["num_tokens"]) / (float(bool_mask.sum().clamp(min=1)) * accumulation)
        out = linear_policy_loss(
            hidden,
            weight,
            completion_ids,
            old,
            advantages,
            bool_mask,
            bias=bias,
            temperature=temperature,
            fp32_lm_head=bool(self.args.cast_lm_head_to_fp32),
            return_entropy=True,
            entropy_coef=entropy_coef,
            ref_logp=ref,
            is_weights=weights,
            validate=False,
            config=cfg,
            **normaliser,
        )
        loss = out.loss
        self._log_negkernels_metrics(mode, out, old, ref, advantages, mask)
        if self._entropy_bonus_enabled:
            effective = mask.float() if entropy_mask is None else mask.float() * entropy_mask
            entropy_sum = (out.token_entropy * effective).sum()
            policy = loss.detach()
            if folded:  # the fused loss holds −entropy_coef·ΣH / num_tokens: put it back for the metric
                policy = policy + entropy_coef * (out.token_entropy * mask.float()).sum() / normaliser["num_tokens"]
            elif bonus_pass is not None:
                entropy = bonus_pass[1]
                loss = loss - coef * (entropy * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
            if self.loss_type not in ("dapo", "cispo"):  # TRL logs its policy loss before the GA division
                policy = policy * accumulation
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            self._negkernels_entropy_controller(mode, entropy_sum.detach(), effective.sum().detach())
        return loss

    def _negkernels_entropy_coef(self) -> float:
        """The bonus coefficient of this step (TRL's rule: adaptive control gates it on the entropy
        measured over the previous optimisation step's window)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return float(self.entropy_coef)

    def _negkernels_entropy_controller(self, mode, entropy_sum, count):
        """TRL's adaptive entropy control: the window's token-weighted mean entropy over every rank
        moves the coefficient by entropy_coef_delta within [entropy_coef_min, entropy_coef_max] at
        each optimiser step; the coefficient is logged at each step's boundary."""
        args = self.args
        if self.use_adaptive_entropy and mode == "train":
            stats = torch.stack([entropy_sum, count])
            self._entropy_window_stats = (
                stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
            )
            if self.accelerator.sync_gradients:
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world = (total[0] / total[1].clamp(min=1.0)).item()
                if world <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _policy_term_weights(
        self, inputs, hidden, weight, bias, targets, temperature, mask, advantages, old, computed=None
    ):
        """TRL's high-entropy mask, off-policy sequence mask and vLLM IS ratios, multiplied: the
        per-token weights of the policy term (not of the KL term), or None; and the entropy mask.
        ``computed``: this step's (log-probs, entropies) when a pass already made them."""
        weights = entropy_mask = None
        entropy_quantile = self.top_entropy_quantile < 1.0
        if entropy_quantile or self.off_policy_mask_threshold is not None:
            if computed is not None:
                logp, entropy = (x.detach() for x in computed)
            else:
                with torch.no_grad():  # both need this step's log-probs / entropies before the loss
                    logp, entropy = linear_token_logprobs(
                        hidden.detach(),
                        weight.detach(),
                        targets,
                        bias=None if bias is None else bias.detach(),
                        temperature=temperature,
                        return_entropy=True,
                        fp32_lm_head=bool(self.args.cast_lm_head_to_fp32),
                        validate=False,
                    )
            if entropy_quantile:
                weights = entropy_mask = self.get_high_entropy_mask(
                    entropy, mask, 1 - self.top_entropy_quantile
                ).float()
            if self.off_policy_mask_threshold is not None:
                column = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
                sampling = inputs.get("sampling_per_token_logps", old if old is not None else logp)
                keep = self.get_off_policy_mask(
                    advantages=column,
                    per_token_logps=logp,
                    sampling_per_token_logps=sampling,
                    mask=mask,
                    off_policy_threshold=self.off_policy_mask_threshold,
                ).float()
                weights = keep.expand_as(mask).float() if weights is None else weights * keep
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"].float()
            weights = ratio if weights is None else weights * ratio
        if weights is None:
            return None, entropy_mask
        if self.importance_sampling_level == "sequence" and self.loss_type != "cispo":
            # one weight per sequence ratio (cispo's term stays per token: −sg(min(s, ε))·A·logp_t)
            return per_sequence_weights(weights, mask).contiguous(), entropy_mask
        return weights.expand(mask.shape).contiguous(), entropy_mask

    def _log_negkernels_metrics(self, mode, out, old, ref, advantages, mask):
        """TRL's logged metrics (kl, entropy, clip ratios) from the fused pass's per-token outputs."""
        cfg = self._negkernels_config
        logp, entropy = out.token_logp, out.token_entropy
        maskf = mask.float()
        column = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        log_ratio = torch.zeros_like(logp) if old is None else logp - old
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef = torch.exp(log_ratio)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * maskf).sum(), maskf.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * maskf).sum(-1) / maskf.sum(-1)

        metrics = self._metrics[mode]
        if ref is not None:
            d = ref - logp
            kl = torch.exp(d) - d - 1
            if cfg.kl_bias_correction:
                kl = kl * coef
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(entropy))
        if self.loss_type in _GRPO_FAMILY:
            if self.args.delta is not None:
                coef = coef.clamp(max=self.args.delta)
            low = ((coef < 1 - self.epsilon_low) & (column < 0)).float()
            high = ((coef > 1 + self.epsilon_high) & (column > 0)).float()
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            low_seq = self.accelerator.gather(masked_seq_mean(low))
            high_seq = self.accelerator.gather(masked_seq_mean(high))
            metrics["clip_ratio/low_min"].append(_nan_extreme(low_seq, torch.min))
            metrics["clip_ratio/high_max"].append(_nan_extreme(high_seq, torch.max))
        elif self.loss_type == "cispo":
            clipped = ((coef > self.epsilon_high) & (column > 0)).float()
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped))


def _nan_extreme(x: Tensor, reduce) -> float:
    """The min / max over the non-NaN values (NaN if there are none), as TRL's nanmin / nanmax."""
    x = x[~torch.isnan(x)]
    return float("nan") if x.numel() == 0 else reduce(x).item()


# ---------------------------------------------------------------------------------------------
# DPOTrainer
# ---------------------------------------------------------------------------------------------

# TRL's "sft" term is the mean NLL of the chosen tokens: computed here from the same log-probs.
_DPO_SFT = "sft"
# Chosen tokens per chunk of the forward-only pass for TRL's mean_token_accuracy (argmax of the logits).
_TOP1_CHUNK = 4096


def _dpo_configs(trainer) -> tuple[Optional[list], Optional[str]]:
    """([(PreferenceLossConfig or "sft", weight)], None) or (None, why TRL's own loss runs)."""
    args = trainer.args
    unsupported = [t for t in trainer.loss_types if t not in DPO_LOSS_OPTIONS and t != _DPO_SFT]
    if unsupported:
        return None, f"loss_type={unsupported} has no fused form (aot / aot_unpaired sort the batch)"
    if trainer.f_divergence_type != "reverse_kl":
        return None, f"f_divergence_type={trainer.f_divergence_type!r} reshapes the log-ratios"
    if trainer.ld_alpha is not None:
        return None, "ld_alpha (LD-DPO) weighs the tokens past the shared length"
    if trainer.use_weighting:
        return None, "use_weighting (WPO) needs Σ p² of every next-token distribution"
    if trainer.aux_loss_enabled:
        return None, "the MoE router auxiliary loss needs the model's own forward"
    configs = []
    for loss_type, weight in zip(trainer.loss_types, trainer.loss_weights):
        if loss_type == _DPO_SFT:
            configs.append((_DPO_SFT, float(weight)))
            continue
        config = dpo_config(
            loss_type, beta=trainer.beta, label_smoothing=trainer.label_smoothing, discopop_tau=args.discopop_tau
        )
        configs.append((config, float(weight)))
    return configs, None


class NegkernelsDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is :func:`negkernels.preference_loss` on log-probs from
    :func:`negkernels.linear_token_logprobs` (the LM head fused, the logits never in memory).

    The migration is the class name::

        from negkernels.integrations.trl import NegkernelsDPOTrainer as DPOTrainer

    Same constructor, ``DPOConfig`` and logged metrics. The reference log-probs are TRL's
    precomputed ones (``precompute_ref_log_probs``) or the reference model's, computed through
    the same fused head without gradient. ``loss_type`` may be any of TRL's but ``aot`` and
    ``aot_unpaired``, with ``loss_weights``. TRL's own loss runs instead (a warning says why) for
    those two, ``f_divergence_type`` other than reverse KL, ``ld_alpha``, ``use_weighting``, MoE
    auxiliary losses, a PEFT model without a reference copy (the adapter-disabled reference),
    multimodal inputs and soft-capped logits. TRL's ``logits/*`` and ``mean_token_accuracy``
    metrics come from the hidden states: the mean logit over the vocabulary is h·mean(W) + mean(b)
    exactly, the top-1 accuracy takes one forward-only pass over the chosen tokens in chunks.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        target = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._negkernels_configs, self._negkernels_fallback = _dpo_configs(self)
        if self._negkernels_fallback is None and self.ref_model is None and not self.precompute_ref_logps:
            self._negkernels_fallback = "the reference is the PEFT model with its adapter disabled"
        ref_target = None
        if self._negkernels_fallback is None:
            try:
                lm_head(target)
                if self.ref_model is not None:
                    ref_target = self.accelerator.unwrap_model(self.ref_model)
                    lm_head(ref_target)
            except ValueError as err:
                self._negkernels_fallback = str(err)
        if self._negkernels_fallback is not None:
            warnings.warn(f"NegkernelsDPOTrainer: TRL's own loss runs: {self._negkernels_fallback}", stacklevel=2)
        else:
            _add_hidden_state_forward(target)
            if ref_target is not None:
                _add_hidden_state_forward(ref_target)
        self._negkernels_target = target
        self._negkernels_ref_target = ref_target

    def _negkernels_token_logprobs(self, model, target, model_kwargs, targets, seq_len, entropy: bool):
        """(token log-probs[, entropies], (hidden, weight, bias, head)) of ``targets`` under ``model``."""
        hidden, weight, bias, head = _head_operands(self, model, target, **model_kwargs)
        hidden = hidden[:, :-1][:, -seq_len:]
        out = linear_token_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=head.temperature(1.0),
            return_entropy=entropy,
            validate=False,
        )
        return out, (hidden, weight, bias, head)

    def _compute_loss(self, model, inputs, return_outputs):
        if self._negkernels_fallback is not None or any(inputs.get(k) is not None for k in _MULTIMODAL_INPUTS):
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        model_kwargs = {
            k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
        }
        completion_mask = inputs["completion_mask"]
        mask = completion_mask[:, 1:].bool()
        seq_len = mask.size(1)
        # Ids where the mask is 0 are never scored; any in-range id stands in for TRL's −100.
        targets = torch.where(mask, inputs["input_ids"][:, 1:], torch.zeros_like(mask, dtype=inputs["input_ids"].dtype))
        (logp, entropy), (hidden, weight, bias, head) = self._negkernels_token_logprobs(
            model, self._negkernels_target, model_kwargs, targets, seq_len, entropy=True
        )
        chosen_logp, rejected_logp = logp.chunk(2)
        chosen_mask, rejected_mask = mask.chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                ref_logp, _ = self._negkernels_token_logprobs(
                    self.ref_model, self._negkernels_ref_target, model_kwargs, targets, seq_len, entropy=False
                )
            ref_chosen, ref_rejected = ref_logp.chunk(2)

        loss = 0.0
        for config, weight_of_loss in self._negkernels_configs:
            if config == _DPO_SFT:
                term = -chosen_logp[chosen_mask].mean()
            else:
                term = preference_loss(
                    chosen_logp,
                    rejected_logp,
                    ref_chosen,
                    ref_rejected,
                    chosen_mask=chosen_mask,
                    rejected_mask=rejected_mask,
                    config=config,
                ).loss
            loss = loss + term * weight_of_loss
        self._log_negkernels_dpo_metrics(
            mode, inputs, logp.detach(), entropy, mask, ref_chosen, ref_rejected, hidden, weight, bias, head, targets
        )
        if return_outputs:  # evaluation with prediction_loss_only=False wants the logits: one more forward, as TRL's
            with torch.no_grad():
                return loss, model(**model_kwargs, use_cache=False)
        return loss

    @torch.no_grad()
    def _log_negkernels_dpo_metrics(
        self, mode, inputs, logp, entropy, mask, ref_chosen, ref_rejected, hidden, weight, bias, head, targets
    ):
        """TRL's DPO metrics, by TRL's names and reductions."""
        gather, gather_metrics, metrics = (
            self.accelerator.gather,
            self.accelerator.gather_for_metrics,
            self._metrics[mode],
        )
        tokens = mask.sum()
        entropy_sum = gather_metrics((entropy * mask).sum()).sum()
        total = gather_metrics(tokens).sum()
        metrics["entropy"].append((entropy_sum / total).item() if total > 0 else 0.0)
        if mode == "train":
            seen = gather_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += seen // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        # The mean of the logits over the vocabulary is linear in h: h·mean(W) + mean(b), scaled.
        mean_row = weight.float().mean(0)
        mean_logits = (
            hidden.float() @ mean_row + (bias.float().mean() if bias is not None else 0.0)
        ) * head.logit_scale
        chosen_mask, rejected_mask = mask.chunk(2)
        chosen_mean, rejected_mean = mean_logits.chunk(2)
        for name, values, kept in (("chosen", chosen_mean, chosen_mask), ("rejected", rejected_mean, rejected_mask)):
            logit_sum = gather_metrics(values[kept].sum()).sum().item()
            count = gather_metrics(kept.sum()).sum().item()
            metrics[f"logits/{name}"].append(logit_sum / count if count > 0 else 0.0)

        # Top-1 accuracy on the chosen tokens: the argmax needs the logits, a chunk at a time.
        chosen_hidden = hidden.chunk(2)[0][chosen_mask]
        chosen_targets = targets.chunk(2)[0][chosen_mask]
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for start in range(0, chosen_hidden.shape[0], _TOP1_CHUNK):
            logits = torch.nn.functional.linear(chosen_hidden[start : start + _TOP1_CHUNK], weight, bias)
            correct += (logits.argmax(-1) == chosen_targets[start : start + _TOP1_CHUNK]).sum()
        correct, count = gather_metrics(correct).sum(), gather_metrics(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        chosen_logps, rejected_logps = (logp * mask).sum(1).chunk(2)
        sequence_ref = [
            r if r.dim() == 1 else (r * m).sum(1) for r, m in ((ref_chosen, chosen_mask), (ref_rejected, rejected_mask))
        ]
        chosen_rewards = self.beta * (chosen_logps - sequence_ref[0])
        rejected_rewards = self.beta * (rejected_logps - sequence_ref[1])
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps).mean().item())
