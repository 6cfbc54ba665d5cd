"""The kv cases: KV-cache retention: eviction and retention mass.

``BENCH``: the benchmark cases (`negkernels bench`, ``pytest benchmarks/``, the static cost).
``checks(device)``: (op, config, run) rows, where ``run(backend)`` returns (output, float64
reference[, error floor as a fraction of the largest reference entry]) (`negkernels check`, the
GPU tests, the sanitizer script).
"""

from __future__ import annotations

import torch

from ._case import Case, kernel_dtype, kernel_impls


def _kv_inputs(sizes_full, sizes_cpu):
    def build(device: torch.device, full: bool) -> dict:
        b, h, s, d, budget = sizes_full if full else sizes_cpu
        dtype = kernel_dtype(device)
        keys = torch.randn(b, h, s, d, device=device, dtype=dtype)
        values = torch.randn(b, h, s, d, device=device, dtype=dtype)
        log_beta = torch.nn.functional.logsigmoid(torch.randn(b, h, s, device=device) + 3).to(dtype)
        positions = torch.arange(s, device=device, dtype=torch.int32).expand(b, h, s).contiguous()
        return dict(
            keys=keys,
            values=values,
            log_beta=log_beta,
            positions=positions,
            step=s,
            budget=budget,
            b=b,
            h=h,
            s=s,
            d=d,
            dtype=dtype,
        )

    return build


def _evict_impls(i: dict) -> dict:
    import negkernels as nk

    keys, values, log_beta, positions, step, budget = (
        i[k] for k in ("keys", "values", "log_beta", "positions", "step", "budget")
    )

    def eager():
        # What eviction code does today: scores, topk, sort the kept indices, gather K and V.
        scores = (step - positions).float() * log_beta.float()
        kept = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
        gather = kept[..., None].expand(*kept.shape, keys.shape[-1])
        return keys.gather(2, gather), values.gather(2, gather)

    out = {"eager": eager, "compile": torch.compile(eager)}
    return kernel_impls(
        out,
        keys.device,
        "evict",
        lambda b: lambda: nk.evict(keys, values, log_beta, positions, step, budget, backend=b),
    )


def _evict_bytes(i: dict) -> int:
    elem = torch.finfo(i["dtype"]).bits // 8
    rows = i["b"] * i["h"]
    # read log β and positions once; read and write the kept K and V rows; write the indices
    return rows * i["s"] * (elem + 4) + rows * i["budget"] * (4 * i["d"] * elem + 8)


def _mass_inputs(device: torch.device, full: bool) -> dict:
    h, t = (8, 32768) if full else (2, 1024)
    log_beta = torch.nn.functional.logsigmoid(torch.randn(h, t, device=device) + 3).requires_grad_()
    return dict(log_beta=log_beta, h=h, t=t)


def _mass_impls(i: dict) -> dict:
    import negkernels as nk

    lb = i["log_beta"]

    def chunked_eager():
        # The plain formula, 1024 query rows at a time (the whole [T, T] matrix does not fit at T = 32768).
        t = lb.shape[-1]
        pos = torch.arange(t, device=lb.device)
        out = []
        for start in range(0, t, 1024):
            rows = pos[start : start + 1024, None]
            age = (rows - pos[None, :]).clamp_min(0).float()
            terms = torch.exp(age * lb[:, None, :]) * (rows >= pos[None, :])
            out.append(terms.sum(-1))
        mass = torch.cat(out, dim=-1)
        return torch.autograd.grad(mass.sum(), lb)

    out = {"eager": chunked_eager}
    return kernel_impls(
        out,
        lb.device,
        "retention_mass",
        lambda b: lambda: torch.autograd.grad(nk.retention_mass(lb, backend=b).sum(), lb),
    )


