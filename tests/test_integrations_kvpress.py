"""negkernels.integrations.kvpress against the real kvpress 0.5.5: the same presses on a tiny random
Llama (grouped-query attention) keep the same tokens in every layer's cache, and the next token's
logits after compression agree.

kvpress 0.5.5 requires transformers >= 4.56, < 5.3; CI runs this file in its stages at
transformers 5.0.0 and 5.2.0 (.ci/run). The main stage, at the newest transformers, has no kvpress.
"""

import os

import pytest
import torch

if os.environ.get("NEGKERNELS_REQUIRE_KVPRESS"):  # CI's kvpress stages: an import error fails
    import kvpress
else:
    kvpress = pytest.importorskip(
        "kvpress",
        reason="kvpress 0.5.5 needs transformers < 5.3: CI runs this file in its transformers 5.0.0 and 5.2.0 stages",
    )

from kvpress.utils import compute_n_kept  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import negkernels as nk  # noqa: E402
from negkernels.integrations import kvpress as ours  # noqa: E402
from negkernels.reference.kv import retention_scores_reference  # noqa: E402

BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]


def tiny_llama(attn_implementation):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).eval()


def distinct_tokens(batch, length):
    """Each row's tokens all different: a repeated token's keys differ only by RoPE's rotation, so
    their norms tie exactly, and kvpress's topk leaves the order of ties unspecified."""
    return torch.stack([torch.randperm(97)[:length] for _ in range(batch)])


def prefill(model, press, ids):
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    return cache


def layer_kv(cache, layer):
    return cache.layers[layer].keys, cache.layers[layer].values


def same_kept_tokens(a, b):
    """Both caches hold the same (key, value) rows per head, in any order."""
    for layer in range(len(a.layers)):
        (ka, va), (kb, vb) = layer_kv(a, layer), layer_kv(b, layer)
        assert ka.shape == kb.shape, (layer, ka.shape, kb.shape)
        order_a, order_b = ka[..., 0].argsort(-1), kb[..., 0].argsort(-1)
        take = lambda x, o: x.gather(2, o[..., None].expand_as(x))  # noqa: E731
        torch.testing.assert_close(take(ka, order_a), take(kb, order_b), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(take(va, order_a), take(vb, order_b), rtol=1e-6, atol=1e-6)


def next_logits(model, cache, token):
    with torch.no_grad():
        return model(token, past_key_values=cache).logits


PAIRS = {
    "knorm": (lambda r: kvpress.KnormPress(r), lambda r: ours.KnormPress(r), "sdpa"),
    "keydiff": (lambda r: kvpress.KeyDiffPress(r), lambda r: ours.KeyDiffPress(r), "sdpa"),
    "snapkv": (lambda r: kvpress.SnapKVPress(r, window_size=8), lambda r: ours.SnapKVPress(r, window_size=8), "sdpa"),
    "snapkv-eager": (
        lambda r: kvpress.SnapKVPress(r, window_size=8, kernel_size=3),
        lambda r: ours.SnapKVPress(r, window_size=8, kernel_size=3),
        "eager",
    ),
    "tova": (lambda r: kvpress.TOVAPress(r), lambda r: ours.TOVAPress(r), "sdpa"),
    "tova-eager": (lambda r: kvpress.TOVAPress(r), lambda r: ours.TOVAPress(r), "eager"),
    "observed": (lambda r: kvpress.ObservedAttentionPress(r), lambda r: ours.ObservedAttentionPress(r), "eager"),
}


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_press_keeps_what_kvpress_keeps(name, ratio):
    theirs_press, our_press, attn = PAIRS[name]
    model = tiny_llama(attn)
    ids = distinct_tokens(2, 37)
    theirs, mine = prefill(model, theirs_press(ratio), ids), prefill(model, our_press(ratio), ids)
    same_kept_tokens(theirs, mine)
    token = torch.randint(0, 97, (2, 1))
    torch.testing.assert_close(next_logits(model, mine, token), next_logits(model, theirs, token), rtol=1e-5, atol=1e-5)


def test_presses_are_kvpress_presses():
    for press in (ours.KnormPress(0.5), ours.SnapKVPress(0.5, window_size=4), ours.TOVAPress(0.2)):
        assert isinstance(press, kvpress.ScorerPress)
    composed = kvpress.ComposedPress([ours.KnormPress(0.2), ours.KeyDiffPress(0.2)])
    cache = prefill(tiny_llama("sdpa"), composed, torch.randint(0, 97, (1, 30)))
    assert layer_kv(cache, 0)[0].shape[2] == compute_n_kept(compute_n_kept(30, 0.2), 0.2)


def test_trim_kv_press_keeps_the_largest_retention():
    def gate(module, hidden_states, keys):  # a fixed per-token log β from the keys
        return -torch.nn.functional.softplus(keys.mean(-1))

    captured = {}

    class Spy(ours.TrimKVPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            captured.setdefault(module.layer_idx, (keys.clone(), values.clone()))
            return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    model = tiny_llama("sdpa")
    cache = prefill(model, Spy(0.5, retention_gate=gate), torch.randint(0, 97, (2, 33)))
    for layer, (keys, _values) in captured.items():
        b, h, s, _ = keys.shape
        scores = retention_scores_reference(gate(None, None, keys), torch.arange(s).expand(b, h, s), s)
        kept = scores.topk(compute_n_kept(s, 0.5), dim=-1).indices.sort(-1).values
        want = keys.gather(2, kept[..., None].expand(-1, -1, -1, keys.shape[-1]))
        torch.testing.assert_close(layer_kv(cache, layer)[0], want)
    with pytest.raises(ValueError, match="retention_gate"):
        prefill(model, ours.TrimKVPress(0.5), torch.randint(0, 97, (1, 10)))


def test_snapkv_window_longer_than_prompt_raises():
    with pytest.raises(ValueError, match="window_size"):
        prefill(tiny_llama("sdpa"), ours.SnapKVPress(0.5, window_size=64), torch.randint(0, 97, (1, 20)))
