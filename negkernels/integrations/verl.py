"""negkernels' policy losses and advantage estimators in verl's registries.

Importing this module registers them. verl imports it itself in every process through the
``verl.plugins`` entry point in negkernels' package metadata (unless
``VERL_USE_EXTERNAL_PLUGINS=none``), so a verl run switches by configuration::

    actor_rollout_ref.actor.policy_loss.loss_mode=negkernels_vanilla
    algorithm.adv_estimator=negkernels_grpo

Policy losses (verl's signature ``(old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode, config, rollout_is_weights) -> (loss, metrics)``, the same metric keys):

=======================  ================================================================
``negkernels_vanilla``   ppo with verl's dual clip, always on: ``dual_clip = clip_ratio_c``
``negkernels_gspo``      gspo, token form (each token's share of the sequence ratio)
``negkernels_cispo``     cispo, two-sided as verl's: sg(clip(ρ, 1 − low, 1 + high))·A·logp
``negkernels_sapo``      sapo with ``tau_pos`` / ``tau_neg``; seq-mean-token-mean, as verl's
``negkernels_geo_mean``  GMPO: log ρ clipped in log space, geometric-mean sequence ratio; the
                         mean over the rows, IS weights' geometric mean per sequence, as verl's
``negkernels_clip_cov``  Clip-Cov: a random share of the tokens in a covariance band drop out
``negkernels_kl_cov``    KL-Cov: |log ρ| penalty on the tokens of largest covariance, unclipped
``negkernels_gpg``       −A·logp
=======================  ================================================================

verl's ``config.global_batch_info`` becomes the global normalisers: ``batch_num_tokens`` /
``dp_size`` → ``num_tokens``, ``global_batch_size`` / ``dp_size`` → ``num_sequences``,
``loss_scale_factor`` (default: the padded length) → ``norm_constant``; ``token-sum`` is the
token sum times ``dp_size``. ``rollout_is_weights`` multiply the policy term, uncapped. Where the
two differ, by design: verl clamps log ρ to [−20, 20] (and GSPO's log s at 10) before exp; here
ρ is exact. The metrics are verl's: ``actor/pg_clipfrac`` (tokens clipped on either side),
``actor/ppo_kl`` (mean of old − new log-prob, from the same clamped log-ratio as verl's) and
``actor/pg_clipfrac_lower`` (dual-clipped tokens; 0 for gspo and cispo).

Advantage estimators (verl's signature ``(token_level_rewards, response_mask, index,
epsilon, norm_adv_by_std_in_grpo, config) -> (advantages, returns)``): ``negkernels_grpo``
(``norm_adv_by_std_in_grpo=False``: Dr. GRPO), ``negkernels_rloo`` and
``negkernels_reinforce_plus_plus_baseline`` (verl's token-level whitening), each one
:func:`negkernels.group_advantages` call on the token rewards summed per sequence, with the uid
strings mapped to integer group ids. A group of one gets advantage 0 in all three (no baseline
exists), as in verl's vectorised RLOO; verl's loop GRPO, loop RLOO and REINFORCE++-baseline give
it its raw score (r / (1 + ε), r, and r whitened with the batch).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

from ..ops.advantages import group_advantages
from ..ops.logprobs import covariance_token_mask, policy_loss

__all__ = ["POLICY_LOSSES", "ADVANTAGE_ESTIMATORS"]

_NO_CAP = float(torch.finfo(torch.float32).max)  # rollout IS weights multiply the policy term as they are
_LOG_RATIO_CLAMP = 20.0  # verl's clamp of log ρ; used here for its ppo_kl metric only


def _actor_config(config):
    if config is None:
        raise ValueError("config: verl's ActorConfig is required (its clip ratios and global batch info)")
    return config


def _clip_range(config) -> tuple[float, float]:
    _actor_config(config)
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return float(low), float(high)


def _aggregation(loss_agg_mode: str, config, mask: Tensor) -> dict[str, Any]:
    """verl's agg_loss (with its global batch info) as the fused loss's aggregation and normalisers."""
    info = dict(getattr(config, "global_batch_info", None) or {})
    dp_size = int(info.get("dp_size") or 1)
    num_tokens, batch_size = info.get("batch_num_tokens"), info.get("global_batch_size")
    if dp_size > 1 and loss_agg_mode == "token-mean" and num_tokens is None:
        raise ValueError("config.global_batch_info: batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and batch_size is None:
        raise ValueError("config.global_batch_info: global_batch_size is required when dp_size > 1")
    if loss_agg_mode == "token-mean":
        options = dict(aggregation="token-mean")
        if num_tokens is not None:
            options["num_tokens"] = _as_count(num_tokens, mask) / dp_size
    elif loss_agg_mode == "token-sum":
        # verl multiplies the local token sum by dp_size: a token mean over 1 / dp_size tokens
        options = (
            dict(aggregation="token-sum") if dp_size == 1 else dict(aggregation="token-mean", num_tokens=1.0 / dp_size)
        )
    elif loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        options = dict(aggregation=loss_agg_mode)
        if batch_size is not None:
            options["num_sequences"] = _as_count(batch_size, mask) / dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            factor = info.get("loss_scale_factor")
            options["norm_constant"] = float(factor if factor is not None else mask.shape[-1])
    else:
        raise ValueError(f"loss_agg_mode: unknown {loss_agg_mode!r}")
    return options


def _as_count(value, mask: Tensor):
    """A count from verl's batch info: a Python number as it is, a tensor as fp32 on the mask's device."""
    if isinstance(value, Tensor):
        return value.to(device=mask.device, dtype=torch.float32)
    return float(value)


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    """verl's masked_mean (Σ x·m / (Σ m + 1e-8)), in x's dtype (fp32 for a bool x), as a float."""
    x = x if x.is_floating_point() else x.float()
    maskf = mask.to(x.dtype)
    return float((x * maskf).sum() / (maskf.sum() + 1e-8))


def _ppo_kl(old_log_prob: Tensor, log_prob: Tensor, mask: Tensor) -> float:
    neg_kl = (log_prob.detach() - old_log_prob).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return _masked_mean(-neg_kl, mask)


def _uncapped(is_weights: Optional[Tensor]) -> dict:
    """verl's rollout IS weights as the fused loss's ``is_weights``: they multiply the policy term
    as they are (verl caps them itself, before the loss)."""
    if is_weights is None:
        return {}
    return dict(is_weights=is_weights.detach(), is_mode="truncate", is_threshold=_NO_CAP)


def _run(
    loss_type_options: dict,
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode,
    config,
    rollout_is_weights,
    *,
    dual_clip_metric: bool,
    force_agg_mode: Optional[str] = None,
):
    mask = response_mask.bool()
    options = dict(
        loss_type_options,
        **_aggregation(force_agg_mode or loss_agg_mode, config, mask),
        **_uncapped(rollout_is_weights),
    )
    out = policy_loss(log_prob, old_log_prob, advantages, mask, **options)
    metrics = {
        "actor/pg_clipfrac": float(out.clip_fraction_low + out.clip_fraction_high),
        "actor/ppo_kl": _ppo_kl(old_log_prob, log_prob, mask),
        "actor/pg_clipfrac_lower": float(out.dual_clip_fraction) if dual_clip_metric else 0.0,
    }
    return out.loss, metrics


@register_policy_loss("negkernels_vanilla")
def vanilla(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """verl's ``vanilla`` PPO loss: clipped surrogate with the dual clip ``clip_ratio_c``."""
    low, high = _clip_range(config)
    clip_ratio_c = float(config.get("clip_ratio_c", 3.0))
    if not clip_ratio_c > 1.0:
        raise ValueError(f"config.clip_ratio_c: the dual clip must be > 1, got {clip_ratio_c}")
    return _run(
        dict(loss_type="ppo", clip_low=low, clip_high=high, dual_clip=clip_ratio_c),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        dual_clip_metric=True,
    )


