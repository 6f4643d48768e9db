"""A batch of random inputs of a network's declared shapes: a train step run without data.

Benchmarks time train steps on it (benchmarks/bench_train_step.py, the step costs of
benchmarks/study_microdit_masking.py) and tests run a step of a family with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from common.training import sharding
from common.training.experiment import Experiment


def random_batch(exp: Experiment, batch_size: int, seed: int = 0) -> dict:
  """A global batch {"x", "cond"} of `batch_size` random examples of the shapes and dtypes of
  `exp.example_inputs`, sharded as the trainer shards its batches (`sharding.global_batch`).

  Float leaves are uniform in [-1, 1]; integer leaves are class labels in [0, num_classes) for a
  network with `num_classes`, else token masks (all ones).
  """
  rng = np.random.default_rng(seed)
  x, cond = exp.example_inputs(batch_size)

  def fill(s):
    if jnp.issubdtype(s.dtype, jnp.integer):
      classes = getattr(exp.abstract_model, "num_classes", 0) or 0
      if classes:
        return rng.integers(0, classes, s.shape).astype(s.dtype)
      return np.ones(s.shape, s.dtype)
    return rng.uniform(-1, 1, s.shape).astype(s.dtype)

  return sharding.global_batch({"x": fill(x), "cond": jax.tree.map(fill, cond)}, exp.mesh,
                               exp.rules)
