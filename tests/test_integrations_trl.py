"""NegkernelsGRPOTrainer and NegkernelsDPOTrainer against the real trl.GRPOTrainer and trl.DPOTrainer.

Oracle: TRL's own trainers. Both train a tiny randomly initialised Llama (built from a config, no
downloads) for two steps from the same seed on an in-memory dataset (GRPO: prompts and a toy
reward; DPO: prompts with chosen and rejected responses); the
logged losses, gradient norms and metrics must agree to fp32 tolerance for every loss type and
option. Plain SGD keeps the two trajectories together (Adam turns rounding-level gradient
differences into ±lr updates) while a large step makes the second iteration off-policy and clip.
"""

import math

# The test extra installs TRL (with datasets and tokenizers): a missing peer fails, never skips.
import datasets
import pytest
import tokenizers
import torch
import transformers
import trl

from negkernels.integrations.trl import NegkernelsDPOTrainer, NegkernelsGRPOTrainer  # noqa: E402

VOCAB = 64


def tiny_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def toy_reward(completions, **kwargs):
    return [0.1 * len(c) - 2.0 * c.count("w3") + 0.5 * c.count("w7") for c in completions]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama and tokenizer: TRL loads its reference model from the same path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


PROMPTS = datasets.Dataset.from_dict(
    {"prompt": [" ".join(f"w{(i * 7 + j) % 61}" for j in range(5)) for i in range(16)]}
)


def trainer_args(cls, tmp_path, **options) -> dict:
    """Both trainers' arguments: two logged SGD steps on the CPU, from seed 0, nothing saved."""
    return (
        dict(
            output_dir=str(tmp_path / cls.__name__),
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            seed=0,
            optim="sgd",
            learning_rate=2.0,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
        )
        | options
    )


def train(cls, model_dir, tmp_path, **options):
    options = dict(num_generations=4, max_completion_length=10, beta=0.04, epsilon=0.05, num_iterations=2) | options
    args = trainer_args(cls, tmp_path, **options)
    trainer = cls(
        model=model_dir,
        reward_funcs=toy_reward,
        args=trl.GRPOConfig(**args),
        train_dataset=PROMPTS,
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], trainer


