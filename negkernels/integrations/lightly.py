"""lightly's contrastive losses, with negkernels underneath.

Code written for lightly switches by its import::

    # from lightly.loss import NTXentLoss
    from negkernels.integrations.lightly import NTXentLoss

Same constructor (``temperature=0.5, memory_bank_size=0, gather_distributed=False``), same call
(``loss(out0, out1)``), same semantics:

* ``out0`` and ``out1`` are L2-normalised (inside the op, gradients through the normalisation);
* with a memory bank, ``out0`` is the query, ``out1`` its positive, and the bank's keys the
  negatives; the bank is read *before* the current ``out1`` is added, and it is updated only when
  ``out0`` requires a gradient (a loss evaluated under ``no_grad`` leaves it alone); both views get
  gradients (through the positive), the bank none;
* the bank starts full of random unit vectors, which are negatives from the first step, as
  lightly's ``MemoryBankModule`` does (``bank_init="empty"`` starts it empty instead: only keys
  enqueued so far are negatives);
* without a bank (size 0) it is SimCLR's NT-Xent over the 2B views: each view's positive is the
  other view of its sample, its negatives the other 2B − 2 views; with ``gather_distributed``
  every rank's views are negatives and gradients flow back to the rank that made them.

One difference, deliberate: the bank is a true ring buffer. lightly resets its pointer to 0 when
a batch does not fit in the slots left, dropping the batch's remaining keys (a bank of 100 with
batches of 32 never holds more than 96 real keys, and slot 99 is rewritten only every fourth
step); here every key is kept and the oldest is overwritten first. The two agree exactly when the
bank size is a multiple of the (gathered) batch size.

``MoCoLoss`` is the MoCo step: InfoNCE of queries against their momentum-encoder keys plus a queue
of past keys, then the keys are enqueued. ``update_momentum`` is the exponential moving average
of the key encoder's parameters.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_finite_float, check_int, check_tensor
from ..nn.memory_bank import MemoryBank
from ..ops.contrastive import bank_info_nce
from ._distributed import world_size

__all__ = ["NTXentLoss", "MoCoLoss", "update_momentum"]

_BANK_INITS = ("random", "empty")


def _bank_step(
    query: Tensor,
    positive: Tensor,
    bank: MemoryBank,
    temperature: float,
    backend,
    *,
    enqueue: bool,
    gather_distributed: bool,
) -> Tensor:
    """InfoNCE of (normalised) ``query`` against ``positive`` and the bank's keys as stored, then,
    with ``enqueue``, the positives appended (every rank's, with ``gather_distributed``). They go
    into a fresh copy of the buffer: the loss just computed saved the old one for its backward
    (lightly's bank hands out a clone for the same reason)."""
    keys = bank.buffer if bank.buffer.dtype == query.dtype else bank.buffer.to(query.dtype)
    loss = bank_info_nce(query, positive, keys, temperature=temperature, bank_valid=bank.valid, backend=backend)
    if enqueue:
        group = torch.distributed.group.WORLD if gather_distributed and world_size() > 1 else None
        bank.buffer = bank.buffer.clone()
        bank.enqueue(positive.detach().to(bank.buffer.dtype), process_group=group)
    return loss


def _random_unit_keys(bank: MemoryBank) -> None:
    with torch.no_grad():
        bank.buffer.copy_(F.normalize(torch.randn_like(bank.buffer), dim=-1))
    bank.total = bank.size  # every slot filled; the next key goes to slot 0


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss`` over :func:`negkernels.bank_info_nce` (see the module docstring).

    Args:
        temperature: τ; lightly's default 0.5. It must be positive (lightly also accepts a
            negative one, which inverts the objective).
        memory_bank_size: 0 (SimCLR), ``(num_features, dim)`` as lightly 1.6 asks, or a bare
            ``num_features`` (the width is then taken from the first batch, as older lightly did).
        gather_distributed: gather every rank's keys before the bank update (with a bank) or
            every rank's views as negatives (without one).
        bank_init: ``"random"`` (lightly's) or ``"empty"``.
        bank_dtype: the bank's dtype (lightly's is float32); keys are cast to the query's dtype
            when read.
        backend: negkernels backend for the loss (None: the default rule).
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        *,
        bank_init: str = "random",
        bank_dtype: torch.dtype = torch.float32,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.temperature = check_finite_float("temperature", temperature, minimum=0.0, exclusive=True)
        if bank_init not in _BANK_INITS:
            raise ValueError(f"bank_init: expected one of {_BANK_INITS}, got {bank_init!r}")
        if isinstance(memory_bank_size, int):
            size, dim = check_int("memory_bank_size", memory_bank_size, minimum=0), None
        else:
            shape = tuple(memory_bank_size)
            if len(shape) != 2:
                raise ValueError(
                    f"memory_bank_size: expected 0, a size, or (num_features, dim), got {memory_bank_size!r}"
                )
            size = check_int("memory_bank_size", shape[0], minimum=0)
            dim = check_int("memory_bank_size", shape[1], minimum=1)
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed: torch.distributed is not available in this build of torch")
        self.memory_bank_size = size
        self.gather_distributed = gather_distributed
        self.bank_init = bank_init
        self.bank_dtype = bank_dtype
        self.backend = backend
        self.memory_bank: Optional[MemoryBank] = None
        if size and dim is not None:
            self._make_bank(dim, None)

    def _make_bank(self, dim: int, device) -> None:
        self.memory_bank = MemoryBank(self.memory_bank_size, dim, dtype=self.bank_dtype, device=device)
        if self.bank_init == "random":
            _random_unit_keys(self.memory_bank)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        check_tensor("out0", out0, ndim=2)
        check_tensor("out1", out1, ndim=2, device=out0.device)
        if out1.shape != out0.shape:
            raise ValueError(f"out1: shape {tuple(out1.shape)} does not match out0's {tuple(out0.shape)}")
        if out1.dtype != out0.dtype:
            raise TypeError(f"out1: dtype {out1.dtype} does not match out0's {out0.dtype}")
        if self.memory_bank_size == 0:
            return self._simclr(out0, out1)
        if self.memory_bank is None:
            self._make_bank(out0.shape[1], out0.device)
        bank = self.memory_bank
        if bank.dim != out0.shape[1]:
            raise ValueError(f"out0: width {out0.shape[1]} does not match the memory bank's {bank.dim}")
        if bank.buffer.device != out0.device:
            bank.to(out0.device)
        # The views are normalised here, not in the op: the bank's keys are used as stored, as
        # lightly uses them (normalising them again would move each by up to an ulp).
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        return _bank_step(
            out0,
            out1,
            bank,
            self.temperature,
            self.backend,
            enqueue=out0.requires_grad,
            gather_distributed=self.gather_distributed,
        )

    def _simclr(self, out0: Tensor, out1: Tensor) -> Tensor:
        batch = out0.shape[0]
        rank, keys0, keys1 = 0, out0, out1
        if self.gather_distributed and world_size() > 1:
            from torch.distributed.nn.functional import all_gather

            rank = torch.distributed.get_rank()
            keys0, keys1 = torch.cat(all_gather(out0)), torch.cat(all_gather(out1))
        sample = rank * batch + torch.arange(batch, device=out0.device)
        key_ids = torch.arange(keys0.shape[0], device=out0.device)
        # Each view is a query whose positive is the other view of its sample. Its own view and
        # that positive carry the sample's id in the bank of all views, and are excluded there.
        return bank_info_nce(
            torch.cat([out0, out1]),
            torch.cat([out1, out0]),
            torch.cat([keys0, keys1]),
            temperature=self.temperature,
            normalize=True,
            query_ids=sample.repeat(2),
            bank_ids=key_ids.repeat(2),
            false_negatives="exclude",
            backend=self.backend,
        )


class MoCoLoss(nn.Module):
    """The MoCo step: InfoNCE of ``query`` [B, D] against its key [B, D] (from the momentum
    encoder; detached here) and a queue of past keys, after which the keys are enqueued.

    Args:
        queue_size, dim: the queue (a :class:`negkernels.MemoryBank`, a true ring buffer).
        temperature: τ; MoCo v2's 0.2 by default.
        normalize: L2-normalise queries and keys inside the op (MoCo's heads normalise; keys
            are enqueued normalised).
        gather_distributed: enqueue every rank's keys, in rank order, on every rank.
        bank_init: ``"empty"`` (only real keys are negatives; the default here) or ``"random"``
            (MoCo's reference code starts its queue with random unit vectors).
    """

    def __init__(
        self,
        queue_size: int = 65536,
        dim: int = 128,
        temperature: float = 0.2,
        *,
        normalize: bool = True,
        gather_distributed: bool = False,
        bank_init: str = "empty",
        dtype: torch.dtype = torch.float32,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.temperature = check_finite_float("temperature", temperature, minimum=0.0, exclusive=True)
        if bank_init not in _BANK_INITS:
            raise ValueError(f"bank_init: expected one of {_BANK_INITS}, got {bank_init!r}")
        self.queue = MemoryBank(queue_size, dim, dtype=dtype)
        if bank_init == "random":
            _random_unit_keys(self.queue)
        self.normalize = normalize
        self.gather_distributed = gather_distributed
        self.backend = backend

    def forward(self, query: Tensor, key: Tensor, *, enqueue: Optional[bool] = None) -> Tensor:
        """→ the mean loss. ``enqueue`` (default: whether ``query`` requires a gradient) adds the
        keys to the queue after the loss is computed."""
        check_tensor("query", query, ndim=2)
        check_tensor("key", key, ndim=2, device=query.device)
        if key.shape != query.shape:
            raise ValueError(f"key: shape {tuple(key.shape)} does not match query's {tuple(query.shape)}")
        queue = self.queue
        if query.shape[1] != queue.dim:
            raise ValueError(f"query: width {query.shape[1]} does not match the queue's {queue.dim}")
        key = key.detach().to(query.dtype)
        if self.normalize:  # the queue holds normalised keys, used as stored
            query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
        return _bank_step(
            query,
            key,
            queue,
            self.temperature,
            self.backend,
            enqueue=query.requires_grad if enqueue is None else enqueue,
            gather_distributed=self.gather_distributed,
        )


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """model_ema ← m·model_ema + (1 − m)·model, parameter by parameter (MoCo's key encoder)."""
    m = check_finite_float("m", m, minimum=0.0)
    if m > 1.0:
        raise ValueError(f"m: expected a momentum in [0, 1], got {m}")
    for ema, online in zip(model_ema.parameters(), model.parameters()):
        ema.mul_(m).add_(online.detach(), alpha=1.0 - m)
