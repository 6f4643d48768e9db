"""COAT mode (`config.precision = "coat"`) trains every family: the same preset of numerics rules
and optimizer reaches MicroDiT's and TerDiT's full-precision networks, with no family code in
the trainer (SiD2: tests/test_coat_activations.py)."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from common.nn import layers
from common.nn import numerics
from common.training import sharding
from common.training.experiment import Experiment
from common.training.random_batch import random_batch
from configs.base import load_config

FAMILIES = ("configs/microdit.py:runlocal", "configs/terdit.py:runlocal,fp")


def _coat(spec: str):
  c = load_config(spec)
  c.precision = "coat"
  c.optim.warmup_steps = 0
  c.train.batch_size = 4
  return c


@pytest.mark.parametrize("spec", FAMILIES)
def test_coat_rules_reach_the_family(spec):
  from coat import activations, linear  # pylint: disable=import-outside-toplevel
  exp = Experiment(_coat(spec), sharding.make_mesh(_coat(spec).mesh))
  fp8 = [p for p, m in nnx.iter_graph(exp.abstract_model) if isinstance(m, linear.FP8Dense)]
  saved = [p for p, m in nnx.iter_graph(exp.abstract_model)
           if isinstance(getattr(m, "residuals", None), activations.FP8Residuals)]
  assert fp8 and all(any(k in p for k in ("attn", "cross_attn", "mlp", "ffn")) for p in fp8), fp8
  # every activation of the blocks' MLPs, the gated product included (every layer's numerics by
  # role: tests/test_precision_coverage.py)
  acts = [p for p, m in nnx.iter_graph(exp.abstract_model)
          if isinstance(m, layers.Activation) and re.search(r"\d+/mlp/", "/".join(map(str, p)))]
  assert acts and set(acts) <= set(saved), (acts, saved)
  # a mixture of experts' per-expert maps too (MicroDiT): no high-precision ExpertDense is left
  assert not [p for p, m in nnx.iter_graph(exp.abstract_model)
              if isinstance(m, layers.ExpertDense)]
  if spec.startswith("configs/microdit.py"):
    assert [p for p, m in nnx.iter_graph(exp.abstract_model)
            if isinstance(m, linear.FP8ExpertDense)]
  assert numerics.optim_config(exp.config).name == "coat.optim.fp8_adamw"


@pytest.mark.slow  # the FP8 train step's CPU compile takes minutes
@pytest.mark.parametrize("spec", FAMILIES)
def test_coat_mode_trains_the_family(spec):
  c = _coat(spec)
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  state = exp.init_state(0)
  before = jax.tree.map(np.asarray, state["params"])
  batch = random_batch(exp, 4)
  losses = []
  for step in range(3):
    state, metrics = exp.train_step(state, batch, exp.step_key(step))
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and int(state["step"]) == 3
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                         state["params"], before))
  assert sum(changed) > len(changed) // 2
