"""Benchmark cases, defined once: `negkernels bench` and `pytest benchmarks/ --benchmark-only` both use them.

A case builds its inputs on a device (full size on a GPU, small on the CPU), names the bytes it
must move at least (the memory floor) and/or its flops, and maps implementation names to
zero-argument callables. Implementations: "eager" (the plain-PyTorch reference), "compile"
(torch.compile of the same), "triton", "cuda", and a peer library where installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Case:
    family: str
    name: str
    build: Callable[[torch.device, bool], dict]  # (device, full_size) -> inputs
    implementations: Callable[[dict], dict[str, Callable[[], object]]]
    min_bytes: Callable[[dict], int]
    flops: Callable[[dict], int] = lambda inputs: 0
    shape: Callable[[dict], str] = lambda inputs: ""
    notes: str = ""  # the target and today's baselines, printed under the table

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"


def _kernel_dtype(device: torch.device) -> torch.dtype:
    # bf16 where kernels run (and on "meta", which benchmarks/static_cost.py uses for the GPU
    # shapes without their memory); fp32 for the CPU smoke test, whose matmuls lack bf16 speed.
    return torch.float32 if device.type == "cpu" else torch.bfloat16


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

    return _kernel_impls(
        {"eager": loss_and_grad("reference")}, scores.device, "group_discriminative_loss", loss_and_grad
    )


def _logits_inputs(device: torch.device, full: bool) -> dict:
    b, t, v = (8, 1024, 151936) if full else (2, 64, 4099)
    logits = torch.randn(b, t, v, device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, v, (b, t), device=device)
    with torch.no_grad():
        base = torch.log_softmax(logits[:, :4].float(), -1).mean()  # a plausible log-prob level
    old = base + 0.1 * torch.randn(b, t, device=device)
    return dict(
        logits=logits,
        targets=targets,
        old_logp=old,
        advantages=torch.randn(b, device=device),
        mask=torch.rand(b, t, device=device) > 0.1,
        b=b,
        t=t,
        v=v,
    )


def _selective_logprobs_eager(logits, targets):
    # What RL trainers run today: an fp32 log-softmax of the whole row, then a gather.
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _entropy_eager(logits, chunk_rows=128):
    # verl-style entropy in row chunks to bound the fp32 temporaries.
    flat = logits.reshape(-1, logits.shape[-1])
    out = [torch.distributions.Categorical(logits=c.float()).entropy() for c in flat.split(chunk_rows)]
    return torch.cat(out).view(logits.shape[:-1])


def _kernel_impls(impls: dict, device: torch.device, op: str, make) -> dict:
    import negkernels as nk

    if device.type == "cuda":
        for backend in ("triton", "cuda"):
            if backend in nk.available_backends(device, op=op):
                impls[backend] = make(backend)
    return impls


def _logprobs_impls(with_entropy: bool):
    def impls(i: dict) -> dict:
        import negkernels as nk

        x, tg = i["logits"], i["targets"]
        if with_entropy:

            def eager():
                return _selective_logprobs_eager(x, tg), _entropy_eager(x)
        else:

            def eager():
                return _selective_logprobs_eager(x, tg)

        out = {"eager": eager, "compile": torch.compile(eager)}
        return _kernel_impls(
            out,
            x.device,
            "token_logprobs",
            lambda b: lambda: nk.token_logprobs(x, tg, return_entropy=with_entropy, validate=False, backend=b),
        )

    return impls


def _grpo_from_logits_impls(i: dict) -> dict:
    import negkernels as nk

    logits, tg, old, adv, mask = i["logits"], i["targets"], i["old_logp"], i["advantages"], i["mask"]
    x = logits.detach().requires_grad_()

    def eager_loss(x):
        logp = _selective_logprobs_eager(x, tg)
        ratio = torch.exp(logp - old)
        a = adv.unsqueeze(-1)
        per_token = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        return (per_token * mask).sum() / mask.sum()

    compiled_loss = torch.compile(eager_loss)
    out = {
        "eager": lambda: torch.autograd.grad(eager_loss(x), x),
        "compile": lambda: torch.autograd.grad(compiled_loss(x), x),
    }
    return _kernel_impls(
        out,
        logits.device,
        "policy_loss_from_logits",
        lambda b: (
            lambda: torch.autograd.grad(
                nk.policy_loss_from_logits(x, tg, old, adv, mask, clip_high=0.28, validate=False, backend=b).loss, x
            )
        ),
    )


def _lm_head_inputs(device: torch.device, full: bool) -> dict:
    n, h, v = (8192, 4096, 151936) if full else (256, 64, 4099)
    dtype = _kernel_dtype(device)
    b = 8 if full else 4
    hidden = torch.randn(b, n // b, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h**0.5 * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (b, n // b), device=device)
    old = torch.full((b, n // b), -float(torch.log(torch.tensor(float(v)))), device=device) + 0.1 * torch.randn(
        b, n // b, device=device
    )
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        old_logp=old,
        advantages=torch.randn(b, device=device),
        mask=torch.rand(b, n // b, device=device) > 0.1,
        n=n,
        h=h,
        v=v,
        dtype=dtype,
    )


def _linear_grpo_impls(i: dict) -> dict:
    import negkernels as nk

    hidden, weight, tg, old, adv, mask = (
        i[k] for k in ("hidden", "weight", "targets", "old_logp", "advantages", "mask")
    )

    def eager_loss(hidden, weight):
        # What trainers run today: the full logits, an fp32 log-softmax, the clipped surrogate.
        logp = _selective_logprobs_eager(hidden @ weight.t(), tg)
        ratio = torch.exp(logp - old)
        a = adv.unsqueeze(-1)
        per_token = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        return (per_token * mask).sum() / mask.sum()

    compiled_loss = torch.compile(eager_loss)
    out = {
        "eager": lambda: torch.autograd.grad(eager_loss(hidden, weight), (hidden, weight)),
        "compile": lambda: torch.autograd.grad(compiled_loss(hidden, weight), (hidden, weight)),
    }
    return _kernel_impls(
        out,
        hidden.device,
        "linear_policy_loss",
        lambda b: (
            lambda: torch.autograd.grad(
                nk.linear_policy_loss(
                    hidden, weight, tg, old, adv, mask, clip_high=0.28, validate=False, backend=b
                ).loss,
                (hidden, weight),
            )
        ),
    )


def _policy_loss_inputs(device: torch.device, full: bool) -> dict:
    b, t = (1024, 8192) if full else (64, 512)
    logp = (torch.randn(b, t, device=device) * 0.3 - 2).requires_grad_()
    return dict(
        logp=logp,
        old_logp=logp.detach() + 0.05 * torch.randn(b, t, device=device),
        advantages=torch.randn(b, device=device),
        mask=torch.rand(b, t, device=device) > 0.1,
        b=b,
        t=t,
    )


def _policy_loss_impls(i: dict) -> dict:
    import negkernels as nk

    x, old, adv, mask = i["logp"], i["old_logp"], i["advantages"], i["mask"]

    def eager_loss(x):
        ratio = torch.exp(x - old)
        a = adv.unsqueeze(-1)
        per_token = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        clip_frac = (((ratio > 1.28) & (a > 0)) | ((ratio < 0.8) & (a < 0))).float().mul(mask).sum() / mask.sum()
        return (per_token * mask).sum() / mask.sum(), clip_frac

    compiled_loss = torch.compile(eager_loss)
    out = {
        "eager": lambda: torch.autograd.grad(eager_loss(x)[0], x),
        "compile": lambda: torch.autograd.grad(compiled_loss(x)[0], x),
    }
    return _kernel_impls(
        out,
        x.device,
        "policy_loss",
        lambda b: lambda: torch.autograd.grad(nk.policy_loss(x, old, adv, mask, clip_high=0.28, backend=b).loss, x),
    )


def _bank_inputs(sizes_full, sizes_cpu):
    def build(device: torch.device, full: bool) -> dict:
        n, k, d = sizes_full if full else sizes_cpu
        dtype = _kernel_dtype(device)
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
    return _kernel_impls(
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
    return _kernel_impls(out, q.device, "bank_topk", lambda b: lambda: nk.bank_topk(q, bank, 64, backend=b))


def _bank_bytes(i: dict) -> int:
    # read queries, positives and the bank; write d(query) and d(positive)
    size = torch.finfo(i["dtype"]).bits // 8
    return (4 * i["n"] + i["k"]) * i["d"] * size


def _kv_inputs(sizes_full, sizes_cpu):
    def build(device: torch.device, full: bool) -> dict:
        b, h, s, d, budget = sizes_full if full else sizes_cpu
        dtype = _kernel_dtype(device)
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
    return _kernel_impls(
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
    return _kernel_impls(
        out,
        lb.device,
        "retention_mass",
        lambda b: lambda: torch.autograd.grad(nk.retention_mass(lb, backend=b).sum(), lb),
    )


CASES: list[Case] = [
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
    Case(
        family="logprobs",
        name="fwd",
        build=_logits_inputs,
        implementations=_logprobs_impls(with_entropy=False),
        min_bytes=lambda i: i["b"] * i["t"] * i["v"] * 2,  # read the bf16 logits once
        shape=lambda i: f"logits {i['b']}x{i['t']}x{i['v']} bf16",
        notes="H100 target <= 0.90 ms (today: eager 10.9 ms +9.5 GB, torch.compile 1.58 ms, Liger 0.854 ms)",
    ),
    Case(
        family="logprobs",
        name="fwd-entropy",
        build=_logits_inputs,
        implementations=_logprobs_impls(with_entropy=True),
        min_bytes=lambda i: i["b"] * i["t"] * i["v"] * 2,
        shape=lambda i: f"logits {i['b']}x{i['t']}x{i['v']} bf16, log-probs + entropy",
        notes="H100 target <= 0.95 ms (today, entropy alone: eager 22.8 ms, torch.compile 2.41 ms)",
    ),
    Case(
        family="grpo-from-logits",
        name="fwd+bwd",
        build=_logits_inputs,
        implementations=_grpo_from_logits_impls,
        min_bytes=lambda i: 2 * i["b"] * i["t"] * i["v"] * 2,  # read the logits, write their gradient
        shape=lambda i: f"logits {i['b']}x{i['t']}x{i['v']} bf16, PPO clip, token-mean",
        notes="H100 target <= 1.8 ms, no memory beyond the gradient (today: eager 25.5 ms +14 GB, "
        "torch.compile 7.9 ms +4.8 GB, Liger 2.53 ms)",
    ),
    Case(
        family="linear-grpo",
        name="fwd+bwd",
        build=_lm_head_inputs,
        implementations=_linear_grpo_impls,
        # read hidden and the LM head, write their gradients
        min_bytes=lambda i: 2 * (i["n"] + i["v"]) * i["h"] * (torch.finfo(i["dtype"]).bits // 8),
        flops=lambda i: 3 * 2 * i["n"] * i["h"] * i["v"],  # logits, d hidden, d weight
        shape=lambda i: f"{i['n']} tokens H={i['h']} V={i['v']} {str(i['dtype'])[6:]}, PPO clip, token-mean",
        notes="H100 target <= 50 ms and <= 2.0 GB extra memory, d weight included (today: eager 59 ms +14.3 GB, "
        "torch.compile 50 ms +5.9 GB, Liger chunked GRPO 564 ms +3.6 GB; matmul floor ~39 ms)",
    ),
    Case(
        family="policy-loss",
        name="fwd+bwd",
        build=_policy_loss_inputs,
        implementations=_policy_loss_impls,
        # read logp, old_logp and the mask; write the gradient; the backward reads and writes it once more
        min_bytes=lambda i: i["b"] * i["t"] * (4 + 4 + 1 + 4 + 8),
        shape=lambda i: f"log-probs {i['b']}x{i['t']} fp32, PPO clip, token-mean",
        notes="H100 target <= 0.08 ms (today: eager 1.42 ms, torch.compile 0.563 ms; floor 0.056 ms)",
    ),
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


def select(family: str | None = None, case: str | None = None) -> list[Case]:
    chosen = [c for c in CASES if (family is None or c.family == family) and (case is None or case in (c.id, c.name))]
    if not chosen:
        raise SystemExit(f"no benchmark case matches family={family!r} case={case!r}; cases: {[c.id for c in CASES]}")
    return chosen
