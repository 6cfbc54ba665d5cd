"""Next-token log-probs and policy losses of a Hugging Face causal LM, without its logits.

A causal LM's forward is a backbone (embeddings, blocks, final norm) and an LM head. These
functions run the backbone, then hand its last hidden states and the head's weight (and bias) to
:func:`negkernels.linear_token_logprobs` / :func:`negkernels.linear_policy_loss`, so the
[batch, length, vocabulary] logits never exist.

The shift: position t of a causal LM predicts token t + 1, so ``causal_lm_logprobs`` returns
``out[:, t] = log p(input_ids[:, t + 1] | input_ids[:, :t + 1])``, shape [B, L − 1]. With
``logits_to_keep = k`` (TRL's and transformers' name; k = the completion length) it returns the
log-probs of the last k tokens, [B, k]: ``out[:, j]`` scores ``input_ids[:, L − k + j]``.

What the head may do: a linear map plus bias, times a constant logit scale (Cohere's
``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's
``lm_head_multiplier``), folded into the temperature exactly. A tanh soft cap
(``final_logit_softcapping``, Gemma 2) is not of that form and is rejected, not approximated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._validation import check_finite_float, check_int
from ..ops.logprobs import PolicyLossOutput, linear_policy_loss, linear_token_logprobs

__all__ = ["LMHead", "lm_head", "backbone_hidden_states", "causal_lm_logprobs", "causal_lm_policy_loss"]


@dataclass(frozen=True)
class LMHead:
    """The output layer of a causal LM as the fused ops take it: logits = (h·weightᵀ + bias)·logit_scale."""

    weight: Tensor
    bias: Optional[Tensor]
    logit_scale: float

    def temperature(self, temperature: float) -> float:
        """The temperature of the fused op that gives softmax(logits / ``temperature``)."""
        return check_finite_float("temperature", temperature, minimum=0.0, exclusive=True) / self.logit_scale


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _full(t: Optional[Tensor]) -> Optional[Tensor]:
    """A sharded (FSDP2 DTensor) parameter gathered; a plain tensor as it is."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def lm_head(model) -> LMHead:
    """The LM head of ``model`` (``get_output_embeddings()``) and its constant logit scale.

    Raises ValueError naming the config attribute when the model transforms its logits in a way
    the fused ops cannot reproduce exactly (a soft cap, a non-positive scale)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"model: {type(model).__name__} has no linear output embedding (LM head)")
    config = _text_config(model)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            f"model: config.final_logit_softcapping={softcap} (logits = c·tanh(logits / c)) is not "
            "supported: the fused LM head computes softmax((h·Wᵀ + b)·scale / T) exactly, and a soft "
            "cap is not of that form"
        )
    scale = 1.0
    for name, invert in (("logit_scale", False), ("lm_head_multiplier", False), ("logits_scaling", True)):
        value = getattr(config, name, None)
        if value is not None:
            value = float(value)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"model: config.{name}={value} must be a positive finite logit scale")
            scale = 1.0 / value if invert else value
            break
    return LMHead(_full(head.weight), _full(getattr(head, "bias", None)), scale)


def backbone_hidden_states(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **model_kwargs) -> Tensor:
    """The last hidden states [B, L, H] of ``model``'s backbone (after its final norm): what its
    LM head is applied to. ``model_kwargs`` go to the backbone (``position_ids``, ...)."""
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        raise ValueError(f"model: {type(model).__name__} exposes no backbone (base_model) apart from itself")
    model_kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def _scored_length(input_ids: Tensor, logits_to_keep: Optional[int]) -> int:
    """How many next tokens are scored; checked before the backbone runs."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids: expected a [B, L] tensor, got "
            f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}"
        )
    length = input_ids.shape[1]
    if logits_to_keep is None:
        return length - 1
    k = check_int("logits_to_keep", logits_to_keep, minimum=1)
    if k >= length:
        raise ValueError(
            f"logits_to_keep: {k} must be below the sequence length {length} (the first token has no prediction)"
        )
    return k


