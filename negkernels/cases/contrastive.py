"""The contrastive cases: InfoNCE, SupCon and hard negatives against a memory bank.

``BENCH``: the benchmark cases (`negkernels bench`, ``pytest benchmarks/``, the static cost).
``checks(device)``: (op, config, run) rows, where ``run(backend)`` returns (output, float64
reference[, error floor as a fraction of the largest reference entry]) (`negkernels check`, the
GPU tests, the sanitizer script).
"""

from __future__ import annotations

import torch

from ..reference.contrastive import bank_info_nce_reference, bank_supcon_reference, bank_topk_reference
from ._case import Case, kernel_dtype, kernel_impls


def _bank_inputs(sizes_full, sizes_cpu):
    def build(device: torch.device, full: bool) -> dict:
        n, k, d = sizes_full if full else sizes_cpu
        dtype = kernel_dtype(device)
        unit = torch.nn.functional.normalize
        query = unit(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_()
        positive = unit(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_()
        bank = unit(torch.randn(k, d, device=device), dim=-1).to(dtype)  # a MoCo queue: no gradient
        return dict(query=query, positive=positive, bank=bank, n=n, k=k, d=d, dtype=dtype)

    return build


def _info_nce_impls(i: dict) -> dict:
    import negkernels as nk

    q, p, bank = i["query"], i["positive"], i["bank"]

    def eager_loss(q, p):
        # What MoCo-style code does today: the [N, 1 + K] logits, then cross-entropy on column 0.
        logits = torch.cat([(q * p).sum(-1, keepdim=True), q @ bank.T], dim=1).float() / 0.07
        return torch.nn.functional.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    compiled_loss = torch.compile(eager_loss)
    out = {
        "eager": lambda: torch.autograd.grad(eager_loss(q, p), (q, p)),
        "compile": lambda: torch.autograd.grad(compiled_loss(q, p), (q, p)),
    }
    return kernel_impls(
        out,
        q.device,
        "bank_info_nce",
        lambda b: lambda: torch.autograd.grad(nk.bank_info_nce(q, p, bank, temperature=0.07, backend=b), (q, p)),
    )


def _bank_topk_impls(i: dict) -> dict:
    import negkernels as nk

    q, bank = i["query"].detach(), i["bank"]

    def eager():
        return (q @ bank.T).float().topk(64, dim=1)

    out = {"eager": eager, "compile": torch.compile(eager)}
    return kernel_impls(out, q.device, "bank_topk", lambda b: lambda: nk.bank_topk(q, bank, 64, backend=b))


def _bank_bytes(i: dict) -> int:
    # read queries, positives and the bank; write d(query) and d(positive)
    size = torch.finfo(i["dtype"]).bits // 8
    return (4 * i["n"] + i["k"]) * i["d"] * size


BENCH: list[Case] = [
    Case(
        family="contrastive",
        name="nce",
        build=_bank_inputs((4096, 65536, 128), (256, 4096, 64)),
        implementations=_info_nce_impls,
        min_bytes=_bank_bytes,
        flops=lambda i: 3 * 2 * i["n"] * i["k"] * i["d"],  # q·Bᵀ forward; recompute and G·B backward
        shape=lambda i: f"N={i['n']} K={i['k']} D={i['d']} {str(i['dtype'])[6:]}, fwd+bwd, bank without grad",
        notes="H100 target <= 0.5 ms, extra memory O(N) (today: eager 6.8 ms +3.1 GB, torch.compile 2.63 ms +1 GB; "
        "floor ~0.26 ms)",
    ),
    Case(
        family="contrastive",
        name="nce-large",
        build=_bank_inputs((16384, 131072, 256), (512, 8192, 64)),
        implementations=_info_nce_impls,
        min_bytes=_bank_bytes,
        flops=lambda i: 3 * 2 * i["n"] * i["k"] * i["d"],
        shape=lambda i: f"N={i['n']} K={i['k']} D={i['d']} {str(i['dtype'])[6:]}, fwd+bwd, bank without grad",
        notes="H100 target <= 7 ms (today: eager 57 ms +24.6 GB, torch.compile 27.7 ms +4.2 GB; floor ~4.2 ms)",
    ),
    Case(
        family="contrastive",
        name="topk64",
        build=_bank_inputs((4096, 65536, 128), (256, 4096, 64)),
        implementations=_bank_topk_impls,
        min_bytes=lambda i: (i["n"] + i["k"]) * i["d"] * (torch.finfo(i["dtype"]).bits // 8),
        flops=lambda i: 2 * i["n"] * i["k"] * i["d"],
        shape=lambda i: f"N={i['n']} K={i['k']} D={i['d']} {str(i['dtype'])[6:]}, k=64",
        notes="H100 target <= 0.3 ms",
    ),
]


def _contrastive_checks(device):
    import negkernels as nk

    configs = {
        "plain": dict(),
        "exclude/filled-count": dict(false_negatives="exclude", ids=True, bank_valid=300),
        "positive/mask/normalize/extras": dict(
            false_negatives="positive", ids=True, bank_valid="mask", normalize=True, extra=3
        ),
        "learnable-tau/bank-grad": dict(tau_grad=True, bank_grad=True, ids=True),
    }
    for config, opts in configs.items():

        def run(backend, opts=opts):
            n, k, d = (300, 1000, 96) if device.type == "cuda" else (23, 413, 20)
            q, p, bank = (torch.randn(s, d, device=device) * 0.3 for s in (n, n, k))
            kw = dict(normalize=opts.get("normalize", False), false_negatives=opts.get("false_negatives", "exclude"))
            if opts.get("ids"):
                kw.update(
                    query_ids=torch.randint(0, 9, (n,), device=device),
                    bank_ids=torch.randint(0, 9, (k,), device=device),
                )
            valid = opts.get("bank_valid")
            kw["bank_valid"] = torch.rand(k, device=device) > 0.3 if valid == "mask" else valid
            extra = torch.randn(n, opts["extra"], d, device=device) if opts.get("extra") else None
            results = []
            for dtype in (torch.float32, torch.float64):
                tau = torch.tensor(0.2, dtype=dtype, device=device, requires_grad=opts.get("tau_grad", False))
                xs = [
                    x.to(dtype).requires_grad_(i != 2 or opts.get("bank_grad", False))
                    for i, x in enumerate((q, p, bank))
                ]
                e = extra.to(dtype) if extra is not None else None
                if dtype == torch.float32:
                    loss = nk.bank_info_nce(*xs, temperature=tau, extra_negatives=e, backend=backend, **kw)
                else:
                    loss = bank_info_nce_reference(*xs, tau, extra_negatives=e, **kw)
                wrt = [x for x in xs + [tau] if x.requires_grad]
                grads = torch.autograd.grad(loss, wrt)
                results.append(
                    torch.cat([loss.reshape(1)] + [g.reshape(-1) / g.abs().max().clamp_min(1e-30) for g in grads])
                )
            return results[0], results[1]

        yield "bank_info_nce", config, run
    for config, opts in {
        "labels/self-slots/normalize": dict(normalize=True),
        "positive/mask/learnable-tau/bank-grad": dict(positive=True, tau_grad=True),
    }.items():

        def run(backend, opts=opts):
            n, k, d = (300, 1000, 96) if device.type == "cuda" else (23, 413, 20)
            q, p, bank = (torch.randn(s, d, device=device) * 0.3 for s in (n, n, k))
            labels, bank_labels = torch.randint(0, 9, (n,), device=device), torch.randint(0, 9, (k,), device=device)
            kw = dict(
                normalize=opts.get("normalize", False),
                self_slots=torch.randint(-1, k, (n,), device=device),
                bank_valid=torch.rand(k, device=device) > 0.3 if opts.get("positive") else k - 7,
            )
            results = []
            for dtype in (torch.float32, torch.float64):
                tau = torch.tensor(0.2, dtype=dtype, device=device, requires_grad=opts.get("tau_grad", False))
                query, keys = q.to(dtype).requires_grad_(), bank.to(dtype).requires_grad_(opts.get("tau_grad", False))
                positive = p.to(dtype).requires_grad_() if opts.get("positive") else None
                if dtype == torch.float32:
                    loss = nk.bank_supcon(
                        query, keys, labels, bank_labels, positive=positive, temperature=tau, backend=backend, **kw
                    )
                else:
                    loss = bank_supcon_reference(query, keys, labels, bank_labels, tau, positive=positive, **kw)
                wrt = [x for x in (query, keys, positive, tau) if x is not None and x.requires_grad]
                grads = torch.autograd.grad(loss, wrt)
                results.append(
                    torch.cat([loss.reshape(1)] + [g.reshape(-1) / g.abs().max().clamp_min(1e-30) for g in grads])
                )
            return results[0], results[1]

        yield "bank_supcon", config, run
    for config, (kk, normalize) in {"k=16": (16, False), "k=100/normalize": (100, True)}.items():

        def run_topk(backend, kk=kk, normalize=normalize):
            n, k, d = (300, 1000, 96) if device.type == "cuda" else (23, 413, 20)
            q, bank = torch.randn(n, d, device=device), torch.randn(k, d, device=device)
            values, _ = nk.bank_topk(q, bank, kk, normalize=normalize, bank_valid=k - 5, backend=backend)
            ref, _ = bank_topk_reference(q.double(), bank.double(), kk, normalize=normalize, bank_valid=k - 5)
            return values, ref

        yield "bank_topk", config, run_topk


def checks(device: torch.device):
    yield from _contrastive_checks(device)
