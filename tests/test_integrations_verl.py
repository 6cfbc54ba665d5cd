"""negkernels.integrations.verl against the real verl registries and functions.

Oracle: verl's own registered policy losses and advantage estimators (verl.trainer.ppo.core_algos),
called with the same tensors and the same ActorConfig; losses, log-prob gradients and metrics must
agree (float64 on the reference backend, fp32 tolerance on the Triton kernels). Masks are ragged
with a fully masked row; the log-ratios are wide enough that every clip binds somewhere.
"""

import numpy as np
import pytest
import torch

# verl (installed by the README's test command, without its dependencies) must import: a missing
# peer fails here rather than skipping the file.
import verl.trainer.ppo.core_algos as core_algos
import verl.workers.config as verl_config

import negkernels.integrations.verl as nk_verl  # noqa: E402

from .helpers import assert_close  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def actor_config(**options):
    # Clip-Cov / KL-Cov pick a fifth of the tokens (verl's defaults pick one), in a band that the
    # covariances of these batches reach.
    selection = verl_config.PolicyLossConfig(
        clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=2.0, kl_cov_ratio=0.2, ppo_kl_coef=0.7
    )
    base = dict(
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=4,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=2.5,
        tau_pos=1.3,
        tau_neg=1.7,
        policy_loss=selection,
    )
    base.update(options)
    return verl_config.ActorConfig(**base)


def batch(dtype, b=6, t=11):
    mask = torch.rand(b, t) > 0.3
    mask[2] = False  # a fully masked response
    mask[:, 0] = mask[:, 0] | (torch.arange(b) != 2)
    mask[0, 1:4] = True
    old = -torch.rand(b, t, dtype=dtype) * 2
    logp = old + 0.35 * torch.randn(b, t, dtype=dtype)
    logp[0, 1:4] += 1.5  # ρ > e^1.5 under a negative advantage: the dual clip binds
    column = torch.randn(b, 1, dtype=dtype)
    column[0] = -column[0].abs() - 0.1
    adv = column.expand(b, t) * mask  # verl's token-level advantages
    weights = 0.5 + torch.rand(b, t, dtype=dtype)
    return old, logp, adv.contiguous(), mask, weights


