"""Fused Triton kernels, one file per kernel. Imported lazily: Triton is optional."""
