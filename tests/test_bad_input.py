"""Bad input, one table for every public op: each row is a call that must raise, before any kernel
runs, an exception of the given type whose message names the argument.

To add a case, add a row to BAD_INPUTS: (op, what is wrong, call(backend) -> None, exception,
pattern the message must match). Every row runs on every CPU backend that implements the op
(once, with backend None, for functions and modules without a backend choice).
"""

from __future__ import annotations

import os

import pytest
import torch

import negkernels as nk
from negkernels._backend import IMPLEMENTED

CPU_BACKENDS = nk.available_backends("cpu")


def _logp(b=3, t=5):
    return -torch.rand(b, t) - 0.1


def _policy(backend, **override):
    logp = _logp()
    kw = dict(old_logp=logp + 0.1, advantages=torch.randn(3), mask=None)
    kw.update(override)
    nk.policy_loss(logp, kw.pop("old_logp"), kw.pop("advantages"), kw.pop("mask"), backend=backend, **kw)


def _from_logits(backend, **override):
    logits = torch.randn(3, 5, 11)
    kw = dict(targets=torch.randint(0, 11, (3, 5)), old_logp=_logp(), advantages=torch.randn(3))
    kw.update(override)
    nk.policy_loss_from_logits(
        logits, kw.pop("targets"), kw.pop("old_logp"), kw.pop("advantages"), backend=backend, **kw
    )


def _linear(backend, **override):
    kw = dict(
        hidden=torch.randn(3, 5, 8),
        weight=torch.randn(13, 8),
        targets=torch.randint(0, 13, (3, 5)),
        old_logp=_logp(),
        advantages=torch.randn(3),
    )
    kw.update(override)
    nk.linear_policy_loss(
        kw.pop("hidden"),
        kw.pop("weight"),
        kw.pop("targets"),
        kw.pop("old_logp"),
        kw.pop("advantages"),
        backend=backend,
        **kw,
    )


def _linear_logprobs(backend, **override):
    kw = dict(hidden=torch.randn(4, 8), weight=torch.randn(13, 8), targets=torch.randint(0, 13, (4,)))
    kw.update(override)
    nk.linear_token_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), backend=backend, **kw)


def _advantages(backend, rewards=None, **kw):
    nk.group_advantages(torch.rand(8) if rewards is None else rewards, backend=backend, **kw)


def _nce(backend, **override):
    kw = dict(query=torch.randn(4, 8), positive=torch.randn(4, 8), bank=torch.randn(20, 8))
    kw.update(override)
    nk.bank_info_nce(kw.pop("query"), kw.pop("positive"), kw.pop("bank"), backend=backend, **kw)


def _kv(n_heads=2, s=10, d=4):
    return torch.randn(1, n_heads, s, d), torch.randn(1, n_heads, s, d)


def _compact(backend, indices, *, inplace=False, keys=None, values=None, **kw):
    k, v = _kv()
    k = k if keys is None else keys
    v = v if values is None else values
    (nk.compact_kv_ if inplace else nk.compact_kv)(k, v, indices, backend=backend, **kw)


def _expanded_keys():
    return torch.randn(1, 1, 10, 4).expand(1, 2, 10, 4)


def _shared_keys_values(backend):
    k, _ = _kv()
    nk.compact_kv_(k, k, torch.arange(3).expand(1, 2, 3).contiguous(), backend=backend)


def _with_env_backend(value):
    def call(backend):
        old = os.environ.get("NEGKERNELS_BACKEND")
        os.environ["NEGKERNELS_BACKEND"] = value
        try:
            nk.policy_loss(_logp(), _logp(), torch.randn(3))
        finally:
            if old is None:
                del os.environ["NEGKERNELS_BACKEND"]
            else:
                os.environ["NEGKERNELS_BACKEND"] = old

    return call


IDX = torch.arange(3).expand(1, 2, 3).contiguous()


def _preference(backend, b=4, **options):
    chosen, rejected = _logp(b, 6), _logp(b, 6)
    refs = options.pop("refs", (_logp(b, 6), _logp(b, 6)))
    nk.preference_loss(chosen, rejected, *refs, backend=backend, **options)


