"""Per-parameter learning-rate multipliers (optax and the fused FP8 AdamW) and the step schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from common.training import sharding
from common.errors import ConfigError
from common.training.experiment import Experiment
from common.training.optim import (FusedGradientTransformation, apply_gradients, learning_rate_schedule,
                          lr_scale_tree, make_optimizer, scale_learning_rates)
from configs import sid2_digits


def optim_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
      warmup_steps=0, schedule="constant", final_lr_fraction=0.0, clip_norm=0.0,
      lr_switch_step=0, lr_after_switch=0.0, lr_multipliers=()))
  c.update(kw)
  return c


def params_and_grads():
  k = jax.random.split(jax.random.key(0), 6)
  params = {"blocks": {0: {"mlp": {"experts": {"w1": {"kernel": jax.random.normal(k[0], (4, 8))}},
                                   "fc": {"kernel": jax.random.normal(k[1], (8, 3))}}},
                       1: {"mlp": {"experts": {"w1": {"kernel": jax.random.normal(k[2], (4, 8))}},
                                   "fc": {"kernel": jax.random.normal(k[3], (8, 3))}}}},
            "head": {"bias": jax.random.normal(k[4], (3,))}}
  grads = jax.tree.map(lambda p: jax.random.normal(k[5], p.shape), params)
  return params, grads


EXPERTS = (r"blocks/\d+/mlp/experts/.*", 0.1)


def test_scale_tree_first_match_wins_and_unmatched_regex_is_an_error():
  params, _ = params_and_grads()
  tree = lr_scale_tree(params, (EXPERTS, (r"blocks/.*", 0.5)))
  assert tree["blocks"][1]["mlp"]["experts"]["w1"]["kernel"] == 0.1   # first rule wins
  assert tree["blocks"][0]["mlp"]["fc"]["kernel"] == 0.5
  assert tree["head"]["bias"] == 1.0
  # fullmatch: a prefix is not enough
  assert lr_scale_tree(params, (("head/bias", 2.0),))["head"]["bias"] == 2.0
  with pytest.raises(ConfigError, match=r"\['head'\] match no parameter"):
    lr_scale_tree(params, (("head", 0.0),))
  with pytest.raises(ConfigError, match="match no parameter"):
    lr_scale_tree(params, (EXPERTS, ("blocks/7/.*", 0.1)))
  for bad in ((("(", 1.0),), (("head/bias", -1.0),), (("head/bias",),), (("head/bias", "x"),)):
    with pytest.raises(ConfigError, match="lr_multipliers"):
      lr_scale_tree(params, bad)
  with pytest.raises(ConfigError, match="match no parameter"):
    make_optimizer(optim_cfg(lr_multipliers=(("nope", 0.5),)), 10, params)


def first_step(tx, params, grads):
  new, _ = apply_gradients(tx, grads, tx.init(params), params)
  return jax.tree.map(jnp.subtract, new, params)


def test_adamw_multiplier_scales_the_whole_step_weight_decay_included():
  params, grads = params_and_grads()
  base = first_step(make_optimizer(optim_cfg(), 10, params), params, grads)
  tx = make_optimizer(optim_cfg(lr_multipliers=(EXPERTS,)), 10, params)
  scaled = first_step(tx, params, grads)
  # The optimizer state keeps its structure (checkpoints do not depend on the multipliers).
  assert (jax.tree.structure(tx.init(params))
          == jax.tree.structure(make_optimizer(optim_cfg(), 10, params).init(params)))
  for i in (0, 1):
    u, b = (t["blocks"][i]["mlp"]["experts"]["w1"]["kernel"] for t in (scaled, base))
    np.testing.assert_allclose(u, 0.1 * b, rtol=1e-5, atol=3e-7)  # new - p: fp32 ulps of p ~ 1
    np.testing.assert_array_equal(scaled["blocks"][i]["mlp"]["fc"]["kernel"],
                                  base["blocks"][i]["mlp"]["fc"]["kernel"])
  # Same as a torch param group with lr * 0.1: optax.adamw at that rate, decay term included
  # (weight_decay 0.1 makes it a visible part of the step).
  ref = first_step(optax.adamw(1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1), params, grads)
  np.testing.assert_allclose(scaled["blocks"][0]["mlp"]["experts"]["w1"]["kernel"],
                             ref["blocks"][0]["mlp"]["experts"]["w1"]["kernel"],
                             rtol=1e-5, atol=3e-7)
  # With the update path the scale is an exact multiply of the update.
  s0 = tx.init(params)
  u_scaled, _ = tx.update(grads, s0, params)
  u_base, _ = make_optimizer(optim_cfg(), 10, params).update(grads, s0, params)
  np.testing.assert_array_equal(u_scaled["blocks"][0]["mlp"]["experts"]["w1"]["kernel"],
                                0.1 * u_base["blocks"][0]["mlp"]["experts"]["w1"]["kernel"])


def test_zero_multiplier_freezes_matched_params_over_clipped_steps():
  params, grads = params_and_grads()
  tx = make_optimizer(optim_cfg(clip_norm=0.5, lr_multipliers=((r"blocks/0/.*", 0.0),)), 10,
                      params)
  state, p = tx.init(params), params
  for _ in range(3):
    p, state = apply_gradients(tx, grads, state, p)
  jax.tree.map(np.testing.assert_array_equal, p["blocks"][0], params["blocks"][0])
  assert not np.allclose(p["blocks"][1]["mlp"]["fc"]["kernel"],
                         params["blocks"][1]["mlp"]["fc"]["kernel"])
  assert not np.allclose(p["head"]["bias"], params["head"]["bias"])


def coat_cfg(**kw):
  return optim_cfg(name="coat.optim.fp8_adamw", options={"impl": "jnp"}, **kw)


def test_fp8_adamw_keeps_its_fused_step_and_scales_per_parameter():
  params, grads = params_and_grads()
  base_tx = make_optimizer(coat_cfg(clip_norm=1.0), 10, params)
  tx = make_optimizer(coat_cfg(clip_norm=1.0,
                               lr_multipliers=(EXPERTS, (r"blocks/1/mlp/fc/.*", 0.0))),
                      10, params)
  assert isinstance(tx, FusedGradientTransformation)
  base = first_step(base_tx, params, grads)
  scaled = first_step(tx, params, grads)
  for i in (0, 1):
    np.testing.assert_allclose(scaled["blocks"][i]["mlp"]["experts"]["w1"]["kernel"],
                               0.1 * base["blocks"][i]["mlp"]["experts"]["w1"]["kernel"],
                               rtol=1e-5, atol=3e-7)
  np.testing.assert_array_equal(scaled["blocks"][1]["mlp"]["fc"]["kernel"], 0.0)
  np.testing.assert_array_equal(scaled["blocks"][0]["mlp"]["fc"]["kernel"],
                                base["blocks"][0]["mlp"]["fc"]["kernel"])
  # The update path (tx.update + optax.apply_updates) computes the same step.
  updates, _ = tx.update(grads, tx.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-7),
               updates, scaled)


def test_fused_step_without_lr_scale_falls_back_to_update():
  params, grads = params_and_grads()
  inner = optax.adamw(1e-2)

  def apply(g, s, p, grad_scale=None):
    u, s = inner.update(g, s, p)
    return optax.apply_updates(p, u), s

  fused = FusedGradientTransformation(inner.init, inner.update, apply)
  tx = scale_learning_rates(fused, lr_scale_tree(params, ((r"head/.*", 0.0),)))
  assert not isinstance(tx, FusedGradientTransformation)
  step = first_step(tx, params, grads)
  np.testing.assert_array_equal(step["head"]["bias"], 0.0)
  assert np.abs(step["blocks"][0]["mlp"]["fc"]["kernel"]).min() > 0


def test_step_schedule_after_warmup():
  lr = learning_rate_schedule(optim_cfg(schedule="step", learning_rate=5e-4, warmup_steps=4,
                                        lr_switch_step=10, lr_after_switch=1e-4), 100)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 9, 10, 50)],
                             [0.0, 2.5e-4, 5e-4, 5e-4, 1e-4, 1e-4], rtol=1e-6)
  lr = learning_rate_schedule(optim_cfg(schedule="step", learning_rate=5e-4, lr_switch_step=3,
                                        lr_after_switch=1e-4), 100)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 3)], [5e-4, 5e-4, 1e-4], rtol=1e-6)
  for bad in (dict(lr_switch_step=0), dict(lr_switch_step=2, warmup_steps=5),
              dict(lr_switch_step=5, lr_after_switch=0.0)):
    with pytest.raises(ConfigError, match="lr_switch_step|lr_after_switch"):
      learning_rate_schedule(optim_cfg(schedule="step", **bad), 100)


@pytest.mark.slow  # tests/test_init_from.py trains with a frozen group in the fast set
def test_experiment_train_steps_leave_zero_multiplier_params_in_place():
  """Through the jitted train step (clipping, EMA): the regex sees the network's real paths."""
  c = sid2_digits.get_config("runlocal")
  c.model.channels, c.model.level_types = (16,), ("transformer",)  # compiles fast
  c.model.blocks_per_level, c.model.dropout, c.model.patch_size = (), (0.0,), 2
  c.optim.warmup_steps = 0
  c.optim.lr_multipliers = ((r"mid/.*", 0.0), (r"patch_embed/.*", 0.5))
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  state = exp.init_state(0)
  init = jax.tree.map(np.asarray, state["params"])
  batch = {"x": jnp.zeros((16, 8, 8, 1)), "cond": {"label": jnp.arange(16) % 10}}
  for step in range(2):
    state, _ = exp.train_step(state, batch, exp.step_key(step))
  jax.tree.map(np.testing.assert_array_equal, state["params"]["mid"], init["mid"])
  assert not np.allclose(state["params"]["patch_embed"]["proj"]["kernel"],
                         init["patch_embed"]["proj"]["kernel"])
  assert not np.allclose(state["params"]["out_proj"]["proj"]["kernel"],
                         init["out_proj"]["proj"]["kernel"])
