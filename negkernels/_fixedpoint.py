"""Host-side constants of the fixed-point group sums shared by the Triton and CUDA kernels."""

from __future__ import annotations

import math


def headroom_bits(n: int) -> int:
    """Bits kept free so that n values each below 2**(62 - headroom) sum without int64 overflow."""
    return max(1, math.ceil(math.log2(max(n, 1) + 1))) + 1


def exponent_bound(x: float) -> int:
    """Smallest E (clamped to fp32's range) with |x| < 2**E; 129 for non-finite x."""
    x = abs(float(x))
    if x == 0.0:
        return -126
    if not math.isfinite(x):
        return 129
    return max(math.frexp(x)[1], -126)
