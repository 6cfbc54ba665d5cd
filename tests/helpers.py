"""Shared test machinery: tolerances per dtype, fresh inputs, output poisoning, parity checks."""

from __future__ import annotations

import contextlib
import os

import torch

# Outputs are fp32 whatever the input dtype: compared to the float64 reference on the same
# (upcast) inputs they agree to fp32 accuracy. Gradients come back in the input's dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}

# Rewards are what they are in the input dtype: the fp32 outputs match the float64 reference run
# on the upcast inputs to fp32 accuracy.
OUTPUT_TOLERANCE = TOLERANCES[torch.float32]


def fresh(shape, dtype=torch.float32, *, noncontiguous=False, device="cpu", scale=1.0, offset=0.0):
    """Random normal values; with ``noncontiguous`` a strided view into a larger buffer."""
    if noncontiguous:
        base = torch.randn(*shape[:-1], shape[-1] * 2, device=device) * scale + offset
        return base[..., ::2].to(dtype)
    return (torch.randn(*shape, device=device) * scale + offset).to(dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


@contextlib.contextmanager
def poisoned_allocations():
    """Fill every tensor that torch.empty hands out with garbage (NaN / a huge int) while active.

    Kernels must write every output element and clear their own workspaces; an element they skip
    shows up as NaN or as a wrong count.
    """
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64, torch.int16):
            t.fill_(-987654321 if t.dtype != torch.int16 else -12345)
        return t

    # The compiled extension allocates its outputs in C++: it poisons them under this variable.
    previous = os.environ.get("NEGKERNELS_POISON_OUTPUTS")
    os.environ["NEGKERNELS_POISON_OUTPUTS"] = "1"
    torch.empty = poisoned_empty
    try:
        yield
    finally:
        torch.empty = real_empty
        if previous is None:
            del os.environ["NEGKERNELS_POISON_OUTPUTS"]
        else:
            os.environ["NEGKERNELS_POISON_OUTPUTS"] = previous


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual64.shape == expected64.shape, f"{what}: shape {actual64.shape} != {expected64.shape}"
    torch.testing.assert_close(actual64, expected64, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
