"""The data-parallel world the adapters see."""

from __future__ import annotations

import torch


def world_size() -> int:
    """Ranks in the default process group; 1 when torch.distributed is absent or not initialised."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
