"""RetentionCache with Hugging Face generation: tiny randomly initialised models built from configs.

Oracles: the normal DynamicCache (a budget larger than the sequence changes nothing); a
sliding-window model, which keeps exactly the last W tokens, as a cache that evicts down to its
recent window at every step must (this checks the positions and the attention mask after
evictions); the bound budget + buffer at every step.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import negkernels as nk  # noqa: E402

CONFIG = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def greedy(model, prompt, new_tokens, cache=None):
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.no_grad():
        if cache is not None:  # under the keyword this transformers takes (no deprecation warning)
            kwargs[nk.RetentionCache.generate_keyword()] = cache
        return model.generate(prompt, **kwargs)


class Gates(torch.nn.Module):
    """A retention gate per layer: hidden states → log β per KV head (log-sigmoid of a linear map)."""

    def __init__(self, layers, hidden, kv_heads, constant=None):
        super().__init__()
        self.proj = torch.nn.ModuleList(torch.nn.Linear(hidden, kv_heads) for _ in range(layers))
        self.constant = constant

    def forward(self, layer_idx, hidden):
        out = torch.nn.functional.logsigmoid(self.proj[layer_idx](hidden))
        return torch.full_like(out, self.constant) if self.constant is not None else out


def track_peak(cache):
    peak = [0]
    real_update = cache.update

    def update(*args, **kwargs):
        out = real_update(*args, **kwargs)
        peak[0] = max(peak[0], *cache.cached_lengths())
        return out

    cache.update = update
    return peak


@pytest.mark.parametrize("scorer", ["trim_kv", "key_norm"])
def test_generate_512_tokens_within_budget(scorer):
    model = llama()
    prompt = torch.randint(0, 97, (1, 24))
    gates = Gates(2, 64, 2) if scorer == "trim_kv" else None
    cache = nk.RetentionCache(
        64,
        16,
        scorer=scorer,
        model=model if gates else None,
        retention_gates=gates,
        sink=4,
        window=8,
        backend="reference",
    )
    peak = track_peak(cache)
    out = greedy(model, prompt, 512, cache)
    cache.detach()
    assert out.shape == (1, 24 + 512)
    assert peak[0] <= 64 + 16
    assert cache.evictions > 0 and all(n <= 64 + 16 for n in cache.cached_lengths())
    assert cache.get_seq_length() == 24 + 511  # every token but the last was cached
    for layer in cache.layers:  # sinks survive every eviction
        assert torch.equal(layer.positions[..., :4], torch.arange(4).expand(1, 2, 4))


def test_budget_above_the_sequence_is_the_normal_cache():
    model = llama()
    prompt = torch.randint(0, 97, (2, 17))
    expected = greedy(model, prompt, 120)
    cache = nk.RetentionCache(200, 8)
    assert torch.equal(greedy(model, prompt, 120, cache), expected)
    assert cache.evictions == 0


@pytest.mark.parametrize("backend", [b for b in ("reference", "triton") if b in nk.available_backends("cpu")])
@pytest.mark.parametrize("scorer", ["recent-by-gate", "window"])
def test_eviction_to_the_window_equals_a_sliding_window_model(backend, scorer):
    # A cache evicting down to its last `budget` tokens at every step attends, at each step, to
    # those tokens and the new one: a sliding window of budget + 1. A constant gate β < 1 ranks
    # tokens by recency, so TRIM-KV scoring must give the same tokens.
    budget = 20
    new_tokens = 40 if backend == "reference" else 10  # the interpreter runs two kernels per layer and step
    # A random model may settle into repeating one token, where the window changes nothing: draw
    # again (a few times at most) until the window matters, so the check below is not vacuous.
    for _ in range(5):
        sliding = transformers.MistralForCausalLM(
            transformers.MistralConfig(**CONFIG, sliding_window=budget + 1)
        ).eval()
        full = transformers.MistralForCausalLM(transformers.MistralConfig(**CONFIG, sliding_window=None)).eval()
        full.load_state_dict(sliding.state_dict())
        prompt = torch.randint(0, 97, (2, 15))
        expected = greedy(sliding, prompt, new_tokens, transformers.DynamicCache(config=sliding.config))
        if backend != "reference" or not torch.equal(expected, greedy(full, prompt, new_tokens)):
            break
    else:
        pytest.fail("five random models in a row ignored the window: the check would be vacuous")
    if scorer == "window":
        cache = nk.RetentionCache(budget, 0, window=budget, backend=backend)
    else:
        cache = nk.RetentionCache(
            budget, 0, model=full, retention_gates=Gates(2, 64, 2, constant=-0.1), backend=backend
        )
    assert torch.equal(greedy(full, prompt, new_tokens, cache), expected)
    assert cache.evictions > 0
    cache.detach()


def test_bad_arguments():
    with pytest.raises(ValueError, match="sink \\+ window"):
        nk.RetentionCache(8, sink=5, window=4)
    with pytest.raises(ValueError, match="retention_gates"):
        nk.RetentionCache(8, scorer="trim_kv")
    with pytest.raises(ValueError, match="model"):
        nk.RetentionCache(8, retention_gates=Gates(2, 64, 2))
    with pytest.raises(ValueError, match="scorer"):
        nk.RetentionCache(8, scorer="oracle")
    with pytest.raises(ValueError, match="budget"):
        nk.RetentionCache(0)
