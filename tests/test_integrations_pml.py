"""negkernels.integrations.pml.CrossBatchMemory against the real pytorch-metric-learning 2.9
CrossBatchMemory, for NTXentLoss and SupConLoss, with and without enqueue_mask, over steps that
fill and wrap the memory."""

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

import negkernels as nk
from negkernels.integrations.pml import CrossBatchMemory

BACKENDS = [b for b in ("reference", "triton") if b in nk.available_backends("cpu")]
LOSSES = {
    "NTXentLoss": lambda: pml_losses.NTXentLoss(temperature=0.1),
    "SupConLoss": lambda: pml_losses.SupConLoss(temperature=0.3),
}


def run_both(kind, backend, *, enqueue, steps=6, batch=10, memory=23, dim=12, classes=4):
    dtype = torch.float64 if backend == "reference" else torch.float32
    theirs = pml_losses.CrossBatchMemory(LOSSES[kind](), dim, memory_size=memory)
    ours = CrossBatchMemory(LOSSES[kind](), dim, memory_size=memory, backend=backend)
    for step in range(steps):
        emb = torch.randn(batch, dim, dtype=torch.float64)
        labels = torch.randint(0, classes, (batch,))
        mask = None
        if enqueue:  # MoCo: the second half are keys, labelled as their queries
            mask = torch.arange(batch) >= batch // 2
            labels[batch // 2 :] = labels[: batch // 2]
        x = emb.clone().requires_grad_()
        want = theirs(x, labels, enqueue_mask=mask)
        want.backward()
        y = emb.to(dtype).requires_grad_()
        got = ours(y, labels, enqueue_mask=mask)
        got.backward()
        tol = 1e-6 if backend == "reference" else 3e-5
        assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), (kind, step, got.item(), want.item())
        torch.testing.assert_close(y.grad.double(), x.grad, rtol=tol, atol=tol * 1e-1)
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        torch.testing.assert_close(
            ours.embedding_memory.double(), theirs.embedding_memory.double(), rtol=1e-6, atol=1e-7
        )
        assert torch.equal(ours.label_memory, theirs.label_memory)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("enqueue", [False, True])
def test_matches_pml(kind, backend, enqueue):
    run_both(kind, backend, enqueue=enqueue)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_degenerate_calls_match_pml(kind):
    # one class only (no negative pair anywhere), then a label no slot shares (no positive pair)
    theirs = pml_losses.CrossBatchMemory(LOSSES[kind](), 5, memory_size=8)
    ours = CrossBatchMemory(LOSSES[kind](), 5, memory_size=8)
    for labels in (torch.zeros(3, dtype=torch.long), torch.tensor([5, 6, 7])):
        emb = torch.randn(3, 5, dtype=torch.float64)
        want = theirs(emb, labels)
        got = ours(emb.clone().requires_grad_(), labels)
        assert abs(got.item() - want.item()) < 1e-7, (labels, got.item(), want.item())


def test_memory_is_o_n():
    # SupCon against a 4096-slot memory at N = 64 allocates no N×M float matrix on the kernel path.
    loss_fn = CrossBatchMemory(pml_losses.SupConLoss(), 16, memory_size=4096, backend="triton")
    sizes = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        sizes.append(t.numel())
        return t

    torch.empty = spy
    try:
        loss_fn(torch.randn(64, 16).requires_grad_(), torch.randint(0, 8, (64,))).backward()
    finally:
        torch.empty = real_empty
    assert max(sizes) < 64 * 4096 // 4, max(sizes)


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="loss"):
        CrossBatchMemory(pml_losses.TripletMarginLoss(), 8)
    with pytest.raises(ValueError, match="loss"):
        from pytorch_metric_learning.distances import LpDistance

        CrossBatchMemory(pml_losses.NTXentLoss(distance=LpDistance()), 8)
    with pytest.raises(ValueError, match="miner"):
        from pytorch_metric_learning.miners import MultiSimilarityMiner

        CrossBatchMemory(pml_losses.NTXentLoss(), 8, miner=MultiSimilarityMiner())
    loss_fn = CrossBatchMemory(pml_losses.SupConLoss(), 8, memory_size=4)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_fn(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), indices_tuple=(torch.zeros(1),) * 4)
    with pytest.raises(ValueError, match="embeddings"):
        loss_fn(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(2, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="embeddings"):
        loss_fn(torch.randn(5, 8), torch.zeros(5, dtype=torch.long))  # larger than the memory
