"""negkernels: fused Triton and CUDA kernels for objectives that learn from negatives.

Every op has a pure-PyTorch reference (CPU fallback and test oracle), a Triton kernel and, where
CUDA wins, a compiled CUDA kernel; ``backend=`` or ``NEGKERNELS_BACKEND`` picks one.
"""

from ._backend import BackendUnavailable, available_backends
from ._cuda_ext import has_cuda_ext
from .nn import MemoryBank, PolicyLoss
from .ops.advantages import (
    GroupStats,
    drpo_positive_weights,
    group_advantages,
    group_discriminative_loss,
)
from .ops.contrastive import bank_info_nce, bank_supcon, bank_topk, mochi_negatives
from .ops.kv import (
    Evicted,
    GlobalSelection,
    attention_scores,
    compact_kv,
    compact_kv_,
    evict,
    key_norm_scores,
    keydiff_scores,
    retention_capacity_loss,
    retention_mass,
    retention_scores,
    select_retained,
)
from .ops.logprobs import (
    PolicyLossConfig,
    PolicyLossOutput,
    covariance_token_mask,
    linear_policy_loss,
    linear_token_logprobs,
    policy_loss,
    policy_loss_from_logits,
    token_logprobs,
)
from .ops.preference import (
    LinearPreferenceOutput,
    PreferenceLossConfig,
    PreferenceLossOutput,
    linear_preference_loss,
    preference_loss,
)

__version__ = "0.1.0"


def __getattr__(name):
    # RetentionCache subclasses a transformers class: import transformers only when it is asked for.
    if name == "RetentionCache":
        from .nn.retention_cache import RetentionCache

        return RetentionCache
    raise AttributeError(f"module 'negkernels' has no attribute {name!r}")


__all__ = [
    "LinearPreferenceOutput",
    "PreferenceLossConfig",
    "PreferenceLossOutput",
    "linear_preference_loss",
    "preference_loss",
    "BackendUnavailable",
    "Evicted",
    "GlobalSelection",
    "attention_scores",
    "compact_kv",
    "compact_kv_",
    "evict",
    "key_norm_scores",
    "keydiff_scores",
    "retention_capacity_loss",
    "retention_mass",
    "retention_scores",
    "select_retained",
    "MemoryBank",
    "bank_info_nce",
    "bank_supcon",
    "bank_topk",
    "mochi_negatives",
    "GroupStats",
    "available_backends",
    "drpo_positive_weights",
    "group_advantages",
    "group_discriminative_loss",
    "has_cuda_ext",
    "PolicyLoss",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "covariance_token_mask",
    "linear_policy_loss",
    "linear_token_logprobs",
    "RetentionCache",
    "policy_loss",
    "policy_loss_from_logits",
    "token_logprobs",
]
