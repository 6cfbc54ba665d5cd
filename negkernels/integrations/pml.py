"""pytorch-metric-learning's ``CrossBatchMemory``, with negkernels underneath.

Code written for pytorch-metric-learning switches by its import::

    from pytorch_metric_learning.losses import NTXentLoss, SupConLoss
    # from pytorch_metric_learning.losses import CrossBatchMemory
    from negkernels.integrations.pml import CrossBatchMemory

    loss_fn = CrossBatchMemory(SupConLoss(temperature=0.1), embedding_size=128, memory_size=65536)
    loss = loss_fn(embeddings, labels)                       # or enqueue_mask=... for MoCo

Same constructor (``loss, embedding_size, memory_size=1024, miner=None``), same
``forward(embeddings, labels, indices_tuple=None, enqueue_mask=None)``, same semantics:

* the batch (or, with ``enqueue_mask``, its masked rows, which are then not anchors) is written to
  the memory *before* the loss, at slots ``queue_idx, queue_idx + 1, …`` modulo ``memory_size``;
  the anchors are compared with every filled slot (the memory's content is detached);
* labels are ids: a slot with the anchor's label is a positive, any other a negative; without
  ``enqueue_mask`` each anchor's own slot is in neither set (pml's "self comparisons");
* cosine similarity (pml's default distance for both losses) over τ.

The two losses pml's ``CrossBatchMemory`` supports that are InfoNCE forms run fused:

* ``SupConLoss(temperature)``: :func:`negkernels.bank_supcon`, per anchor
  logsumexp over its positives and negatives minus the mean of its positive logits, averaged over
  the anchors that have a positive (pml's ``AvgNonZeroReducer``). One streaming pass; memory
  O((N + M)·D) — pml's own forms an N×M matrix several times over.
* ``NTXentLoss(temperature)``: per (anchor, positive) pair, −log(e^{l_ap} / (e^{l_ap} + Σ_n e^{l_an}))
  over the anchor's negatives n, averaged over the pairs (pml's ``MeanReducer``). This runs as
  :func:`negkernels.bank_info_nce` with one query row per pair (the anchor, its positive, the
  memory with same-label slots excluded), so its cost grows with the number of pairs: in the MoCo
  use (``enqueue_mask``, one key per query) that is one row per anchor. Finding the pairs reads
  their count on the host once per call.

Both give 0 when the memory holds no negative at all or the batch no positive pair, as pml does.
Not supported (raises, naming the argument): a ``miner``, an ``indices_tuple``, a loss other than
these two, and a distance, reducer or regularizer other than the defaults.
pml's ``small_val`` guard inside NT-Xent's log (1e-38 in float32) is left out; it changes a loss
only when a pair's probability is below it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._validation import check_int, check_tensor
from ..ops.contrastive import bank_info_nce, bank_supcon

__all__ = ["CrossBatchMemory"]

_SUPPORTED = ("NTXentLoss", "SupConLoss")
_DEFAULT_REDUCERS = {"NTXentLoss": "MeanReducer", "SupConLoss": "AvgNonZeroReducer"}


def _loss_kind(loss) -> tuple[str, float]:
    """(pml class name, temperature) of a supported pml loss; raises naming ``loss`` otherwise."""
    kind = type(loss).__name__
    if kind not in _SUPPORTED or not hasattr(loss, "temperature"):
        raise ValueError(
            f"loss: {kind} is not supported; this CrossBatchMemory runs {_SUPPORTED} "
            "(use pytorch_metric_learning.losses.CrossBatchMemory for the others)"
        )
    distance = getattr(loss, "distance", None)
    if distance is not None and (
        type(distance).__name__ != "CosineSimilarity"
        or not distance.normalize_embeddings
        or getattr(distance, "p", 2) != 2
        or getattr(distance, "power", 1) != 1
    ):
        raise ValueError(
            f"loss: {kind} with distance {type(distance).__name__} is not supported (only the default CosineSimilarity)"
        )
    reducer = getattr(loss, "reducer", None)
    if reducer is not None and type(reducer).__name__ != _DEFAULT_REDUCERS[kind]:
        raise ValueError(
            f"loss: {kind} with reducer {type(reducer).__name__} is not supported (only its default, "
            f"{_DEFAULT_REDUCERS[kind]})"
        )
    if getattr(loss, "embedding_regularizer", None) is not None:
        raise ValueError(f"loss: {kind} with an embedding_regularizer is not supported")
    temperature = float(loss.temperature)
    if not temperature > 0:
        raise ValueError(f"loss: temperature must be positive, got {temperature}")
    return kind, temperature


class CrossBatchMemory(nn.Module):
    """pml's ``CrossBatchMemory`` for ``NTXentLoss`` and ``SupConLoss`` (see the module docstring).

    Attributes as pml's: ``embedding_memory`` [memory_size, embedding_size] and ``label_memory``
    [memory_size] (buffers), ``queue_idx`` (the next slot written), ``has_been_filled``.
    """

    def __init__(
        self, loss, embedding_size: int, memory_size: int = 1024, miner=None, *, backend: Optional[str] = None
    ):
        super().__init__()
        if miner is not None:
            raise ValueError(
                "miner: mining against the memory is not supported here (use "
                "pytorch_metric_learning.losses.CrossBatchMemory)"
            )
        self.kind, self.temperature = _loss_kind(loss)
        self.loss = loss
        self.miner = None
        self.embedding_size = check_int("embedding_size", embedding_size, minimum=1)
        self.memory_size = check_int("memory_size", memory_size, minimum=1)
        self.backend = backend
        self.reset_queue()

    def reset_queue(self) -> None:
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.has_been_filled = False
        self.queue_idx = 0

    def add_to_memory(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Writes the rows at the next slots (mod memory_size) → those slots."""
        count = embeddings.shape[0]
        slots = torch.arange(self.queue_idx, self.queue_idx + count, device=labels.device) % self.memory_size
        self.embedding_memory[slots] = embeddings.detach().to(self.embedding_memory.dtype)
        self.label_memory[slots] = labels.detach().to(torch.long)
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + count) % self.memory_size
        if not self.has_been_filled and self.queue_idx <= previous:
            self.has_been_filled = True
        return slots

    def forward(
        self, embeddings: Tensor, labels: Tensor, indices_tuple=None, enqueue_mask: Optional[Tensor] = None
    ) -> Tensor:
        if indices_tuple is not None:
            raise ValueError(
                "indices_tuple: explicit pairs are not supported here (use "
                "pytorch_metric_learning.losses.CrossBatchMemory)"
            )
        check_tensor("embeddings", embeddings, ndim=2)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings: width {embeddings.shape[1]} does not match embedding_size {self.embedding_size}"
            )
        check_tensor("labels", labels, ndim=1)
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels: length {labels.shape[0]} does not match the {embeddings.shape[0]} embeddings")
        device = embeddings.device
        labels = labels.to(device)
        if self.embedding_memory.device != device or self.embedding_memory.dtype != embeddings.dtype:
            self.embedding_memory = self.embedding_memory.to(device=device, dtype=embeddings.dtype)
            self.label_memory = self.label_memory.to(device)
        if enqueue_mask is not None:
            check_tensor("enqueue_mask", enqueue_mask, ndim=1, dtypes=(torch.bool,), device=device)
            if enqueue_mask.shape[0] != embeddings.shape[0]:
                raise ValueError(
                    f"enqueue_mask: length {enqueue_mask.shape[0]} does not match the {embeddings.shape[0]} embeddings"
                )
            self.add_to_memory(embeddings[enqueue_mask], labels[enqueue_mask])
            anchors, anchor_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            self_slots = None
        else:
            if embeddings.shape[0] > self.memory_size:
                raise ValueError(
                    f"embeddings: a batch of {embeddings.shape[0]} does not fit a memory of {self.memory_size}"
                )
            self_slots = self.add_to_memory(embeddings, labels)
            anchors, anchor_labels = embeddings, labels
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        memory = self.embedding_memory[:filled].detach()
        memory_labels = self.label_memory[:filled]
        # pml returns 0 when no pair of the call is a negative one (checked in O(N + M)).
        first = memory_labels[:1]
        has_negative = ((memory_labels != first).any() | (anchor_labels != first).any()) & (filled > 0)
        labels64 = anchor_labels.to(torch.long)
        if self.kind == "SupConLoss":
            loss = bank_supcon(
                anchors,
                memory,
                labels64,
                memory_labels,
                temperature=self.temperature,
                normalize=True,
                self_slots=self_slots,
                backend=self.backend,
            )
        else:
            loss = self._ntxent(anchors, labels64, memory, memory_labels, self_slots)
        return torch.where(has_negative, loss, torch.zeros_like(loss))

    def _ntxent(
        self, anchors: Tensor, labels: Tensor, memory: Tensor, memory_labels: Tensor, self_slots: Optional[Tensor]
    ) -> Tensor:
        # One query row per (anchor, positive slot) pair; the pairs are found a block of anchors
        # at a time, so no N×M matrix is held.
        pair_anchor, pair_slot = [], []
        slots = torch.arange(memory.shape[0], device=memory.device)
        for start in range(0, anchors.shape[0], 256):
            same = labels[start : start + 256, None] == memory_labels[None, :]
            if self_slots is not None:
                same &= slots[None, :] != self_slots[start : start + 256, None]
            a, p = torch.nonzero(same, as_tuple=True)
            pair_anchor.append(a + start)
            pair_slot.append(p)
        pair_anchor, pair_slot = torch.cat(pair_anchor), torch.cat(pair_slot)
        if pair_anchor.numel() == 0:
            return anchors.sum() * 0.0  # no positive pair: pml's zero loss, still attached to the graph
        # The positive's own slot has the anchor's label, so "exclude" keeps it out of the
        # denominator's bank part, with every other positive: A = {p} ∪ negatives, as pml.
        return bank_info_nce(
            anchors[pair_anchor],
            memory[pair_slot],
            memory,
            temperature=self.temperature,
            normalize=True,
            query_ids=labels[pair_anchor],
            bank_ids=memory_labels,
            false_negatives="exclude",
            backend=self.backend,
        )
