"""Compiled host-side kernels (numba), used at wrap time only, never in the training step."""
