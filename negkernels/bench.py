"""`negkernels bench`: measure the device's roofline, then every case × implementation.

Rows, on a GPU: device ms (the kernels' own time per call, summed from the profiler's kernel
records, so host overhead is not in it), wall ms per call (back-to-back calls, one
synchronisation at the end: what a training step sees), effective GB/s (bytes the op must move
at least / device time) or TFLOP/s, % of the measured roofline, peak extra memory, speed-up vs
eager and vs torch.compile (by device time). A %roof above 100 means the roof or the byte count
of that row is wrong, and the row is marked. On a CPU the bench is a smoke test: the eager and
compiled references on small shapes, wall time only; the Triton and CUDA kernels are not
measured and the table says so. Results go to a table on stdout, a JSON file and (with
matplotlib) a PNG plot.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from . import _cuda_ext
from .cases import select


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, min_time_s: float = 0.2, max_reps: int = 1000) -> float:
    """Wall milliseconds per call of ``fn()`` after warm-up. On a GPU: calls back to back with one
    synchronisation at the end (the median of five such batches), so host and device overlap as
    in training; on a CPU: the median of single calls."""
    for _ in range(3):
        fn()
    _sync(device)
    if device.type == "cuda":
        t0 = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - t0, 1e-6)
        per_batch = max(1, min(max_reps, int(min_time_s / 5 / once)))
        batches = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(per_batch):
                fn()
            _sync(device)
            batches.append((time.perf_counter() - t0) * 1e3 / per_batch)
        return statistics.median(batches)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < max_reps and (time.perf_counter() - start_all < min_time_s or len(samples) < 5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def device_ms(fn, device: torch.device, reps: int = 10) -> float | None:
    """Kernel time per call on the GPU: the profiler's device time of every kernel (and memset /
    memcpy) that ``reps`` calls launch, divided by ``reps``. None on a CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    total_us = 0.0
    for event in prof.events():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            total_us += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    return total_us / reps / 1e3


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_roofline(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written per second) and, on a GPU, the bf16 matmul rate."""
    n = (256 << 20) // 4 if device.type == "cuda" else (32 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    out = {"copy_GBps": 2 * src.numel() * 4 / ms / 1e6}
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        ms = time_ms(lambda: a @ b, device)
        out["matmul_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    return out


def run(family=None, case=None, impls=None, out_dir="bench-results", full=None, progress=True) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = device.type == "cuda" if full is None else full
    cases = select(family, case)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    say(f"device: {name}; measuring the roofline...")
    roof = measure_roofline(device)
    say("roofline: " + ", ".join(f"{k} {v:.1f}" for k, v in roof.items()))
    rows = []
    total = len(cases)
    for ci, c in enumerate(cases, 1):
        inputs = c.build(device, full)
        implementations = c.implementations(inputs)
        if impls:
            implementations = {k: v for k, v in implementations.items() if k in impls}
        for impl, fn in implementations.items():
            say(f"[{ci}/{total}] {c.id} · {impl} ...")
            try:
                wall = time_ms(fn, device)
                kernel = device_ms(fn, device)
                extra = peak_extra_bytes(fn, device)
                error = None
            except Exception as exc:  # a failing implementation is a row, not a crash
                wall, kernel, extra, error = (
                    float("nan"),
                    None,
                    None,
                    f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                )
            # The device time where there is one (nothing of the host in it), else wall time.
            ms = kernel if kernel is not None and kernel > 0 else wall
            nbytes, flops = c.min_bytes(inputs), c.flops(inputs)
            gbps = nbytes / ms / 1e6 if ms == ms and ms > 0 else float("nan")
            tflops = flops / ms / 1e9 if flops and ms == ms and ms > 0 else None
            if tflops is not None and "matmul_TFLOPs" in roof:
                pct = 100 * tflops / roof["matmul_TFLOPs"]
            else:
                pct = 100 * gbps / roof["copy_GBps"]
            if device.type != "cuda":
                pct = None  # small CPU shapes live in cache: a DRAM copy roof says nothing about them
            rows.append(
                dict(
                    case=c.id,
                    shape=c.shape(inputs),
                    impl=impl,
                    ms=ms,
                    device_ms=kernel,
                    wall_ms=wall,
                    GBps=gbps,
                    TFLOPs=tflops,
                    pct_roofline=pct,
                    roof_suspect=pct is not None and pct == pct and pct > 100,
                    peak_extra_MB=None if extra is None else extra / 2**20,
                    error=error,
                    floor_ms=nbytes / (roof["copy_GBps"] * 1e6),
                    op_family=c.op_family,
                )
            )
        case_rows = [r for r in rows if r["case"] == c.id]
        base = {r["impl"]: r["ms"] for r in case_rows}
        for r in case_rows:
            r["notes"] = c.notes
            r["vs_eager"] = base.get("eager", float("nan")) / r["ms"] if r["ms"] else float("nan")
            r["vs_compile"] = base.get("compile", float("nan")) / r["ms"] if r["ms"] else float("nan")
    print_table(rows, device, name, roof)
    for line in missing_kernel_rows(device, cases, impls):
        print(line)
    write_outputs(rows, device, name, roof, Path(out_dir))
    return rows


def missing_kernel_rows(device: torch.device, cases, impls=None) -> list[str]:
    """Why kernel rows are absent from the table: no CUDA device, no Triton, or the CUDA extension
    not loaded (with the loader's reason)."""
    wanted = [b for b in ("triton", "cuda") if not impls or b in impls]
    if device.type != "cuda":
        which = "every case" if len(cases) > 1 else cases[0].id
        return [f"not measured here (no CUDA device): the {' and '.join(wanted)} rows of {which}"]
    import negkernels as nk

    lines = []
    if "triton" in wanted and "triton" not in nk.available_backends(device):
        lines.append("no triton rows: Triton is not installed (pip install triton)")
    if "cuda" in wanted and not _cuda_ext.has_cuda_ext():
        lines.append(f"no cuda rows: the CUDA extension is not loaded: {_cuda_ext.load_error()}")
    return lines


def _fmt(v, spec):
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if v is None or v != v else format(v, spec)


def print_table(rows, device, name, roof) -> None:
    print(
        f"\nnegkernels bench on {name} ({device.type}); roofline: " + ", ".join(f"{k}={v:.1f}" for k, v in roof.items())
    )
    if device.type != "cuda":
        print(
            "SMOKE TEST on a CPU: wall time of the eager and compiled references on small shapes; no kernel "
            "of this package is timed here."
        )
    header = (
        f"{'case':<24} {'impl':<8} {'device ms':>10} {'wall ms':>10} {'GB/s':>9} {'%roof':>6} {'floor ms':>9} "
        f"{'+mem MB':>8} {'x eager':>8} {'x compile':>9}  shape"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        suspect = "  %roof > 100: the roof or the byte count is wrong" if r.get("roof_suspect") else ""
        print(
            f"{r['case']:<24} {r['impl']:<8} {_fmt(r.get('device_ms'), '10.4f')} {_fmt(r.get('wall_ms'), '10.4f')} "
            f"{_fmt(r['GBps'], '9.1f')} {_fmt(r['pct_roofline'], '6.1f')} "
            f"{_fmt(r['floor_ms'], '9.4f')} {_fmt(r['peak_extra_MB'], '8.1f')} {_fmt(r.get('vs_eager'), '8.2f')} "
            f"{_fmt(r.get('vs_compile'), '9.2f')}  {r['shape']}"
            + (f"  ERROR {r['error']}" if r["error"] else "")
            + suspect
        )
    notes = dict.fromkeys(f"{r['case']}: {r['notes']}" for r in rows if r.get("notes"))
    if notes:
        print("\n" + "\n".join(notes))


def write_outputs(rows, device, name, roof, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(
        device=name,
        device_type=device.type,
        torch=torch.__version__,
        roofline=roof,
        smoke_test=device.type != "cuda",
        rows=rows,
    )
    (out_dir / "bench.json").write_text(json.dumps(payload, indent=2, default=float))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print(f"wrote {out_dir / 'bench.json'} (install matplotlib for the plot)")
        return
    plot(rows, device, name, out_dir / "bench.png", plt)
    print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")


def plot(rows, device, name, path: Path, plt) -> tuple[str, list[str]]:
    """One panel per op family: its cases side by side, one bar per implementation (device ms on
    a GPU, wall ms on a CPU), and the case's memory floor (the bytes it must move at the measured
    copy rate) as a black line across its bars. Returns the figure's title and its panels' titles."""
    families = list(dict.fromkeys(r["op_family"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {impl: plt.get_cmap("tab10")(k) for k, impl in enumerate(impls)}
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families) + 1, 4.8), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, family in zip(axes[0], families):
        family_rows = [r for r in rows if r["op_family"] == family]
        cases = list(dict.fromkeys(r["case"] for r in family_rows))
        for j, case in enumerate(cases):
            case_rows = {r["impl"]: r for r in family_rows if r["case"] == case}
            for k, impl in enumerate(impls):
                r = case_rows.get(impl)
                if r is not None and r["ms"] == r["ms"] and r["ms"] > 0:
                    ax.bar(j + k * width, r["ms"], width, color=colors[impl], label=impl)
            floor = next(iter(case_rows.values()))["floor_ms"]
            ax.hlines(
                floor, j - width / 2, j + width * (len(impls) - 0.5), colors="black", linewidth=2, label="memory floor"
            )
        ax.set_xticks(
            [j + width * (len(impls) - 1) / 2 for j in range(len(cases))],
            [c.split("/", 1)[1] if c.startswith(family + "/") else c for c in cases],
            rotation=20,
            ha="right",
            fontsize=8,
        )
        ax.set_yscale("log")
        ax.set_title(family)
        ax.grid(axis="y", which="both", alpha=0.3)
    panels = [ax.get_title() for ax in axes[0]]
    axes[0][0].set_ylabel("device ms per call (lower is better)" if device.type == "cuda" else "CPU wall ms per call")
    handles: dict = {}  # label -> the first artist drawn with it
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=8)
    what = (
        "kernels measured: profiler device time"
        if device.type == "cuda"
        else "SMOKE TEST: references only, no kernel of this package timed"
    )
    title = f"negkernels bench on {name} ({device.type}) · {what}"
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return title, panels