def _shifted(hidden: Tensor, input_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(hidden states that predict the last k tokens, those tokens)."""
    length = input_ids.shape[1]
    return hidden[:, length - k - 1 : length - 1], input_ids[:, length - k :]


def causal_lm_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    logits_to_keep: Optional[int] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    fp32_lm_head: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    **model_kwargs,
):
    """Per-token log-probs of the next tokens under ``model`` (see the module docstring for the
    shift), fp32, differentiable in the model's parameters; with ``return_entropy`` also the
    entropy of each predicted distribution. ``temperature`` divides the logits, as in sampling.

    Example::

        from transformers import AutoModelForCausalLM
        from negkernels.integrations.transformers import causal_lm_logprobs

        model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")
        logp = causal_lm_logprobs(model, input_ids, attention_mask, logits_to_keep=completion_ids.shape[1])
        # equals model(input_ids, attention_mask=attention_mask).logits[:, -k - 1:-1]
        #        .log_softmax(-1).gather(-1, input_ids[:, -k:, None])[..., 0]
    """
    k = _scored_length(input_ids, logits_to_keep)
    head = lm_head(model)
    temperature = head.temperature(temperature)
    hidden = backbone_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    h, targets = _shifted(hidden, input_ids, k)
    return linear_token_logprobs(
        h.to(head.weight.dtype),
        head.weight,
        targets,
        bias=head.bias,
        temperature=temperature,
        return_entropy=return_entropy,
        fp32_lm_head=fp32_lm_head,
        chunk_size=chunk_size,
        backend=backend,
    )


def causal_lm_policy_loss(
    model,
    input_ids: Tensor,
    old_logp: Optional[Tensor],
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    attention_mask: Optional[Tensor] = None,
    logits_to_keep: Optional[int] = None,
    temperature: float = 1.0,
    model_kwargs: Optional[dict] = None,
    **loss_options,
) -> PolicyLossOutput:
    """:func:`negkernels.linear_policy_loss` of ``model``'s next-token log-probs (shifted as in
    :func:`causal_lm_logprobs`): ``old_logp``, ``advantages``, ``mask`` and every other option
    as there, with shapes [B, L − 1] (or [B, logits_to_keep]); ``old_logp=None`` is on-policy."""
    k = _scored_length(input_ids, logits_to_keep)
    head = lm_head(model)
    temperature = head.temperature(temperature)
    hidden = backbone_hidden_states(model, input_ids, attention_mask, **(model_kwargs or {}))
    h, targets = _shifted(hidden, input_ids, k)
    return linear_policy_loss(
        h.to(head.weight.dtype),
        head.weight,
        targets,
        old_logp,
        advantages,
        mask,
        bias=head.bias,
        temperature=temperature,
        **loss_options,
    )


# ============================================================================ attention of the last queries


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_window_attention(
    module,
    hidden_states: Tensor,
    keys: Tensor,
    window: int,
    position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """The softmax weights of the last ``window`` queries of a Hugging Face attention layer over the
    cached keys: the input :func:`negkernels.attention_scores` needs (SnapKV, TOVA, H2O), without
    running the layer with ``attn_implementation="eager"`` over the whole prompt.

    Args:
        module: a Llama-like attention layer (``q_proj``, or Phi-3's fused ``qkv_proj``; a
            ``q_norm``, as Qwen3's and Gemma 3's, is applied), with ``config`` and ``head_dim``.
        hidden_states: [B, T, hidden], the layer's input; its last ``window`` rows are the queries.
        keys: [B, Hkv, S, D], the layer's cached keys after RoPE (the last T of them are this
            call's, so query i sits at position S − W + i).
        window: W ≥ 1 (clipped to T).
        position_embeddings: the layer's ``(cos, sin)`` [B, T, D]; None for a model without RoPE.

    Returns fp32 [B, Hq, W, S]: query i attends to the keys j ≤ S − W + i (causal), scaled by the
    layer's ``scaling`` (1/√D when it has none), the query heads of a KV head sharing its keys.
    """
    check_int("window", window, minimum=1)
    b, t, _ = hidden_states.shape
    w = min(window, t)
    heads = module.config.num_attention_heads
    dim = module.head_dim
    x = hidden_states[:, -w:]
    if hasattr(module, "q_proj"):
        q = module.q_proj(x)
    elif hasattr(module, "qkv_proj"):
        q = module.qkv_proj(x)[..., : heads * dim]
    else:
        raise TypeError(f"module: {type(module).__name__} has neither q_proj nor qkv_proj")
    q = q.view(b, w, heads, dim).transpose(1, 2)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        cos, sin = cos[:, -w:].unsqueeze(1), sin[:, -w:].unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
    kv_heads, s = keys.shape[1], keys.shape[2]
    if heads % kv_heads:
        raise ValueError(f"keys: {kv_heads} KV heads do not divide the layer's {heads} query heads")
    k = keys.float().repeat_interleave(heads // kv_heads, dim=1)
    logits = q.float() @ k.transpose(-1, -2) * float(getattr(module, "scaling", dim**-0.5))
    query_pos = s - w + torch.arange(w, device=keys.device)
    hidden = torch.arange(s, device=keys.device)[None, :] > query_pos[:, None]
    return torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