def assert_same_logs(theirs, ours, rtol):
    assert len(theirs) == len(ours)
    for step, (a, b) in enumerate(zip(theirs, ours)):
        compared = [k for k, v in a.items() if isinstance(v, float) and k not in ("step_time", "learning_rate")]
        assert {"loss", "grad_norm", "entropy"} <= set(compared)
        for key in compared:
            assert key in b, f"step {step}: metric {key} not logged"
            if math.isnan(a[key]):
                assert math.isnan(b[key]), f"step {step} {key}: {b[key]} vs NaN"
                continue
            assert b[key] == pytest.approx(a[key], rel=rtol, abs=rtol * 1e-2), f"step {step} {key}"


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.02),
    "cispo, TRL's default cap (epsilon_high = epsilon < 1)": dict(loss_type="cispo"),
    "sapo": dict(loss_type="sapo"),
    "luspo": dict(loss_type="luspo"),
    "gspo (sequence-level IS)": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "dapo sequence-level": dict(loss_type="dapo", importance_sampling_level="sequence"),
    "cispo sequence-level": dict(loss_type="cispo", epsilon_high=1.02, importance_sampling_level="sequence"),
    "cispo sequence-level, plain KL": dict(
        loss_type="cispo",
        epsilon_high=1.02,
        importance_sampling_level="sequence",
        use_bias_correction_kl=False,
        top_entropy_quantile=0.5,
    ),
    "sapo sequence-level": dict(loss_type="sapo", importance_sampling_level="sequence"),
    "sapo sequence-level, entropy mask": dict(
        loss_type="sapo", importance_sampling_level="sequence", top_entropy_quantile=0.5, beta=0.0
    ),
    "plain KL, delta": dict(loss_type="bnpo", use_bias_correction_kl=False, delta=1.5),
    "on-policy, no KL": dict(loss_type="grpo", beta=0.0, num_iterations=1),
    "on-policy with KL": dict(loss_type="dr_grpo", num_iterations=1),
    "top-entropy quantile": dict(loss_type="bnpo", top_entropy_quantile=0.5),
    "off-policy mask": dict(loss_type="grpo", off_policy_mask_threshold=0.05),
    "gradient accumulation": dict(loss_type="dapo", gradient_accumulation_steps=2, max_steps=3),
    "grad accumulation grpo": dict(loss_type="grpo", gradient_accumulation_steps=2, max_steps=3),
    "temperature": dict(loss_type="grpo", temperature=0.7),
    # TRL's entropy bonus is a token mean whatever the loss: folded into the fused pass under a
    # token-mean loss, a second LM-head pass under the others or with an entropy mask
    "entropy bonus, bnpo": dict(loss_type="bnpo", entropy_coef=0.05),
    "entropy bonus, dapo with GA": dict(
        loss_type="dapo", entropy_coef=0.05, gradient_accumulation_steps=2, max_steps=3
    ),
    "entropy bonus, grpo": dict(loss_type="grpo", entropy_coef=0.05),
    "entropy bonus, entropy mask": dict(loss_type="bnpo", entropy_coef=0.05, top_entropy_quantile=0.5),
    "entropy bonus, off-policy mask": dict(loss_type="grpo", entropy_coef=0.05, off_policy_mask_threshold=0.05),
    "adaptive entropy": dict(
        loss_type="dr_grpo",
        use_adaptive_entropy=True,
        entropy_coef=0.02,
        entropy_coef_delta=0.01,
        entropy_target=5.0,
        max_steps=3,
    ),
    "adaptive entropy, gated off": dict(
        loss_type="bnpo",
        use_adaptive_entropy=True,
        entropy_coef=0.02,
        entropy_coef_delta=0.01,
        entropy_target=0.5,
        max_steps=3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_matches_trl(case, tiny_model_dir, tmp_path):
    theirs, _ = train(trl.GRPOTrainer, tiny_model_dir, tmp_path, **CASES[case])
    ours, trainer = train(NegkernelsGRPOTrainer, tiny_model_dir, tmp_path, **CASES[case])
    assert trainer._negkernels_fallback is None  # the fused loss ran, not TRL's
    assert_same_logs(theirs, ours, rtol=1e-4)
    if "entropy_coef" in CASES[case]:  # TRL's bonus metrics are logged; adaptive control moves the coefficient
        assert "policy_loss" in ours[0] and "entropy_coef" in ours[0]
        if case == "adaptive entropy":
            assert ours[-1]["entropy_coef"] > ours[0]["entropy_coef"]


def test_trainer_matches_trl_on_the_triton_kernels(tiny_model_dir, tmp_path, monkeypatch):
    """The fused Triton LM-head loss (under the interpreter on a CPU) inside the trainer."""
    monkeypatch.setenv("NEGKERNELS_BACKEND", "triton")
    options = dict(loss_type="grpo", max_completion_length=6)
    theirs, _ = train(trl.GRPOTrainer, tiny_model_dir, tmp_path, **options)
    ours, _ = train(NegkernelsGRPOTrainer, tiny_model_dir, tmp_path, **options)
    assert_same_logs(theirs, ours, rtol=1e-4)


def test_trainer_matches_trl_in_bf16(tiny_model_dir, tmp_path):
    """Mixed precision: the LM head runs in the autocast dtype, as TRL's does; bf16 tolerance."""
    theirs, _ = train(trl.GRPOTrainer, tiny_model_dir, tmp_path, loss_type="bnpo", bf16=True, max_steps=1)
    ours, _ = train(NegkernelsGRPOTrainer, tiny_model_dir, tmp_path, loss_type="bnpo", bf16=True, max_steps=1)
    assert_same_logs(theirs, ours, rtol=2e-2)


def with_vllm_ratios(cls):
    """The trainer with TRL's vLLM importance-sampling correction on, fed made-up ratios (no vLLM
    on a CPU): generation runs TRL's own sampler, then per-token ratios join the batch."""

    class WithRatios(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.vllm_importance_sampling_correction = True

        def _generate_and_score_completions(self, inputs):
            self.use_vllm = False
            out = super()._generate_and_score_completions(inputs)
            self.use_vllm = True
            ids = out["completion_ids"]
            gen = torch.Generator().manual_seed(int(ids.sum()))
            out["importance_sampling_ratio"] = 0.5 + torch.rand(ids.shape, generator=gen)
            # the loss reads use_vllm: on from here to the next generation
            return out

    WithRatios.__name__ = cls.__name__
    return WithRatios


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="grpo"),
        dict(loss_type="cispo", epsilon_high=1.02),
        # per-token ratios on a per-sequence term: each sequence weighed by its tokens' mean ratio
        dict(loss_type="dapo", importance_sampling_level="sequence", top_entropy_quantile=0.5),
    ],
    ids=["grpo", "cispo", "gspo with entropy mask"],
)
def test_trainer_matches_trl_with_vllm_importance_ratios(options, tiny_model_dir, tmp_path):
    theirs, _ = train(with_vllm_ratios(trl.GRPOTrainer), tiny_model_dir, tmp_path, **options)
    ours, _ = train(with_vllm_ratios(NegkernelsGRPOTrainer), tiny_model_dir, tmp_path, **options)
    assert_same_logs(theirs, ours, rtol=1e-4)


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(loss_type="vespo"), "vespo"),
    ],
)
def test_trainer_falls_back_to_trl_loss_with_a_warning(options, reason, tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match=reason):
        ours, trainer = train(NegkernelsGRPOTrainer, tiny_model_dir, tmp_path, max_steps=1, **options)
    assert trainer._negkernels_fallback is not None
    theirs, _ = train(trl.GRPOTrainer, tiny_model_dir, tmp_path, max_steps=1, **options)
    assert_same_logs(theirs, ours, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# NegkernelsDPOTrainer against trl.DPOTrainer
# ---------------------------------------------------------------------------------------------


def _words(i, n, k):
    return " ".join(f"w{(i * k + j * 3) % 61}" for j in range(n))


# Prompts and responses of different lengths, so padding and the completion masks are exercised.
PREFERENCES = datasets.Dataset.from_dict(
    {
        "prompt": [_words(i, 4 + i % 3, 7) for i in range(16)],
        "chosen": [" " + _words(i, 3 + i % 4, 5) for i in range(16)],
        "rejected": [" " + _words(i, 2 + i % 5, 11) for i in range(16)],
    }
)


def train_dpo(cls, model_dir, tmp_path, **options):
    # The large step moves the policy away from the reference, so the second step's rewards,
    # margins and accuracies are not the first step's zeros.
    args = trainer_args(cls, tmp_path, **(dict(beta=0.1) | options))
    trainer = cls(
        model=model_dir,
        args=trl.DPOConfig(**args),
        train_dataset=PREFERENCES,
        eval_dataset=PREFERENCES.select(range(8)) if args.get("eval_strategy", "no") != "no" else None,
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    return trainer.state.log_history, trainer


def assert_same_dpo_logs(theirs, ours, rtol):
    train_logs = lambda history: [h for h in history if "loss" in h]  # noqa: E731
    eval_logs = lambda history: [h for h in history if "eval_loss" in h]  # noqa: E731
    assert_same_logs(train_logs(theirs), train_logs(ours), rtol)
    theirs_eval, ours_eval = eval_logs(theirs), eval_logs(ours)
    assert len(theirs_eval) == len(ours_eval)
    for a, b in zip(theirs_eval, ours_eval):
        compared = [k for k, v in a.items() if isinstance(v, float) and k.startswith("eval_") and "runtime" not in k]
        compared = [k for k in compared if "per_second" not in k]
        assert {"eval_loss", "eval_rewards/margins"} <= set(compared)
        for key in compared:
            assert b[key] == pytest.approx(a[key], rel=rtol, abs=rtol * 1e-2), key


DPO_LOSS_TYPES = [
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
]
DPO_CASES = {
    **{
        loss_type: dict(loss_type=[loss_type], label_smoothing=0.1 if loss_type in ("exo_pair", "robust") else 0.0)
        for loss_type in DPO_LOSS_TYPES
    },
    "cDPO smoothing left to TRL's sigmoid": dict(loss_type=["sigmoid"], label_smoothing=0.2),
    "weighted mix (MPO-style)": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "precomputed reference log-probs": dict(loss_type=["sigmoid"], precompute_ref_log_probs=True),
    "gradient accumulation": dict(loss_type=["ipo"], gradient_accumulation_steps=2, max_steps=2),
    "evaluation": dict(loss_type=["sigmoid"], eval_strategy="steps", eval_steps=1),
    "evaluation, loss only": dict(
        loss_type=["robust"], label_smoothing=0.1, eval_strategy="steps", eval_steps=1, prediction_loss_only=True
    ),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_trainer_matches_trl(case, tiny_model_dir, tmp_path):
    theirs, _ = train_dpo(trl.DPOTrainer, tiny_model_dir, tmp_path, **DPO_CASES[case])
    ours, trainer = train_dpo(NegkernelsDPOTrainer, tiny_model_dir, tmp_path, **DPO_CASES[case])
    assert trainer._negkernels_fallback is None  # the fused loss ran, not TRL's
    if "eval_strategy" in DPO_CASES[case]:
        assert sum("eval_loss" in h for h in ours) == 2  # one evaluation after each step
    assert_same_dpo_logs(theirs, ours, rtol=1e-4)


def test_dpo_trainer_never_builds_the_logits(tiny_model_dir, tmp_path, monkeypatch):
    """Training calls neither model's LM head module: the log-probs come from the hidden states."""
    calls = []
    original = NegkernelsDPOTrainer.__init__

    def init_and_watch(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for model in (self.model, self.ref_model):
            model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(a[0]))

    monkeypatch.setattr(NegkernelsDPOTrainer, "__init__", init_and_watch)
    logs, trainer = train_dpo(NegkernelsDPOTrainer, tiny_model_dir, tmp_path, loss_type=["sigmoid"])
    assert trainer._negkernels_fallback is None and trainer.ref_model is not None
    assert [h for h in logs if "loss" in h] and calls == []


def test_dpo_trainer_matches_trl_on_the_triton_kernels(tiny_model_dir, tmp_path, monkeypatch):
    """The Triton LM-head log-probs and preference kernel (under the interpreter on a CPU)."""
    monkeypatch.setenv("NEGKERNELS_BACKEND", "triton")
    options = dict(loss_type=["sigmoid", "sft"], per_device_train_batch_size=2)
    theirs, _ = train_dpo(trl.DPOTrainer, tiny_model_dir, tmp_path, **options)
    ours, _ = train_dpo(NegkernelsDPOTrainer, tiny_model_dir, tmp_path, **options)
    assert_same_dpo_logs(theirs, ours, rtol=1e-4)


def test_dpo_trainer_matches_trl_in_bf16(tiny_model_dir, tmp_path):
    """Mixed precision: the LM head runs in the autocast dtype, as TRL's does; bf16 tolerance."""
    theirs, _ = train_dpo(trl.DPOTrainer, tiny_model_dir, tmp_path, loss_type=["sigmoid"], bf16=True, max_steps=1)
    ours, _ = train_dpo(NegkernelsDPOTrainer, tiny_model_dir, tmp_path, loss_type=["sigmoid"], bf16=True, max_steps=1)
    assert_same_dpo_logs(theirs, ours, rtol=2e-2)


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(loss_type=["aot"]), "aot"),
        (dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"), "f_divergence_type"),
        (dict(loss_type=["sigmoid"], ld_alpha=0.5), "ld_alpha"),
        (dict(loss_type=["sigmoid"], use_weighting=True), "use_weighting"),
    ],
    ids=["aot", "f-divergence", "ld_alpha", "wpo weighting"],
)
def test_dpo_trainer_falls_back_to_trl_loss_with_a_warning(options, reason, tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match=reason):
        ours, trainer = train_dpo(NegkernelsDPOTrainer, tiny_model_dir, tmp_path, max_steps=1, **options)
    assert trainer._negkernels_fallback is not None
    theirs, _ = train_dpo(trl.DPOTrainer, tiny_model_dir, tmp_path, max_steps=1, **options)
    assert_same_dpo_logs(theirs, ours, rtol=1e-6)
