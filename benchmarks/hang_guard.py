"""The kernels that synchronise their programs on the device, once each, at their bench shapes:
the grid-barrier advantages and DisCO kernels and the policy-loss kernels whose last program finishes the
reduction. A kernel that deadlocks stops the process here, under a timeout, before anything
else runs. Prints each one's device time (CUDA events) and whether its result matches the
reference.

    timeout 60 python3 benchmarks/hang_guard.py
"""

from __future__ import annotations

import faulthandler
import sys

import torch

import negkernels as nk


def timed(name: str, fn, check) -> bool:
    fn()  # compile
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    out = fn()
    end.record()
    end.synchronize()
    ok = bool(check(out))
    print(f"{name:<44} {begin.elapsed_time(end):9.4f} ms  {'ok' if ok else 'MISMATCH'}", flush=True)
    return ok


def main() -> int:
    faulthandler.dump_traceback_later(55, exit=True)  # a hang prints where it is stuck
    dev = torch.device("cuda")
    ok = True
    n = 131072
    rewards = torch.randn(n, device=dev)
    sizes = torch.randint(1, 129, (n,))
    ids = torch.repeat_interleave(torch.arange(n), sizes)[:n][torch.randperm(n)]
    groups = int(ids.max()) + 1
    ids = ids.to(dev)
    for scale in ("group", "whiten"):
        ok &= timed(
            f"group_advantages ragged N={n} scale={scale}",
            lambda s=scale: nk.group_advantages(
                rewards, ids, num_groups=groups, scale=s, validate=False, backend="triton"
            ),
            lambda a, s=scale: torch.allclose(
                a.double(),
                nk.group_advantages(rewards.double(), ids, num_groups=groups, scale=s, backend="reference"),
                atol=1e-4,
            ),
        )
    # the DisCO kernel: the same grid barrier, four phases
    scores, correct = torch.randn(n, device=dev), torch.rand(n, device=dev) > 0.5
    disco_ref = nk.group_discriminative_loss(
        scores.double(), correct, ids, num_groups=groups, tau=0.5, backend="reference"
    )
    ok &= timed(
        f"group_discriminative_loss ragged N={n}",
        lambda: nk.group_discriminative_loss(
            scores, correct, ids, num_groups=groups, tau=0.5, validate=False, backend="triton"
        ),
        lambda loss: abs(float(loss) - float(disco_ref)) <= 1e-4 * max(1.0, abs(float(disco_ref))),
    )
    b, t = 1024, 8192
    logp = (torch.randn(b, t, device=dev) * 0.3 - 2).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(b, t, device=dev)
    adv, mask = torch.randn(b, device=dev), torch.rand(b, t, device=dev) > 0.1
    ref = nk.policy_loss(logp.double(), old.double(), adv.double(), mask, backend="reference").loss
    ok &= timed(
        f"policy_loss B={b} T={t}",
        lambda: nk.policy_loss(logp, old, adv, mask, backend="triton").loss,
        lambda loss: abs(float(loss) - float(ref)) <= 1e-4 * max(1.0, abs(float(ref))),
    )
    logits = torch.randn(4, 512, 151936, device=dev, dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 151936, (4, 512), device=dev)
    old2 = torch.full((4, 512), -12.0, device=dev)
    adv2, mask2 = torch.randn(4, device=dev), torch.rand(4, 512, device=dev) > 0.1
    ref2 = nk.policy_loss_from_logits(logits.float(), targets, old2, adv2, mask2, backend="reference").loss
    ok &= timed(
        "policy_loss_from_logits 4x512x151936 bf16",
        lambda: nk.policy_loss_from_logits(logits, targets, old2, adv2, mask2, validate=False, backend="triton").loss,
        lambda loss: abs(float(loss) - float(ref2)) <= 1e-3 * max(1.0, abs(float(ref2))),
    )
    faulthandler.cancel_dump_traceback_later()
    print("hang guard:", "every kernel returned and matched" if ok else "a kernel returned a wrong result")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
