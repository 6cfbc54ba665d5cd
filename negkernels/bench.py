"""`negkernels bench`: measure the device's roofline, then every case × implementation.

Rows: median ms, effective GB/s (bytes the op must move at least / time) or TFLOP/s, % of the
measured roofline, peak extra memory (CUDA), speed-up vs eager and vs torch.compile. Results go
to a table on stdout, a JSON file and (with matplotlib) a PNG plot.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ._cuda_ext import SOURCE_ROOT


def load_cases():
    path = SOURCE_ROOT / "benchmarks" / "cases.py"
    if not path.is_file():
        raise SystemExit(f"benchmark cases not found at {path}: run from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("negkernels_benchmark_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, min_time_s: float = 0.2, max_reps: int = 1000) -> float:
    """Median milliseconds of ``fn()`` after warm-up (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(3):
        fn()
    _sync(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < max_reps and (time.perf_counter() - start_all < min_time_s or len(samples) < 5):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


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
    cases_module = load_cases()
    cases = cases_module.select(family, case)
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
                ms = time_ms(fn, device)
                extra = peak_extra_bytes(fn, device)
                error = None
            except Exception as exc:  # a failing implementation is a row, not a crash
                ms, extra, error = float("nan"), None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            nbytes, flops = c.min_bytes(inputs), c.flops(inputs)
            gbps = nbytes / ms / 1e6 if ms == ms and ms > 0 else float("nan")
            tflops = flops / ms / 1e9 if flops and ms == ms and ms > 0 else None
            if tflops is not None and "matmul_TFLOPs" in roof:
                pct = 100 * tflops / roof["matmul_TFLOPs"]
            else:
                pct = 100 * gbps / roof["copy_GBps"]
            rows.append(dict(case=c.id, shape=c.shape(inputs), impl=impl, ms=ms, GBps=gbps, TFLOPs=tflops,
                             pct_roofline=pct, peak_extra_MB=None if extra is None else extra / 2**20, error=error,
                             floor_ms=nbytes / (roof["copy_GBps"] * 1e6)))
        case_rows = [r for r in rows if r["case"] == c.id]
        base = {r["impl"]: r["ms"] for r in case_rows}
        for r in case_rows:
            r["notes"] = c.notes
            r["vs_eager"] = base.get("eager", float("nan")) / r["ms"] if r["ms"] else float("nan")
            r["vs_compile"] = base.get("compile", float("nan")) / r["ms"] if r["ms"] else float("nan")
    print_table(rows, device, name, roof)
    write_outputs(rows, device, name, roof, Path(out_dir))
    return rows


def _fmt(v, spec):
    return "-" if v is None or v != v else format(v, spec)


def print_table(rows, device, name, roof) -> None:
    print(f"\nnegkernels bench on {name} ({device.type}); roofline: " + ", ".join(f"{k}={v:.1f}" for k, v in roof.items()))
    header = f"{'case':<24} {'impl':<8} {'median ms':>10} {'GB/s':>9} {'%roof':>6} {'floor ms':>9} {'+mem MB':>8} {'x eager':>8} {'x compile':>9}  shape"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<24} {r['impl']:<8} {_fmt(r['ms'], '10.4f')} {_fmt(r['GBps'], '9.1f')} {_fmt(r['pct_roofline'], '6.1f')} "
              f"{_fmt(r['floor_ms'], '9.4f')} {_fmt(r['peak_extra_MB'], '8.1f')} {_fmt(r.get('vs_eager'), '8.2f')} "
              f"{_fmt(r.get('vs_compile'), '9.2f')}  {r['shape']}" + (f"  ERROR {r['error']}" if r["error"] else ""))
    notes = dict.fromkeys(f"{r['case']}: {r['notes']}" for r in rows if r.get("notes"))
    if notes:
        print("\n" + "\n".join(notes))
    if device.type != "cuda":
        print("\nNo CUDA device: CPU timings of the eager and compiled references on small shapes only; "
              "the Triton and CUDA kernel figures need a CUDA GPU.")


def write_outputs(rows, device, name, roof, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(device=name, device_type=device.type, torch=torch.__version__, roofline=roof, rows=rows)
    (out_dir / "bench.json").write_text(json.dumps(payload, indent=2, default=float))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print(f"wrote {out_dir / 'bench.json'} (install matplotlib for the plot)")
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) * max(1, len(impls)) / 2), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for j, c in enumerate(cases):
            for r in rows:
                if r["case"] == c and r["impl"] == impl and r["ms"] == r["ms"]:
                    xs.append(j + k * width)
                    ys.append(r["ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(cases))], cases, rotation=15)
    ax.set_ylabel("median ms (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"negkernels bench · {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
