"""Pallas and jax-triton kernels, each with a pure-jnp reference: packed-ternary matmul, fused FP8 AdamW
(with its Dynamic Range Expansion row math, kernels/dre.py). A leaf package: it imports nothing of the
project's own and raises plain ValueError."""
