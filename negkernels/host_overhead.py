"""`negkernels bench --host`: what each fused op costs on the host before any kernel runs.

Every Triton launch is replaced by a no-op (``JITFunction.__getitem__`` and the interpreter's
``InterpretedFunction.__getitem__`` return a callable that does nothing), so what is timed is
the Python around the kernels: validation, option plumbing, torch's custom-op dispatch,
autograd, output allocation and any host reads. One call on tiny CPU tensors, one thread,
median of single calls in thread CPU time, reported as a multiple of ``F.cross_entropy`` forward + backward on a
[16, 64] tensor timed in the same run (the cheapest loss a user would call). A GPU does not
change these figures much: a launch costs the host a few µs more, the rest is the same code.

Targets (the multiple of the baseline an op may cost): a fused op must not lose to the eager
code it replaces before its kernels even start.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HostCase:
    name: str
    build: Callable[[], Callable[[], object]]  # () -> one call (inputs made once, outside the timing)
    target: float | None  # at most this multiple of the baseline; None: shown for comparison


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel launch a no-op, and CPU tensors routed to the Triton backend."""
    import triton.runtime.jit as jit

    patched = [(jit.JITFunction, jit.JITFunction.__getitem__)]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        patched.append((InterpretedFunction, InterpretedFunction.__getitem__))
    except ImportError:  # pragma: no cover - every supported Triton has the interpreter
        pass
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for cls, _ in patched:
        cls.__getitem__ = lambda self, grid: _noop
    try:
        yield
    finally:
        for cls, original in patched:
            cls.__getitem__ = original
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _sample_pair_us(base, fn, calls: int, block: int = 10) -> tuple[float, float]:
    """The medians of ``calls`` single calls of ``base`` and of ``fn``, taken in alternating
    blocks of ``block`` calls (so both see the same spell of a shared machine, and the median
    still sees warm calls: the first call of a block finds the other's code in the caches), in
    this thread's CPU time, garbage collection paused."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    base_s: list[float] = []
    fn_s: list[float] = []
    try:
        for _ in range(max(calls // block, 1)):
            for f, samples in ((base, base_s), (fn, fn_s)):
                for _ in range(block):
                    t0 = time.thread_time()
                    f()
                    samples.append(time.thread_time() - t0)
    finally:
        if enabled:
            gc.enable()
    return statistics.median(base_s) * 1e6, statistics.median(fn_s) * 1e6


def _cross_entropy_baseline():
    logits = torch.randn(16, 64, requires_grad=True)
    target = torch.randint(0, 64, (16,))

    def call():
        F.cross_entropy(logits, target).backward()

    return call


def _cases() -> list[HostCase]:
    import negkernels as nk

    def advantages(ragged: bool):
        def build():
            rewards = torch.randn(4096)
            if ragged:
                ids = torch.randint(0, 512, (4096,))
                return lambda: nk.group_advantages(rewards, ids, num_groups=512, validate=False, backend="triton")
            return lambda: nk.group_advantages(rewards, group_size=8, backend="triton")

        return build

    def token_logprobs():
        logits = torch.randn(4, 8, 64)
        targets = torch.randint(0, 64, (4, 8))
        return lambda: nk.token_logprobs(logits, targets, validate=False, backend="triton")

    def grpo_inputs():
        b, t = 4, 32
        logp = torch.randn(b, t, requires_grad=True)
        return logp, torch.randn(b, t), torch.randn(b), torch.rand(b, t) > 0.2

    def policy_loss(backend="triton"):
        def build():
            logp, old, adv, mask = grpo_inputs()
            return lambda: nk.policy_loss(logp, old, adv, mask, backend=backend).loss.backward()

        return build

    def eager_grpo():
        logp, old, adv, mask = grpo_inputs()

        def call():
            ratio = torch.exp(logp - old)
            a = adv.unsqueeze(-1)
            surrogate = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
            m = mask.float()
            loss = -(surrogate * m).sum() / m.sum().clamp_min(1)
            clipped = ((ratio < 0.8) & (a < 0)) | ((ratio > 1.2) & (a > 0))
            (clipped.float() * m).sum() / m.sum().clamp_min(1)
            loss.backward()

        return call

    def from_logits():
        logits = torch.randn(4, 8, 64, requires_grad=True)
        targets = torch.randint(0, 64, (4, 8))
        old, adv = torch.randn(4, 8), torch.randn(4)
        mask = torch.rand(4, 8) > 0.2
        return lambda: nk.policy_loss_from_logits(
            logits, targets, old, adv, mask, validate=False, backend="triton"
        ).loss.backward()

    def evict():
        b, h, s, d = 2, 2, 64, 16
        keys, values = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
        log_beta = -torch.rand(b, h, s)
        positions = torch.arange(s)
        return lambda: nk.evict(keys, values, log_beta, positions, s, 32, backend="triton")

    def topk():
        query, bank = torch.randn(8, 32), torch.randn(256, 32)
        return lambda: nk.bank_topk(query, bank, 16, backend="triton")

    def discriminative():
        scores = torch.randn(4096, requires_grad=True)
        correct, ids = torch.rand(4096) > 0.5, torch.randint(0, 512, (4096,))
        return lambda: nk.group_discriminative_loss(
            scores, correct, ids, num_groups=512, validate=False, backend="triton"
        ).backward()

    def info_nce():
        query = torch.randn(8, 32, requires_grad=True)
        positive, bank = torch.randn(8, 32), torch.randn(256, 32)
        return lambda: nk.bank_info_nce(query, positive, bank, backend="triton").backward()

    def supcon():
        query = torch.randn(8, 32, requires_grad=True)
        bank = torch.randn(256, 32)
        labels, bank_labels = torch.randint(0, 4, (8,)), torch.randint(0, 4, (256,))
        return lambda: nk.bank_supcon(query, bank, labels, bank_labels, backend="triton").backward()

    def preference_inputs():
        b, t = 4, 32
        chosen, rejected = (-torch.rand(b, t)).requires_grad_(), (-torch.rand(b, t)).requires_grad_()
        refs = -torch.rand(b), -torch.rand(b)
        return chosen, rejected, refs, torch.rand(b, t) > 0.2, torch.rand(b, t) > 0.2

    def preference():
        chosen, rejected, refs, chosen_mask, rejected_mask = preference_inputs()
        return lambda: nk.preference_loss(
            chosen, rejected, *refs, chosen_mask=chosen_mask, rejected_mask=rejected_mask, backend="triton"
        ).loss.backward()

    def eager_dpo():
        chosen, rejected, (ref_c, ref_r), chosen_mask, rejected_mask = preference_inputs()

        def call():
            h = ((chosen * chosen_mask).sum(-1) - ref_c) - ((rejected * rejected_mask).sum(-1) - ref_r)
            loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
            rewards_c, rewards_r = 0.1 * ((chosen * chosen_mask).sum(-1) - ref_c), 0.1 * h
            (rewards_c > rewards_r).float().mean()
            loss.backward()

        return call

    return [
        HostCase("group_advantages uniform, 4096 rewards", advantages(False), 1.5),
        HostCase("group_advantages ragged, 4096 rewards", advantages(True), 1.5),
        HostCase("token_logprobs fwd", token_logprobs, 1.5),
        HostCase("evict", evict, 2.0),
        HostCase("bank_topk", topk, 2.0),
        HostCase("policy_loss fwd+bwd", policy_loss(), 3.0),
        HostCase("policy_loss_from_logits fwd+bwd", from_logits, 3.0),
        HostCase("bank_info_nce fwd+bwd", info_nce, 3.0),
        HostCase("bank_supcon fwd+bwd", supcon, None),
        HostCase("group_discriminative_loss fwd+bwd", discriminative, 3.0),
        HostCase("preference_loss fwd+bwd", preference, 3.0),
        HostCase("eager GRPO loss fwd+bwd (for comparison)", eager_grpo, None),
        HostCase("eager DPO loss fwd+bwd (for comparison)", eager_dpo, None),
    ]


def measure(reps: int = 300, rounds: int = 10) -> dict:
    """{"baseline_us": ..., "rows": [{"op", "us", "ratio", "target"}]} with every launch stubbed.

    Interleaved: each round times every op, ``reps // rounds`` calls, in blocks of 10 that
    alternate with blocks of baseline calls, and an op's ratio is the median over rounds of its
    median over the baseline's in that round, so a slow spell of a shared machine (the baseline
    alone moves by half between runs on one) scales both sides of a ratio alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with stubbed_launches():
            cases = _cases()
            calls = [case.build() for case in cases]
            baseline = _cross_entropy_baseline()
            for fn in [baseline, *calls]:
                for _ in range(10):
                    fn()
            per_round = max(reps // rounds, 5)
            base_us: list[list[float]] = [[] for _ in cases]
            op_us: list[list[float]] = [[] for _ in cases]
            for _ in range(rounds):
                for before, times, fn in zip(base_us, op_us, calls):
                    b, t = _sample_pair_us(baseline, fn, per_round)
                    before.append(b)
                    times.append(t)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for case, before, times in zip(cases, base_us, op_us):
        ratios = [t / b for t, b in zip(times, before)]
        rows.append(
            dict(op=case.name, us=statistics.median(times), ratio=statistics.median(ratios), target=case.target)
        )
    return dict(baseline_us=statistics.median(t for before in base_us for t in before), rows=rows)


def print_table(result: dict) -> None:
    base = result["baseline_us"]
    print(
        f"host overhead per call, every kernel launch a no-op (CPU, 1 thread); baseline "
        f"F.cross_entropy fwd+bwd [16, 64] = {base:.1f} µs"
    )
    header = f"{'op (kernel path)':<44} {'µs':>8} {'× baseline':>11} {'target':>7}"
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        target = "-" if row["target"] is None else f"≤ {row['target']:g}"
        flag = "" if row["target"] is None or row["ratio"] <= row["target"] else "  over target"
        print(f"{row['op']:<44} {row['us']:8.1f} {row['ratio']:11.2f} {target:>7}{flag}")
