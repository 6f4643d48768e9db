"""Tests for terdit/ternary.py: quantizer, packing layout, QAT layer and its packed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from terdit import ternary as T
from terdit.deploy import PackedTernaryDense


# ------------------------------------------------------------------------------------------
# ternarize
# ------------------------------------------------------------------------------------------


def test_ternarize_exact_values():
  w = jnp.array([[1.0, -0.2], [0.0, -2.8]], jnp.float32)  # gamma = 4 / 4 = 1
  codes, gamma = T.ternarize(w)
  assert codes.dtype == jnp.int8
  assert float(gamma) == 1.0
  np.testing.assert_array_equal(codes, [[1, 0], [0, -1]])


def test_ternarize_rounds_half_to_even():
  # Find t with t / (gamma + 1e-6) == 0.5 exactly in f32 (gamma depends on t, so iterate
  # to the fixed point t = (mean|w| + 1e-6) / 2). Half-away rounding would give +-1.
  n = 64
  t = jnp.float32(0.5)
  for _ in range(50):
    w = jnp.concatenate([jnp.stack([t, -t]), jnp.ones((n - 2,), jnp.float32)])
    s = jnp.mean(jnp.abs(w)) + 1e-6
    t_new = s / 2
    if t_new == t:
      break
    t = t_new
  assert float(w[0] / s) == 0.5 and float(w[1] / s) == -0.5
  codes, _ = T.ternarize(w)
  np.testing.assert_array_equal(codes[:2], [0, 0])
  np.testing.assert_array_equal(codes[2:], 1)
  # And 1.5 ties (round to 2, then clip) stay at +-1.
  codes15, _ = T.ternarize(jnp.array([1.5, -1.5, 0.5, 0.5]))  # gamma = 1
  np.testing.assert_array_equal(codes15, [1, -1, 0, 0])


def test_ternarize_all_zero():
  codes, gamma = T.ternarize(jnp.zeros((3, 4)))
  assert float(gamma) == 0.0
  np.testing.assert_array_equal(codes, np.zeros((3, 4), np.int8))


def test_ternarize_matches_numpy_on_random():
  w = np.random.default_rng(0).normal(size=(37, 19)).astype(np.float32)
  codes, gamma = T.ternarize(w)
  g = np.float32(np.mean(np.abs(w)))
  want = np.clip(np.round(w / (g + np.float32(1e-6))), -1, 1)
  np.testing.assert_allclose(gamma, g, rtol=1e-6)
  np.testing.assert_array_equal(codes, want)


# ------------------------------------------------------------------------------------------
# pack / unpack
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 37])
def test_pack_unpack_round_trip(k):
  codes = np.random.default_rng(k).integers(-1, 2, size=(k, 19)).astype(np.int8)
  packed = T.pack(codes)
  assert packed.dtype == jnp.uint8 and packed.shape == (-(-k // 4), 19)
  out = T.unpack(packed, k)
  assert out.dtype == jnp.int8
  np.testing.assert_array_equal(out, codes)


def test_pack_byte_layout_hand_worked():
  # K = 5 -> H = 2; rows padded to 8 with code 0. u = code + 1:
  #   column 0: codes [-1, 0, 1, 1, -1] -> u [0, 1, 2, 2, 0, (1), (1), (1)]
  #   byte r = u[r] | u[2 + r] << 2 | u[4 + r] << 4 | u[6 + r] << 6
  #   byte 0 = 0 | 2 << 2 | 0 << 4 | 1 << 6 = 0x48; byte 1 = 1 | 2 << 2 | 1 << 4 | 1 << 6 = 0x59
  #   column 1: all zero codes -> 0x55 0x55; column 2: all +1 in 5 rows ->
  #   byte 0 = 2 | 2 << 2 | 2 << 4 | 1 << 6 = 0x6A; byte 1 = 2 | 2 << 2 | 1 << 4 | 1 << 6 = 0x5A
  codes = np.array([[-1, 0, 1], [0, 0, 1], [1, 0, 1], [1, 0, 1], [-1, 0, 1]], np.int8)
  packed = np.asarray(T.pack(codes))
  np.testing.assert_array_equal(packed, [[0x48, 0x55, 0x6A], [0x59, 0x55, 0x5A]])
  np.testing.assert_array_equal(T.unpack(packed, 5), codes)


# ------------------------------------------------------------------------------------------
# TernaryDense
# ------------------------------------------------------------------------------------------


def _layer(k=7, n=5, seed=0, **kw):
  kw.setdefault("kernel_axes", None)
  return T.TernaryDense(k, n, rngs=nnx.Rngs(params=seed), **kw)


def test_alpha_init_gamma_matched_and_zero_kernel_fallback():
  layer = _layer()
  np.testing.assert_allclose(layer.alpha[...], jnp.mean(jnp.abs(layer.kernel[...])), rtol=1e-6)
  assert layer.alpha[...].dtype == jnp.float32 and layer.alpha[...].shape == ()
  zero = _layer(k=16, kernel_init=nnx.initializers.zeros_init(), use_bias=True)
  np.testing.assert_allclose(zero.alpha[...], 0.25, rtol=1e-6)  # 1 / sqrt(16)
  assert float(_layer(alpha_init=0.3).alpha[...]) == pytest.approx(0.3)


def test_default_logical_axes_under_mesh():
  mesh = jax.make_mesh((1, 1), ("embed", "mlp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    layer = T.TernaryDense(8, 4, use_bias=True, rngs=nnx.Rngs(0))
  assert layer.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert layer.bias.get_metadata()["out_sharding"] == ("mlp",)
  assert isinstance(layer.kernel, nnx.Param)  # trained by optimizers filtering nnx.Param


def test_qat_forward_is_alpha_times_codes():
  layer = _layer(use_bias=True, bias_init=nnx.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(1), (3, 7))
  codes, _ = T.ternarize(layer.kernel[...])
  want = x @ (layer.alpha[...] * codes.astype(jnp.float32)) + layer.bias[...]
  np.testing.assert_allclose(layer(x), want, rtol=1e-6, atol=1e-6)


def test_identity_ste_gradients_to_kernel_and_alpha():
  layer = _layer(k=7, n=5)
  x = jax.random.normal(jax.random.key(1), (3, 7))
  g = jax.random.normal(jax.random.key(2), (3, 5))

  def loss(m):
    return jnp.sum(m(x) * g)

  grads = nnx.grad(loss)(layer)
  codes, _ = T.ternarize(layer.kernel[...])
  d_weff = x.T @ g  # dL/dW_eff for y = x W_eff
  alpha = layer.alpha[...]
  # Identity STE: dL/dW = dL/dWt = alpha * dL/dW_eff (no 1/gamma, no clip mask).
  np.testing.assert_allclose(grads["kernel"][...], alpha * d_weff, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads["alpha"][...], jnp.sum(d_weff * codes), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(grads["kernel"][...]) != 0)  # reaches saturated entries too


def test_zero_init_layer_still_learns():
  layer = _layer(k=8, n=3, kernel_init=nnx.initializers.zeros_init(), use_bias=True)
  x = jax.random.normal(jax.random.key(1), (4, 8))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2 + m(x)))(layer)
  assert np.abs(np.asarray(grads["kernel"][...])).sum() > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_inference_equals_qat_forward(dtype):
  layer = _layer(k=37, n=19, use_bias=True, bias_init=nnx.initializers.normal(1.0),
                 dtype=dtype)
  x = jax.random.normal(jax.random.key(3), (2, 3, 37))
  want = layer(x)
  assert want.dtype == dtype and want.shape == (2, 3, 19)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  ref = PackedTernaryDense.from_ternary(layer, impl="reference")(x)
  assert ref.dtype == dtype
  np.testing.assert_allclose(np.asarray(ref, np.float32), np.asarray(want, np.float32), **tol)
  pal = PackedTernaryDense.from_ternary(layer, impl="pallas")(x)
  np.testing.assert_allclose(np.asarray(pal, np.float32), np.asarray(want, np.float32), **tol)


def _packed(layer: T.TernaryDense) -> dict:
  """The packed form `packed_dense` takes: uint8 codes [ceil(K/4), N], alpha, K, bias."""
  codes, _ = T.ternarize(layer.kernel[...])
  out = {"packed": T.pack(codes), "alpha": jnp.asarray(layer.alpha[...], jnp.float32),
         "in_features": jnp.asarray(layer.in_features, jnp.int32)}
  if layer.bias is not None:
    out["bias"] = layer.bias[...]
  return out


def test_packed_dense_runs_a_packed_layer():
  down = T.TernaryDense(9, 6, use_bias=True, kernel_axes=None,
                        bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(2), (3, 9))
  want = down(h)
  layer = _packed(down)
  assert layer["packed"].dtype == jnp.uint8 and layer["packed"].shape == (3, 6)  # ceil(9/4)
  got = T.packed_dense(layer, h)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # kernels/ raises plain ValueError; the user-facing wrappers turn it into the project's errors
  from common.errors import ConfigError, ShapeError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ShapeError, match="ceil"):
    T.packed_dense(layer, h[:, :5])  # 5 inputs need 2 packed rows, the layer has 3
  with pytest.raises(ConfigError, match="impl"):
    T.packed_dense(layer, h, impl="cuda")
  with pytest.raises(ShapeError):
    T.pack(jnp.zeros((2, 3, 4)))
