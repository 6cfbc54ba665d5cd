"""negkernels.integrations.lightly against the real lightly 1.6 (NTXentLoss with and without a
memory bank, the ring buffer, MoCo), and MoCoLoss against the MoCo step written out.

lightly imports torchvision, whose PyPI wheels do not load beside a CPU build of torch; both are
installed apart from the environment, in ``.peers/lightly`` (the README's test command does it),
and the checks run in a subprocess that has them on its path (tests/peers/lightly_checks.py
says how torchvision is made to import there). The rest of the suite never sees torchvision.
"""

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import negkernels as nk
from negkernels.integrations.lightly import MoCoLoss, NTXentLoss, update_momentum

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEERS = pathlib.Path(os.environ.get("NEGKERNELS_LIGHTLY_PATH", ROOT / ".peers" / "lightly"))
BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]
CHECKS = ["simclr", "memory_bank", "ring_buffer_differs_as_documented", "moco_against_lightly"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check", CHECKS)
def test_against_lightly(check, backend):
    assert (PEERS / "lightly").is_dir(), (
        f"lightly is not installed at {PEERS}: pip install --no-deps --target .peers/lightly "
        "lightly==1.6.0 torchvision==0.28.0 pillow (the README's test command)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PEERS), str(ROOT)]))
    done = subprocess.run(
        [sys.executable, "-m", "tests.peers.lightly_checks", check, backend],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"ok {check} {backend}" in done.stdout


def moco_step_written_out(q, k, queue, tau):
    """MoCo (He et al. 2020, Algorithm 1): logits [l_pos, l_neg] / τ, cross-entropy on class 0."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_loss_is_the_moco_step(backend):
    dim, batch, size = 7, 5, 13  # not a multiple: the queue wraps mid-batch
    loss_fn = MoCoLoss(size, dim, temperature=0.2, dtype=torch.float64, backend=backend)
    queue = []  # the oracle's queue: every key, newest last
    dtype = torch.float64 if backend == "reference" else torch.float32
    for step in range(5):
        q = torch.randn(batch, dim, dtype=torch.float64)
        k = torch.randn(batch, dim, dtype=torch.float64)
        x = q.to(dtype).detach().requires_grad_()
        got = loss_fn(x, k.to(dtype))
        got.backward()
        y = q.detach().clone().requires_grad_()
        live = torch.stack(queue[-size:]) if queue else torch.zeros(0, dim, dtype=torch.float64)
        want = moco_step_written_out(y, k, live, 0.2)
        want.backward()
        tol = 1e-6 if backend == "reference" else 2e-5
        assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), (step, got.item(), want.item())
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=tol, atol=tol)
        queue.extend(F.normalize(k, dim=1))
        assert loss_fn.queue.valid == min(len(queue), size)
    # the slots hold the newest `size` keys at (key number mod size)
    for number, key in enumerate(queue[-size:], start=len(queue) - size):
        torch.testing.assert_close(loss_fn.queue.buffer[number % size], key)
    # no gradient: no enqueue
    total = loss_fn.queue.total
    with torch.no_grad():
        loss_fn(torch.randn(batch, dim, dtype=torch.float64).to(dtype), torch.randn(batch, dim).to(dtype))
    assert loss_fn.queue.total == total


def test_empty_bank_init_and_lazy_width():
    loss_fn = NTXentLoss(temperature=0.5, memory_bank_size=8, bank_init="empty")
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    # nothing filled yet: the positive alone, loss log 1 = 0
    assert abs(loss_fn(a.requires_grad_(), b).item()) < 1e-6
    assert loss_fn.memory_bank.dim == 4 and loss_fn.memory_bank.valid == 3
    c = torch.randn(3, 4)
    q, p, bank = F.normalize(c, dim=1), F.normalize(a.detach(), dim=1), F.normalize(b, dim=1)
    logits = torch.cat([(q * F.normalize(a.detach() + 1, dim=1)).sum(1, keepdim=True), q @ bank.t()], 1) / 0.5
    want = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    got = loss_fn(c, a.detach() + 1)
    assert abs(got.item() - want.item()) < 1e-5
    del p


def test_update_momentum():
    online, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_momentum(online, ema, 0.9)
    for new, old, src in zip(ema.parameters(), before, online.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * src.detach())
    with pytest.raises(ValueError, match="m"):
        update_momentum(online, ema, 1.5)


def test_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="memory_bank_size"):
        NTXentLoss(memory_bank_size=(4, 5, 6))
    with pytest.raises(ValueError, match="bank_init"):
        NTXentLoss(bank_init="zeros")
    loss_fn = NTXentLoss(memory_bank_size=(8, 4))
    with pytest.raises(ValueError, match="out1"):
        loss_fn(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="out0"):
        loss_fn(torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="key"):
        MoCoLoss(8, 4)(torch.randn(3, 4), torch.randn(3, 5))
    assert math.isfinite(NTXentLoss()(torch.randn(2, 3), torch.randn(2, 3)).item())
