"""The README's runnable examples run and do what they say (a code block starting `# runnable`)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if b.startswith("# runnable")]


def test_readme_has_runnable_examples():
    assert BLOCKS


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.splitlines()[0][:60])
def test_readme_example_runs(block, capsys):
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert ("loss" in printed or "cache" in namespace) and "nan" not in printed.lower()
    if "cache" in namespace:  # the generate() example: bounded cache, evictions happened
        assert namespace["cache"].evictions > 0 and max(namespace["cache"].cached_lengths()) <= 48 + 16
    if "logits" in namespace:  # the GRPO step: the gradient reached the logits
        assert namespace["logits"].grad is not None
    if "lm_head" in namespace:  # the fused LM-head example: gradients reached the head and the hidden states
        assert namespace["lm_head"].weight.grad is not None and namespace["hidden"].grad is not None
    if "encoder" in namespace:  # the MoCo step: the gradient reached the encoder and the temperature
        assert all(p.grad is not None for p in namespace["encoder"].parameters())
        assert namespace["log_tau"].grad is not None and namespace["bank"].valid > 0