@register_policy_loss("negkernels_gspo")
def gspo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """verl's ``gspo`` loss: the sequence ratio s = exp(mean log ρ), clipped, in token form."""
    low, high = _clip_range(config)
    return _run(
        dict(loss_type="gspo", clip_low=low, clip_high=high),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        dual_clip_metric=False,
    )


@register_policy_loss("negkernels_cispo")
def cispo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """verl's ``cispo`` loss: −sg(clip(ρ, 1 − low, 1 + high))·A·logp, clipped on both sides."""
    low, high = _clip_range(config)
    return _run(
        dict(loss_type="cispo", clip_low=low, clip_high=high, cispo_two_sided=True),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        dual_clip_metric=False,
    )


@register_policy_loss("negkernels_sapo")
def sapo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """verl's ``sapo`` loss: soft gates with ``tau_pos`` / ``tau_neg``, always seq-mean-token-mean."""
    _actor_config(config)
    loss, metrics = _run(
        dict(loss_type="sapo", sapo_tau_pos=float(config.tau_pos), sapo_tau_neg=float(config.tau_neg)),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        dual_clip_metric=False,
        force_agg_mode="seq-mean-token-mean",
    )
    metrics["actor/pg_clipfrac"] = 0.0  # SAPO does not clip; verl reports 0
    return loss, metrics


