"""COAT's FP8 linear layer (coat/linear.py): values against a float64 simulation of the same
quantization, FP8 residuals, f8 GEMMs in the HLO lowered for CUDA, weights quantized once per step."""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from coat import linear
from common.nn import layers
from common.training.memory import temporaries_mib
from kernels import cuda_inspect


def sim_quantize(x: np.ndarray, fp8_dtype) -> tuple[np.ndarray, np.float32]:
  """Per-tensor quantization in numpy: s = (max|x| + 1e-10) / fp8_max (fp32, as COAT), codes =
  round-to-nearest-even of clip(x / s) in the FP8 format; returns (codes as float64, s)."""
  fmax = float(ml_dtypes.finfo(fp8_dtype).max)
  s = np.float32((np.float32(np.abs(x.astype(np.float32)).max()) + np.float32(1e-10))
                 / np.float32(fmax))
  q = np.clip(x.astype(np.float32) / s, -fmax, fmax).astype(fp8_dtype)
  return q.astype(np.float64), s


def sim_fp8_dense(x, w, b, g):
  """float64 simulation of the FP8 GEMMs: (y, dx, dw, db) for cotangent g of y."""
  xq, sx = sim_quantize(x, ml_dtypes.float8_e4m3fn)
  wq, sw = sim_quantize(w, ml_dtypes.float8_e4m3fn)
  gq, sg = sim_quantize(g, ml_dtypes.float8_e5m2)
  y = (xq @ wq) * (float(sx) * float(sw)) + b
  dx = (gq @ wq.T) * (float(sg) * float(sw))
  dw = (xq.T @ gq) * (float(sx) * float(sg))
  return y, dx, dw, g.astype(np.float64).sum(0)


def _layer(k=48, n=24, seed=0, out_dtype="float32"):
  dense = layers.Dense(k, n, rngs=nnx.Rngs(params=seed))
  dense.bias[...] = jax.random.normal(jax.random.key(seed + 7), (n,)) * 0.1
  return dense, linear.FP8Dense.from_module(dense, out_dtype=out_dtype)


def _inputs(m=20, k=48, n=24, dtype=np.float32):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((m, k)) * np.exp(rng.standard_normal((m, 1)))).astype(dtype)
  g = (rng.standard_normal((m, n)) * 1e-3).astype(np.float32)
  return x, g


@pytest.mark.parametrize("cached", [False, True])
def test_forward_and_gradients_match_float64_simulation(cached):
  dense, fp8 = _layer()
  if cached:
    fp8.use_step_cache(fp8.step_cache())
  x, g = _inputs()
  w, b = np.asarray(dense.kernel[...]), np.asarray(dense.bias[...])

  graphdef, params, rest = nnx.split(fp8, nnx.Param, ...)

  def f(params, x):
    return nnx.merge(graphdef, params, rest)(x)

  y, vjp = jax.vjp(f, params, jnp.asarray(x))
  dparams, dx = vjp(jnp.asarray(g))
  y_sim, dx_sim, dw_sim, db_sim = sim_fp8_dense(x, w, b, g)
  # fp32 accumulation of exact FP8 products, and fp32 scale products: ~1e-6 relative.
  np.testing.assert_allclose(y, y_sim, rtol=1e-5, atol=1e-5 * np.abs(y_sim).max())
  np.testing.assert_allclose(dx, dx_sim, rtol=1e-5, atol=1e-5 * np.abs(dx_sim).max())
  np.testing.assert_allclose(dparams["kernel"][...], dw_sim, rtol=1e-5,
                             atol=1e-5 * np.abs(dw_sim).max())
  np.testing.assert_allclose(dparams["bias"][...], db_sim, rtol=1e-5, atol=1e-8)
  assert dparams["kernel"][...].dtype == jnp.float32 and dx.dtype == jnp.float32
  # The simulation is not the exact product: FP8 error is visible (a test that could not fail
  # on a plain fp32 matmul would prove nothing).
  assert np.abs(y_sim - (x.astype(np.float64) @ w + b)).max() > 1e-3


