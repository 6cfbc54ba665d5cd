"""`negkernels check`: every available backend of every op against the float64 reference on
fresh random inputs on the current device; prints a pass/fail table, returns the failure count.
The rows are the families' check tables (negkernels.cases)."""

from __future__ import annotations

import torch

from ._backend import available_backends, triton_interpret
from .cases import checks

TOLERANCE = 1e-4  # the largest relative error a row may show
DEFAULT_FLOOR_FRACTION = 1e-3


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor_fraction: float = DEFAULT_FLOOR_FRACTION) -> float:
    """max |out − ref| / (|ref| + floor), the floor being 1e-6 plus ``floor_fraction`` of the
    largest reference entry, so that a value that cancels to nearly 0 (a loss summed over ± terms,
    a matmul gradient) is judged against the scale of its terms. NaN where both are NaN counts as
    equal; NaN on one side only is infinitely wrong."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not out.numel():
        return 0.0
    if not torch.equal(out.isnan(), ref.isnan()):
        return float("inf")
    floor = 1e-6 + floor_fraction * ref.abs().nan_to_num(0.0).max().item()
    return ((out - ref).abs() / (ref.abs() + floor)).nan_to_num(0.0).max().item()


def run_row(fn, backend: str) -> float:
    """Run one check row on ``backend``; its relative error (see :func:`relative_error`)."""
    out, ref, *floor_fraction = fn(backend)
    return relative_error(out, ref, *floor_fraction)


def _missing_backend_notes(device: torch.device) -> list[str]:
    """Why backends are absent from the table: no CUDA device (and whether the interpreter stands
    in), or the CUDA extension not loaded."""
    notes = []
    if device.type != "cuda":
        if not triton_interpret():
            notes.append(
                "no CUDA device: only the reference backend runs. TRITON_INTERPRET=1 negkernels check runs the "
                "Triton kernels too, in the interpreter (about a minute on a CPU)."
            )
        else:
            notes.append("no CUDA device: the Triton kernels run in the interpreter (TRITON_INTERPRET=1).")
    from . import _cuda_ext

    if device.type == "cuda" and not _cuda_ext.has_cuda_ext():
        notes.append(f"CUDA extension not loaded, so no cuda rows: {_cuda_ext.load_error()}")
    return notes


def run_checks(device: torch.device | None = None, verbose: bool = True) -> int:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for op, config, fn in checks(device):
        for backend in available_backends(device, op=op):
            try:
                err = run_row(fn, backend)
                rows.append((op, config, backend, "PASS" if err <= TOLERANCE else "FAIL", f"{err:.2e}"))
            except Exception as exc:
                rows.append((op, config, backend, "ERROR", f"{type(exc).__name__}: {exc}".splitlines()[0][:120]))
    failures = sum(r[3] != "PASS" for r in rows)
    if verbose:
        print(f"negkernels check on {device} (backends: {', '.join(available_backends(device))})")
        for note in _missing_backend_notes(device):
            print(note)
        header = ("op", "config", "backend", "result", "max rel err")
        widths = [max(len(header[j]), *(len(r[j]) for r in rows)) if rows else len(header[j]) for j in range(4)]
        line = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        print(line.format(*header))
        for r in rows:
            print(line.format(*r))
        print(f"{len(rows) - failures} passed, {failures} failed (a row passes at relative error <= {TOLERANCE:g})")
    return failures