@register_policy_loss("negkernels_geo_mean")
def geo_mean(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """verl's ``geo_mean`` (GMPO): −Ā·exp(mean of log ρ clipped in log space on the pessimistic side).

    As verl's, it ignores ``loss_agg_mode`` and the global batch info (the mean over this call's
    rows, fully masked ones included) and weights each sequence by the geometric mean of its
    rollout IS weights."""
    low, high = _clip_range(config)
    mask = response_mask.bool()
    maskf = response_mask.to(log_prob.dtype)
    count = maskf.sum(dim=-1)
    options = dict(
        loss_type="geo_mean",
        clip_low=low,
        clip_high=high,
        aggregation="seq-mean-token-mean",
        num_sequences=float(mask.shape[0]),
    )
    if rollout_is_weights is not None:
        log_w = torch.log(rollout_is_weights.detach() + 1e-10) * maskf
        options.update(_uncapped(torch.exp(log_w.sum(dim=-1) / (count + 1e-8))))
    out = policy_loss(log_prob, old_log_prob, advantages, mask, **options)
    with torch.no_grad():  # verl's metrics: tokens outside the band, by the advantage's sign
        log_ratio = log_prob.detach() - old_log_prob
        outside = (log_ratio < -low) | (log_ratio > high)
        metrics = {
            "actor/pg_clipfrac": _masked_mean(outside & (advantages > 0), mask),
            "actor/ppo_kl": _masked_mean(-log_ratio, mask),
            "actor/pg_clipfrac_lower": _masked_mean(outside & (advantages < 0), mask),
        }
    return out.loss, metrics


def _policy_option(config, name: str, default: float) -> float:
    value = getattr(getattr(config, "policy_loss", None), name, None)
    return float(default if value is None else value)


def _selection_ratio(config, name: str) -> float:
    """Clip-Cov's / KL-Cov's share of the tokens (verl's default 0.0002), which must be > 0."""
    ratio = _policy_option(config, name, 0.0002)
    if not ratio > 0:
        raise ValueError(f"config.policy_loss.{name}: must be > 0, got {ratio}")
    return ratio


@register_policy_loss("negkernels_clip_cov")
def clip_cov(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """verl's ``clip_cov`` (Clip-Cov): the clipped surrogate, with the gradient of a random
    ``clip_cov_ratio`` of the tokens whose advantage–log-prob covariance lies in
    (``clip_cov_lb``, ``clip_cov_ub``) and whose clip does not bind taken out (value and gradient)."""
    low, high = _clip_range(config)
    ratio = _selection_ratio(config, "clip_cov_ratio")
    band = (_policy_option(config, "clip_cov_lb", 1.0), _policy_option(config, "clip_cov_ub", 5.0))
    mask = response_mask.bool()
    with torch.no_grad():
        rho = torch.exp(log_prob.detach() - old_log_prob)
        clip_binds = ((advantages > 0) & (rho > 1.0 + high)) | ((advantages < 0) & (rho < 1.0 - low))
        picked = covariance_token_mask(
            log_prob.detach(), advantages, mask, fraction=ratio, band=band, exclude=clip_binds & mask
        )
        # the picked tokens' terms weigh 0: they still count in every normaliser, as verl's
        kept = (~picked).to(log_prob.dtype)
        weights = kept if rollout_is_weights is None else kept * rollout_is_weights
    options = dict(
        loss_type="ppo", clip_low=low, clip_high=high, **_uncapped(weights), **_aggregation(loss_agg_mode, config, mask)
    )
    out = policy_loss(log_prob, old_log_prob, advantages, mask, **options)
    metrics = {
        "actor/pg_clipfrac": _masked_mean(picked, mask),
        "actor/ppo_kl": _masked_mean(old_log_prob - log_prob.detach(), mask),
    }
    return out.loss, metrics


@register_policy_loss("negkernels_kl_cov")
def kl_cov(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """verl's ``kl_cov`` (KL-Cov): the unclipped −A·ρ, plus ``ppo_kl_coef``·|log ρ| on the
    ``kl_cov_ratio`` of the tokens with the largest advantage–log-prob covariance (as a KL term
    against ref = old on those tokens, importance-weighted with the policy term)."""
    _actor_config(config)
    ratio = _selection_ratio(config, "kl_cov_ratio")
    coef = _policy_option(config, "ppo_kl_coef", 1.0)
    mask = response_mask.bool()
    with torch.no_grad():
        picked = covariance_token_mask(log_prob.detach(), advantages, mask, fraction=ratio)
        # |logp − ref| is |log ρ| where picked and 0 (gradient 0) elsewhere
        ref = torch.where(picked, old_log_prob, log_prob.detach())
    # clip_low = 1 puts the lower bound at ρ = 0, clip_high at the float range: the clip never binds
    options = dict(
        loss_type="ppo",
        clip_low=1.0,
        clip_high=_NO_CAP,
        ref_logp=ref,
        kl_coef=coef,
        kl_estimator="abs",
        **_aggregation(loss_agg_mode, config, mask),
    )
    if rollout_is_weights is not None:
        options.update(_uncapped(rollout_is_weights), kl_times_is_weights=True)
    out = policy_loss(log_prob, old_log_prob, advantages, mask, **options)
    return out.loss, {"actor/ppo_kl": _masked_mean((log_prob.detach() - old_log_prob).abs(), mask)}


@register_policy_loss("negkernels_gpg")
def gpg(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """verl's ``gpg`` loss: −A·logp (no ratio); no metrics, as verl's."""
    _actor_config(config)
    loss, _ = _run(
        dict(loss_type="gpg"),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        dual_clip_metric=False,
    )
    return loss, {}


# ---------------------------------------------------------------------------- advantages


def _group_ids(index, device) -> tuple[Tensor, int]:
    """verl's uid labels (strings, ints, a tensor) → int64 group ids in [0, G) and G."""
    if isinstance(index, Tensor):
        index = index.cpu().numpy()
    labels, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(device), len(labels)


def _outcome(token_level_rewards: Tensor, response_mask: Tensor, index, **estimator_options):
    if index is None:
        raise ValueError("index: the uid of each response's prompt is required (verl's non_tensor_batch['uid'])")
    scores = token_level_rewards.sum(dim=-1)
    ids, groups = _group_ids(index, scores.device)
    if ids.numel() != scores.numel():
        raise ValueError(f"index: {ids.numel()} labels for {scores.numel()} responses")
    with torch.no_grad():
        adv = group_advantages(scores, ids, num_groups=groups, validate=False, **estimator_options)
        adv = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return adv, adv


def _norm_by_std(norm_adv_by_std_in_grpo: Optional[bool], config) -> bool:
    if norm_adv_by_std_in_grpo is not None:
        return bool(norm_adv_by_std_in_grpo)
    return bool(getattr(config, "norm_adv_by_std_in_grpo", True)) if config is not None else True


@register_adv_est("negkernels_grpo")
def grpo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index=None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: Optional[bool] = None,
    config=None,
    **kwargs,
):
    """verl's ``grpo``: (r − μ_g) / (σ_g + ε) with the unbiased σ, or r − μ_g (Dr. GRPO)."""
    estimator = "grpo" if _norm_by_std(norm_adv_by_std_in_grpo, config) else "dr_grpo"
    return _outcome(token_level_rewards, response_mask, index, estimator=estimator, eps=float(epsilon))


@register_adv_est("negkernels_rloo")
def rloo_advantage(
    token_level_rewards: Tensor, response_mask: Tensor, index=None, epsilon: float = 1e-6, config=None, **kwargs
):
    """verl's ``rloo``: r minus the mean of the group's other responses."""
    return _outcome(token_level_rewards, response_mask, index, estimator="rloo")


@register_adv_est("negkernels_reinforce_plus_plus_baseline")
def reinforce_pp_baseline_advantage(
    token_level_rewards: Tensor, response_mask: Tensor, index=None, epsilon: float = 1e-6, config=None, **kwargs
):
    """verl's ``reinforce_plus_plus_baseline``: r − μ_g, whitened over the batch's tokens
    (verl's masked_whiten: token-weighted mean, unbiased over the token count, rsqrt(var + 1e-8))."""
    tokens = response_mask.sum(dim=-1).to(torch.float32)
    return _outcome(
        token_level_rewards,
        response_mask,
        index,
        estimator="reinforce_pp_baseline",
        scale="whiten",
        whiten_weights=tokens,
        eps=1e-8,
    )


POLICY_LOSSES = {
    "negkernels_vanilla": vanilla,
    "negkernels_gspo": gspo,
    "negkernels_cispo": cispo,
    "negkernels_sapo": sapo,
    "negkernels_geo_mean": geo_mean,
    "negkernels_clip_cov": clip_cov,
    "negkernels_kl_cov": kl_cov,
    "negkernels_gpg": gpg,
}
ADVANTAGE_ESTIMATORS = {
    "negkernels_grpo": grpo_advantage,
    "negkernels_rloo": rloo_advantage,
    "negkernels_reinforce_plus_plus_baseline": reinforce_pp_baseline_advantage,
}
