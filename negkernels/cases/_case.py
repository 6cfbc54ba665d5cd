"""The benchmark case record, and the helpers every family's cases share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    op_family: str = ""  # the module it lives in (negkernels.cases.FAMILIES); set there

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"


def kernel_dtype(device: torch.device) -> torch.dtype:
    # bf16 where kernels run (and on "meta", which benchmarks/static_cost.py uses for the GPU
    # shapes without their memory); fp32 for the CPU smoke test, whose matmuls lack bf16 speed.
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def kernel_impls(impls: dict, device: torch.device, op: str, make) -> dict:
    import negkernels as nk

    if device.type == "cuda":
        for backend in ("triton", "cuda"):
            if backend in nk.available_backends(device, op=op):
                impls[backend] = make(backend)
    return impls
