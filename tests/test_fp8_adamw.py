"""Tests of coat/optim.py (FP8 AdamW) and kernels/fp8_adamw.py (the fused Pallas kernel)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

from coat import fp8
from coat.optim import Fp8AdamWState, fp8_adamw, state_bytes
from common.training.ema import ema_update
from common.errors import ConfigError
from common.training.memory import temporaries_mib
from kernels.fp8_adamw import fp8_adamw_rows

# ---------------------------------------------------------------------------------------------
# The digits problem: standardized sklearn digits, a 64-128-10 ReLU MLP, minibatches of 128.

HIDDEN = 128
STEPS = 300
BATCH = 128


@functools.lru_cache(maxsize=1)
def _digits():
  d = load_digits()
  x = StandardScaler().fit_transform(d.data)
  return jnp.asarray(x, jnp.float32), jnp.asarray(d.target, jnp.int32)


def _init_mlp(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (64, HIDDEN)) / 8.0, "b1": jnp.zeros(HIDDEN),
          "w2": jax.random.normal(k2, (HIDDEN, 10)) / jnp.sqrt(HIDDEN), "b2": jnp.zeros(10)}


def _loss(p, x, y):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"] + p["b2"], y).mean()


def _train(tx, steps=STEPS):
  """Trains the MLP with `tx`; returns (final full-data loss, final optimizer state)."""
  x, y = _digits()
  idx = jax.random.randint(jax.random.key(1), (steps, BATCH), 0, x.shape[0])

  @jax.jit
  def run():
    p = _init_mlp(jax.random.key(0))
    s = tx.init(p)

    def body(carry, i):
      p, s = carry
      g = jax.grad(_loss)(p, x[i], y[i])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, s), _ = jax.lax.scan(body, (p, s), idx)
    return _loss(p, x, y), s

  return run()


def _schedule():
  return optax.warmup_cosine_decay_schedule(0.0, 1e-3, 20, STEPS)


# ---------------------------------------------------------------------------------------------
# Following optax.adamw.


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_first_step_equals_optax_adamw(impl):
  """From the fresh state nothing has been quantized yet: step 1 is fp32 AdamW exactly."""
  params = {"w": jax.random.normal(jax.random.key(0), (37, 129)), "b": jnp.arange(5.0)}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  sched = optax.linear_schedule(2e-3, 1e-3, 10)
  want, _ = optax.adamw(sched, weight_decay=0.1).update(
      grads, optax.adamw(sched, weight_decay=0.1).init(params), params)
  tx = fp8_adamw(sched, weight_decay=0.1, impl=impl, interpret=True, block_rows=8)
  got, state = jax.jit(tx.update)(grads, tx.init(params), params)
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-5, atol=1e-9)
    assert got[k].shape == params[k].shape and got[k].dtype == jnp.float32
  assert int(state.count) == 1
  # the stored m is (1 - b1) g quantized per group
  np.testing.assert_allclose(np.asarray(fp8.dequantize_groups(state.mu["w"])),
                             0.1 * np.asarray(grads["w"]), rtol=0.13)


def test_digits_final_loss_follows_optax_adamw():
  ref_loss, _ = _train(optax.adamw(_schedule(), weight_decay=1e-4))
  fp8_loss, state = _train(fp8_adamw(_schedule(), weight_decay=1e-4))
  rel = (float(fp8_loss) - float(ref_loss)) / float(ref_loss)
  print(f"\ndigits MLP, {STEPS} steps: optax.adamw loss {float(ref_loss):.4f}, "
        f"fp8_adamw loss {float(fp8_loss):.4f} ({100 * rel:+.2f}%)")
  assert int(state.count) == STEPS
  assert float(ref_loss) < 0.3  # it did train
  # fp8_adamw trains ~4% *faster* on this problem (the quantized v errs low on wide groups);
  # see the report. The gap bound is 5%; it must never train worse than optax by more than 2%.
  assert abs(rel) < 0.05 and rel < 0.02


def test_expansion_lowers_m_over_sqrt_v_error_of_real_moments():
  _, (adam_state, *_) = _train(optax.adam(1e-3), steps=200)
  mse = {}
  for expand in (True, False):
    errs = []
    for m, v in zip(jax.tree.leaves(adam_state.mu), jax.tree.leaves(adam_state.nu)):
      mq = fp8.dequantize_groups(fp8.quantize_groups(m, expand=expand))
      vq = fp8.dequantize_groups(fp8.quantize_groups(v, expand=expand))
      ratio, ratio_q = m / (jnp.sqrt(v) + 1e-8), mq / (jnp.sqrt(vq) + 1e-8)
      errs.append(((ratio_q - ratio) ** 2).ravel())
    mse[expand] = float(jnp.concatenate(errs).mean())
  print(f"\nMSE of m/sqrt(v), real Adam moments (digits, 200 steps): E4M3+Exp {mse[True]:.3e}, "
        f"E4M3 {mse[False]:.3e}")
  assert mse[True] < 0.5 * mse[False]


# ---------------------------------------------------------------------------------------------
# The Pallas kernel equals the jnp path.


def _random_moment(key, n):
  q = fp8.quantize_groups(jax.random.normal(key, (n, 128)) * 1e-2)
  return (q.codes, q.scale[:, None], q.k[:, None], q.c[:, None])


@pytest.mark.parametrize("weight_decay,expand", [(0.0, True), (0.05, False)])
def test_pallas_kernel_equals_jnp(weight_decay, expand):
  n = 38  # 5 programs of 8 groups, the last one partial
  keys = jax.random.split(jax.random.key(3), 5)
  g = jax.random.normal(keys[0], (n, 128)) * 1e-1
  g = g.at[3].set(0.0).at[7, 5].set(jnp.nan)  # an all-zero group and a non-finite group
  p = jax.random.normal(keys[1], (n, 128))
  m = _random_moment(keys[2], n)
  v = _random_moment(keys[3], n)
  v = (v[0], v[1], v[2], v[3])
  v = tuple(jnp.abs(a.astype(jnp.float32)).astype(a.dtype) for a in v)
  args = (g, p, m, v, jnp.float32(1e-3), jnp.float32(0.19), jnp.float32(0.0447))
  kw = dict(weight_decay=weight_decay, expand=expand)
  ref = jax.jit(functools.partial(fp8_adamw_rows, impl="jnp", **kw))(*args)
  got = jax.jit(functools.partial(fp8_adamw_rows, impl="pallas", interpret=True, block_rows=8,
                                  **kw))(*args)
  u_ref, m_ref, v_ref = ref
  u_got, m_got, v_got = got
  # m = b1 m + (1-b1) g cancels; XLA may contract it into an FMA in one path and not the other,
  # so the tolerance is fp32 rounding relative to the update's scale.
  scale = float(jnp.abs(u_ref).max())
  np.testing.assert_allclose(np.asarray(u_got), np.asarray(u_ref), rtol=1e-5, atol=1e-6 * scale)
  assert bool((u_got[7] == 0).all())  # the non-finite group: no update, old state kept
  for new, old in ((m_got, m), (v_got, v)):
    for a, b in zip(new, old):
      np.testing.assert_array_equal(np.asarray(a[7].astype(jnp.float32)),
                                    np.asarray(b[7].astype(jnp.float32)))
  for got_rows, ref_rows in ((m_got, m_ref), (v_got, v_ref)):
    for a, b in zip(got_rows, ref_rows):
      assert a.dtype == b.dtype and a.shape == b.shape
    # the group min can come from a cancelled element whose value differs in the last bits, which
    # moves c and s slightly: compare the decoded moments, and k (a multiple of 1/16) exactly
    # except where that min sits on a floor boundary.
    assert np.mean(np.asarray(got_rows[2]) != np.asarray(ref_rows[2])) < 0.05
    dg = np.asarray(fp8.dre_dequantize_rows(*got_rows))
    dr = np.asarray(fp8.dre_dequantize_rows(*ref_rows))
    row_max = np.abs(dr).max(axis=1, keepdims=True)
    np.testing.assert_allclose(dg, dr, rtol=0.07, atol=1e-3 * float(row_max.max()))
    assert np.mean(np.abs(dg - dr) <= 1e-4 * np.abs(dr)) > 0.95


def test_pallas_optimizer_tracks_jnp_optimizer_over_steps():
  params = {"w": jax.random.normal(jax.random.key(0), (37, 129)), "b": jnp.zeros(()),
            "e": jnp.ones((3, 5, 7))}
  txs = [fp8_adamw(1e-2, weight_decay=0.01, impl=impl, interpret=True, block_rows=16)
         for impl in ("jnp", "pallas")]
  states = [tx.init(params) for tx in txs]
  ps = [params, params]
  for step in range(3):
    grads = jax.tree.map(
        lambda p, s=step: jax.random.normal(jax.random.key(10 + s), jnp.shape(p)), params)
    for i, tx in enumerate(txs):
      u, states[i] = jax.jit(tx.update)(grads, states[i], ps[i])
      ps[i] = optax.apply_updates(ps[i], u)
  for a, b in zip(jax.tree.leaves(ps[0]), jax.tree.leaves(ps[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(states[0].nu), jax.tree.leaves(states[1].nu)):
    np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)),
                               np.asarray(b.astype(jnp.float32)), rtol=0.13, atol=0)


# ---------------------------------------------------------------------------------------------
# Defined behaviour on bad input, memory, checkpoints, sharding.


def _all_finite(tree):
  return all(bool(jnp.isfinite(a.astype(jnp.float32)).all()) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_nonfinite_gradients_skip_the_step(impl):
  params = {"w": jnp.ones((10, 30)), "b": jnp.ones((7,))}
  tx = fp8_adamw(1e-2, weight_decay=0.1, impl=impl, interpret=True)
  update = jax.jit(tx.update)
  good = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
  _, state = update(good, tx.init(params), params)
  for bad_value in (jnp.nan, jnp.inf, -jnp.inf):
    bad = {"w": good["w"].at[3, 4].set(bad_value), "b": good["b"]}
    u, new_state = update(bad, state, params)
    assert all(bool((a == 0).all()) for a in jax.tree.leaves(u))  # the whole step is skipped
    assert int(new_state.count) == int(state.count)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                    np.asarray(b.astype(jnp.float32)))
  # with the whole-step skip off, only the bad group keeps its state; nothing becomes NaN
  tx2 = fp8_adamw(1e-2, impl=impl, interpret=True, skip_nonfinite=False)
  bad = {"w": good["w"].at[3, 4].set(jnp.nan), "b": good["b"]}
  u, s2 = jax.jit(tx2.update)(bad, state, params)
  assert _all_finite(s2) and _all_finite(u)
  assert bool((u["w"].ravel()[:128] == 0).all()) and bool((u["w"].ravel()[128:] != 0).all())
  # a finite gradient whose square overflows fp32 never puts inf/NaN in the state
  huge = {"w": good["w"].at[0, 0].set(3e38), "b": good["b"]}
  u, s3 = jax.jit(tx.update)(huge, state, params)
  assert _all_finite(s3) and _all_finite(u)


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_zero_grads_odd_sizes_and_scalars(impl):
  params = {"s": jnp.float32(2.0), "odd": jnp.ones((3, 5, 7)), "z": jnp.ones((129,))}
  tx = fp8_adamw(1e-2, impl=impl, interpret=True)
  state = tx.init(params)
  for step in range(2):
    grads = {"s": jnp.float32(0.3 * step), "odd": jnp.full((3, 5, 7), 1e-3),
             "z": jnp.zeros((129,))}
    u, state = jax.jit(tx.update)(grads, state, params)
    assert _all_finite(state) and _all_finite(u)
    assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(np.asarray(u["z"]), 0.0)
  np.testing.assert_array_equal(np.asarray(state.mu["z"].scale), 0.0)  # all-zero groups
  np.testing.assert_allclose(np.asarray(u["odd"]), -1e-2, rtol=1e-3)  # Adam: -lr sign(g)


def test_state_bytes_per_parameter():
  params = _init_mlp(jax.random.key(0))
  n_params = sum(p.size for p in jax.tree.leaves(params))
  state = fp8_adamw(1e-3).init(params)
  per_param = state_bytes(state) / n_params
  ref = state_bytes(optax.adamw(1e-3).init(params)) / n_params
  print(f"\nstate bytes/param: fp8_adamw {per_param:.4f} (MLP tree), optax.adamw {ref:.4f}")
  assert per_param <= 2.25 and ref >= 8.0
  big = fp8_adamw(1e-3).init({"w": jnp.zeros((256, 512))})
  assert state_bytes(big) == 256 * 512 * 2 * (1 + 3 * 4 / 128) + 4  # 2.1875 B/param + count


def test_orbax_checkpoint_round_trip(tmp_path):
  params = {"w": jax.random.normal(jax.random.key(0), (20, 30)), "b": jnp.zeros((3,))}
  tx = fp8_adamw(1e-3, weight_decay=0.01)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "opt_state"
  ckpt.save(path, state)
  ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ckpt.restore(path, abstract)
  ckpt.close()
  assert isinstance(restored, Fp8AdamWState)
  assert restored.mu["w"].codes.dtype == fp8.E4M3 and restored.mu["w"].shape == (20, 30)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                  np.atleast_1d(np.asarray(b)).view(np.uint8))
  u1, _ = jax.jit(tx.update)(grads, state, params)
  u2, _ = jax.jit(tx.update)(grads, restored, params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("num_shards,impl", [(2, "jnp"), (4, "pallas")])
def test_groups_stay_within_leading_axis_shards(num_shards, impl):
  params = {"w": jax.random.normal(jax.random.key(0), (8, 100)), "b": jnp.ones((3,))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  tx = fp8_adamw(1e-3, num_shards=num_shards, impl=impl, interpret=True)
  state = tx.init(params)
  assert state.mu["w"].num_shards == num_shards and state.mu["b"].num_shards == 1  # 3 % n != 0
  _, state = jax.jit(tx.update)(grads, state, params)
  for moment, target in ((state.mu["w"], 0.1 * grads["w"]),
                         (state.nu["w"], 0.001 * grads["w"] ** 2)):
    shards = [fp8.quantize_groups(s) for s in jnp.split(target, num_shards, axis=0)]
    for field in ("codes", "scale", "k", "c"):
      want = jnp.concatenate([getattr(s, field) for s in shards]).astype(jnp.float32)
      got = getattr(moment, field).astype(jnp.float32)
      assert got.shape == want.shape
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  # a callable picks the shard count per parameter shape
  tx_fn = fp8_adamw(1e-3, num_shards=lambda shape: 4 if len(shape) == 2 else 1)
  assert tx_fn.init(params).mu["w"].num_shards == 4


def _step_temporaries(num_leaves: int) -> float:
  """Compiled temporaries (MiB) of one apply step of fp8_adamw (wd 0.1) on `num_leaves` f32
  [1024, 1024] parameters, params and state donated."""
  params = {f"w{i}": jax.ShapeDtypeStruct((1024, 1024), jnp.float32) for i in range(num_leaves)}
  tx = fp8_adamw(1e-3, weight_decay=0.1)
  state = jax.eval_shape(tx.init, params)
  return temporaries_mib(tx.apply, params, state, params, donate_argnums=(1, 2))


def test_step_memory_does_not_grow_with_the_number_of_leaves():
  """Leaves are updated one at a time: without that XLA dequantized every leaf's moments to fp32
  at once (224.8 MiB of temporaries for 8 leaves of 4 MiB; 28.1 MiB with it)."""
  eight, sixteen = _step_temporaries(8), _step_temporaries(16)
  assert sixteen < 1.1 * eight and eight < 8 * 4, (eight, sixteen)


def test_the_step_and_the_ema_make_no_copy_of_the_parameters():
  """The trainer's order: the in-place step, then the EMA of the new parameters, all donated.
  Without the barrier on each leaf's results XLA fused the update into the EMA too, which then
  read each old parameter after the step had overwritten it, so every parameter was copied
  (40.0 MiB of temporaries for 32 MiB of parameters; 24.1 MiB without the copies)."""
  params = {f"w{i}": jax.ShapeDtypeStruct((1024, 1024), jnp.float32) for i in range(8)}
  tx = fp8_adamw(1e-3, weight_decay=0.1)
  state = jax.eval_shape(tx.init, params)

  def step(grads, state, params, ema):
    new, state = tx.apply(grads, state, params)
    return new, state, ema_update(ema, new, jnp.int32(5), decay=0.999)
  assert temporaries_mib(step, params, state, params, params, donate_argnums=(1, 2, 3)) < 8 * 4


def test_bad_arguments():
  with pytest.raises(ConfigError, match="impl"):
    fp8_adamw(1e-3, impl="cuda")
  tx = fp8_adamw(1e-3, weight_decay=0.1)
  params = {"w": jnp.ones((4,))}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
  if jax.default_backend() == "cpu":
    tx = fp8_adamw(1e-3, impl="pallas")  # without interpret=True
    with pytest.raises(ConfigError, match="interpret=True"):
      tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------------------------
# The in-place step through common.training.optim (the trainer's path).


def _optim_cfg(name="coat.optim.fp8_adamw", clip_norm=0.5, **options):
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(dict(
      name=name, learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.05,
      warmup_steps=2, schedule="cosine", final_lr_fraction=0.1, clip_norm=clip_norm,
      options=options))


def _tree():
  k = jax.random.split(jax.random.key(7), 3)
  return {"w": jax.random.normal(k[0], (16, 128)), "b": jax.random.normal(k[1], (5,)),
          "e": jax.random.normal(k[2], (3, 5, 7))}


def _grads(step):
  return jax.tree.map(lambda p: 3.0 * jax.random.normal(jax.random.key(100 + step), p.shape),
                      _tree())


def test_make_optimizer_by_dotted_name_keeps_the_fused_step():
  from common.errors import ConfigError  # pylint: disable=import-outside-toplevel,reimported
  from common.training.optim import FusedGradientTransformation, make_optimizer  # pylint: disable=import-outside-toplevel
  tx = make_optimizer(_optim_cfg(impl="jnp"), 10)
  assert isinstance(tx, FusedGradientTransformation) and isinstance(tx, optax.GradientTransformation)
  # the state has the structure of optax.chain(clip, fp8_adamw): checkpoints do not change
  chained = optax.chain(optax.clip_by_global_norm(0.5), fp8_adamw(1e-2))
  assert (jax.tree.structure(tx.init(_tree()))
          == jax.tree.structure(chained.init(_tree())))
  assert isinstance(make_optimizer(_optim_cfg(clip_norm=0.0), 10), FusedGradientTransformation)
  assert not isinstance(make_optimizer(_optim_cfg(name="adamw"), 10), FusedGradientTransformation)
  make_optimizer(_optim_cfg(name="optax.adamw"), 10)  # any factory with AdamW's keywords
  for bad in ("fp8_adamw", "coat.optim.nope", "nomodule.fn"):
    with pytest.raises(ConfigError, match="optim.name"):
      make_optimizer(_optim_cfg(name=bad), 10)
  with pytest.raises(ConfigError, match="impl"):
    make_optimizer(_optim_cfg(impl="cuda"), 10)


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_apply_gradients_in_place_equals_update_path(impl):
  """3 clipped steps with `apply_gradients` (fused, in place) vs `update` + `apply_updates`."""
  from common.training.optim import apply_gradients, make_optimizer  # pylint: disable=import-outside-toplevel
  fused = make_optimizer(_optim_cfg(impl=impl, interpret=True, block_rows=8), 10)
  plain = make_optimizer(_optim_cfg(impl="jnp"), 10)

  def plain_step(p, s, g):
    u, s = plain.update(g, s, p)
    return optax.apply_updates(p, u), s

  fused_step = jax.jit(functools.partial(apply_gradients, fused), donate_argnums=(1, 2))
  plain_step = jax.jit(plain_step)
  pf, sf = _tree(), fused.init(_tree())
  pp, sp = _tree(), plain.init(_tree())
  for step in range(3):
    assert float(optax.global_norm(_grads(step))) > 0.5  # clipping acts
    pf, sf = fused_step(_grads(step), sf, pf)
    pp, sp = plain_step(pp, sp, _grads(step))
  for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pp)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(sf[1].count) == int(sp[1].count) == 3
  for a, b in zip(jax.tree.leaves(sf), jax.tree.leaves(sp)):
    codes = a.dtype == fp8.E4M3
    a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
    # fp32 rounding differences (FMA contraction) can flip an E4M3 code by one step (2^-3)
    assert not codes or np.mean(a != b) < 0.01
    np.testing.assert_allclose(a, b, rtol=0.13, atol=1e-6 * float(np.abs(b).max()))


def test_apply_gradients_skips_nonfinite_and_resumes_exactly():
  from common.training.optim import apply_gradients, make_optimizer  # pylint: disable=import-outside-toplevel
  tx = make_optimizer(_optim_cfg(impl="pallas", interpret=True), 10)
  step = jax.jit(functools.partial(apply_gradients, tx), donate_argnums=(1, 2))
  p, s = _tree(), tx.init(_tree())
  p, s = step(_grads(0), s, p)
  before = jax.device_get((p, s))
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(1))
  p, s = step(bad, s, p)  # skipped: parameters and state unchanged bit for bit
  for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                  np.atleast_1d(np.asarray(b)).view(np.uint8))
  # two more steps straight, or through a host round trip (a checkpoint): identical
  saved = jax.device_get((p, s))
  straight = (p, s)
  for i in (2, 3):
    straight = step(_grads(i), straight[1], straight[0])
  resumed = jax.device_put(saved)
  for i in (2, 3):
    resumed = step(_grads(i), resumed[1], resumed[0])
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                  np.atleast_1d(np.asarray(b)).view(np.uint8))
  assert int(straight[1][1].count) == 3


def test_donated_train_step_aliases_params_and_state():
  """A jitted train step with params and state donated: the compiled executable writes the new
  parameters and FP8 moments into the donated buffers (aliased outputs), as the trainer's does."""
  from common.training.optim import apply_gradients, make_optimizer  # pylint: disable=import-outside-toplevel
  tx = make_optimizer(_optim_cfg(impl="pallas", interpret=True), 10)
  params = {"w": jnp.ones((64, 128)), "v": jnp.ones((32, 128))}
  state = tx.init(params)

  def train_step(params, opt_state, x):
    grads = jax.grad(lambda p: jnp.sum((x @ p["w"].T) ** 2) + jnp.sum(p["v"] ** 2))(params)
    return apply_gradients(tx, grads, opt_state, params)

  x = jnp.ones((4, 128))
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, x).compile()
  hlo = compiled.as_text()
  header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
  # params (2 leaves) and both moments (4 arrays per leaf each) are aliased to outputs
  assert len(re.findall(r"(?:may|must)-alias", header)) >= 2 + 8 * 2, header
  mem = compiled.memory_analysis()
  donated = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((params, state)))
  if mem is not None and getattr(mem, "alias_size_in_bytes", 0):
    assert mem.alias_size_in_bytes >= donated - 64  # all but scalars (count) may stay separate
  new_p, new_s = compiled(params, state, x)
  assert int(new_s[1].count) == 1 and new_p["w"].shape == (64, 128)
  assert float(jnp.abs(new_s[1].mu["w"].codes.astype(jnp.float32)).max()) > 0  # m was written
