"""Backend selection: explicit argument > ``NEGKERNELS_BACKEND`` > automatic.

Automatic choice, per op and per call:
  * the compiled CUDA kernel when the extension is loaded, implements the op and the tensors are on a GPU;
  * else Triton when the tensors are on a GPU (or on the CPU under ``TRITON_INTERPRET=1``);
  * else the pure-PyTorch reference.

An explicit request for a backend that cannot run the call raises :class:`BackendUnavailable`;
nothing silently falls back.
"""

from __future__ import annotations

import os

import torch

BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """Raised when a backend is explicitly requested but cannot run this call."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_HAS_TRITON: list[bool] = []  # decided once; a list, not lru_cache, which torch.compile warns about


def has_triton() -> bool:
    if not _HAS_TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:
            _HAS_TRITON.append(False)
        else:
            _HAS_TRITON.append(True)
    return _HAS_TRITON[0]


def sm_count(device: torch.device) -> int | None:
    """The streaming multiprocessors a grid is sized for: the CUDA device's count, or None where
    the Triton interpreter runs the kernels (its programs run one after another, so persistent
    and grid-barrier kernels take a small fixed grid). Launchers call it through this module, so
    ``benchmarks/static_cost.py`` can size the grids of an absent GPU."""
    if device.type != "cuda" or triton_interpret():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def _triton_runs_on(device: torch.device) -> tuple[bool, str]:
    if not has_triton():
        return False, "the `triton` package is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpret():
        return True, ""
    return False, f"Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to run them on the CPU)"


def _cuda_runs_on(device: torch.device, op: str) -> tuple[bool, str]:
    from . import _cuda_ext

    if device.type != "cuda":
        return False, f"the CUDA backend needs CUDA tensors (got {device.type})"
    ext = _cuda_ext.load()
    if ext is None:
        return False, f"the compiled extension is not available ({_cuda_ext.load_error()})"
    if op not in _cuda_ext.cuda_ops():
        return False, f"the compiled extension has no kernel for `{op}`"
    return True, ""


# Each public op's implementations, registered by its family's module in negkernels.ops at import.
IMPLEMENTED: dict[str, tuple[str, ...]] = {}


def register_op(op: str, backends: tuple[str, ...]) -> tuple[str, ...]:
    """Record which backends implement ``op`` (for :func:`available_backends`); returns ``backends``."""
    IMPLEMENTED[op] = backends
    return backends


def available_backends(device: torch.device | str | None = None, op: str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU).

    With ``op`` (a public op's name, e.g. ``"policy_loss"``) only the backends that implement it
    are listed, and the CUDA backend only if the compiled extension has its kernel.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    implemented = BACKENDS
    if op is not None:
        if op not in IMPLEMENTED:
            raise ValueError(f"op: unknown op {op!r}; known ops: {sorted(IMPLEMENTED)}")
        implemented = IMPLEMENTED[op]
    out = ["reference"]
    if "triton" in implemented and _triton_runs_on(device)[0]:
        out.append("triton")
    if "cuda" in implemented and device.type == "cuda":
        from . import _cuda_ext

        if _cuda_ext.load() is not None and (op is None or op in _cuda_ext.cuda_ops()):
            out.append("cuda")
    return out


def resolve_backend(backend: str | None, device: torch.device, op: str, implemented: tuple[str, ...]) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``implemented`` lists the backends that have an implementation of ``op`` at all.
    """
    from_env = backend is None and bool(os.environ.get("NEGKERNELS_BACKEND"))
    requested = backend if backend is not None else os.environ.get("NEGKERNELS_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            if from_env:
                raise ValueError(
                    f"NEGKERNELS_BACKEND: expected one of {BACKENDS} or unset, got {requested!r} "
                    "(the environment variable sets the default backend)"
                )
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {requested!r}")
        if requested not in implemented:
            raise BackendUnavailable(
                f"backend={requested!r}: `{op}` has no {requested} implementation (it has {implemented})"
            )
        if requested == "triton":
            ok, why = _triton_runs_on(device)
            if not ok:
                raise BackendUnavailable(f"backend='triton' for `{op}`: {why}")
        elif requested == "cuda":
            ok, why = _cuda_runs_on(device, op)
            if not ok:
                raise BackendUnavailable(f"backend='cuda' for `{op}`: {why}")
        return requested
    if "cuda" in implemented and device.type == "cuda" and _cuda_runs_on(device, op)[0]:
        return "cuda"
    if "triton" in implemented and _triton_runs_on(device)[0]:
        return "triton"
    return "reference"