def run(fn, old, logp, adv, mask, agg, config, weights):
    torch.manual_seed(1234)  # Clip-Cov's random draw: the same on both sides
    lp = logp.clone().requires_grad_()
    loss, metrics = fn(
        old_log_prob=old,
        log_prob=lp,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=weights,
    )
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("backend, dtype, tol", [("reference", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "cispo", "sapo", "geo_mean", "clip_cov", "kl_cov", "gpg"])
@pytest.mark.parametrize("batch_info", ["local", "global dp=2"])
def test_policy_losses_match_verl(mode, agg, batch_info, backend, dtype, tol, monkeypatch):
    monkeypatch.setenv("NEGKERNELS_BACKEND", backend)
    old, logp, adv, mask, weights = batch(dtype)
    config = actor_config(loss_agg_mode=agg)
    if batch_info == "global dp=2":  # what verl's ppo_loss fills in before calling the loss
        config.global_batch_info.update(
            dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 5, global_batch_size=13, loss_scale_factor=16
        )
    use_weights = weights if mode in ("vanilla", "gspo", "geo_mean", "clip_cov", "kl_cov") else None
    if mode == "geo_mean":  # verl divides each sequence's sums by its token count + 1e-8: ~1e-9 relative
        tol = max(tol, 1e-7)
    theirs = run(core_algos.get_policy_loss_fn(mode), old, logp, adv, mask, agg, config, use_weights)
    ours = run(core_algos.get_policy_loss_fn(f"negkernels_{mode}"), old, logp, adv, mask, agg, config, use_weights)
    assert_close(ours[0], theirs[0], rtol=tol, atol=tol, what="loss")
    assert_close(ours[1], theirs[1], rtol=tol, atol=tol, what="d log_prob")
    assert set(ours[2]) == set(theirs[2])
    for key, value in theirs[2].items():
        assert ours[2][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_the_dual_clip_and_both_sided_clips_bind_in_the_batch():
    """The parity cases above are not vacuous: verl's metrics count clipped tokens there."""
    old, logp, adv, mask, _ = batch(torch.float64)
    _, metrics = core_algos.get_policy_loss_fn("vanilla")(old, logp, adv, mask, "token-mean", actor_config())
    assert metrics["actor/pg_clipfrac"] > 0.1 and metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_the_covariance_selections_pick_tokens_and_change_the_loss(mode):
    """Clip-Cov and KL-Cov are not vacuous in the parity cases: tokens are picked and the loss
    differs from the plain clipped (Clip-Cov) or unclipped (KL-Cov, coefficient 0) surrogate."""
    old, logp, adv, mask, _ = batch(torch.float64)
    picked = nk_verl.covariance_token_mask(
        logp, adv, mask.bool(), fraction=0.2, band=(0.05, 2.0) if mode == "clip_cov" else None
    )
    assert int(picked.sum()) == int(0.2 * int(mask.sum())) and not bool((picked & ~mask.bool()).any())
    loss = run(
        core_algos.get_policy_loss_fn(f"negkernels_{mode}"), old, logp, adv, mask, "token-mean", actor_config(), None
    )[0]
    if mode == "clip_cov":
        plain = core_algos.get_policy_loss_fn("vanilla")(
            old, logp, adv, mask, "token-mean", actor_config(clip_ratio_c=1e9)
        )[0]
    else:
        off = actor_config(policy_loss=verl_config.PolicyLossConfig(kl_cov_ratio=0.2, ppo_kl_coef=0.0))
        plain = run(core_algos.get_policy_loss_fn("kl_cov"), old, logp, adv, mask, "token-mean", off, None)[0]
    assert abs(float(loss) - float(plain)) > 1e-4


def test_registration_and_bad_config():
    for name in nk_verl.POLICY_LOSSES:
        assert core_algos.get_policy_loss_fn(name) is nk_verl.POLICY_LOSSES[name]
    for name in nk_verl.ADVANTAGE_ESTIMATORS:
        assert core_algos.get_adv_estimator_fn(name) is nk_verl.ADVANTAGE_ESTIMATORS[name]
    old, logp, adv, mask, _ = batch(torch.float32)
    with pytest.raises(ValueError, match="config"):
        nk_verl.vanilla(old, logp, adv, mask, "token-mean", None)
    config = actor_config()
    config.global_batch_info.update(dp_size=2)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        nk_verl.vanilla(old, logp, adv, mask, "token-mean", config)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        nk_verl.gspo(old, logp, adv, mask, "seq-sum", actor_config())


def rewards_batch(groups=5, per_group=(2, 3, 4, 5, 3), t=9):
    sizes = list(per_group)[:groups]
    uids = np.array([f"prompt-{g}" for g, n in enumerate(sizes) for _ in range(n)], dtype=object)
    order = np.random.permutation(len(uids))  # verl's batches need not keep a group together
    uids = uids[order]
    mask = torch.rand(len(uids), t) > 0.3
    mask[:, 0] = True
    lengths = mask.sum(-1)
    token_rewards = torch.zeros(len(uids), t)
    # verl's outcome rewards: one score at each response's last token (plus some token-level shaping)
    token_rewards[torch.arange(len(uids)), lengths - 1] = torch.randn(len(uids))
    token_rewards += 0.05 * torch.randn(len(uids), t) * mask
    return token_rewards, mask.long(), uids


@pytest.mark.parametrize(
    "estimator, options",
    [
        ("grpo", dict(norm_adv_by_std_in_grpo=True)),
        ("grpo", dict(norm_adv_by_std_in_grpo=False)),
        ("grpo_vectorized", dict(epsilon=1e-3)),
        ("rloo", {}),
        ("rloo_vectorized", {}),
        ("reinforce_plus_plus_baseline", {}),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_advantage_estimators_match_verl(estimator, options, backend, monkeypatch):
    monkeypatch.setenv("NEGKERNELS_BACKEND", backend)
    rewards, mask, uids = rewards_batch()
    theirs, theirs_returns = core_algos.get_adv_estimator_fn(estimator)(
        token_level_rewards=rewards.clone(), response_mask=mask, index=uids, **options
    )
    ours_name = "negkernels_" + estimator.replace("_vectorized", "")
    ours, returns = core_algos.get_adv_estimator_fn(ours_name)(
        token_level_rewards=rewards.clone(), response_mask=mask, index=uids, **options
    )
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close(ours, theirs, rtol=2e-5, atol=2e-6, what="advantages")
    assert_close(returns, theirs_returns, rtol=2e-5, atol=2e-6, what="returns")


def test_singleton_groups_get_zero_advantage_as_verls_vectorised_rloo():
    rewards, mask, uids = rewards_batch(groups=3, per_group=(1, 3, 1))
    ours, _ = nk_verl.grpo_advantage(rewards, mask, uids)
    rloo, _ = core_algos.get_adv_estimator_fn("rloo_vectorized")(
        token_level_rewards=rewards, response_mask=mask, index=uids
    )
    singles = np.isin(uids, ["prompt-0", "prompt-2"])
    assert torch.all(ours[torch.from_numpy(singles)] == 0) and torch.all(rloo[torch.from_numpy(singles)] == 0)
    assert torch.all(ours[torch.from_numpy(~singles)].abs().sum(-1) > 0)
    with pytest.raises(ValueError, match="index"):
        nk_verl.grpo_advantage(rewards, mask, None)


def test_verl_loads_the_plugin_in_a_fresh_process():
    """The "verl.plugins" entry point: `import verl` alone registers every negkernels_* name (what a
    Ray worker does); VERL_USE_EXTERNAL_PLUGINS=none leaves the registries as verl ships them."""
    import os
    import subprocess
    import sys

    script = (
        "import verl\nfrom verl.trainer.ppo import core_algos as c\n"
        "print(sorted(k for k in c.POLICY_LOSS_REGISTRY if k.startswith('negkernels')),"
        " sorted(k for k in c.ADV_ESTIMATOR_REGISTRY if str(k).startswith('negkernels')))"
    )
    for policy, expect in (("auto", True), ("none", False)):
        env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS=policy)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        names = sorted(nk_verl.POLICY_LOSSES), sorted(nk_verl.ADVANTAGE_ESTIMATORS)
        assert proc.stdout.strip() == (str(names[0]) + " " + str(names[1]) if expect else "[] []"), policy
