"""Tests of coat/fp8.py: per-tensor, 1xG and Dynamic-Range-Expansion group quantization."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from coat import fp8
from common.errors import ShapeError


def _lognormal(key, shape, sigma=2.0):
  k1, k2 = jax.random.split(key)
  return jax.random.normal(k1, shape) * jnp.exp(sigma * jax.random.normal(k2, shape))


def _coat_dre_reference(x, group_size=128):
  """Spec B2 written directly in float64 numpy (groups of the flattened tensor, last partial).

  Returns per group (k, c, s) and the decoded values of the float8 codes.
  """
  flat = np.asarray(x, np.float64).ravel()
  n_groups = max(1, -(-flat.size // group_size))
  flat = np.pad(flat, (0, n_groups * group_size - flat.size)).reshape(n_groups, group_size)
  ks, cs, ss, dec = [], [], [], []
  for g in flat:
    a = np.abs(g)
    big = a.max() + 1e-30
    small = a[a > 0].min() + 1e-30  # a true min over the nonzero magnitudes
    r = big / small
    k = 1.0 if r == 1.0 else math.floor(16 * math.log2(448.0**2 / 2) / math.log2(r)) / 16
    c = math.sqrt(big) * math.sqrt(small)
    expanded = np.sign(g) * (a / c) ** k
    s = (big / c) ** k / 448.0
    codes = np.clip(expanded / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    xq = codes * s
    dec.append(np.sign(xq) * np.abs(xq) ** (1.0 / k) * c)
    ks.append(k)
    cs.append(c)
    ss.append(s)
  return np.array(ks), np.array(cs), np.array(ss), np.stack(dec)


# ---------------------------------------------------------------------------------------------
# Per-tensor and 1xG.


@pytest.mark.parametrize("dtype,bound,rel", [(fp8.E4M3, 448.0, 2**-4), (fp8.E5M2, 57344.0, 2**-3)])
def test_per_tensor_round_trip(dtype, bound, rel):
  x = jax.random.normal(jax.random.key(0), (64, 48)) * 3.0
  codes, scale = fp8.quantize_per_tensor(x, dtype)
  assert codes.dtype == dtype and codes.shape == x.shape and scale.shape == ()
  np.testing.assert_allclose(float(scale), (float(jnp.abs(x).max()) + 1e-10) / bound, rtol=1e-6)
  y = fp8.dequantize_per_tensor(codes, scale)
  big = jnp.abs(x) > 0.1 * jnp.abs(x).max()  # normal range of the format: relative error bound
  assert float(jnp.max(jnp.where(big, jnp.abs(y - x) / jnp.abs(x), 0.0))) <= rel
  assert float(jnp.abs(codes.astype(jnp.float32)).max()) == bound  # the max maps to fp8_max


def test_e4m3_cast_saturates_instead_of_nan():
  big = jnp.array([448.0, 449.0, 500.0, 1e9, -1e30, -600.0])
  assert bool(jnp.isnan(big.astype(fp8.E4M3)).any())  # why we clip: a raw cast
  out = fp8.cast_to_fp8(big).astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(out), [448, 448, 448, 448, -448, -448])
  codes, _ = fp8.quantize_per_tensor(big, scale=jnp.float32(1.0))
  assert not bool(jnp.isnan(codes.astype(jnp.float32)).any())
  assert float(codes.astype(jnp.float32)[3]) == 448.0


def test_per_group_activations_bf16_scales_and_clip():
  x = _lognormal(jax.random.key(1), (4, 6, 64), sigma=3.0)
  codes, scales = fp8.quantize_per_group(x, 16)
  assert codes.shape == x.shape and codes.dtype == fp8.E4M3
  assert scales.shape == (4, 6, 4) and scales.dtype == jnp.bfloat16
  c32 = codes.astype(jnp.float32)
  # bf16 scales are rounded: x / s can exceed 448, which must saturate, never give NaN.
  assert not bool(jnp.isnan(c32).any()) and float(jnp.abs(c32).max()) <= 448.0
  y = fp8.dequantize_per_group(codes, scales, jnp.float32)
  xg = x.reshape(4, 6, 4, 16)
  gmax = jnp.abs(xg).max(-1, keepdims=True)
  err = jnp.abs(y.reshape(xg.shape) - xg)
  # error within E4M3's half-ulp at the group's top octave, plus bf16 scale rounding
  assert float(jnp.max(err / gmax)) < 2**-4 + 2**-7
  with pytest.raises(ShapeError):
    fp8.quantize_per_group(jnp.ones((3, 10)), 16)


# ---------------------------------------------------------------------------------------------
# Groups with Dynamic Range Expansion.


def test_quantize_groups_matches_coat_dre():
  x = _lognormal(jax.random.key(2), (16, 128), sigma=1.5)  # 16 groups of 128
  q = fp8.quantize_groups(x)
  ks, cs, ss, dec = _coat_dre_reference(np.asarray(x))
  assert q.codes.dtype == fp8.E4M3 and q.codes.shape == (16, 128)
  assert q.scale.dtype == q.k.dtype == q.c.dtype == jnp.float32 and q.k.shape == (16,)
  np.testing.assert_array_equal(np.asarray(q.k), ks)
  np.testing.assert_allclose(np.asarray(q.c), cs, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(q.scale), ss, rtol=1e-4)
  y = np.asarray(fp8.dequantize_groups(q))
  np.testing.assert_allclose(y, dec, rtol=1e-3, atol=0)
  assert y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(q.k * 16), np.floor(np.asarray(q.k * 16)))  # step 1/16


def test_true_min_over_nonzero_and_zero_lanes():
  x = np.asarray(_lognormal(jax.random.key(3), (4, 128), sigma=1.0))
  x_zeros = x.copy()
  x_zeros[:, 0] = 0.0  # a zero at lane 0: the CUDA kernel's partial min would give k ~ 1/16
  x_zeros[:, 77] = 0.0
  q, qz = fp8.quantize_groups(x), fp8.quantize_groups(x_zeros)
  ks, _, _, _ = _coat_dre_reference(x_zeros)
  np.testing.assert_array_equal(np.asarray(qz.k), ks)
  assert float(qz.k.min()) >= float(q.k.min())  # dropping elements cannot widen the range
  assert float(qz.k.min()) > 1.0
  y = np.asarray(fp8.dequantize_groups(qz))
  assert (y[:, 0] == 0).all() and (y[:, 77] == 0).all()


def test_all_zero_constant_and_compressing_groups():
  zeros = jnp.zeros((2, 128))
  q = fp8.quantize_groups(zeros)
  np.testing.assert_array_equal(np.asarray(q.scale), 0.0)
  np.testing.assert_array_equal(np.asarray(q.k), 1.0)
  np.testing.assert_array_equal(np.asarray(q.c), 1.0)
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_groups(q)), 0.0)

  const = jnp.full((128,), -3.25)  # R = 1: k = 1
  q = fp8.quantize_groups(const)
  assert float(q.k[0]) == 1.0
  np.testing.assert_allclose(np.asarray(fp8.dequantize_groups(q)), -3.25, rtol=1e-6)

  # R = 1e40 > 448^2/2: k < 1 compresses (not clamped), and the smallest value stays nonzero.
  wide = jnp.array(np.geomspace(1e-20, 1e20, 128), jnp.float32)
  q = fp8.quantize_groups(wide)
  assert 0.0 < float(q.k[0]) < 1.0
  np.testing.assert_allclose(float(q.k[0]), _coat_dre_reference(np.asarray(wide))[0][0])
  y = fp8.dequantize_groups(q)
  assert bool(jnp.isfinite(y).all()) and bool((y > 0).all())
  assert float(jnp.max(jnp.abs(jnp.log(y / wide)))) < 3.0  # within a factor e^3 over 40 decades

  # Nearly constant: k is capped (K_MAX), codes stay finite and decode to the value.
  near = jnp.full((128,), 1.0).at[5].set(1.0 + 2**-20)
  q = fp8.quantize_groups(near)
  assert float(q.k[0]) == fp8.K_MAX
  np.testing.assert_allclose(np.asarray(fp8.dequantize_groups(q)), np.asarray(near), rtol=1e-5)


@pytest.mark.parametrize("shape", [(), (129,), (3, 5, 7), (10, 100)])
def test_odd_sizes_and_scalars(shape):
  k1, k2 = jax.random.split(jax.random.key(4))
  x = jnp.exp(jax.random.normal(k1, shape)) * jnp.sign(jax.random.normal(k2, shape))
  q = fp8.quantize_groups(x)
  size = int(np.prod(shape))
  assert q.codes.shape == (max(1, -(-size // 128)), 128) and q.shape == shape
  y = fp8.dequantize_groups(q)
  assert y.shape == shape and y.dtype == jnp.float32
  rel = jnp.abs(y - x) / jnp.abs(x)
  # the group's smallest values land on E4M3 subnormals by design (range 448^2/2): <= ~12%
  assert float(jnp.max(rel)) < 0.15 and float(jnp.mean(rel**2)) < 1e-3
  assert bool((jnp.sign(y) == jnp.sign(x)).all())


@pytest.mark.parametrize("wide", [False, True])
def test_expansion_lowers_error(wide):
  key = jax.random.key(5)
  if wide:  # ranges beyond 448^2/2: k < 1 compresses, still better than plain scaling
    x = _lognormal(key, (64, 128), sigma=1.5)
  else:  # ranges ~1e2-1e3, as COAT reports for m: k ~ 2
    x = jnp.exp(jax.random.normal(key, (64, 128)))
  rel = {}
  for expand in (True, False):
    y = fp8.dequantize_groups(fp8.quantize_groups(x, expand=expand))
    rel[expand] = float(jnp.mean(((y - x) / x) ** 2))
  print(f"relative MSE (wide={wide}) with expansion {rel[True]:.3e}, without {rel[False]:.3e}")
  assert rel[True] < (0.9 if wide else 0.5) * rel[False]


def test_quantized_groups_is_a_pytree():
  q = fp8.quantize_groups(jnp.arange(300.0).reshape(3, 100))
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 4 and leaves[0].dtype == fp8.E4M3
  q2 = jax.jit(lambda t: t)(q)
  assert isinstance(q2, fp8.QuantizedGroups) and q2.shape == (3, 100)
  np.testing.assert_array_equal(np.asarray(fp8.dequantize_groups(q2)),
                                np.asarray(fp8.dequantize_groups(q)))
  assert jax.tree.unflatten(treedef, leaves).shape == (3, 100)
  assert q.nbytes == 3 * 128 + 3 * 3 * 4


@pytest.mark.parametrize("num_shards", [2, 4])
def test_groups_never_straddle_shards(num_shards):
  x = _lognormal(jax.random.key(6), (8, 100), sigma=1.5)  # shards of 400 or 200: not x128
  q = fp8.quantize_groups(x, num_shards=num_shards)
  per_shard = [fp8.quantize_groups(s) for s in jnp.split(x, num_shards, axis=0)]
  for field in ("codes", "scale", "k", "c"):
    want = jnp.concatenate([getattr(s, field) for s in per_shard])
    got = getattr(q, field)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                  np.asarray(want.astype(jnp.float32)))
  y = fp8.dequantize_groups(q)
  want = jnp.concatenate([fp8.dequantize_groups(s) for s in per_shard])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  # without sharding the groups differ (they cross shard boundaries)
  assert q.codes.shape[0] != fp8.quantize_groups(x).codes.shape[0]
  with pytest.raises(ShapeError):
    fp8.quantize_groups(jnp.ones((6, 4)), num_shards=4)
