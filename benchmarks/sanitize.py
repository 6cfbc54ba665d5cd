"""Run every GPU kernel at small, odd shapes (forward and backward, every kernel backend), for
`compute-sanitizer` to watch: out-of-bounds accesses, races, uninitialised reads.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize.py

First every row of the families' check tables (negkernels.cases, what `negkernels check` runs,
each compared with its float64 reference), then the calls below, which reach the options the
tables leave out (in-place backward, packed sequences with an empty one, IS weights, fp32 LM head,
bank extras). ``--device=cpu`` runs the calls below on the Triton interpreter, a smoke test of this
script (``--skip-table``: the table's rows run under the interpreter in tests/test_cli.py).
"""

from __future__ import annotations

import sys

import torch

import negkernels as nk
from negkernels.cases import checks
from negkernels.check import TOLERANCE, run_row


def main(cuda_only: bool = False, device: str = "cuda", table: bool = True) -> int:
    dev = torch.device(device)
    backends = ["cuda"] if cuda_only else ["triton", "cuda"]
    ran = []

    def available(op):
        return [b for b in backends if b in nk.available_backends(dev, op=op)]

    failures = 0
    if table:
        for op, config, run in checks(dev):
            for b in available(op):
                err = run_row(run, b)
                failures += err > TOLERANCE
                ran.append(f"{op}[{config}]/{b}" + ("" if err <= TOLERANCE else f" FAILED ({err:.2e})"))

    rewards = torch.randn(1003, device=dev)
    ids = torch.randint(0, 57, (1003,), device=dev)
    for b in available("group_advantages"):
        nk.group_advantages(rewards[:1001], group_size=7, backend=b)
        nk.group_advantages(rewards, ids, scale="whiten", backend=b)
        ran.append(f"group_advantages/{b}")

    logits = torch.randn(3, 6, 1001, device=dev, dtype=torch.bfloat16)
    targets = torch.randint(0, 1001, (3, 5), device=dev)
    for b in available("token_logprobs"):
        x = logits.clone().requires_grad_()
        logp, ent = nk.token_logprobs(x[:, :-1], targets, return_entropy=True, backend=b)
        (logp.sum() + ent.sum()).backward()
        y = logits.clone().requires_grad_()
        work = y * 1
        nk.token_logprobs(
            work, torch.randint(0, 1001, (3, 6), device=dev), inplace_backward=True, backend=b
        ).sum().backward()
        ran.append(f"token_logprobs/{b}")

    logp = torch.randn(5, 37, device=dev) - 2
    old = logp + 0.1 * torch.randn_like(logp)
    mask = torch.rand(5, 37, device=dev) > 0.2
    cu = torch.tensor([0, 10, 10, 47, 100, 185], device=dev)
    for b in available("policy_loss"):
        for loss_type in ("ppo", "gspo", "cispo", "sapo", "gpg", "npo"):
            x = logp.clone().requires_grad_()
            nk.policy_loss(
                x,
                old,
                torch.randn(5, device=dev),
                mask,
                ref_logp=old,
                kl_coef=0.1,
                loss_type=loss_type,
                is_weights=torch.rand(5, 37, device=dev),
                aggregation="seq-mean-token-mean",
                backend=b,
            ).loss.backward()
            xp = logp.reshape(-1).clone().requires_grad_()
            nk.policy_loss(
                xp,
                old.reshape(-1),
                torch.randn(5, device=dev),
                mask.reshape(-1),
                cu_seqlens=cu,
                ref_logp=old.reshape(-1),
                loss_type=loss_type,
                backend=b,
            ).loss.backward()
        ran.append(f"policy_loss/{b}")

    old_l = torch.randn(3, 5, device=dev) - 7
    for b in available("policy_loss_from_logits"):
        for loss_type in ("ppo", "gspo"):
            for inplace in (False, True):
                x = logits.clone().requires_grad_()
                out = nk.policy_loss_from_logits(
                    x[:, :-1] * 1 if inplace else x[:, :-1],
                    targets,
                    old_l,
                    torch.randn(3, device=dev),
                    loss_type=loss_type,
                    return_entropy=True,
                    inplace_backward=inplace,
                    backend=b,
                )
                out.loss.backward()
        ran.append(f"policy_loss_from_logits/{b}")
    hidden = torch.randn(3, 5, 48, device=dev, dtype=torch.bfloat16)
    head = torch.randn(1001, 48, device=dev, dtype=torch.bfloat16) * 0.2
    head_bias = torch.randn(1001, device=dev, dtype=torch.bfloat16)
    for b in available("linear_policy_loss"):
        for fp32_lm_head in (False, True):
            h, w, bias = (t.clone().requires_grad_() for t in (hidden, head, head_bias))
            logp, ent = nk.linear_token_logprobs(
                h, w, targets, bias=bias, return_entropy=True, fp32_lm_head=fp32_lm_head, chunk_size=4, backend=b
            )
            (logp.sum() + ent.sum()).backward()
            for loss_type in ("ppo", "gspo"):
                h, w, bias = (t.clone().requires_grad_() for t in (hidden, head, head_bias))
                nk.linear_policy_loss(
                    h,
                    w,
                    targets,
                    old_l,
                    torch.randn(3, device=dev),
                    bias=bias,
                    loss_type=loss_type,
                    fp32_lm_head=fp32_lm_head,
                    chunk_size=4,
                    backend=b,
                ).loss.backward()
        ran.append(f"linear_token_logprobs+linear_policy_loss/{b}")
    q = torch.randn(37, 40, device=dev, dtype=torch.bfloat16)
    bank = torch.randn(203, 40, device=dev, dtype=torch.bfloat16)
    extra = torch.randn(37, 3, 40, device=dev, dtype=torch.bfloat16)
    qid, bid = torch.randint(0, 9, (37,), device=dev), torch.randint(0, 9, (203,), device=dev)
    for b in available("bank_info_nce"):
        for fn, valid, normalize in (("exclude", 150, False), ("positive", torch.rand(203, device=dev) > 0.4, True)):
            xs = [t.clone().requires_grad_() for t in (q, q.flip(0), bank, extra)]
            tau = torch.tensor(0.1, device=dev, requires_grad=True)
            nk.bank_info_nce(
                xs[0],
                xs[1],
                xs[2],
                temperature=tau,
                normalize=normalize,
                query_ids=qid,
                bank_ids=bid,
                false_negatives=fn,
                bank_valid=valid,
                extra_negatives=xs[3],
                backend=b,
            ).backward()
        ran.append(f"bank_info_nce/{b}")
    for b in available("bank_topk"):
        nk.bank_topk(q, bank, 70, bank_valid=199, backend=b)
        nk.bank_topk(q, bank, 5, bank_valid=torch.rand(203, device=dev) > 0.5, normalize=True, backend=b)
        ran.append(f"bank_topk/{b}")
    scores = torch.randn(3, 5, 1001, device=dev)
    keys = torch.randn(3, 5, 1001, 72, device=dev, dtype=torch.bfloat16)
    log_beta = -torch.rand(3, 5, 1001, device=dev)
    positions = torch.arange(1001, device=dev)
    for b in available("select_retained"):
        nk.select_retained(scores, 300, sink=4, window=16, lengths=torch.tensor([1001, 17, 0], device=dev), backend=b)
        ran.append(f"select_retained/{b}")
    for b in available("evict"):
        nk.evict(keys, keys.flip(2), log_beta, positions, 1001, 257, sink=1, window=7, backend=b)
        nk.evict(
            keys,
            keys,
            log_beta,
            positions,
            torch.tensor([1001, 1500, 2000], device=dev),
            99,
            lengths=torch.tensor([1001, 40, 99], device=dev),
            key_norm_weight=0.5,
            backend=b,
        )
        ran.append(f"evict/{b}")
    for b in available("compact_kv"):
        indices = nk.select_retained(scores, 500)
        nk.compact_kv_(keys.clone(), keys.clone(), indices, log_beta.clone(), backend=b)
        ran.append(f"compact_kv_/{b}")
    for b in available("retention_mass"):
        lb = log_beta[0].clone().requires_grad_()
        nk.retention_mass(lb, torch.tensor([0, 300, 1001], device=dev), backend=b).sum().backward()
        ran.append(f"retention_mass/{b}")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("ran:", ", ".join(ran))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(
        main(
            cuda_only="--cuda-only" in sys.argv,
            device="cpu" if "--device=cpu" in sys.argv else "cuda",
            table="--skip-table" not in sys.argv,
        )
    )
