"""Pallas and jax-triton kernels, each with a pure-jnp reference: packed-ternary matmul, fused FP8 AdamW."""