def _linear_preference(**override):
    kw = dict(
        hidden=torch.randn(4, 5, 8),
        weight=torch.randn(13, 8),
        targets=torch.randint(0, 13, (4, 5)),
        mask=torch.rand(4, 5) > 0.3,
        ref_chosen_logp=-torch.rand(2),
        ref_rejected_logp=-torch.rand(2),
    )
    kw.update(override)
    args = [kw.pop(k) for k in ("hidden", "weight", "targets", "mask", "ref_chosen_logp", "ref_rejected_logp")]
    nk.linear_preference_loss(*args, **kw)


BAD_INPUTS = [
    # --- token_logprobs
    (
        "token_logprobs",
        "target id = V",
        lambda b: nk.token_logprobs(torch.randn(4, 10), torch.tensor([0, 1, 2, 10]), backend=b),
        ValueError,
        "targets",
    ),
    (
        "token_logprobs",
        "float targets",
        lambda b: nk.token_logprobs(torch.randn(4, 10), torch.zeros(4), backend=b),
        TypeError,
        "targets",
    ),
    (
        "token_logprobs",
        "temperature 0",
        lambda b: nk.token_logprobs(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), temperature=0.0, backend=b),
        ValueError,
        "temperature",
    ),
    (
        "token_logprobs",
        "V = 0",
        lambda b: nk.token_logprobs(torch.randn(4, 0), torch.zeros(4, dtype=torch.long), backend=b),
        ValueError,
        "logits",
    ),
    # --- policy_loss
    ("policy_loss", "old_logp not a tensor", lambda b: _policy(b, old_logp=[0.5]), TypeError, "old_logp"),
    ("policy_loss", "advantages missing", lambda b: _policy(b, advantages=None), ValueError, "advantages"),
    ("policy_loss", "weighted float mask", lambda b: _policy(b, mask=torch.full((3, 5), 0.5)), ValueError, "mask"),
    ("policy_loss", "int mask with a 2", lambda b: _policy(b, mask=torch.full((3, 5), 2)), ValueError, "mask"),
    ("policy_loss", "num_tokens = 0 (int)", lambda b: _policy(b, num_tokens=0), ValueError, "num_tokens"),
    ("policy_loss", "num_tokens NaN (float)", lambda b: _policy(b, num_tokens=float("nan")), ValueError, "num_tokens"),
    (
        "policy_loss",
        "num_tokens of two elements",
        lambda b: _policy(b, num_tokens=torch.tensor([3.0, 4.0])),
        ValueError,
        "num_tokens",
    ),
    (
        "policy_loss",
        "num_sequences bool tensor",
        lambda b: _policy(b, aggregation="seq-mean-token-sum", num_sequences=torch.tensor(True)),
        ValueError,
        "num_sequences",
    ),
    (
        "policy_loss",
        "cu_seqlens past N",
        lambda b: nk.policy_loss(
            _logp().reshape(-1), _logp().reshape(-1), torch.zeros(2), cu_seqlens=torch.tensor([0, 5, 30]), backend=b
        ),
        ValueError,
        "cu_seqlens",
    ),
    (
        "policy_loss",
        "cu_seqlens decreasing",
        lambda b: nk.policy_loss(
            _logp().reshape(-1), _logp().reshape(-1), torch.zeros(3), cu_seqlens=torch.tensor([0, 9, 4, 15]), backend=b
        ),
        ValueError,
        "cu_seqlens",
    ),
    ("policy_loss", "unknown loss_type", lambda b: _policy(b, loss_type="trpo"), ValueError, "loss_type"),
    (
        "covariance_token_mask",
        "fraction <= 0",
        lambda b: nk.covariance_token_mask(torch.randn(2, 3), torch.randn(2, 3), fraction=0.0),
        ValueError,
        "fraction",
    ),
    (
        "covariance_token_mask",
        "advantages shape",
        lambda b: nk.covariance_token_mask(torch.randn(2, 3), torch.randn(3), fraction=0.1),
        ValueError,
        "advantages",
    ),
    ("policy_loss", "dual_clip <= 1", lambda b: _policy(b, dual_clip=0.5), ValueError, "dual_clip"),
    ("policy_loss", "ppo at sequence level", lambda b: _policy(b, ratio_level="sequence"), ValueError, "ratio_level"),
    (
        "policy_loss",
        "unknown ratio_level",
        lambda b: _policy(b, loss_type="sapo", ratio_level="batch"),
        ValueError,
        "ratio_level",
    ),
    ("policy_loss", "kl_clamp <= 0", lambda b: _policy(b, kl_clamp=0.0), ValueError, "kl_clamp"),
    ("policy_loss", "kl_clamp nan", lambda b: _policy(b, kl_clamp=float("nan")), ValueError, "kl_clamp"),
    ("policy_loss", "npo without ref_logp", lambda b: _policy(b, loss_type="npo"), ValueError, "ref_logp"),
    ("policy_loss", "unknown backend", lambda b: _policy("fast"), ValueError, "backend"),
    ("policy_loss", "unknown NEGKERNELS_BACKEND", _with_env_backend("fast"), ValueError, "NEGKERNELS_BACKEND"),
    # --- policy_loss_from_logits
    (
        "policy_loss_from_logits",
        "old_logp not a tensor",
        lambda b: _from_logits(b, old_logp=[0.5]),
        TypeError,
        "old_logp",
    ),
    (
        "policy_loss_from_logits",
        "weighted mask",
        lambda b: _from_logits(b, mask=torch.full((3, 5), 0.3)),
        ValueError,
        "mask",
    ),
    (
        "policy_loss_from_logits",
        "target id = V",
        lambda b: _from_logits(b, targets=torch.full((3, 5), 11)),
        ValueError,
        "targets",
    ),
    (
        "policy_loss_from_logits",
        "entropy_coef inf",
        lambda b: _from_logits(b, entropy_coef=float("inf")),
        ValueError,
        "entropy_coef",
    ),
    # --- linear_token_logprobs / linear_policy_loss
    (
        "linear_token_logprobs",
        "weight of another width",
        lambda b: _linear_logprobs(b, weight=torch.randn(13, 7)),
        ValueError,
        "weight",
    ),
    (
        "linear_token_logprobs",
        "weight of another dtype",
        lambda b: _linear_logprobs(b, weight=torch.randn(13, 8).double()),
        TypeError,
        "weight",
    ),
    (
        "linear_token_logprobs",
        "bias of another length",
        lambda b: _linear_logprobs(b, bias=torch.randn(12)),
        ValueError,
        "bias",
    ),
    ("linear_policy_loss", "old_logp not a tensor", lambda b: _linear(b, old_logp=[0.5]), TypeError, "old_logp"),
    ("linear_policy_loss", "weighted mask", lambda b: _linear(b, mask=torch.full((3, 5), 0.5)), ValueError, "mask"),
    ("linear_policy_loss", "chunk_size 0", lambda b: _linear(b, chunk_size=0), ValueError, "chunk_size"),
    # --- group_advantages
    ("group_advantages", "eps = 0", lambda b: _advantages(b, group_size=4, eps=0.0), ValueError, "eps"),
    ("group_advantages", "eps < 0", lambda b: _advantages(b, group_size=4, eps=-1e-6), ValueError, "eps"),
    ("group_advantages", "group_size not dividing N", lambda b: _advantages(b, group_size=3), ValueError, "group_size"),
    (
        "group_advantages",
        "negative id",
        lambda b: _advantages(b, group_index=torch.tensor([0, 1, -1, 0, 1, 0, 1, 0])),
        ValueError,
        "group_index",
    ),
    (
        "group_advantages",
        "id >= num_groups",
        lambda b: _advantages(b, group_index=torch.full((8,), 5), num_groups=2),
        ValueError,
        "group_index",
    ),
    (
        "group_advantages",
        "2-D rewards",
        lambda b: _advantages(b, rewards=torch.rand(2, 4), group_size=4),
        ValueError,
        "rewards",
    ),
    (
        "group_discriminative_loss",
        "mode",
        lambda b: nk.group_discriminative_loss(
            torch.randn(4),
            torch.tensor([True, False, True, False]),
            torch.zeros(4, dtype=torch.long),
            mode="disco_c",
            backend=b,
        ),
        ValueError,
        "mode",
    ),
    # --- contrastive
    ("bank_info_nce", "bank of another width", lambda b: _nce(b, bank=torch.randn(20, 7)), ValueError, "bank"),
    ("bank_info_nce", "temperature 0", lambda b: _nce(b, temperature=0.0), ValueError, "temperature"),
    (
        "bank_supcon",
        "labels of the wrong length",
        lambda b: nk.bank_supcon(
            torch.randn(4, 8),
            torch.randn(20, 8),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(20, dtype=torch.long),
            backend=b,
        ),
        ValueError,
        "query_labels",
    ),
    (
        "bank_supcon",
        "self slots of floats",
        lambda b: nk.bank_supcon(
            torch.randn(4, 8),
            torch.randn(20, 8),
            torch.zeros(4, dtype=torch.long),
            torch.zeros(20, dtype=torch.long),
            self_slots=torch.zeros(4),
            backend=b,
        ),
        TypeError,
        "self_slots",
    ),
    (
        "bank_topk",
        "k < 0",
        lambda b: nk.bank_topk(torch.randn(4, 8), torch.randn(20, 8), -1, backend=b),
        ValueError,
        "k",
    ),
    # --- kv
    (
        "compact_kv",
        "index = S",
        lambda b: _compact(b, torch.tensor([0, 1, 10]).expand(1, 2, 3).contiguous()),
        ValueError,
        "indices",
    ),
    (
        "compact_kv",
        "index 300 into S = 10",
        lambda b: _compact(b, torch.tensor([0, 300, 2]).expand(1, 2, 3).contiguous()),
        ValueError,
        "indices",
    ),
    (
        "compact_kv",
        "index below -1",
        lambda b: _compact(b, torch.tensor([0, -2, 2]).expand(1, 2, 3).contiguous()),
        ValueError,
        "indices",
    ),
    (
        "compact_kv_",
        "in place into an expanded buffer",
        lambda b: _compact(b, IDX, inplace=True, keys=_expanded_keys()),
        ValueError,
        "keys",
    ),
    ("compact_kv_", "in place with keys and values one tensor", _shared_keys_values, ValueError, "values"),
    (
        "compact_kv_",
        "in place, index = S",
        lambda b: _compact(b, torch.tensor([0, 1, 10]).expand(1, 2, 3).contiguous(), inplace=True),
        ValueError,
        "indices",
    ),
    (
        "retention_mass",
        "cu_seqlens ending before T",
        lambda b: nk.retention_mass(torch.randn(2, 6), torch.tensor([0, 4]), backend=b),
        ValueError,
        "cu_seqlens",
    ),
    (
        "retention_mass",
        "cu_seqlens past T",
        lambda b: nk.retention_mass(torch.randn(2, 6), torch.tensor([0, 3, 9]), backend=b),
        ValueError,
        "cu_seqlens",
    ),
    (
        "retention_mass",
        "cu_seqlens decreasing",
        lambda b: nk.retention_mass(torch.randn(2, 6), torch.tensor([0, 4, 2, 6]), backend=b),
        ValueError,
        "cu_seqlens",
    ),
    (
        "retention_mass",
        "cu_seqlens float",
        lambda b: nk.retention_mass(torch.randn(2, 6), torch.tensor([0.0, 6.0]), backend=b),
        TypeError,
        "cu_seqlens",
    ),
    (
        "select_retained",
        "budget < 0",
        lambda b: nk.select_retained(torch.randn(1, 2, 10), -1, backend=b),
        ValueError,
        "budget",
    ),
    (
        "retention_scores",
        "positions of another length",
        lambda b: nk.retention_scores(torch.randn(1, 2, 10), torch.arange(9), 10, backend=b),
        ValueError,
        "positions",
    ),
    (
        "evict",
        "sink + window over budget",
        lambda b: nk.evict(*_kv(), torch.randn(1, 2, 10), torch.arange(10), 10, 4, sink=3, window=2, backend=b),
        ValueError,
        "sink",
    ),
    # --- public functions and modules without a backend choice (b is None for them)
    (
        "mochi_negatives",
        "bank of another width",
        lambda b: nk.mochi_negatives(
            torch.randn(4, 8), torch.randn(20, 7), top_n=5, num_pair_mixes=2, num_query_mixes=1
        ),
        ValueError,
        "bank",
    ),
    (
        "mochi_negatives",
        "top_n 0",
        lambda b: nk.mochi_negatives(
            torch.randn(4, 8), torch.randn(20, 8), top_n=0, num_pair_mixes=2, num_query_mixes=1
        ),
        ValueError,
        "top_n",
    ),
    (
        "drpo_positive_weights",
        "lam 0",
        lambda b: nk.drpo_positive_weights(
            torch.randint(1, 9, (4,)),
            torch.ones(4, dtype=torch.bool),
            torch.zeros(4, dtype=torch.long),
            max_length=10,
            lam=0.0,
        ),
        ValueError,
        "lam",
    ),
    (
        "retention_capacity_loss",
        "budget < 0",
        lambda b: nk.retention_capacity_loss(torch.randn(2, 6), budget=-1.0),
        ValueError,
        "budget",
    ),
    (
        "retention_capacity_loss",
        "cu_seqlens past T",
        lambda b: nk.retention_capacity_loss(torch.randn(2, 6), budget=1.0, cu_seqlens=torch.tensor([0, 7])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "attention_scores",
        "unknown method",
        lambda b: nk.attention_scores(torch.rand(1, 4, 3, 10), 2, "mean"),
        ValueError,
        "method",
    ),
    (
        "attention_scores",
        "KV heads not dividing",
        lambda b: nk.attention_scores(torch.rand(1, 4, 3, 10), 3, "snapkv"),
        ValueError,
        "num_kv_heads",
    ),
    ("key_norm_scores", "3-D keys", lambda b: nk.key_norm_scores(torch.randn(2, 10, 4)), ValueError, "keys"),
    ("keydiff_scores", "3-D keys", lambda b: nk.keydiff_scores(torch.randn(2, 10, 4)), ValueError, "keys"),
    ("MemoryBank", "size 0", lambda b: nk.MemoryBank(0, 4), ValueError, "size"),
    (
        "MemoryBank",
        "keys of another width",
        lambda b: nk.MemoryBank(10, 4).enqueue(torch.randn(3, 5)),
        ValueError,
        "keys",
    ),
    (
        "MemoryBank",
        "ids without with_ids",
        lambda b: nk.MemoryBank(10, 4).enqueue(torch.randn(3, 4), ids=torch.arange(3)),
        ValueError,
        "ids",
    ),
    (
        "RetentionCache",
        "sink + window over budget",
        lambda b: nk.RetentionCache(8, sink=5, window=4),
        ValueError,
        "sink",
    ),
    ("RetentionCache", "unknown scorer", lambda b: nk.RetentionCache(8, scorer="h2o"), ValueError, "scorer"),
    ("PolicyLoss", "unknown option", lambda b: nk.PolicyLoss(clip=0.2), TypeError, "clip"),
    ("PolicyLoss", "bad option value at construction", lambda b: nk.PolicyLoss(clip_low=-0.1), ValueError, "clip_low"),
    ("PolicyLossConfig", "unknown option", lambda b: nk.PolicyLossConfig(clip=0.2), TypeError, "clip"),
    (
        "PolicyLossConfig",
        "sapo_tau_neg = 0",
        lambda b: nk.PolicyLossConfig(sapo_tau_neg=0.0),
        ValueError,
        "sapo_tau_neg",
    ),
    (
        "PolicyLossConfig",
        "cispo_two_sided not a bool",
        lambda b: nk.PolicyLossConfig(cispo_two_sided=1),
        TypeError,
        "cispo_two_sided",
    ),
    (
        "PolicyLossConfig",
        "config and keywords",
        lambda b: nk.policy_loss(_logp(), _logp(), torch.randn(3), config=nk.PolicyLossConfig(), clip_low=0.1),
        TypeError,
        "config",
    ),
    ("policy_loss", "unknown option keyword", lambda b: _policy(b, clip=0.3), TypeError, "clip"),
    (
        "policy_loss",
        "cu_seqlens of floats, trusted layout",
        lambda b: nk.policy_loss(
            _logp().reshape(-1),
            _logp().reshape(-1),
            torch.randn(2),
            cu_seqlens=torch.tensor([0.0, 7.0, 15.0]),
            max_seqlen=8,
            validate=False,
            backend=b,
        ),
        TypeError,
        "cu_seqlens",
    ),
    (
        "preference_loss",
        "chosen / rejected length mismatch",
        lambda b: nk.preference_loss(_logp(4, 6), _logp(3, 6), _logp(4, 6), _logp(3, 6), backend=b),
        ValueError,
        "chosen_logp",
    ),
    ("preference_loss", "beta 0", lambda b: _preference(b, beta=0.0), ValueError, "beta"),
    ("preference_loss", "beta negative", lambda b: _preference(b, beta=-0.1), ValueError, "beta"),
    (
        "preference_loss",
        "label smoothing 0.5",
        lambda b: _preference(b, label_smoothing=0.5),
        ValueError,
        "label_smoothing",
    ),
    (
        "preference_loss",
        "label smoothing < 0",
        lambda b: _preference(b, label_smoothing=-0.1),
        ValueError,
        "label_smoothing",
    ),
    (
        "preference_loss",
        "exo_pair without smoothing",
        lambda b: _preference(b, loss_type="exo_pair"),
        ValueError,
        "label_smoothing",
    ),
    ("preference_loss", "unknown loss type", lambda b: _preference(b, loss_type="dpo"), ValueError, "loss_type"),
    ("preference_loss", "unknown reduction", lambda b: _preference(b, reduction="avg"), ValueError, "reduction"),
    ("preference_loss", "missing reference", lambda b: _preference(b, refs=()), ValueError, "ref_rejected_logp"),
    (
        "preference_loss",
        "reference of another length",
        lambda b: _preference(b, refs=(_logp(4, 6), -torch.rand(3))),
        ValueError,
        "ref_rejected_logp",
    ),
    (
        "preference_loss",
        "mask of another shape",
        lambda b: _preference(b, chosen_mask=torch.ones(4, 5, dtype=torch.bool)),
        ValueError,
        "chosen_mask",
    ),
    (
        "preference_loss",
        "3-D log-probs",
        lambda b: nk.preference_loss(_logp(4, 6)[None], _logp(4, 6), backend=b, loss_type="simpo"),
        ValueError,
        "chosen_logp",
    ),
    (
        "preference_loss",
        "integer log-probs",
        lambda b: nk.preference_loss(torch.ones(4, dtype=torch.int64), -torch.rand(4), backend=b, loss_type="simpo"),
        TypeError,
        "chosen_logp",
    ),
    (
        "preference_loss",
        "no chosen outside npo",
        lambda b: nk.preference_loss(None, _logp(4, 6), None, _logp(4, 6), backend=b),
        ValueError,
        "chosen_logp",
    ),
    (
        "preference_loss",
        "calibration outside npo",
        lambda b: _preference(b, npo_token_calibration=True),
        ValueError,
        "npo_token_calibration",
    ),
    (
        "preference_loss",
        "calibration on sequence sums",
        lambda b: nk.preference_loss(
            None, -torch.rand(4), None, -torch.rand(4), loss_type="npo", npo_token_calibration=True, backend=b
        ),
        ValueError,
        "rejected_logp",
    ),
    (
        "preference_loss",
        "kto reference point of two values",
        lambda b: _preference(b, loss_type="kto", kto_reference_point=torch.zeros(2)),
        ValueError,
        "kto_reference_point",
    ),
    (
        "preference_loss",
        "kto weight < 0",
        lambda b: _preference(b, loss_type="kto", kto_desirable_weight=-1.0),
        ValueError,
        "kto_desirable_weight",
    ),
    (
        "preference_loss",
        "discopop tau 0",
        lambda b: _preference(b, loss_type="discopop", discopop_tau=0.0),
        ValueError,
        "discopop_tau",
    ),
    (
        "preference_loss",
        "gamma inf",
        lambda b: _preference(b, loss_type="simpo", simpo_gamma=float("inf")),
        ValueError,
        "simpo_gamma",
    ),
    ("preference_loss", "unknown option keyword", lambda b: _preference(b, gamma=0.5), TypeError, "gamma"),
    (
        "PreferenceLossConfig",
        "length_normalize not a bool",
        lambda b: nk.PreferenceLossConfig(length_normalize=1),
        TypeError,
        "length_normalize",
    ),
    (
        "PreferenceLossConfig",
        "config and keywords",
        lambda b: _preference(b, config=nk.PreferenceLossConfig(), beta=0.2),
        TypeError,
        "config",
    ),
    (
        "linear_preference_loss",
        "odd number of rows",
        lambda b: _linear_preference(
            hidden=torch.randn(3, 5, 8), targets=torch.randint(0, 13, (3, 5)), mask=torch.ones(3, 5)
        ),
        ValueError,
        "hidden",
    ),
    (
        "linear_preference_loss",
        "targets of another shape",
        lambda b: _linear_preference(targets=torch.randint(0, 13, (4, 6))),
        ValueError,
        "targets",
    ),
    (
        "linear_preference_loss",
        "mask of another shape",
        lambda b: _linear_preference(mask=torch.ones(4, 6)),
        ValueError,
        "mask",
    ),
    (
        "linear_preference_loss",
        "target out of range",
        lambda b: _linear_preference(targets=torch.full((4, 5), 13), mask=torch.ones(4, 5)),
        ValueError,
        "targets",
    ),
    (
        "linear_preference_loss",
        "reference log-probs and ref_hidden",
        lambda b: _linear_preference(ref_hidden=torch.randn(4, 5, 8)),
        ValueError,
        "ref_hidden",
    ),
    (
        "linear_preference_loss",
        "ref_weight without ref_hidden",
        lambda b: _linear_preference(ref_weight=torch.randn(13, 8)),
        ValueError,
        "ref_weight",
    ),
    ("linear_preference_loss", "beta 0", lambda b: _linear_preference(beta=0.0), ValueError, "beta"),
]

