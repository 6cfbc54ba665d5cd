"""``nn.Module`` wrappers of the ops (stateful pieces such as memory banks and caches)."""

from .memory_bank import MemoryBank
from .policy_loss import PolicyLoss

__all__ = ["MemoryBank", "PolicyLoss"]
