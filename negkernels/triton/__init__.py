"""Triton kernels and their launchers, one module per op family (import needs `triton`).

The launchers size their grids with :func:`cdiv` and :func:`next_power_of_2` below rather than
``triton.cdiv`` / ``triton.next_power_of_2``: those are constexpr functions, which cost about
3 µs of argument unwrapping per call from the host, and a launcher makes up to a dozen calls.
"""


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for integers."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (0 for n ≤ 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
