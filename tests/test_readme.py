"""Every Python block of the README runs as written on a CPU, without a warning, and the runnable
examples (a block starting `# runnable`) do what they say."""

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
ALL_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
BLOCKS = [b for b in ALL_BLOCKS if b.startswith("# runnable")]


def _run(block: str) -> dict:
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # The Triton interpreter evaluates both sides of tl.where with numpy; see pyproject.toml.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_readme_has_runnable_examples():
    assert BLOCKS and len(ALL_BLOCKS) > len(BLOCKS)


@pytest.mark.parametrize(
    "block", [b for b in ALL_BLOCKS if b not in BLOCKS], ids=lambda b: b.strip().splitlines()[-1][:60]
)
def test_readme_snippet_runs(block):
    _run(block)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.splitlines()[0][:60])
def test_readme_example_runs(block, capsys):
    namespace = _run(block)
    printed = capsys.readouterr().out
    assert ("loss" in printed or "cache" in namespace) and "nan" not in printed.lower()
    if "cache" in namespace:  # the generate() example: bounded cache, evictions happened
        assert namespace["cache"].evictions > 0 and max(namespace["cache"].cached_lengths()) <= 48 + 16
    if "logits" in namespace:  # the GRPO step: the gradient reached the logits
        assert namespace["logits"].grad is not None
    if "lm_head" in namespace:  # the fused LM-head example: gradients reached the head and the hidden states
        assert namespace["lm_head"].weight.grad is not None and namespace["hidden"].grad is not None
    if "policy_head" in namespace:  # the DPO step: gradients reached the policy's head, not the reference's
        assert namespace["policy_head"].weight.grad is not None and namespace["hidden"].grad is not None
        assert namespace["reference_head"].weight.grad is None
    if "encoder" in namespace:  # the MoCo step: the gradient reached the encoder and the temperature
        assert all(p.grad is not None for p in namespace["encoder"].parameters())
        assert namespace["log_tau"].grad is not None and namespace["bank"].valid > 0
