"""kvpress presses whose scoring and selection run on negkernels.

Code written for kvpress switches by its import::

    # from kvpress import KnormPress, SnapKVPress
    from negkernels.integrations.kvpress import KnormPress, SnapKVPress

    with SnapKVPress(compression_ratio=0.5, window_size=64)(model):
        model(input_ids, past_key_values=cache)            # or kvpress's pipeline, unchanged

Each press is a kvpress ``ScorerPress`` (a dataclass with kvpress's fields and defaults), so
kvpress's pipeline, ``ComposedPress``, ``BlockPress`` and ``PerLayerCompressionPress`` take it.
``score`` calls negkernels' scorer; ``compress`` keeps the ``compute_n_kept`` best tokens of each
KV head with :func:`negkernels.select_retained` (Triton radix select on a GPU; ties to the more
recent token, where kvpress's ``topk`` leaves the order of ties unspecified) and gathers them with
:func:`negkernels.compact_kv`. The kept tokens stay in position order (kvpress's stay in score
order; attention does not depend on the order of the cached keys, RoPE being applied already).

Scores, press by press (kvpress's definitions, which these reproduce):

* ``KnormPress``: −‖k‖ (:func:`negkernels.key_norm_scores`).
* ``KeyDiffPress``: −cos(k, mean of the normalised keys) (:func:`negkernels.keydiff_scores`).
* ``SnapKVPress(window_size=64, kernel_size=5)``: SnapKV (:func:`negkernels.attention_scores`,
  ``"snapkv"``): the window's attention to the prefix, averaged over the window and each KV
  head's query heads, pooled with zero padding; the window itself is always kept (+inf here,
  max + 1 in kvpress). The window's attention comes from the eager layer's weights when the model
  returns them, else from :func:`negkernels.integrations.transformers.last_window_attention`.
* ``TOVAPress``: the last query's attention averaged over all query heads (``"tova"``); the
  newest token is always kept, as in kvpress.
* ``ObservedAttentionPress``: H2O's accumulated attention divided by the number of queries that
  see each token (``"h2o_normalized"``); needs ``attn_implementation="eager"``, as kvpress's.
* ``TrimKVPress(retention_gate=...)``: TRIM-KV (:func:`negkernels.retention_scores`),
  (S − position)·log β with log β = ``retention_gate(module, hidden_states, keys)`` [B, Hkv, S]
  (a learned gate, e.g. a trained TRIM-KV head, or any per-token log-retention).

kvpress 0.5.5 runs with transformers >= 4.56, < 5.3 (its own requirement); these presses are
tested against it at transformers 5.0.0 and 5.2.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from kvpress import ScorerPress
from kvpress.utils import compute_n_kept
from torch import Tensor, nn

from ..ops.kv import attention_scores, compact_kv, key_norm_scores, keydiff_scores, retention_scores, select_retained
from .transformers import last_window_attention

__all__ = [
    "KnormPress",
    "KeyDiffPress",
    "SnapKVPress",
    "TOVAPress",
    "ObservedAttentionPress",
    "TrimKVPress",
    "last_window_attention",
]


class _SelectOnNegkernels:
    """``compress`` for a ScorerPress: negkernels' per-head selection and gather."""

    def compress(
        self, module: nn.Module, hidden_states: Tensor, keys: Tensor, values: Tensor, attentions, kwargs: dict
    ) -> tuple[Tensor, Tensor]:
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        kept = select_retained(scores, compute_n_kept(keys.shape[2], self.compression_ratio))
        keys, values = compact_kv(keys, values, kept, validate=False)
        return keys.contiguous(), values.contiguous()


@dataclass
class KnormPress(_SelectOnNegkernels, ScorerPress):
    """kvpress's ``KnormPress``: keep the keys of smallest norm."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> Tensor:
        return key_norm_scores(keys)


@dataclass
class KeyDiffPress(_SelectOnNegkernels, ScorerPress):
    """kvpress's ``KeyDiffPress``: keep the keys least like the mean key direction."""

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> Tensor:
        return keydiff_scores(keys)


@dataclass
class SnapKVPress(_SelectOnNegkernels, ScorerPress):
    """kvpress's ``SnapKVPress`` (same fields and defaults): SnapKV from the last window's attention."""

    compression_ratio: float = 0.0
    window_size: int = 64
    kernel_size: int = 5

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> Tensor:
        if hidden_states.shape[1] <= self.window_size:
            raise ValueError(
                f"window_size: the prompt ({hidden_states.shape[1]} tokens) must be longer than the "
                f"window ({self.window_size})"
            )
        if attentions is not None:
            weights = attentions[..., -self.window_size :, :]
        else:
            weights = last_window_attention(
                module, hidden_states, keys, self.window_size, kwargs.get("position_embeddings")
            )
        return attention_scores(weights, keys.shape[1], "snapkv", pool_kernel=self.kernel_size)


@dataclass
class TOVAPress(_SelectOnNegkernels, ScorerPress):
    """kvpress's ``TOVAPress``: the last query's attention, averaged over all query heads."""

    compression_ratio: float = 0.0

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> Tensor:
        if attentions is not None:
            weights = attentions[..., -1:, :]
        else:
            weights = last_window_attention(module, hidden_states, keys, 1, kwargs.get("position_embeddings"))
        scores = attention_scores(weights, keys.shape[1], "tova")
        scores[..., -1] = float("inf")  # the newest token is always kept (kvpress's convention)
        return scores


@dataclass
class ObservedAttentionPress(_SelectOnNegkernels, ScorerPress):
    """kvpress's ``ObservedAttentionPress``: H2O's attention, normalised by how many queries see a token."""

    compression_ratio: float = 0.0

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> Tensor:
        if attentions is None:
            raise ValueError(
                "attentions: ObservedAttentionPress needs the attention weights; load the model with "
                'attn_implementation="eager"'
            )
        return attention_scores(attentions, keys.shape[1], "h2o_normalized")


@dataclass
class TrimKVPress(_SelectOnNegkernels, ScorerPress):
    """TRIM-KV retention: keep the tokens whose retention β^(age) is largest at the end of the prompt.

    ``retention_gate(module, hidden_states, keys) → log β`` [B, Hkv, S] (≤ 0), per layer.
    """

    compression_ratio: float = 0.0
    retention_gate: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> Tensor:
        if self.retention_gate is None:
            raise ValueError("retention_gate: TrimKVPress needs a gate giving log β [B, Hkv, S] per layer")
        log_beta = self.retention_gate(module, hidden_states, keys)
        b, h, s = keys.shape[:3]
        positions = torch.arange(s, device=keys.device).expand(b, h, s)
        return retention_scores(log_beta, positions, s)
