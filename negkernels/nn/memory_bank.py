"""A ring buffer of negative keys (a MoCo queue) that feeds :func:`negkernels.bank_info_nce`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._validation import INDEX_DTYPES, check_int, check_tensor


class MemoryBank(nn.Module):
    """Ring buffer of ``size`` keys of width ``dim``, with optional integer ids per key.

    The t-th key ever enqueued (counting from 0) lives in slot ``t mod size`` until it is
    overwritten; a batch larger than the bank keeps its newest ``size`` keys. Slots fill in order
    from 0, so the filled ones are always [0, valid): pass ``bank_valid=bank.valid`` (a Python int,
    no host read) and unfilled slots are never used as negatives. They start at zero, never random.

    Attributes: ``buffer`` [size, dim] (a buffer: it moves with ``.to()`` and is saved), ``ids``
    [size] int64 or None, ``valid`` (filled count), ``ptr`` (the next slot written), ``total``
    (keys ever enqueued). ``state_dict`` holds buffer, ids, ptr, valid and total, so a resumed run
    continues bit-identically.
    """

    buffer: Tensor  # [size, dim], registered buffers (state_dict, .to())
    ids: Tensor  # [size] int64, or None without ids

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        with_ids: bool = False,
    ):
        super().__init__()
        self.size = check_int("size", size, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.register_buffer("buffer", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.int64, device=device) if with_ids else None)
        self.with_ids = with_ids
        self.total = 0

    @property
    def valid(self) -> int:
        return min(self.total, self.size)

    @property
    def ptr(self) -> int:
        return self.total % self.size

    def get_extra_state(self) -> dict:
        return {"total": self.total, "ptr": self.ptr, "valid": self.valid}

    def set_extra_state(self, state: dict) -> None:
        total = int(state["total"])
        if total < 0 or total % self.size != state["ptr"] or min(total, self.size) != state["valid"]:
            raise ValueError(f"state_dict: inconsistent memory-bank pointers {state} for a bank of {self.size}")
        self.total = total

    def _check_keys(self, keys: Tensor, ids: Optional[Tensor], mask: Optional[Tensor]) -> None:
        check_tensor("keys", keys, ndim=2)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys: width {keys.shape[1]} does not match the bank's dim {self.dim}")
        if keys.dtype != self.buffer.dtype:
            raise TypeError(f"keys: dtype {keys.dtype} does not match the bank's {self.buffer.dtype}")
        if keys.device != self.buffer.device:
            raise ValueError(f"keys: on {keys.device}, the bank is on {self.buffer.device}")
        if ids is not None:
            if not self.with_ids:
                raise ValueError("ids: this bank was made without ids (MemoryBank(..., with_ids=True) keeps them)")
            check_tensor("ids", ids, ndim=1, dtypes=INDEX_DTYPES, device=self.buffer.device)
            if ids.shape[0] != keys.shape[0]:
                raise ValueError(f"ids: length {ids.shape[0]} does not match the {keys.shape[0]} keys")
        elif self.with_ids:
            raise ValueError("ids: this bank keeps ids; pass one per key")
        if mask is not None:
            check_tensor("mask", mask, ndim=1, dtypes=(torch.bool,), device=self.buffer.device)
            if mask.shape[0] != keys.shape[0]:
                raise ValueError(f"mask: length {mask.shape[0]} does not match the {keys.shape[0]} keys")

    @torch.no_grad()
    def enqueue(
        self, keys: Tensor, ids: Optional[Tensor] = None, mask: Optional[Tensor] = None, process_group=None
    ) -> None:
        """Append keys [B, dim] (detached), with ids [B] when the bank keeps them.

        ``mask`` [B] bool selects the rows that go in. With ``process_group`` the selected keys
        (and ids) of every rank are gathered in rank order first, so every rank holds the same bank.
        """
        self._check_keys(keys, ids, mask)
        keys = keys.detach()
        if mask is not None:
            keys = keys[mask]
            ids = ids[mask] if ids is not None else None
        if process_group is not None:
            keys, ids = _gather_in_rank_order(keys, ids, process_group)
        count = keys.shape[0]
        if count == 0:
            return
        if count > self.size:  # only the newest `size` keys survive
            keys, ids = keys[-self.size :], ids[-self.size :] if ids is not None else None
            self.total += count - self.size
            count = self.size
        slots = (self.total + torch.arange(count, device=keys.device)) % self.size
        self.buffer.index_copy_(0, slots, keys)
        if ids is not None:
            self.ids.index_copy_(0, slots, ids.to(torch.int64))
        self.total += count

    def filled(self) -> Tensor:
        """The filled slots, [valid, dim] (a view)."""
        return self.buffer[: self.valid]

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.buffer.dtype}, with_ids={self.with_ids}, valid={self.valid}"
        )


def _gather_in_rank_order(keys: Tensor, ids: Optional[Tensor], process_group):
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    counts = [torch.zeros(1, dtype=torch.int64, device=keys.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([keys.shape[0]], dtype=torch.int64, device=keys.device), group=process_group)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    # all_gather needs equal shapes: pad every rank's rows to the longest, then trim.
    padded = keys.new_zeros((longest, keys.shape[1]))
    padded[: keys.shape[0]] = keys
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=process_group)
    keys = torch.cat([g[:c] for g, c in zip(gathered, sizes)])
    if ids is not None:
        padded_ids = ids.new_zeros(longest, dtype=torch.int64)
        padded_ids[: ids.shape[0]] = ids
        gathered_ids = [torch.empty_like(padded_ids) for _ in range(world)]
        dist.all_gather(gathered_ids, padded_ids, group=process_group)
        ids = torch.cat([g[:c] for g, c in zip(gathered_ids, sizes)])
    return keys, ids
