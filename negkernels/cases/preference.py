"""The preference cases: pairwise preference losses on log-probs and fused with the LM head.

``BENCH``: the benchmark cases (`negkernels bench`, ``pytest benchmarks/``, the static cost).
``checks(device)``: (op, config, run) rows, where ``run(backend)`` returns (output, float64
reference[, error floor as a fraction of the largest reference entry]).
"""

from __future__ import annotations

import torch

from ..reference.preference import PREFERENCE_LOSS_TYPES
from ._case import Case, kernel_dtype, kernel_impls

BETA = 0.1


def _dpo_lm_head_inputs(device: torch.device, full: bool) -> dict:
    # 2×4 sequences × 1024 tokens on an H4096 / V151936 head (a Qwen-7B-sized DPO micro-batch)
    pairs, t, h, v = (4, 1024, 4096, 151936) if full else (2, 48, 64, 4099)
    dtype = kernel_dtype(device)
    n = 2 * pairs * t
    hidden = torch.randn(2 * pairs, t, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h**0.5 * 2).to(dtype).requires_grad_()
    ref_hidden = (hidden.detach() + 0.05 * torch.randn_like(hidden)).to(dtype)
    ref_weight = weight.detach().clone()
    targets = torch.randint(0, v, (2 * pairs, t), device=device)
    mask = torch.rand(2 * pairs, t, device=device) > 0.1
    targets_ignored = torch.where(mask, targets, torch.full_like(targets, -100))
    return dict(
        hidden=hidden,
        weight=weight,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        targets=targets_ignored,
        mask=mask,
        pairs=pairs,
        t=t,
        n=n,
        h=h,
        v=v,
        dtype=dtype,
    )


