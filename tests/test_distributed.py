"""Across ranks (gloo, 2 CPU processes): batch statistics, vocab-parallel logits and LM heads, data-parallel
normalisers and the memory bank equal the single-process result."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import negkernels as nk

WORLD = 2
# (estimator, scale, weighted): weighted whitening counts reward i (i % 7 + 1) times, like token counts.
BATCH_CASES = [
    ("grpo", "batch", False),
    ("reinforce_pp_baseline", "whiten", False),
    ("rloo", "whiten", False),
    ("reinforce_pp_baseline", "whiten", True),
]


def _whiten_weights(n, weighted):
    return (torch.arange(n) % 7 + 1).double() if weighted else None


def _worker(rank, init_file, rewards, ids, backends, results):
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        half = rewards.numel() // WORLD
        mine = slice(rank * half, (rank + 1) * half)
        out = {}
        for backend in backends:
            for estimator, scale, weighted in BATCH_CASES:
                weights = _whiten_weights(rewards.numel(), weighted)
                adv = nk.group_advantages(
                    rewards[mine],
                    ids[mine],
                    estimator=estimator,
                    scale=scale,
                    whiten_weights=None if weights is None else weights[mine],
                    num_groups=int(ids.max()) + 1,
                    process_group=dist.group.WORLD,
                    backend=backend,
                )
                out[(backend, estimator, scale, weighted)] = adv
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_batch_statistics_across_ranks():
    rewards = torch.randn(64)
    ids = torch.arange(64) // 8  # groups never straddle ranks
    ids = ids[torch.randperm(64).sort().values]  # keep groups contiguous per rank
    backends = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(
            _worker,
            args=(os.path.join(tmp, "store"), rewards, ids, backends, results),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        results = dict(results)
    for backend in backends:
        for estimator, scale, weighted in BATCH_CASES:
            combined = torch.cat([results[r][(backend, estimator, scale, weighted)] for r in range(WORLD)])
            single = nk.group_advantages(
                rewards.double(),
                ids,
                estimator=estimator,
                scale=scale,
                whiten_weights=_whiten_weights(rewards.numel(), weighted),
                backend="reference",
            )
            torch.testing.assert_close(combined, single, rtol=1e-5, atol=1e-6)


def _logprobs_worker(rank, init_file, logits, targets, old, adv, mask, backends, results):
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = dist.group.WORLD
        out = {}
        # Vocab-parallel: rank r holds an uneven contiguous slice of the vocabulary.
        cut = 17
        mine = slice(0, cut) if rank == 0 else slice(cut, logits.shape[-1])
        for backend in backends:
            x = logits[..., mine].clone().requires_grad_()
            logp, entropy = nk.token_logprobs(
                x, targets, return_entropy=True, temperature=0.8, process_group=group, backend=backend
            )
            (logp.sum() + 0.3 * entropy.sum()).backward()
            out[("vocab", backend)] = (logp.detach(), entropy.detach(), x.grad)
            # Data-parallel policy loss: each rank holds half the sequences; global normalisers.
            half = logits.shape[0] // WORLD
            rows = slice(rank * half, (rank + 1) * half)
            for aggregation in ("token-mean", "seq-mean-token-mean"):
                lp = (old[rows] + 0.1).clone().requires_grad_()
                res = nk.policy_loss(
                    lp, old[rows], adv[rows], mask[rows], aggregation=aggregation, process_group=group, backend=backend
                )
                res.loss.backward()
                out[("dp", backend, aggregation)] = (res.loss.detach(), lp.grad, torch.stack(res[1:7]))
            xl = logits[rows].clone().requires_grad_()
            res = nk.policy_loss_from_logits(
                xl,
                targets[rows],
                old[rows],
                adv[rows],
                mask[rows],
                return_entropy=True,
                aggregation="seq-mean-token-mean",
                process_group=group,
                backend=backend,
            )
            res.loss.backward()
            out[("logits", backend)] = (res.loss.detach(), xl.grad, res.entropy)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_vocab_parallel_logprobs_and_data_parallel_policy_loss():
    b, t, v = 4, 3, 45
    logits = torch.randn(b, t, v) * 2
    targets = torch.randint(0, v, (b, t))
    old = torch.randn(b, t) * 0.3 - 2
    adv = torch.randn(b)
    mask = torch.rand(b, t) > 0.3
    mask[0] = False
    backends = [x for x in ("reference", "triton") if x in nk.available_backends("cpu")]
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(
            _logprobs_worker,
            args=(os.path.join(tmp, "store"), logits, targets, old, adv, mask, backends, results),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        results = dict(results)
    x64 = logits.double().requires_grad_()
    logp, entropy = nk.token_logprobs(x64, targets, return_entropy=True, temperature=0.8, backend="reference")
    (logp.sum() + 0.3 * entropy.sum()).backward()
    for backend in backends:
        for rank in range(WORLD):
            r_logp, r_ent, _ = results[rank][("vocab", backend)]
            torch.testing.assert_close(r_logp.double(), logp.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r_ent.double(), entropy.detach(), rtol=1e-5, atol=1e-6)
        grad = torch.cat([results[0][("vocab", backend)][2], results[1][("vocab", backend)][2]], dim=-1)
        torch.testing.assert_close(grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
        for aggregation in ("token-mean", "seq-mean-token-mean"):
            lp = (old + 0.1).double().requires_grad_()
            whole = nk.policy_loss(lp, old.double(), adv.double(), mask, aggregation=aggregation, backend="reference")
            whole.loss.backward()
            parts = [results[r][("dp", backend, aggregation)] for r in range(WORLD)]
            # Each rank's loss is its share: the shares and their gradients add up to the whole batch.
            torch.testing.assert_close((parts[0][0] + parts[1][0]).double(), whole.loss.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]).double(), lp.grad, rtol=1e-5, atol=1e-7)
            for p in parts:  # metrics are global
                torch.testing.assert_close(p[2].double(), torch.stack(whole[1:7]).detach(), rtol=1e-5, atol=1e-6)
        y64 = logits.double().requires_grad_()
        whole = nk.policy_loss_from_logits(
            y64,
            targets,
            old.double(),
            adv.double(),
            mask,
            return_entropy=True,
            aggregation="seq-mean-token-mean",
            backend="reference",
        )
        whole.loss.backward()
        parts = [results[r][("logits", backend)] for r in range(WORLD)]
        torch.testing.assert_close((parts[0][0] + parts[1][0]).double(), whole.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]).double(), y64.grad, rtol=1e-4, atol=1e-7)
        for p in parts:
            torch.testing.assert_close(p[2].double(), whole.entropy.detach(), rtol=1e-5, atol=1e-6)


def _tensor_parallel_lm_head_worker(
    rank, init_file, hidden, weight, bias, targets, old, adv, mask, g_logp, g_ent, cut, backends, results
):
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import negkernels.triton.logprobs as triton_logprobs

    # A tiny workspace: the backward walks each shard in vocabulary slices of 16 (17 = 16 + 1, 24 = 16 + 8).
    triton_logprobs.LINEAR_WORKSPACE_BYTES = 4 * 4 * 20
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = dist.group.WORLD
        mine = slice(0, cut) if rank == 0 else slice(cut, weight.shape[0])  # uneven vocabulary shards
        out = {}
        for backend in backends:
            h = hidden.clone().requires_grad_()
            w, b = weight[mine].clone().requires_grad_(), bias[mine].clone().requires_grad_()
            logp, ent = nk.linear_token_logprobs(
                h,
                w,
                targets,
                bias=b,
                return_entropy=True,
                temperature=0.9,
                chunk_size=4,
                process_group=group,
                backend=backend,
            )
            (logp * g_logp + ent * g_ent).sum().backward()
            out[("logprobs", backend)] = (logp.detach(), ent.detach(), h.grad, w.grad, b.grad)
            h = hidden.clone().requires_grad_()
            w, b = weight[mine].clone().requires_grad_(), bias[mine].clone().requires_grad_()
            res = nk.linear_policy_loss(
                h,
                w,
                targets,
                old,
                adv,
                mask,
                bias=b,
                return_entropy=True,
                entropy_coef=0.02,
                chunk_size=4,
                process_group=group,
                backend=backend,
            )
            res.loss.backward()
            out[("loss", backend)] = (res.loss.detach(), res.entropy, h.grad, w.grad, b.grad)
            # Data parallel: each rank holds half the sequences and the whole head.
            half = hidden.shape[0] // WORLD
            rows = slice(rank * half, (rank + 1) * half)
            h = hidden[rows].clone().requires_grad_()
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            res = nk.linear_policy_loss(
                h,
                w,
                targets[rows],
                old[rows],
                adv[rows],
                mask[rows],
                bias=b,
                aggregation="seq-mean-token-mean",
                chunk_size=3,
                data_parallel_group=group,
                backend=backend,
            )
            res.loss.backward()
            out[("dp", backend)] = (res.loss.detach(), res.clip_fraction_low, h.grad, w.grad, b.grad)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_tensor_parallel_lm_head_equals_single_process():
    b, t, h, v, cut = 4, 5, 12, 41, 17
    hidden = torch.randn(b, t, h)
    weight = torch.randn(v, h) / h**0.5 * 2
    bias = torch.randn(v) * 0.5
    targets = torch.randint(0, v, (b, t))
    targets[0, :2] = torch.tensor([cut - 1, cut])  # ids on both sides of the shard boundary
    old = torch.randn(b, t) * 0.3 - 3
    adv = torch.randn(b)
    mask = torch.rand(b, t) > 0.2
    g_logp, g_ent = torch.randn(b, t), torch.randn(b, t)
    backends = [x for x in ("reference", "triton") if x in nk.available_backends("cpu")]
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(
            _tensor_parallel_lm_head_worker,
            args=(
                os.path.join(tmp, "store"),
                hidden,
                weight,
                bias,
                targets,
                old,
                adv,
                mask,
                g_logp,
                g_ent,
                cut,
                backends,
                results,
            ),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        results = dict(results)
    h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
    logp, ent = nk.linear_token_logprobs(
        h64, w64, targets, bias=b64, return_entropy=True, temperature=0.9, backend="reference"
    )
    (logp * g_logp.double() + ent * g_ent.double()).sum().backward()
    single = {"logprobs": (logp.detach(), ent.detach(), h64.grad, w64.grad, b64.grad)}
    h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
    whole = nk.linear_policy_loss(
        h64,
        w64,
        targets,
        old.double(),
        adv.double(),
        mask,
        bias=b64,
        return_entropy=True,
        entropy_coef=0.02,
        backend="reference",
    )
    whole.loss.backward()
    single["loss"] = (whole.loss.detach(), whole.entropy, h64.grad, w64.grad, b64.grad)

    def close(a, b, what):
        torch.testing.assert_close(
            a.double(), b, rtol=1e-4, atol=2e-5 * max(b.abs().max().item(), 1e-3), msg=lambda m: f"{what}: {m}"
        )

    for backend in backends:
        for kind, want in single.items():
            for rank in range(WORLD):
                got = results[rank][(kind, backend)]
                # Every rank holds the whole result and the whole d hidden.
                for name, a, b in zip(("value", "entropy", "d hidden"), got[:3], want[:3]):
                    close(a, b, f"{backend} {kind} rank {rank} {name}")
            # The shards' d weight and d bias are the slices of the single-process ones.
            for i, name in ((3, "d weight"), (4, "d bias")):
                close(
                    torch.cat([results[r][(kind, backend)][i] for r in range(WORLD)]),
                    want[i],
                    f"{backend} {kind} {name}",
                )
        # Data parallel: the ranks' losses and head gradients add up to the whole batch's.
        h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
        whole = nk.linear_policy_loss(
            h64,
            w64,
            targets,
            old.double(),
            adv.double(),
            mask,
            bias=b64,
            aggregation="seq-mean-token-mean",
            backend="reference",
        )
        whole.loss.backward()
        parts = [results[r][("dp", backend)] for r in range(WORLD)]
        close(parts[0][0] + parts[1][0], whole.loss.detach(), f"{backend} dp loss")
        close(torch.cat([parts[0][2], parts[1][2]]), h64.grad, f"{backend} dp d hidden")
        close(parts[0][3] + parts[1][3], w64.grad, f"{backend} dp d weight")
        close(parts[0][4] + parts[1][4], b64.grad, f"{backend} dp d bias")
        for p in parts:  # metrics are global
            close(p[1], whole.clip_fraction_low, f"{backend} dp clip fraction")


def _memory_bank_worker(rank, init_file, keys, ids, masks, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        bank = nk.MemoryBank(11, keys.shape[-1], with_ids=True)
        for step in range(keys.shape[0]):
            bank.enqueue(keys[step, rank], ids=ids[step, rank], mask=masks[step, rank], process_group=dist.group.WORLD)
        results[rank] = (bank.buffer.clone(), bank.ids.clone(), bank.ptr, bank.valid, bank.total)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_memory_bank_gathers_every_rank_in_rank_order():
    steps, batch, dim = 5, 4, 3
    keys = torch.randn(steps, WORLD, batch, dim)
    ids = torch.randint(0, 50, (steps, WORLD, batch))
    masks = torch.rand(steps, WORLD, batch) > 0.3  # uneven counts per rank and step
    masks[2, 0] = False  # a rank with nothing to add
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(
            _memory_bank_worker,
            args=(os.path.join(tmp, "store"), keys, ids, masks, results),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        results = dict(results)
    # the same bank, built in one process from the rank-ordered concatenation of each step
    single = nk.MemoryBank(11, dim, with_ids=True)
    for step in range(steps):
        single.enqueue(
            torch.cat([keys[step, r][masks[step, r]] for r in range(WORLD)]),
            ids=torch.cat([ids[step, r][masks[step, r]] for r in range(WORLD)]),
        )
    for rank in range(WORLD):
        buffer, bank_ids, ptr, valid, total = results[rank]
        assert torch.equal(buffer, single.buffer) and torch.equal(bank_ids, single.ids)
        assert (ptr, valid, total) == (single.ptr, single.valid, single.total)


def _lightly_worker(rank, init_file, views, results):
    from negkernels.integrations.lightly import NTXentLoss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        half = views[0].shape[0] // WORLD
        mine = [v[rank * half : (rank + 1) * half].clone().requires_grad_() for v in views]
        loss = NTXentLoss(temperature=0.3, gather_distributed=True, backend="reference")(*mine)
        loss.backward()
        results[rank] = (loss.detach(), mine[0].grad, mine[1].grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_lightly_simclr_gathers_every_ranks_views_as_negatives():
    from negkernels.integrations.lightly import NTXentLoss

    views = [torch.randn(12, 7, dtype=torch.float64) for _ in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(
            _lightly_worker,
            args=(os.path.join(tmp, "store"), views, results),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        results = dict(results)
    # One process over the whole batch: its mean over all 2·12 rows is the ranks' mean, and each
    # rank's gradient (its loss's, and through the gather every other rank's) is WORLD times the
    # whole-batch mean's gradient on its rows.
    whole = [v.clone().requires_grad_() for v in views]
    loss = NTXentLoss(temperature=0.3, backend="reference")(*whole)
    loss.backward()
    ranks_mean = sum(results[r][0] for r in range(WORLD)) / WORLD
    assert abs(ranks_mean.item() - loss.item()) < 1e-6
    for which in (1, 2):
        got = torch.cat([results[r][which] for r in range(WORLD)])
        torch.testing.assert_close(got, WORLD * whole[which - 1].grad, rtol=1e-10, atol=1e-12)
