"""The Triton kernels and their dispatch: what the patch targets call."""
