"""``nn.Module`` wrappers of the ops (stateful pieces such as memory banks and caches)."""
