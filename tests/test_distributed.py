"""Batch statistics across ranks (gloo, 2 CPU processes) equal the single-process result."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import negkernels as nk

WORLD = 2


def _worker(rank, init_file, rewards, ids, backends, results):
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        half = rewards.numel() // WORLD
        mine = slice(rank * half, (rank + 1) * half)
        out = {}
        for backend in backends:
            for estimator, scale in [("grpo", "batch"), ("reinforce_pp_baseline", "whiten"), ("rloo", "whiten")]:
                adv = nk.group_advantages(rewards[mine], ids[mine], estimator=estimator, scale=scale,
                                          num_groups=int(ids.max()) + 1, process_group=dist.group.WORLD, backend=backend)
                out[(backend, estimator, scale)] = adv
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
        mp.start_processes(_worker, args=(os.path.join(tmp, "store"), rewards, ids, backends, results),
                           nprocs=WORLD, join=True, start_method="spawn")
        results = dict(results)
    for backend in backends:
        for estimator, scale in [("grpo", "batch"), ("reinforce_pp_baseline", "whiten"), ("rloo", "whiten")]:
            combined = torch.cat([results[r][(backend, estimator, scale)] for r in range(WORLD)])
            single = nk.group_advantages(rewards.double(), ids, estimator=estimator, scale=scale, backend="reference")
            torch.testing.assert_close(combined, single, rtol=1e-5, atol=1e-6)