def _dpo_lm_head_impls(i: dict) -> dict:
    import negkernels as nk

    hidden, weight, ref_hidden, ref_weight, targets, mask = (
        i[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight", "targets", "mask")
    )

    def sequence_logps(hid, w):
        # What trainers run today (TRL's DPOTrainer): full logits, an fp32 log-softmax, a gather.
        logp = torch.log_softmax((hid @ w.t()).float(), -1)
        token = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (token * mask).sum(-1)

    def eager_loss(hid, w):
        logps = sequence_logps(hid, w)
        with torch.no_grad():
            ref = sequence_logps(ref_hidden, ref_weight)
        c, r = logps.chunk(2)
        rc, rr = ref.chunk(2)
        return -torch.nn.functional.logsigmoid(BETA * ((c - rc) - (r - rr))).mean()

    compiled_loss = torch.compile(eager_loss)
    out = {
        "eager": lambda: torch.autograd.grad(eager_loss(hidden, weight), (hidden, weight)),
        "compile": lambda: torch.autograd.grad(compiled_loss(hidden, weight), (hidden, weight)),
    }
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:  # Liger is optional: its row is left out
        LigerFusedLinearDPOLoss = None
    if LigerFusedLinearDPOLoss is not None:
        liger = LigerFusedLinearDPOLoss(beta=BETA, compiled=hidden.device.type == "cuda", use_ref_model=True)

        def liger_step():
            loss = liger(weight, hidden, targets, ref_input=ref_hidden, ref_weight=ref_weight)[0]
            return torch.autograd.grad(loss, (hidden, weight))

        out["liger"] = liger_step
    return kernel_impls(
        out,
        hidden.device,
        "preference_loss",
        lambda b: (
            lambda: torch.autograd.grad(
                nk.linear_preference_loss(
                    hidden,
                    weight,
                    targets,
                    mask,
                    ref_hidden=ref_hidden,
                    ref_weight=ref_weight,
                    beta=BETA,
                    validate=False,
                    backend=b,
                ).loss,
                (hidden, weight),
            )
        ),
    )


def _preference_inputs(device: torch.device, full: bool) -> dict:
    b, t = (256, 4096) if full else (16, 256)
    c = (torch.randn(b, t, device=device) * 0.3 - 2).requires_grad_()
    r = (torch.randn(b, t, device=device) * 0.3 - 2).requires_grad_()
    return dict(
        chosen=c,
        rejected=r,
        ref_chosen=c.detach() + 0.05 * torch.randn(b, t, device=device),
        ref_rejected=r.detach() + 0.05 * torch.randn(b, t, device=device),
        chosen_mask=torch.rand(b, t, device=device) > 0.1,
        rejected_mask=torch.rand(b, t, device=device) > 0.1,
        b=b,
        t=t,
    )


def _preference_impls(i: dict) -> dict:
    import negkernels as nk

    c, r, rc, rr, mc, mr = (
        i[k] for k in ("chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_mask", "rejected_mask")
    )

    def eager_loss(c, r):
        h = ((c - rc) * mc).sum(-1) - ((r - rr) * mr).sum(-1)
        return -torch.nn.functional.logsigmoid(BETA * h).mean()

    compiled_loss = torch.compile(eager_loss)
    out = {
        "eager": lambda: torch.autograd.grad(eager_loss(c, r), (c, r)),
        "compile": lambda: torch.autograd.grad(compiled_loss(c, r), (c, r)),
    }

    def ours(backend):
        def run():
            loss = nk.preference_loss(c, r, rc, rr, chosen_mask=mc, rejected_mask=mr, beta=BETA, backend=backend)
            return torch.autograd.grad(loss.loss, (c, r))

        return run

    return kernel_impls(out, c.device, "preference_loss", ours)


def _token_bytes(i: dict) -> int:
    # read chosen, rejected, both references (fp32) and both masks (bool); write both gradients (fp32)
    return i["b"] * i["t"] * (4 * 4 + 2 + 2 * 4)


BENCH: list[Case] = [
    Case(
        family="preference",
        name="dpo-tokens",
        build=_preference_inputs,
        implementations=_preference_impls,
        min_bytes=_token_bytes,
        shape=lambda i: f"{i['b']} pairs x {i['t']} tokens fp32, DPO sigmoid, fwd+bwd",
        notes="target: one launch at the memory floor (eager: a dozen elementwise and reduction kernels)",
    ),
    Case(
        family="linear-dpo",
        name="fwd+bwd",
        build=_dpo_lm_head_inputs,
        implementations=_dpo_lm_head_impls,
        # read policy and reference hidden states and the two LM heads, write d hidden and d weight
        min_bytes=lambda i: (3 * i["n"] + 3 * i["v"]) * i["h"] * (torch.finfo(i["dtype"]).bits // 8),
        # policy logits, d hidden, d weight, and the reference model's logits
        flops=lambda i: 4 * 2 * i["n"] * i["h"] * i["v"],
        shape=lambda i: f"2x{i['pairs']} seqs x {i['t']} H={i['h']} V={i['v']} {str(i['dtype'])[6:]}, DPO, ref head",
        notes="H100 target: within 5% of the LM-head matmul floor and <= 2 GB extra memory "
        "(eager materialises 2x{8192 x 151936} logits: bf16 and fp32, ~7.5 GB)",
    ),
]


def _preference_checks(device):
    import negkernels as nk

    cuda = device.type == "cuda"
    b, t_w, t_l = (37, 517, 389) if cuda else (5, 19, 13)
    for loss_type in PREFERENCE_LOSS_TYPES:

        def run(backend, loss_type=loss_type):
            c = torch.randn(b, t_w, device=device) * 0.4 - 1.5
            r = torch.randn(b, t_l, device=device) * 0.4 - 1.5
            rc = c + 0.1 * torch.randn_like(c)
            rr = r + 0.1 * torch.randn_like(r)
            mc = torch.rand(b, t_w, device=device) > 0.2
            mr = torch.rand(b, t_l, device=device) > 0.2
            kw = dict(
                loss_type=loss_type, beta=0.5, label_smoothing=0.1 if loss_type in ("exo_pair", "robust") else 0.0
            )
            kw |= dict(chosen_mask=mc, rejected_mask=mr, reduction="none")
            if loss_type == "npo":
                kw["npo_token_calibration"] = True

            def loss_and_grads(dtype, be):
                leaves = [x.to(dtype).requires_grad_() for x in (c, r)]
                out = nk.preference_loss(*leaves, rc.to(dtype), rr.to(dtype), backend=be, **kw)
                grads = torch.autograd.grad(out.loss.sum(), leaves, allow_unused=True)
                grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]
                return torch.cat([out.loss, out.chosen_rewards, out.rejected_rewards, *(g.reshape(-1) for g in grads)])

            return loss_and_grads(torch.float32, backend), loss_and_grads(torch.float64, "reference")

        yield "preference_loss", f"{loss_type} B={b} T={t_w}/{t_l}", run


def _linear_preference_checks(device):
    import negkernels as nk

    from .logprobs import MATMUL_GRAD_FLOOR

    cuda = device.type == "cuda"
    pairs, t, h, v = (3, 67, 256, 50257) if cuda else (2, 5, 16, 41)
    for loss_type in ("sigmoid", "orpo", "simpo"):

        def run(backend, loss_type=loss_type):
            hidden = torch.randn(2 * pairs, t, h, device=device)
            weight = torch.randn(v, h, device=device) / h**0.5 * 2
            ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
            targets = torch.randint(0, v, (2 * pairs, t), device=device)
            mask = torch.rand(2 * pairs, t, device=device) > 0.2

            def loss_and_grads(dtype, be):
                leaves = [x.to(dtype).requires_grad_() for x in (hidden, weight)]
                out = nk.linear_preference_loss(
                    *leaves, targets, mask, ref_hidden=ref_hidden.to(dtype), loss_type=loss_type, backend=be
                )
                grads = torch.autograd.grad(out.loss, leaves)
                return out.loss, grads

            loss, grads = loss_and_grads(torch.float32, backend)
            loss64, grads64 = loss_and_grads(torch.float64, "reference")
            scales = [g.abs().max().clamp_min(1e-30) for g in grads64]
            got = torch.cat([loss.reshape(1), *(g.reshape(-1) / s for g, s in zip(grads, scales))])
            want = torch.cat([loss64.reshape(1), *(g.reshape(-1) / s for g, s in zip(grads64, scales))])
            return got, want, MATMUL_GRAD_FLOOR

        yield "linear_preference_loss", f"{loss_type} 2x{pairs}x{t} H={h} V={v}", run


def checks(device: torch.device):
    yield from _preference_checks(device)
    yield from _linear_preference_checks(device)
