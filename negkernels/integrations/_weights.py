"""Per-token weights on a sequence-level policy term, reduced to the one weight per sequence
they amount to.

At ``importance_sampling_level="sequence"`` TRL and Liger compute the policy term once per
sequence, [B, 1], and multiply it by per-token weights (vLLM IS ratios, entropy and off-policy
masks), [B, T]: the product broadcasts to every token, so sequence b's term enters the loss as
``L_b · Σ_t m_t w_t a_t`` with a_t the aggregation's token weight. Every aggregation weighs the
tokens of one sequence alike, so that is ``L_b · W_b · Σ_t m_t a_t`` with W_b the masked mean of
w over b's tokens: the per-sequence weight to hand the fused loss ([B, 1] is_weights). Handing it
w per token instead would weigh each token's share of the sequence ratio's gradient by its own
w_t, not by the mean.
"""

from __future__ import annotations

from torch import Tensor


def per_sequence_weights(weights: Tensor, mask: Tensor, *, over_padding: bool = False) -> Tensor:
    """[B, T] (or [B, 1]) weights → [B, 1]: the mean over each row's unmasked tokens, or over all T
    positions with ``over_padding`` (Liger's luspo sums its broadcast terms without the mask).
    A fully masked row gets 0; it contributes nothing either way."""
    if weights.shape[-1] == 1:
        return weights
    weights = weights.float().expand(mask.shape)
    if over_padding:
        return weights.mean(-1, keepdim=True)
    maskf = mask.float()
    return (weights * maskf).sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1.0)
