"""Argument checks shared by every op: each raises before any kernel runs and names the argument."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, x, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {x.device}")


def check_same_length(name: str, x: torch.Tensor, n: int, ref_name: str) -> None:
    if x.shape[0] != n:
        raise ValueError(f"{name}: length {x.shape[0]} does not match {ref_name} length {n}")


def check_finite_float(name: str, value, *, minimum: float | None = None, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name}: must be {'>' if exclusive else '>='} {minimum}, got {value}")
    return value


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, name: str = "cu_seqlens") -> int:
    """Offsets of packed sequences: a 1-D int tensor that starts at 0, never decreases and ends at
    ``total``. One host read for the whole layout; returns the longest sequence's length."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{name}: needs at least one entry (0)")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ends = (cu_seqlens[0], cu_seqlens[-1])
    first, last, shortest, longest = torch.stack(
        [*ends, *(torch.aminmax(lengths) if lengths.numel() else ends)]
    ).tolist()
    if first != 0 or last != total or shortest < 0:
        shown = cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else f"first {first}, last {last}, shortest {shortest}"
        raise ValueError(f"{name}: must start at 0, be non-decreasing and end at {total}, got {shown}")
    return int(longest) if lengths.numel() else 0


def check_disjoint_outputs(outputs: dict) -> None:
    """Tensors a kernel writes in place: none may overlap itself (a stride-0 expanded or broadcast
    view: two rows would write one address) and no two may share memory, by torch's own rule for
    ``out=`` arguments (conservative: views interleaved in one buffer count as sharing)."""
    named = [(name, x) for name, x in outputs.items() if x.numel()]
    for name, x in named:
        if torch._debug_has_internal_overlap(x) == 1:
            raise ValueError(
                f"{name}: an output written in place must not overlap itself (an expanded or broadcast "
                f"view, strides {tuple(x.stride())}); pass a materialised tensor"
            )
    for i, (a, x) in enumerate(named):
        for b, y in named[i + 1 :]:
            if torch._C._overlaps(x, y):
                raise ValueError(f"{b}: an output written in place must not share memory with {a}")
