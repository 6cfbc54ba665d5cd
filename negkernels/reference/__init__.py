"""Pure-PyTorch implementations: the CPU fallback and the float64 oracle of every test."""

from .advantages import (
    drpo_positive_weights,
    global_moments,
    group_advantages_reference,
    group_discriminative_loss_reference,
)
from .contrastive import bank_info_nce_reference, bank_supcon_reference, bank_topk_reference
from .logprobs import (
    kl_penalty,
    linear_logits_reference,
    linear_token_logprobs_reference,
    policy_loss_reference,
    token_logprobs_reference,
)

__all__ = [
    "bank_info_nce_reference",
    "bank_supcon_reference",
    "bank_topk_reference",
    "drpo_positive_weights",
    "global_moments",
    "group_advantages_reference",
    "group_discriminative_loss_reference",
    "kl_penalty",
    "linear_logits_reference",
    "linear_token_logprobs_reference",
    "policy_loss_reference",
    "token_logprobs_reference",
]
