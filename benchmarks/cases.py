"""Benchmark cases, defined once: `negkernels bench` and `pytest benchmarks/ --benchmark-only` both use them.

A case builds its inputs on a device (full size on a GPU, small on the CPU), names the bytes it
must move at least (the memory floor) and/or its flops, and maps implementation names to
zero-argument callables. Implementations: "eager" (the plain-PyTorch reference), "compile"
(torch.compile of the same), "triton", "cuda", and a peer library where installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Case:
    family: str
    name: str
    build: Callable[[torch.device, bool], dict]  # (device, full_size) -> inputs
    implementations: Callable[[dict], dict[str, Callable[[], object]]]
    min_bytes: Callable[[dict], int]
    flops: Callable[[dict], int] = lambda inputs: 0
    shape: Callable[[dict], str] = lambda inputs: ""
    notes: str = ""  # the target and today's baselines, printed under the table

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"


def _advantage_inputs(ragged: bool):
    def build(device: torch.device, full: bool) -> dict:
        n = 131072 if full else 8192
        rewards = torch.randn(n, device=device)
        if ragged:
            # random group sizes 1..128, groups shuffled
            sizes = torch.randint(1, 129, (n,))
            ids = torch.repeat_interleave(torch.arange(n), sizes)[:n]
            ids = ids[torch.randperm(n)].to(device)
            num_groups = int(ids.max()) + 1
            return dict(rewards=rewards, group_index=ids, num_groups=num_groups, n=n)
        return dict(rewards=rewards, group_size=64, num_groups=n // 64, n=n)

    return build


def _advantage_impls(inputs: dict) -> dict:
    import negkernels as nk

    r = inputs["rewards"]
    g = inputs.get("group_size")
    ids = inputs.get("group_index")
    if ids is None:
        ids_for_ref = torch.arange(r.numel(), device=r.device) // g
    else:
        ids_for_ref = ids
    num_groups = inputs["num_groups"]

    def eager_user_code():
        # What users write today: index_add statistics, then normalise (fp32).
        zeros = torch.zeros(num_groups, device=r.device)
        count = zeros.index_add(0, ids_for_ref, torch.ones_like(r))
        mean = zeros.index_add(0, ids_for_ref, r) / count.clamp_min(1)
        d = r - mean[ids_for_ref]
        var = zeros.index_add(0, ids_for_ref, d * d) / (count - 1).clamp_min(1)
        return d / (var.sqrt()[ids_for_ref] + 1e-6)

    compiled = torch.compile(eager_user_code)
    impls = {"eager": eager_user_code, "compile": compiled}
    available = nk.available_backends(r.device, op="group_advantages")
    kwargs = dict(group_size=g) if ids is None else dict(group_index=ids, num_groups=num_groups, validate=False)
    for backend in ("triton", "cuda"):
        if backend in available and r.device.type == "cuda":
            impls[backend] = (lambda b: (lambda: nk.group_advantages(r, backend=b, **kwargs)))(backend)
    return impls


CASES: list[Case] = [
    Case(
        family="advantages",
        name="uniform-g64",
        build=_advantage_inputs(ragged=False),
        implementations=_advantage_impls,
        min_bytes=lambda i: i["n"] * 4 * 2,  # read rewards, write advantages
        shape=lambda i: f"N={i['n']} G=64 fp32",
        notes="H100 target: one launch, <= 10 us (today: eager 21 us, torch.compile 6 us)",
    ),
    Case(
        family="advantages",
        name="ragged",
        build=_advantage_inputs(ragged=True),
        implementations=_advantage_impls,
        min_bytes=lambda i: i["n"] * (4 + 8 + 4),  # rewards, int64 ids, advantages
        shape=lambda i: f"N={i['n']} sizes 1-128 shuffled, {i['num_groups']} groups",
        notes="H100 target: one launch, <= 10 us (today: eager 104 us)",
    ),
]


def select(family: str | None = None, case: str | None = None) -> list[Case]:
    chosen = [c for c in CASES if (family is None or c.family == family) and (case is None or case in (c.id, c.name))]
    if not chosen:
        raise SystemExit(f"no benchmark case matches family={family!r} case={case!r}; cases: {[c.id for c in CASES]}")
    return chosen
