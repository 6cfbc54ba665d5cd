"""`negkernels check`: every available backend of every op against the float64 reference on
fresh random inputs on the current device; prints a pass/fail table, returns the failure count."""

from __future__ import annotations

import torch

from ._backend import available_backends
from ._testing import old_logp_off_edges
from .reference.advantages import ESTIMATORS, SCALES, group_advantages_reference, group_discriminative_loss_reference
from .reference.contrastive import bank_info_nce_reference, bank_supcon_reference, bank_topk_reference
from .reference.logprobs import AGGREGATIONS, LOSS_TYPES, policy_loss_reference, token_logprobs_reference


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

        def run(backend, kk=kk, normalize=normalize):
            n, k, d = (300, 1000, 96) if device.type == "cuda" else (23, 413, 20)
            q, bank = torch.randn(n, d, device=device), torch.randn(k, d, device=device)
            values, _ = nk.bank_topk(q, bank, kk, normalize=normalize, bank_valid=k - 5, backend=backend)
            ref, _ = bank_topk_reference(q.double(), bank.double(), kk, normalize=normalize, bank_valid=k - 5)
            return values, ref

        yield "bank_topk", config, run


def _kv_checks(device):
    import negkernels as nk

    from .reference.kv import retention_mass_reference, retention_scores_reference, select_retained_reference

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

        def run(backend, packed=packed):
            t = 3000 if big else 200
            lb = (-torch.rand(3, t, device=device) * 0.05).requires_grad_()
            cu = torch.tensor([0, t // 3, t // 3, t], device=device) if packed else None
            mass = nk.retention_mass(lb, cu, backend=backend)
            (g,) = torch.autograd.grad(mass.sum(), lb)
            lb64 = lb.detach().double().requires_grad_()
            ref = retention_mass_reference(lb64, cu)
            (g64,) = torch.autograd.grad(ref.sum(), lb64)
            return torch.cat([mass.reshape(-1), g.reshape(-1)]), torch.cat([ref.reshape(-1), g64.reshape(-1)])

        yield "retention_mass", config, run


def _non_finite_checks(device):
    """NaN in the data reaches the output; ±inf / NaN padding under a mask and −inf logits or
    gates never reach a gradient (the same promises tests/test_edge_cases.py holds on the CPU)."""
    import negkernels as nk

    from .reference.kv import retention_mass_reference

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


def run_checks(device: torch.device | None = None, verbose: bool = True) -> int:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for source in (
        _advantage_checks,
        _discriminative_checks,
        _logprobs_checks,
        _policy_loss_checks,
        _from_logits_checks,
        _linear_checks,
        _contrastive_checks,
        _kv_checks,
        _non_finite_checks,
    ):
        for op, config, fn in source(device):
            backends = available_backends(device, op=op)
            for backend in backends:
                try:
                    out, ref, *floor_fraction = fn(backend)
                    out, ref = out.double(), ref.double()
                    # Relative error, with a floor at 1e-3 of the largest reference entry (or the
                    # row's own fraction) so that a value that cancels to nearly 0 (a loss summed
                    # over ± terms, a matmul gradient) is judged fairly.
                    fraction = floor_fraction[0] if floor_fraction else 1e-3
                    floor = 1e-6 + fraction * ref.abs().nan_to_num(0.0).max().item() if out.numel() else 1e-6
                    err = ((out - ref).abs() / (ref.abs() + floor)).nan_to_num(0.0).max().item() if out.numel() else 0.0
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
