"""Public functions and their ``torch.library`` custom ops, one module per op family."""