def test_bf16_output_and_leading_axes():
  dense, fp8 = _layer(out_dtype="bfloat16")
  x, _ = _inputs(m=12)
  x3 = jnp.asarray(x, jnp.bfloat16).reshape(3, 4, 48)
  y = fp8(x3)
  assert y.shape == (3, 4, 24) and y.dtype == jnp.bfloat16
  y_sim, *_ = sim_fp8_dense(np.asarray(x3, np.float32).reshape(12, 48),
                            np.asarray(dense.kernel[...]), np.asarray(dense.bias[...]),
                            np.zeros((12, 24), np.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32).reshape(12, 24), y_sim, rtol=1e-2,
                             atol=1e-2 * np.abs(y_sim).max())
  dx = jax.grad(lambda x: jnp.sum(fp8(x).astype(jnp.float32)))(x3)
  assert dx.dtype == jnp.bfloat16 and dx.shape == x3.shape


def test_saved_residuals_are_fp8_and_scalars():
  _, fp8 = _layer()
  fp8.use_step_cache(fp8.step_cache())
  x, _ = _inputs()
  _, vjp = jax.vjp(lambda x: fp8(x), jnp.asarray(x))
  saved = [(tuple(a.shape), jnp.dtype(a.dtype)) for a in jax.tree.leaves(vjp)]
  big = [s for s in saved if np.prod(s[0]) > 1]
  assert sorted(big) == sorted([((20, 48), jnp.dtype(jnp.float8_e4m3fn)),
                                ((48, 24), jnp.dtype(jnp.float8_e4m3fn))]), saved


def test_expert_dense_is_one_fp8_gemm_per_expert_with_its_own_scales():
  dense = layers.ExpertDense(3, 48, 24, dtype=jnp.float32, rngs=nnx.Rngs(params=0))
  fp8 = linear.FP8ExpertDense.from_module(dense, out_dtype="float32")
  assert fp8.kernel is dense.kernel
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 5, 48)).astype(np.float32) * np.array([1, 10, 100])[:, None, None]
  g = rng.standard_normal((2, 3, 5, 24)).astype(np.float32)
  w = np.asarray(dense.kernel[...])
  fp8.use_step_cache(fp8.step_cache())
  y, vjp = jax.vjp(lambda x: fp8(x), jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(g))
  dw = np.asarray(nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)) * g))(fp8)["kernel"][...])
  for e in range(3):  # each expert: the float64 simulation with its own per-tensor scales
    ye, dxe, dwe, _ = sim_fp8_dense(x[:, e].reshape(-1, 48), w[e], 0.0, g[:, e].reshape(-1, 24))
    np.testing.assert_allclose(np.asarray(y[:, e]).reshape(-1, 24), ye, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx[:, e]).reshape(-1, 48), dxe, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw[e]), dwe, rtol=1e-4, atol=1e-4)
  big = [(tuple(a.shape), jnp.dtype(a.dtype)) for a in jax.tree.leaves(vjp) if a.size > 3]
  assert sorted(big) == sorted([((3, 10, 48), jnp.dtype(jnp.float8_e4m3fn)),
                                ((3, 48, 24), jnp.dtype(jnp.float8_e4m3fn))]), big


def _chain_grad_temporaries(matmul) -> float:
  """Compiled temporaries (MiB) of the gradient of 8 chained x <- matmul(x, W_i) (x [2048, 1024]
  bf16, W_i [1024, 1024] f32) with respect to the weights and x."""
  def loss(ws, x):
    for w in ws:
      x = matmul(x, w)
    return jnp.sum(x.astype(jnp.float32))
  ws = [jax.ShapeDtypeStruct((1024, 1024), jnp.float32)] * 8
  x = jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16)
  return temporaries_mib(jax.grad(loss), ws, x)


