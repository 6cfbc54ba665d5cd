"""negkernels.integrations.transformers against the models' own logits.

Oracle: each tiny, randomly initialised Hugging Face causal LM's ``forward().logits``, shifted,
divided by the temperature and log-softmaxed in float64; log-probs, entropies, the policy loss and
the gradients of every parameter must agree. Covered: an untied head (Llama), tied ones (Qwen2,
Gemma with its scaled embedding), constant logit scales (Cohere's logit_scale, Granite's
logits_scaling), left padding, and the soft-capped head (Gemma 2) rejected.
"""

import pytest
import torch
import transformers as tf  # a requirement of the test extra: missing, it fails rather than skips

from negkernels.integrations.transformers import (  # noqa: E402
    causal_lm_logprobs,
    causal_lm_policy_loss,
    lm_head,
)
from negkernels.reference.logprobs import policy_loss_reference  # noqa: E402

from .helpers import assert_close  # noqa: E402

VOCAB = 97
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "qwen2": lambda: tf.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "gemma": lambda: tf.GemmaConfig(**SMALL, head_dim=8),
    "cohere (logit_scale)": lambda: tf.CohereConfig(**SMALL, logit_scale=0.37),
    "granite (logits_scaling)": lambda: tf.GraniteConfig(**SMALL, logits_scaling=2.5),
}


def tiny(name):
    torch.manual_seed(1234)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():  # weights large enough that the distributions are far from uniform
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def batch(b=3, length=13):
    ids = torch.randint(0, VOCAB, (b, length))
    attention = torch.ones(b, length, dtype=torch.long)
    attention[0, :4] = 0  # left padding, as in generation batches
    return ids, attention


def oracle(model, ids, attention, keep, temperature):
    logits = model(input_ids=ids, attention_mask=attention).logits
    logits = logits[:, :-1] if keep is None else logits[:, -keep - 1 : -1]
    targets = ids[:, 1:] if keep is None else ids[:, -keep:]
    logp_all = torch.log_softmax(logits.double() / temperature, -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("keep, temperature", [(None, 1.0), (5, 0.7), (12, 1.3)])
def test_logprobs_and_entropy_match_the_models_logits(name, keep, temperature):
    model = tiny(name)
    ids, attention = batch()
    with torch.no_grad():
        want_logp, want_entropy = oracle(model, ids, attention, keep, temperature)
        logp, entropy = causal_lm_logprobs(
            model, ids, attention, logits_to_keep=keep, temperature=temperature, return_entropy=True
        )
    assert logp.shape == want_logp.shape == (3, 12 if keep is None else keep)
    assert_close(logp, want_logp, rtol=1e-5, atol=2e-5, what="log-probs")
    assert_close(entropy, want_entropy, rtol=1e-5, atol=2e-5, what="entropy")


@pytest.mark.parametrize("name", ["llama", "gemma", "granite (logits_scaling)"])
def test_gradients_of_every_parameter_match_the_logits_path(name):
    model = tiny(name)
    ids, attention = batch(b=2, length=9)
    upstream = torch.randn(2, 6, dtype=torch.float64)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads((oracle(model, ids, attention, 6, 0.9)[0] * upstream).sum())
    got = grads(
        (causal_lm_logprobs(model, ids, attention, logits_to_keep=6, temperature=0.9).double() * upstream).sum()
    )
    assert set(got) == set(want)
    for n in want:
        assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, what=f"d {n}")


def test_policy_loss_matches_the_reference_on_the_logits_log_probs():
    model = tiny("llama")
    ids, attention = batch(b=4, length=11)
    keep = 7
    mask = torch.rand(4, keep) > 0.2
    advantages = torch.randn(4)
    with torch.no_grad():
        logp0 = oracle(model, ids, attention, keep, 0.8)[0].float()
    old = logp0 + 0.05 * torch.randn_like(logp0)
    ref = logp0 + 0.05 * torch.randn_like(logp0)
    options = dict(ref_logp=ref, kl_coef=0.1, clip_low=0.2, clip_high=0.28, aggregation="seq-mean-token-mean")

    out = causal_lm_policy_loss(
        model, ids, old, advantages, mask, attention_mask=attention, logits_to_keep=keep, temperature=0.8, **options
    )
    model.zero_grad()
    out.loss.backward()
    got = model.model.embed_tokens.weight.grad.clone()

    logp = oracle(model, ids, attention, keep, 0.8)[0]
    want = policy_loss_reference(logp, old.double(), advantages.double(), mask, **options).loss
    model.zero_grad()
    want.backward()
    assert_close(out.loss, want, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(got, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6, what="d embed_tokens")


def test_the_logit_scale_is_folded_into_the_temperature():
    assert lm_head(tiny("cohere (logit_scale)")).temperature(0.74) == pytest.approx(0.74 / 0.37)
    assert lm_head(tiny("granite (logits_scaling)")).temperature(1.0) == pytest.approx(2.5)
    assert lm_head(tiny("llama")).bias is None


def test_bad_input_is_rejected_naming_the_argument():
    gemma2 = tf.AutoModelForCausalLM.from_config(tf.Gemma2Config(**SMALL, head_dim=8))
    assert gemma2.config.final_logit_softcapping is not None
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head(gemma2)
    model = tiny("llama")
    ids, attention = batch(length=6)
    for keep in (0, 6, -1, 2.5):
        with pytest.raises((ValueError, TypeError), match="logits_to_keep"):
            causal_lm_logprobs(model, ids, attention, logits_to_keep=keep)
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_logprobs(model, ids[0], logits_to_keep=2)
    with pytest.raises(ValueError, match="temperature"):
        causal_lm_logprobs(model, ids, attention, temperature=0.0)


# ============================================================================ last_window_attention


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("window", [1, 5, 40])
def test_last_window_attention_is_the_eager_layers_weights(arch, window):
    from negkernels.integrations.transformers import last_window_attention

    torch.manual_seed(3)
    common = dict(
        vocab_size=61,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    else:
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **common)).eval()  # q_norm on the queries
    ids = torch.randint(0, 61, (2, 23))
    seen = {}

    def grab(module, args, kwargs, output):
        seen[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"], output[1])

    layers = [layer.self_attn for layer in model.model.layers]
    hooks = [layer.register_forward_hook(grab, with_kwargs=True) for layer in layers]
    cache = tf.DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, output_attentions=True)
    for hook in hooks:
        hook.remove()
    for layer, module in enumerate(layers):
        hidden, rope, weights = seen[layer]
        got = last_window_attention(module, hidden, cache.layers[layer].keys, window, rope)
        w = min(window, ids.shape[1])
        assert got.shape == (2, 6, w, 23) and got.dtype == torch.float32
        torch.testing.assert_close(got, weights[..., -w:, :].float(), rtol=1e-5, atol=1e-6)
