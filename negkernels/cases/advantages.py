"""The advantages cases: group-normalised advantages and the DisCO objective.

``BENCH``: the benchmark cases (`negkernels bench`, ``pytest benchmarks/``, the static cost).
``checks(device)``: (op, config, run) rows, where ``run(backend)`` returns (output, float64
reference[, error floor as a fraction of the largest reference entry]) (`negkernels check`, the
GPU tests, the sanitizer script).
"""

from __future__ import annotations

import torch

from ..reference.advantages import ESTIMATORS, SCALES, group_advantages_reference, group_discriminative_loss_reference
from ._case import Case, kernel_impls


def _advantage_inputs(ragged: bool):
    def build(device: torch.device, full: bool) -> dict:
        n = 131072 if full else 8192
        rewards = torch.randn(n, device=device)
        if ragged:
            # random group sizes 1..128, groups shuffled
            sizes = torch.randint(1, 129, (n,))
            ids = torch.repeat_interleave(torch.arange(n), sizes)[:n]
            ids = ids[torch.randperm(n)]
            num_groups = int(ids.max()) + 1
            ids = ids.to(device)
            return dict(rewards=rewards, group_index=ids, num_groups=num_groups, n=n)
        return dict(rewards=rewards, group_size=64, num_groups=n // 64, n=n)

    return build


def _advantage_impls(inputs: dict) -> dict:
    import negkernels as nk

    r = inputs["rewards"]
    g = inputs.get("group_size")
    ids = inputs.get("group_index")
    if ids is None:
        assert g is not None  # uniform groups: the case gives group_size instead of an index
        ids_for_ref = torch.arange(r.numel(), device=r.device) // g
    else:
        ids_for_ref = ids
    num_groups = inputs["num_groups"]

    def eager_user_code():
        # What users write today: index_add statistics, then normalise (fp32).
        zeros = torch.zeros(num_groups, device=r.device)
        count = zeros.index_add(0, ids_for_ref, torch.ones_like(r))
        mean = zeros.index_add(0, ids_for_ref, r) / count.clamp_min(1)
        d = r - mean[ids_for_ref]
        var = zeros.index_add(0, ids_for_ref, d * d) / (count - 1).clamp_min(1)
        return d / (var.sqrt()[ids_for_ref] + 1e-6)

    compiled = torch.compile(eager_user_code)
    impls = {"eager": eager_user_code, "compile": compiled}
    available = nk.available_backends(r.device, op="group_advantages")
    kwargs = dict(group_size=g) if ids is None else dict(group_index=ids, num_groups=num_groups, validate=False)
    for backend in ("triton", "cuda"):
        if backend in available and r.device.type == "cuda":
            impls[backend] = (lambda b: lambda: nk.group_advantages(r, backend=b, **kwargs))(backend)
    return impls


def _disco_inputs(device: torch.device, full: bool) -> dict:
    n = 131072 if full else 8192
    # GRPO groups of 1-16 completions, shuffled; ids drawn on the host (the "meta" device has no values)
    sizes = torch.randint(1, 17, (n,))
    ids = torch.repeat_interleave(torch.arange(n), sizes)[:n]
    ids = ids[torch.randperm(n)]
    return dict(
        scores=torch.randn(n, device=device),
        correct=(torch.rand(n) > 0.5).to(device),
        group_index=ids.to(device),
        num_groups=int(ids.max()) + 1,
        n=n,
    )


def _disco_impls(i: dict) -> dict:
    import negkernels as nk

    scores, correct, ids, groups = i["scores"], i["correct"], i["group_index"], i["num_groups"]

    def loss_and_grad(backend):
        def run():
            s = scores.detach().requires_grad_()
            loss = nk.group_discriminative_loss(
                s, correct, ids, num_groups=groups, validate=False, tau=0.5, backend=backend
            )
            return torch.autograd.grad(loss, s)

        return run

    return kernel_impls(
        {"eager": loss_and_grad("reference")}, scores.device, "group_discriminative_loss", loss_and_grad
    )


BENCH: list[Case] = [
    Case(
        family="advantages",
        name="uniform-g64",
        build=_advantage_inputs(ragged=False),
        implementations=_advantage_impls,
        min_bytes=lambda i: i["n"] * 4 * 2,  # read rewards, write advantages
        shape=lambda i: f"N={i['n']} G=64 fp32",
        notes="H100 target: one launch, <= 10 us (today: eager 21 us, torch.compile 6 us)",
    ),
    Case(
        family="advantages",
        name="ragged",
        build=_advantage_inputs(ragged=True),
        implementations=_advantage_impls,
        min_bytes=lambda i: i["n"] * (4 + 8 + 4),  # rewards, int64 ids, advantages
        shape=lambda i: f"N={i['n']} sizes 1-128 shuffled, {i['num_groups']} groups",
        notes="H100 target: one launch, <= 10 us (today: eager 104 us)",
    ),
    Case(
        family="advantages",
        name="disco",
        build=_disco_inputs,
        implementations=_disco_impls,
        min_bytes=lambda i: i["n"] * (4 + 1 + 8 + 4),  # scores, correct, int64 ids, d scores
        shape=lambda i: f"N={i['n']} sizes 1-16 shuffled, {i['num_groups']} groups, DisCO fwd+bwd",
        notes="target: one launch at the memory floor (the eager reference: index ops plus autograd)",
    ),
]


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


def checks(device: torch.device):
    yield from _advantage_checks(device)
    yield from _discriminative_checks(device)