def test_the_compiled_backward_keeps_the_fp8_operands():
  """What a compiled backward keeps is the FP8 codes (1 byte per element), not a wider copy. On
  CPU XLA computes FP8 dots on f32 conversions of the codes; without the barrier in the backward
  it shared the forward's conversions with the backward, keeping every layer's input and weight
  in f32 (88 MiB of temporaries, 1.05x the bf16 chain; 34 MiB with it)."""
  plain = _chain_grad_temporaries(lambda x, w: x @ w.astype(jnp.bfloat16))
  fp8 = _chain_grad_temporaries(linear.fp8_matmul)
  assert fp8 < 0.6 * plain, (fp8, plain)


def test_zero_input_and_zero_weight_stay_finite():
  dense = layers.Dense(16, 8, zero_init=True, rngs=nnx.Rngs(params=0))
  fp8 = linear.FP8Dense.from_module(dense)
  x = jnp.zeros((4, 16))
  y, vjp = jax.vjp(lambda k, x: linear.fp8_matmul(x, k), fp8.kernel[...], x)
  dk, dx = vjp(jnp.ones_like(y))
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in (y, dk, dx))


def test_large_inputs_saturate_instead_of_nan():
  x = jnp.asarray([[1e30, -1e30, 1.0, 0.0]], jnp.float32)
  w = jnp.eye(4, dtype=jnp.float32)
  y = linear.fp8_matmul(x, w, out_dtype=jnp.float32)
  assert bool(jnp.all(jnp.isfinite(y)))


def test_lowered_for_cuda_the_gemms_take_fp8_operands():
  w = jax.ShapeDtypeStruct((256, 128), jnp.float32)
  x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16)

  def step(w, x):
    return jax.value_and_grad(lambda w, x: jnp.sum(linear.fp8_matmul(x, w).astype(jnp.float32)),
                              argnums=(0, 1))(w, x)

  text = cuda_inspect.lower_for_cuda(step, w, x).mlir_module()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) == 3, dots
  # forward E4M3 x E4M3; dgrad E5M2 x E4M3; wgrad E4M3 x E5M2, each accumulated in fp32.
  sig = sorted(line.split(" : ")[-1] for line in dots)
  assert sum("f8E4M3FN" in s and "f8E5M2" not in s for s in sig) == 1, sig
  assert sum("f8E4M3FN" in s and "f8E5M2" in s for s in sig) == 2, sig
  assert all("bf16" not in s.split("->")[0] and "f32" not in s.split("->")[0] for s in sig), sig


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _walk(jaxpr, inside_scan=False):
  """Yields (eqn, inside_scan) for every equation of a jaxpr, recursively."""
  for eqn in jaxpr.eqns:
    yield eqn, inside_scan
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        yield from _walk(sub, inside_scan or eqn.primitive.name == "scan")


def test_weights_are_quantized_once_per_step_outside_the_accumulation_scan():
  from common.training import sharding
  from common.training.experiment import Experiment  # pylint: disable=import-outside-toplevel
  from configs import sid2_digits  # pylint: disable=import-outside-toplevel
  c = sid2_digits.get_config("runlocal")
  c.precision = "coat"
  c.train.batch_size, c.train.grad_accum_steps = 8, 2
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  model = exp.abstract_model
  kernels = {tuple(m.kernel.shape) for _, m in nnx.iter_graph(model)
             if isinstance(m, linear.FP8Dense)}
  n_fp8 = sum(isinstance(m, linear.FP8Dense) for _, m in nnx.iter_graph(model))
  assert n_fp8 >= 4 and kernels
  params = exp.abstract_params
  batch = {"x": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32),
           "cond": {"label": jax.ShapeDtypeStruct((8,), jnp.int32)}}
  jaxpr = jax.make_jaxpr(exp._grads)(params, batch, jax.random.key(0))  # pylint: disable=protected-access
  casts = [(inside, tuple(e.invars[0].aval.shape)) for e, inside in _walk(jaxpr.jaxpr)
           if e.primitive.name == "convert_element_type"
           and e.params["new_dtype"] == jnp.float8_e4m3fn]
  weight_casts = [(inside, s) for inside, s in casts if s in kernels]
  assert any(inside for inside, _ in casts)           # activations are quantized per micro-batch
  assert len(weight_casts) == n_fp8 and not any(inside for inside, _ in weight_casts), casts
