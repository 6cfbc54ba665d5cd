"""`negkernels check`: every available backend of every op against the float64 reference on
fresh random inputs on the current device; prints a pass/fail table, returns the failure count."""

from __future__ import annotations

import torch

from ._backend import available_backends
from .ops.advantages import DISCRIMINATIVE_LOSS_BACKENDS, GROUP_ADVANTAGES_BACKENDS
from .reference.advantages import ESTIMATORS, SCALES, group_advantages_reference, group_discriminative_loss_reference


def _advantage_checks(device):
    import negkernels as nk

    for grouping in ("uniform", "ragged"):
        for estimator in ESTIMATORS:
            for scale in SCALES:
                def run(backend, estimator=estimator, scale=scale, grouping=grouping):
                    n = 4099 if device.type == "cuda" else 203
                    r = torch.randn(n, device=device) * 2 + 0.5
                    if grouping == "uniform":
                        n -= n % 7
                        r = r[:n]
                        ids, kw = torch.arange(n, device=device) // 7, dict(group_size=7)
                    else:
                        ids = torch.randint(0, n // 9, (n,), device=device)
                        kw = dict(group_index=ids)
                    out = nk.group_advantages(r, estimator=estimator, scale=scale, backend=backend, **kw)
                    ref = group_advantages_reference(r.double(), ids, int(ids.max()) + 1, estimator, scale)[0]
                    return out, ref
                yield "group_advantages", f"{estimator}/{scale}/{grouping}", run


def _discriminative_checks(device):
    import negkernels as nk

    for mode in ("disco", "disco_b"):
        def run(backend, mode=mode):
            n = 301
            s = torch.randn(n, device=device)
            c = torch.rand(n, device=device) > 0.5
            ids = torch.randint(0, 40, (n,), device=device)
            out = nk.group_discriminative_loss(s, c, ids, tau=0.5, mode=mode, backend=backend)
            ref = group_discriminative_loss_reference(s.double(), c, ids, int(ids.max()) + 1, 0.5, mode)
            return out, ref
        yield "group_discriminative_loss", mode, run


OP_BACKENDS = {"group_advantages": GROUP_ADVANTAGES_BACKENDS, "group_discriminative_loss": DISCRIMINATIVE_LOSS_BACKENDS}


def run_checks(device: torch.device | None = None, verbose: bool = True) -> int:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for source in (_advantage_checks, _discriminative_checks):
        for op, config, fn in source(device):
            backends = [b for b in available_backends(device, op=op) if b in OP_BACKENDS[op]]
            for backend in backends:
                try:
                    out, ref = fn(backend)
                    err = ((out.double() - ref).abs() / (ref.abs() + 1e-6)).nan_to_num(0.0).max().item() if out.numel() else 0.0
                    same_nan = torch.equal(out.isnan(), ref.isnan())
                    ok = same_nan and err <= 1e-4
                    rows.append((op, config, backend, "PASS" if ok else "FAIL", f"{err:.2e}"))
                except Exception as exc:
                    rows.append((op, config, backend, "ERROR", f"{type(exc).__name__}: {exc}".splitlines()[0][:80]))
    failures = sum(r[3] != "PASS" for r in rows)
    if verbose:
        print(f"negkernels check on {device} (backends: {', '.join(available_backends(device))})")
        print(f"{'op':<27} {'config':<36} {'backend':<10} {'result':<6} max rel err")
        for r in rows:
            print(f"{r[0]:<27} {r[1]:<36} {r[2]:<10} {r[3]:<6} {r[4]}")
        print(f"{len(rows) - failures} passed, {failures} failed")
    return failures
