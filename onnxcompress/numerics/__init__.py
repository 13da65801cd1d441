"""Pure numeric functions (no graphs): quantization, pruning, least squares."""