# Public names that are types or queries, not ops that take input.
NOT_OPS = {
    "BackendUnavailable",
    "Evicted",
    "GlobalSelection",
    "GroupStats",
    "LinearPreferenceOutput",
    "PreferenceLossOutput",
    "PolicyLossOutput",
    "available_backends",
    "has_cuda_ext",
}


def _cases():
    for op, what, call, exc, pattern in BAD_INPUTS:
        registered = op.rstrip("_")  # an in-place form shares its op's backends
        backends = [b for b in CPU_BACKENDS if b in IMPLEMENTED[registered]] if registered in IMPLEMENTED else [None]
        for backend in backends:
            yield pytest.param(call, exc, pattern, backend, id=f"{op}-{what}-{backend}")


def test_every_public_op_has_a_row():
    assert {row[0] for row in BAD_INPUTS} == set(nk.__all__) - NOT_OPS
    assert set(IMPLEMENTED) <= {row[0] for row in BAD_INPUTS}


@pytest.mark.parametrize("call, exc, pattern, backend", list(_cases()))
def test_bad_input_raises_naming_the_argument(call, exc, pattern, backend):
    with pytest.raises(exc, match=pattern):
        call(backend)


def test_available_backends_per_op():
    # an op without a CUDA kernel lists exactly this machine's other backends
    assert nk.available_backends("cpu", op="group_discriminative_loss") == [
        b for b in nk.available_backends("cpu") if b in ("reference", "triton")
    ]
    for op, implemented in IMPLEMENTED.items():
        assert set(nk.available_backends("cpu", op=op)) <= set(implemented)
    with pytest.raises(ValueError, match="op"):
        nk.available_backends("cpu", op="no_such_op")
