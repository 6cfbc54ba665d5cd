"""Command line: `negkernels bench | check | build-ext` (also `python -m negkernels ...`)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="negkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="measure the roofline, then every benchmark case × implementation")
    b.add_argument("--family", help="only this op family (e.g. advantages)")
    b.add_argument("--case", help="only this case (e.g. advantages/ragged)")
    b.add_argument(
        "--impl", action="append", help="only these implementations (eager, compile, triton, cuda); repeatable"
    )
    b.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    b.add_argument("--full", action="store_true", help="full-size cases even on the CPU")
    b.add_argument(
        "--host",
        action="store_true",
        help="only the host overhead per call, every kernel launch a no-op (works on a CPU)",
    )
    b.add_argument("--reps", type=int, default=300, help="calls per op for --host, spread over ten interleaved rounds")
    sub.add_parser("check", help="every available backend of every op against the float64 reference")
    e = sub.add_parser("build-ext", help="build the CUDA extension (CMake + Ninja + nvcc) into the cache")
    e.add_argument("--arch", help="CUDA architectures, e.g. 90 (default: the visible GPU's)")
    e.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "bench" and args.host:
        import json
        from pathlib import Path

        from .host_overhead import measure, print_table

        result = measure(args.reps)
        print_table(result)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "host.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {out / 'host.json'}")
        return 0
    if args.command == "bench":
        from .bench import run

        rows = run(family=args.family, case=args.case, impls=args.impl, out_dir=args.out, full=args.full or None)
        return 1 if any(r["error"] for r in rows) else 0
    if args.command == "check":
        from .check import run_checks

        return 1 if run_checks() else 0
    from ._cuda_ext import build

    path = build(cuda_archs=args.arch, verbose=args.verbose)
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