BENCH: list[Case] = [
    Case(
        family="kv",
        name="evict",
        build=_kv_inputs((8, 8, 131072, 128, 4096), (2, 4, 4096, 64, 256)),
        implementations=_evict_impls,
        min_bytes=_evict_bytes,
        shape=lambda i: f"B{i['b']} H{i['h']} S{i['s']} D{i['d']} {str(i['dtype'])[6:]} -> {i['budget']}",
        notes="H100 target <= 0.13 ms (today: eager topk+gather 0.52 ms, torch.compile 0.40 ms; floor ~0.10 ms)",
    ),
    Case(
        family="kv",
        name="evict-8rows",
        build=_kv_inputs((1, 8, 32768, 128, 2048), (1, 2, 2048, 64, 128)),
        implementations=_evict_impls,
        min_bytes=_evict_bytes,
        shape=lambda i: f"B{i['b']} H{i['h']} S{i['s']} D{i['d']} {str(i['dtype'])[6:]} -> {i['budget']}",
        notes="H100 target <= 0.03 ms (today: eager 0.24 ms)",
    ),
    Case(
        family="kv",
        name="retention-mass",
        build=_mass_inputs,
        implementations=_mass_impls,
        min_bytes=lambda i: i["h"] * i["t"] * 4 * 4,  # not its limit: the S²/2 pairs of arithmetic are
        shape=lambda i: f"H={i['h']} S={i['t']} fp32, fwd+bwd",
        notes="H100 target <= 1.2 ms; one exponential per pair forward and backward (H·S²/2 = 4.3e9 pairs "
        "each way) would need 2.06 ms of MUFU time alone, so the kernels derive most powers by "
        "multiplication (benchmarks/static_cost.py: 0.78 ms on paper)",
    ),
]


def _kv_checks(device):
    import negkernels as nk

    from ..reference.kv import retention_mass_reference, retention_scores_reference, select_retained_reference

    big = device.type == "cuda"
    b, h, s, d = (4, 8, 5000, 128) if big else (2, 3, 301, 16)
    for config, (budget, sink, window, with_lengths) in {
        "budget/sink/window": (s // 5, 4, 16, False),
        "lengths/ties": (s // 3, 0, 8, True),
    }.items():

        def run(backend, budget=budget, sink=sink, window=window, with_lengths=with_lengths):
            scores = torch.randint(-50, 50, (b, h, s), device=device).float()
            lengths = torch.randint(0, s + 1, (b,), device=device) if with_lengths else None
            out = nk.select_retained(scores, budget, sink=sink, window=window, lengths=lengths, backend=backend)
            return out, select_retained_reference(scores.double(), budget, sink, window, lengths)

        yield "select_retained", config, run

    def run_evict(backend):
        keys = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16)
        values = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16)
        log_beta = -torch.rand(b, h, s, device=device) * 0.1
        positions = torch.randint(0, 2 * s, (b, h, s), device=device)
        kept = nk.evict(keys, values, log_beta, positions, 2 * s, s // 4, sink=2, window=8, backend=backend)
        indices = select_retained_reference(
            retention_scores_reference(log_beta.double(), positions, 2 * s), s // 4, 2, 8
        )
        gather = indices.clamp_min(0)[..., None].expand(b, h, indices.shape[-1], d)
        expected = torch.cat([indices.reshape(-1).double(), keys.gather(2, gather).reshape(-1).double()])
        return torch.cat([kept.indices.reshape(-1).double(), kept.keys.reshape(-1).double()]), expected

    yield "evict", "trim_kv/sink/window", run_evict

    for config, packed in {"one sequence": False, "packed": True}.items():

        def run_mass(backend, packed=packed):
            t = 3000 if big else 200
            lb = (-torch.rand(3, t, device=device) * 0.05).requires_grad_()
            cu = torch.tensor([0, t // 3, t // 3, t], device=device) if packed else None
            mass = nk.retention_mass(lb, cu, backend=backend)
            (g,) = torch.autograd.grad(mass.sum(), lb)
            lb64 = lb.detach().double().requires_grad_()
            ref = retention_mass_reference(lb64, cu)
            (g64,) = torch.autograd.grad(ref.sum(), lb64)
            return torch.cat([mass.reshape(-1), g.reshape(-1)]), torch.cat([ref.reshape(-1), g64.reshape(-1)])

        yield "retention_mass", config, run_mass


def _zero_gate_checks(device):
    """β = 0 gates (log β = −inf) never reach a gradient (as tests/test_edge_cases.py holds on the CPU)."""
    import negkernels as nk

    from ..reference.kv import retention_mass_reference

    def run_zero_gate(backend):
        log_beta = torch.log(torch.rand(3, 300 if device.type == "cuda" else 37, device=device) * 0.5 + 0.4)
        log_beta[:, ::5] = float("-inf")
        x = log_beta.clone().requires_grad_()
        mass = nk.retention_mass(x, backend=backend)
        (g,) = torch.autograd.grad(mass.sum(), x)
        x64 = log_beta.double().requires_grad_()
        ref = retention_mass_reference(x64)
        (g64,) = torch.autograd.grad(ref.sum(), x64)
        return torch.cat([mass.reshape(-1), g.reshape(-1)]), torch.cat([ref.reshape(-1), g64.reshape(-1)])

    yield "retention_mass", "beta = 0 gates", run_zero_gate


def checks(device: torch.device):
    yield from _kv_checks(device)
    yield from _zero_gate_checks(device)
