"""Shared test fixtures."""

import os
import sys

# The suite runs on the CPU. With the `compile` extra installed (libtpu, the CUDA plugin) jax would
# otherwise try those platforms first on a machine that has neither; compile tests name their
# target devices explicitly (tests/test_compile_targets.py). Set JAX_PLATFORMS to run the
# accelerator-marked tests on a GPU or TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
