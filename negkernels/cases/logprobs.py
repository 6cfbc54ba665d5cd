"""The logprobs cases: token log-probs, policy losses, and both fused with the logits or the LM head.

``BENCH``: the benchmark cases (`negkernels bench`, ``pytest benchmarks/``, the static cost).
``checks(device)``: (op, config, run) rows, where ``run(backend)`` returns (output, float64
reference[, error floor as a fraction of the largest reference entry]) (`negkernels check`, the
GPU tests, the sanitizer script).
"""

from __future__ import annotations

import torch

from .._testing import old_logp_off_edges
from ..reference.logprobs import AGGREGATIONS, LOSS_TYPES, policy_loss_reference, token_logprobs_reference
from ._case import Case, kernel_dtype, kernel_impls


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
        return kernel_impls(
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
    return kernel_impls(
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
    dtype = kernel_dtype(device)
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
    return kernel_impls(
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
    return kernel_impls(
        out,
        x.device,
        "policy_loss",
        lambda b: lambda: torch.autograd.grad(nk.policy_loss(x, old, adv, mask, clip_high=0.28, backend=b).loss, x),
    )


BENCH: list[Case] = [
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
]


def _logits(device, v):
    rows = (4, 33) if device.type == "cuda" else (2, 5)
    return torch.randn(*rows, v, device=device) * 3, torch.randint(0, v, rows, device=device)


def _logprobs_checks(device):
    import negkernels as nk

    for v in (151936, 50257, 1000) if device.type == "cuda" else (37, 1001):

        def run(backend, v=v):
            logits, targets = _logits(device, v)
            x = logits.clone().requires_grad_()
            logp, entropy = nk.token_logprobs(x, targets, temperature=0.8, return_entropy=True, backend=backend)
            (logp.sum() + entropy.sum()).backward()
            x64 = logits.double().requires_grad_()
            ref_logp, ref_entropy = token_logprobs_reference(x64, targets, 0.8, True)
            (ref_logp.sum() + ref_entropy.sum()).backward()
            out = torch.cat([logp.reshape(-1), entropy.reshape(-1), x.grad.reshape(-1)])
            return out, torch.cat([ref_logp.reshape(-1), ref_entropy.reshape(-1), x64.grad.reshape(-1)])

        yield "token_logprobs", f"V={v} (logp, entropy, grad)", run


def _policy_inputs(device):
    b, t = (64, 777) if device.type == "cuda" else (5, 13)
    logp = torch.randn(b, t, device=device) * 0.4 - 2
    return dict(
        logp=logp,
        old=old_logp_off_edges(logp, logp + 0.2 * torch.randn(b, t, device=device)),
        ref=logp + 0.2 * torch.randn(b, t, device=device),
        adv=torch.randn(b, device=device),
        mask=torch.rand(b, t, device=device) > 0.2,
    )


def _policy_loss_checks(device):
    import negkernels as nk

    for loss_type in LOSS_TYPES:
        for aggregation in AGGREGATIONS:

            def run(backend, loss_type=loss_type, aggregation=aggregation):
                i = _policy_inputs(device)
                x = i["logp"].clone().requires_grad_()
                kw = dict(loss_type=loss_type, aggregation=aggregation, kl_coef=0.1, dual_clip=3.0)
                out = nk.policy_loss(x, i["old"], i["adv"], i["mask"], ref_logp=i["ref"], backend=backend, **kw)
                (g,) = torch.autograd.grad(out.loss, x)
                x64 = i["logp"].double().requires_grad_()
                ref = policy_loss_reference(
                    x64, i["old"].double(), i["adv"].double(), i["mask"], ref_logp=i["ref"].double(), **kw
                )
                (g64,) = torch.autograd.grad(ref.loss, x64)
                # Gradients are compared relative to their largest entry (most are tiny under token-mean).
                scale = g64.abs().max().clamp_min(1e-30)
                return (
                    torch.cat([out.loss.reshape(1), torch.stack(out[1:7]), (g / scale).reshape(-1)]),
                    torch.cat([ref.loss.reshape(1), ref.metrics, (g64 / scale).reshape(-1)]),
                )

            yield "policy_loss", f"{loss_type}/{aggregation}", run


LOGITS_GRAD_FLOOR = 1e-2


def _from_logits_checks(device):
    import negkernels as nk

    for loss_type in LOSS_TYPES:

        def run(backend, loss_type=loss_type):
            logits, targets = _logits(device, 4099 if device.type == "cuda" else 41)
            logp = token_logprobs_reference(logits, targets).float()
            old = old_logp_off_edges(logp, logp + 0.2)
            adv = torch.randn(targets.shape[0], device=device)
            mask = torch.rand(targets.shape, device=device) > 0.2
            ref_logp = old - 0.1
            kw = dict(loss_type=loss_type, ref_logp=ref_logp, kl_coef=0.1, entropy_coef=0.01)
            x = logits.clone().requires_grad_()
            out = nk.policy_loss_from_logits(x, targets, old, adv, mask, backend=backend, **kw)
            (g,) = torch.autograd.grad(out.loss, x)
            x64 = logits.double().requires_grad_()
            ref = nk.policy_loss_from_logits(
                x64,
                targets,
                old.double(),
                adv.double(),
                mask,
                backend="reference",
                **{**kw, "ref_logp": ref_logp.double()},
            )
            (g64,) = torch.autograd.grad(ref.loss, x64)
            scale = g64.abs().max().clamp_min(1e-30)
            # The entropy bonus's gradient −p·(log p + H) cancels in fp32 for a logit whose log p is
            # near −H (the fp32 reference backend too): its error scales with the largest entry.
            return (
                torch.cat([out.loss.reshape(1), (g / scale).reshape(-1)]),
                torch.cat([ref.loss.reshape(1), (g64 / scale).reshape(-1)]),
                LOGITS_GRAD_FLOOR,
            )

        yield "policy_loss_from_logits", loss_type, run


# The LM head's gradients are sums over tokens (d weight) or the vocabulary (d hidden) whose terms
# largely cancel: in fp32 their error scales with the largest entry, not with each entry.
MATMUL_GRAD_FLOOR = 2e-2


def _linear_checks(device):
    import negkernels as nk

    cuda = device.type == "cuda"
    n, h, v = (132, 256, 50257) if cuda else (10, 16, 41)
    chunk = None if cuda else 4

    def lm_head():
        hidden = torch.randn(2, n // 2, h, device=device)
        weight = torch.randn(v, h, device=device) / h**0.5 * 2
        return hidden, weight, torch.randn(v, device=device) * 0.5, torch.randint(0, v, (2, n // 2), device=device)

    def compared(values, values64, grads, grads64):
        """Values and gradients flattened, each gradient scaled by its reference's largest entry."""
        scales = [g.abs().max().clamp_min(1e-30) for g in grads64]
        return (
            torch.cat([x.reshape(-1) for x in (*values, *(g / c for g, c in zip(grads, scales)))]),
            torch.cat([x.reshape(-1) for x in (*values64, *(g / c for g, c in zip(grads64, scales)))]),
            MATMUL_GRAD_FLOOR,
        )

    def run_logprobs(backend):
        hidden, weight, bias, targets = lm_head()
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        logp, ent = nk.linear_token_logprobs(
            *leaves[:2],
            targets,
            bias=leaves[2],
            temperature=0.8,
            return_entropy=True,
            chunk_size=chunk,
            backend=backend,
        )
        grads = torch.autograd.grad(logp.sum() + ent.sum(), leaves)
        leaves64 = [x.double().requires_grad_() for x in (hidden, weight, bias)]
        ref_logp, ref_ent = nk.linear_token_logprobs(
            *leaves64[:2], targets, bias=leaves64[2], temperature=0.8, return_entropy=True, backend="reference"
        )
        grads64 = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), leaves64)
        return compared((logp, ent), (ref_logp, ref_ent), grads, grads64)

    yield "linear_token_logprobs", f"N={n} H={h} V={v} (logp, entropy, grads)", run_logprobs

    for loss_type in ("ppo", "cispo", "gspo"):

        def run(backend, loss_type=loss_type):
            hidden, weight, bias, targets = lm_head()
            with torch.no_grad():
                logp = nk.linear_token_logprobs(hidden, weight, targets, bias=bias, backend="reference")
                old = old_logp_off_edges(logp, logp + 0.2)
            adv = torch.randn(2, device=device)
            mask = torch.rand(targets.shape, device=device) > 0.2
            kw = dict(loss_type=loss_type, ref_logp=old - 0.1, kl_coef=0.1, entropy_coef=0.01)
            leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
            out = nk.linear_policy_loss(
                *leaves[:2], targets, old, adv, mask, bias=leaves[2], chunk_size=chunk, backend=backend, **kw
            )
            grads = torch.autograd.grad(out.loss, leaves)
            leaves64 = [x.double().requires_grad_() for x in (hidden, weight, bias)]
            ref = nk.linear_policy_loss(
                *leaves64[:2],
                targets,
                old.double(),
                adv.double(),
                mask,
                bias=leaves64[2],
                backend="reference",
                **{**kw, "ref_logp": kw["ref_logp"].double()},
            )
            grads64 = torch.autograd.grad(ref.loss, leaves64)
            return compared((out.loss,), (ref.loss,), grads, grads64)

        yield "linear_policy_loss", f"{loss_type} N={n} H={h} V={v}", run


def _non_finite_checks(device):
    """NaN in the data reaches the output; ±inf / NaN padding under a mask and −inf logits never
    reach a gradient (the same promises tests/test_edge_cases.py holds on the CPU)."""
    import negkernels as nk

    for loss_type in LOSS_TYPES:

        def run_nan(backend, loss_type=loss_type):
            i = _policy_inputs(device)
            logp = i["logp"].clone()
            logp[1, 3] = float("nan")
            mask = i["mask"].clone()
            mask[1, 3] = True
            out = nk.policy_loss(
                logp, i["old"], i["adv"], mask, ref_logp=i["ref"], loss_type=loss_type, backend=backend
            )
            ref = policy_loss_reference(
                logp.double(),
                i["old"].double(),
                i["adv"].double(),
                mask,
                ref_logp=i["ref"].double(),
                loss_type=loss_type,
            )
            return out.loss.reshape(1), ref.loss.reshape(1)

        yield "policy_loss", f"{loss_type}/nan-in-data", run_nan

        def run_padding(backend, loss_type=loss_type):
            i = _policy_inputs(device)
            pad = torch.tensor(float("-inf"), device=device)
            old, ref_logp = (torch.where(i["mask"], i[k], pad) for k in ("old", "ref"))
            x = torch.where(i["mask"], i["logp"], pad).requires_grad_()
            out = nk.policy_loss(
                x, old, i["adv"], i["mask"], ref_logp=ref_logp, loss_type=loss_type, kl_coef=0.1, backend=backend
            )
            (g,) = torch.autograd.grad(out.loss, x)
            x64 = i["logp"].double().requires_grad_()
            ref = policy_loss_reference(
                x64,
                i["old"].double(),
                i["adv"].double(),
                i["mask"],
                ref_logp=i["ref"].double(),
                loss_type=loss_type,
                kl_coef=0.1,
            )
            (g64,) = torch.autograd.grad(ref.loss, x64)
            scale = g64.abs().max().clamp_min(1e-30)
            return (
                torch.cat([out.loss.reshape(1), (g / scale).reshape(-1)]),
                torch.cat([ref.loss.reshape(1), (g64 / scale).reshape(-1)]),
            )

        yield "policy_loss", f"{loss_type}/-inf-padding", run_padding

    def run_impossible_token(backend):
        logits, targets = _logits(device, 4099 if device.type == "cuda" else 41)
        logits[:, ::7] = float("-inf")
        targets = targets // 7 * 7 + 1
        x = logits.clone().requires_grad_()
        logp, ent = nk.token_logprobs(x, targets, return_entropy=True, backend=backend)
        (g,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
        x64 = logits.double().requires_grad_()
        logp64, ent64 = token_logprobs_reference(x64, targets, 1.0, True)
        (g64,) = torch.autograd.grad(logp64.sum() + ent64.sum(), x64)
        return (
            torch.cat([t.reshape(-1) for t in (logp, ent, g)]),
            torch.cat([t.reshape(-1) for t in (logp64, ent64, g64)]),
        )

    yield "token_logprobs", "-inf logits/entropy grad", run_impossible_token


def checks(device: torch.device):
    yield from _logprobs_checks(device)
    yield from _policy_loss_checks(device)
    yield from _from_logits_checks(device)
    yield from _linear_checks(device)
    yield from _non_finite_checks(device)
