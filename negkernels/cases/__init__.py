"""The op cases, one table per family, defined once.

Each family module (``advantages``, ``logprobs``, ``contrastive``, ``kv``, ``preference``) holds ``BENCH`` (the
benchmark cases: inputs at full size on a GPU and small on the CPU, the bytes and flops the op
must move at least, the implementations side by side) and ``checks(device)`` (small odd shapes
against the float64 reference). `negkernels bench`, ``pytest benchmarks/``, the static cost
report, `negkernels check`, the GPU tests and the sanitizer script all read these tables.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import advantages, contrastive, kv, logprobs, preference
from ._case import Case

FAMILIES = {
    "advantages": advantages,
    "logprobs": logprobs,
    "contrastive": contrastive,
    "kv": kv,
    "preference": preference,
}

for _op_family, _module in FAMILIES.items():
    for _case in _module.BENCH:
        _case.op_family = _op_family

CASES: list[Case] = [case for module in FAMILIES.values() for case in module.BENCH]


def select(family: str | None = None, case: str | None = None) -> list[Case]:
    """The bench cases of ``family`` (an op family, or a bench family such as ``policy-loss``) and/or
    the one named ``case`` (``family/name`` or ``name``)."""
    chosen = [
        c
        for c in CASES
        if (family is None or family in (c.family, c.op_family)) and (case is None or case in (c.id, c.name))
    ]
    if not chosen:
        raise SystemExit(f"no benchmark case matches family={family!r} case={case!r}; cases: {[c.id for c in CASES]}")
    return chosen


def checks(device: torch.device) -> Iterator[tuple]:
    """Every family's (op, config, run) check rows, in family order."""
    for module in FAMILIES.values():
        yield from module.checks(device)


__all__ = ["CASES", "FAMILIES", "Case", "checks", "select"]
