"""A Hugging Face ``transformers`` cache that keeps every layer's KV cache within a token budget.

Importing this module imports ``transformers``; ``negkernels.RetentionCache`` loads it on first use.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from ..ops.kv import compact_kv, evict, key_norm_scores, keydiff_scores, select_retained

ScoreFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]  # (keys, values, positions, step) -> scores [B, H, S]
_NAMED_SCORERS = {
    "key_norm": lambda keys, values, positions, step: key_norm_scores(keys),
    "keydiff": lambda keys, values, positions, step: keydiff_scores(keys),
}
SCORERS = ("trim_kv", *_NAMED_SCORERS)


class RetentionLayer(DynamicLayer):
    """One layer's bounded cache: kept K, V [B, H, S, D], their positions and (with a gate) log β.

    ``cumulative_length`` counts every token seen, so positions continue after evictions; the
    attention mask addresses the kept tokens as the positions just before the new ones (they are
    all visible to every new query, as they precede it).
    """

    def __init__(self, owner: "RetentionCache", layer_idx: int):
        super().__init__()
        self._owner = weakref.ref(owner)
        self.layer_idx = layer_idx
        self.cumulative_length = 0
        self.positions: Optional[Tensor] = None
        self.log_beta: Optional[Tensor] = None
        self.evictions = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.keys = key_states.new_empty((b, h, 0, key_states.shape[-1]))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, h, 0), dtype=torch.int64, device=key_states.device)
        self.log_beta = torch.empty((b, h, 0), dtype=torch.float32, device=key_states.device)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self._owner()
        b, h, q, _ = key_states.shape
        new_positions = (self.cumulative_length + torch.arange(q, device=key_states.device)).expand(b, h, q)
        self.cumulative_length += q
        full_keys = torch.cat([self.keys, key_states], dim=-2)
        full_values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        new_log_beta = owner._log_beta(self.layer_idx, b, h, q, key_states.device)
        self.log_beta = torch.cat([self.log_beta, new_log_beta], dim=-1)
        self.keys, self.values = full_keys, full_values
        if full_keys.shape[-2] > owner.budget + owner.buffer:
            self._evict(owner)
        # This step attends to everything cached before eviction; later steps see the kept tokens.
        return full_keys, full_values

    def _evict(self, owner: "RetentionCache") -> None:
        step = self.cumulative_length  # position of the next query
        if owner.scorer == "trim_kv":
            kept = evict(
                self.keys,
                self.values,
                self.log_beta,
                self.positions,
                step,
                owner.budget,
                sink=owner.sink,
                window=owner.window,
                backend=owner.backend,
            )
            self.keys, self.values, self.log_beta, self.positions = (
                kept.keys,
                kept.values,
                kept.log_beta,
                kept.positions,
            )
        else:
            scores = owner._score(self.keys, self.values, self.positions, step)
            indices = select_retained(scores, owner.budget, sink=owner.sink, window=owner.window, backend=owner.backend)
            # select_retained's indices are in range by construction: no host read per eviction.
            self.keys, self.values, self.log_beta, self.positions = compact_kv(
                self.keys, self.values, indices, self.log_beta, self.positions, validate=False, backend=owner.backend
            )
        self.evictions += 1

    def get_mask_sizes(self, query: Union[int, Tensor]) -> tuple[int, int]:
        # transformers >= 5.4 passes the query length; 5.0-5.3 pass the queries' cache positions.
        query_length = query.shape[0] if isinstance(query, Tensor) else int(query)
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.cumulative_length - kept

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        owner = self._owner()
        return owner.budget + owner.buffer if owner is not None else -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.positions = self.log_beta = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("RetentionCache: evicted tokens cannot be restored, so the cache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None and self.positions.shape[-1]:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
            self.log_beta = self.log_beta.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None and self.positions.shape[-1]:
            self.positions = self.positions[indices]
            self.log_beta = self.log_beta[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.positions.shape[-1]:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self.log_beta = self.log_beta.index_select(0, beam_idx.to(self.log_beta.device))


class RetentionCache(Cache):
    """KV cache for ``model.generate(..., past_key_values=cache)`` that never holds more than
    ``budget + buffer`` tokens per layer and head.

    When a layer's cache passes ``budget + buffer`` tokens it evicts down to ``budget``: every
    (batch, KV head) keeps its ``budget`` best tokens by the scorer, always keeping the first
    ``sink`` and the last ``window`` tokens (see :func:`negkernels.select_retained`). The step that
    triggers an eviction still attends to every token it had; the buffer amortises evictions over
    ``buffer`` decoding steps.

    Args:
        budget: tokens kept per layer and KV head after an eviction.
        buffer: tokens allowed beyond the budget before evicting (0: evict at every step).
        scorer: ``"trim_kv"`` (``(step − position)·log β`` from ``retention_gates``, the fused
            :func:`negkernels.evict`), ``"key_norm"``, ``"keydiff"``, or a callable
            ``(keys, values, positions, step) -> scores [B, H, S]``. Default: ``"trim_kv"`` when
            gates are given, else ``"key_norm"``.
        model: the causal LM; needed with ``retention_gates`` (its attention modules get a forward
            pre-hook that hands the layer's hidden states to the gate; :meth:`detach` removes it).
        retention_gates: one module per decoder layer (e.g. an ``nn.ModuleList``) mapping hidden
            states [B, T, hidden] to log β [B, T, num_kv_heads], or a callable
            ``(layer_idx, hidden_states) -> log β``.
        sink, window: tokens always kept at the start and the end (``sink + window <= budget``).
        backend: for the kernels (``None``: automatic).

    Sequences in a batch must have the same length (no padding): the kept tokens are addressed as
    the positions just before the new ones, which a padding mask cannot follow.
    """

    def __init__(
        self,
        budget: int,
        buffer: int = 0,
        *,
        scorer: Union[str, ScoreFn, None] = None,
        model: Optional[nn.Module] = None,
        retention_gates=None,
        sink: int = 0,
        window: int = 0,
        backend: Optional[str] = None,
    ):
        from .._validation import check_int

        self.budget = check_int("budget", budget, minimum=1)
        self.buffer = check_int("buffer", buffer, minimum=0)
        self.sink = check_int("sink", sink, minimum=0)
        self.window = check_int("window", window, minimum=0)
        if self.sink + self.window > self.budget:
            raise ValueError(f"sink + window: {sink} + {window} protected tokens exceed the budget {budget}")
        if scorer is None:
            scorer = "trim_kv" if retention_gates is not None else "key_norm"
        if not callable(scorer) and scorer not in SCORERS:
            raise ValueError(f"scorer: expected one of {SCORERS} or a callable, got {scorer!r}")
        if scorer == "trim_kv" and retention_gates is None:
            raise ValueError("retention_gates: the 'trim_kv' scorer needs a retention gate per layer")
        if retention_gates is not None and model is None:
            raise ValueError("model: retention gates read each layer's hidden states, so pass the model too")
        self.scorer = scorer
        self.backend = backend
        self.retention_gates = retention_gates
        self._hidden: dict[int, Tensor] = {}
        self._hooks = []
        if retention_gates is not None:
            self._attach(model)
        super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> RetentionLayer:
        return RetentionLayer(self, len(self.layers))

    def _attach(self, model: nn.Module) -> None:
        attention = [
            m
            for name, m in model.named_modules()
            if name.endswith("self_attn") and isinstance(getattr(m, "layer_idx", None), int)
        ]
        if not attention:
            raise ValueError(
                "model: found no attention modules (`*.self_attn` with a `layer_idx`) to read hidden states from"
            )
        owner = weakref.ref(self)  # the model must not keep a finished cache alive

        def grab(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cache = owner()
            if cache is not None and hidden is not None:
                cache._hidden[module.layer_idx] = hidden

        self._hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in attention]

    @staticmethod
    def generate_keyword() -> str:
        """The keyword ``model.generate`` takes a cache under in the installed transformers:
        ``"cache"`` where ``past_key_values`` has been renamed (it warns there), else ``"past_key_values"``."""
        from transformers.generation import utils

        names = getattr(utils, "ALL_CACHE_NAMES", ["past_key_values"])
        return "cache" if names and names[0] == "cache" else "past_key_values"

    def generate(self, model: nn.Module, *args, **kwargs):
        """``model.generate(*args, **kwargs)`` with this cache, under whichever keyword the installed
        transformers takes (see :meth:`generate_keyword`)."""
        return model.generate(*args, **kwargs, **{self.generate_keyword(): self})

    def detach(self) -> None:
        """Remove the hooks this cache put on the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _log_beta(self, layer_idx: int, b: int, h: int, q: int, device) -> Tensor:
        if self.retention_gates is None:
            return torch.zeros((b, h, q), dtype=torch.float32, device=device)
        hidden = self._hidden.pop(layer_idx, None)
        if hidden is None:
            raise RuntimeError(f"RetentionCache: no hidden states were captured for layer {layer_idx}")
        gate = self.retention_gates
        log_beta = (
            gate(layer_idx, hidden) if not isinstance(gate, (nn.ModuleList, list, tuple)) else gate[layer_idx](hidden)
        )
        if tuple(log_beta.shape) != (b, q, h):
            raise ValueError(
                f"retention_gates: layer {layer_idx} returned shape {tuple(log_beta.shape)}, expected "
                f"[B, T, num_kv_heads] = {(b, q, h)}"
            )
        return log_beta.detach().float().transpose(1, 2)

    def _score(self, keys: Tensor, values: Tensor, positions: Tensor, step: int) -> Tensor:
        fn = self.scorer if callable(self.scorer) else _NAMED_SCORERS[self.scorer]
        return fn(keys, values, positions, step)

    @property
    def evictions(self) -> int:
        """Evictions so far, summed over layers."""
        return sum(layer.evictions for layer in self.layers)

    def cached_lengths(self) -> list[int]:
        """Tokens held now, per layer."""
        return [layer.keys.shape[-2] if layer.is_initialized else 0 for layer in self.layers]
