"""EMA, the optimizer builder, checkpoints (keep N, exact restore) and image grids."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common.weights.checkpoint import Checkpointer
from common.training.ema import ema_update
from common.errors import ConfigError
from common.images import make_grid, to_uint8
from common.training.optim import learning_rate_schedule, make_optimizer


def optim_cfg(**kw):
  c = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1.0, b1=0.9, b2=0.99, eps=1e-8,
                                     weight_decay=0.0, warmup_steps=10, schedule="cosine",
                                     final_lr_fraction=0.1, clip_norm=1.0))
  c.update(kw)
  return c


def test_warmup_then_cosine_and_constant():
  lr = learning_rate_schedule(optim_cfg(), total_steps=110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(lr(60), 0.1 + 0.9 * 0.5, atol=1e-6)   # half-way down the cosine
  np.testing.assert_allclose(lr(110), 0.1, atol=1e-6)
  lr = learning_rate_schedule(optim_cfg(schedule="constant", warmup_steps=0), total_steps=5)
  assert float(lr(0)) == float(lr(1000)) == 1.0
  with pytest.raises(ConfigError):
    learning_rate_schedule(optim_cfg(schedule="linear"), 10)
  with pytest.raises(ConfigError):
    make_optimizer(optim_cfg(name="sgd"), 10)


def test_clipping_bounds_the_update():
  # With a huge eps Adam's update is ~ -lr * m / eps, linear in the (clipped) gradient.
  kw = dict(schedule="constant", warmup_steps=0, b1=0.0, b2=0.0, eps=1e6, learning_rate=1.0)
  p = {"w": jnp.zeros(3)}
  g = {"w": jnp.array([300.0, 400.0, 0.0])}  # global norm 500
  for clip, want in ((1.0, 1e-6), (0.0, 500e-6)):
    tx = make_optimizer(optim_cfg(clip_norm=clip, **kw), 10)
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(float(jnp.linalg.norm(u["w"])), want, rtol=1e-3)


def test_ema_math_start_step_and_warmup():
  ema, p = {"a": jnp.array(0.0)}, {"a": jnp.array(1.0)}
  out = ema_update(ema, p, jnp.int32(5), decay=0.9)
  np.testing.assert_allclose(out["a"], 0.1, rtol=1e-6)
  out = ema_update(ema, p, jnp.int32(5), decay=0.9, start_step=10)  # before start: copies params
  np.testing.assert_allclose(out["a"], 1.0)
  out = ema_update(ema, p, jnp.int32(0), decay=0.999, warmup=True)   # decay min(.999, 1/10)
  np.testing.assert_allclose(out["a"], 0.9, rtol=1e-6)
  out = ema_update(ema, p, jnp.int32(10**7), decay=0.999, warmup=True)
  np.testing.assert_allclose(out["a"], 0.001, rtol=1e-4)


def test_checkpointer_keeps_n_and_restores_exactly(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=2, async_save=True)
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
  for s in range(1, 6):
    ck.save(s, {"w": tree["w"] * s, "step": jnp.int32(s)})
  ck.wait()
  assert ck.all_steps() == [4, 5] and ck.latest_step() == 5
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  got = ck.restore(4, abstract)
  np.testing.assert_array_equal(got["w"], np.arange(6.0).reshape(2, 3) * 4)
  assert int(got["step"]) == 4
  ck.close()


def test_grid_layout_and_upscaling():
  imgs = to_uint8(np.linspace(-1, 1, 5 * 8 * 8).reshape(5, 8, 8, 1))
  assert imgs.dtype == np.uint8 and imgs.min() == 0 and imgs.max() == 255
  g = make_grid(imgs, ncols=3, pad=1, min_tile=32)
  assert g.shape == (2 * 33 + 1, 3 * 33 + 1, 1)
  np.testing.assert_array_equal(g[1:33:4, 1:33:4, 0], imgs[0, :, :, 0])


def test_tree_names_round_trip_with_list_indices():
  from common.weights import tree_names
  tree = {"blocks": {0: {"w": 1}, 1: {"w": 2}}, "out": {"b": 3}}
  flat = tree_names.flatten(tree)
  assert flat == {"blocks.0.w": 1, "blocks.1.w": 2, "out.b": 3}
  assert tree_names.unflatten(flat) == tree
  assert tree_names.flatten(tree, sep="/")["blocks/1/w"] == 2
