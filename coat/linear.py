"""COAT's FP8 linear layer (arXiv 2410.19313, Sec. 5 and Fig. 3): FP8 GEMMs forward and backward.

Precision flow of `FP8Dense` (y = x W + b, x [..., K], W [K, N]):

  forward   xq, sx = E4M3(x)   per-tensor, just-in-time scale s = (max|x| + 1e-10) / 448
            Wq, sw = E4M3(W)   per-tensor, computed once per optimizer step (`step_cache`)
            y = (xq @ Wq) * (sx sw)  [+ b]          FP8 x FP8 GEMM, fp32 accumulation
  saved     (xq, sx) and (Wq, sw): the FP8 operands themselves, no bf16 copy of x
  backward  gq, sg = E5M2(dy)  per-tensor, just-in-time
            dx = (gq @ Wq^T) * (sg sw)             E5M2 x E4M3 GEMM, in x's dtype
            dW = (xq^T @ gq) * (sx sg)             E4M3 x E5M2 GEMM, fp32 (the master weight's)

Outputs are bf16 by default (`out_dtype`); the master weight W and its gradient stay fp32 (COAT
keeps master weights and the optimizer's gradients in high precision; NVlabs/COAT issue #3).
Every cast to FP8 clips to the format's range first (`coat.fp8.cast_to_fp8`): float8_e4m3fn has
no inf, so an overflow would be NaN.

Why not flax's `fp8_ops` or qwix: `flax.linen.fp8_ops` implements *delayed* scaling (amax
histories kept as variables in a separate collection) and its `quantized_dot` saves the
full-precision operands for the backward pass; COAT needs just-in-time scales and FP8 residuals.
qwix's quantized training (`dot_general_qt`) does current scaling with quantized residuals but is
a further dependency that intercepts Linen/NNX calls rather than our `Dense`, and would quantize
the weight again in every micro-batch. The GEMMs here are plain `lax.dot_general` calls on FP8
operands with `preferred_element_type=float32` followed by one multiply by a scalar scale: the
pattern XLA rewrites into a cuBLASLt FP8 GEMM on Hopper (tests/test_coat_linear.py checks that
the StableHLO lowered for CUDA has dot_generals on f8E4M3FN / f8E5M2 operands).

Weight quantization once per step: the trainer (`common.training.experiment.Experiment._grads`) calls
`common.nn.numerics.step_caches(model)` once per optimizer step, outside the gradient-accumulation
`lax.scan`, and hands each micro-batch's network the same (Wq, sw) through `use_step_cache`, as
COAT caches the weight's FP8 copy on the first micro-batch (`_fp8_weightcache.py`). Without a cache
(sampling, evaluation, a plain `jax.grad` of the layer) the layer quantizes W on each call; the
values are the same. The gradient of W is the straight-through one: dL/dW = dL/d(Wq sw).
"""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from coat import fp8
from common.nn import layers
from common import registry

Array = jax.Array
E4M3, E5M2 = fp8.E4M3, fp8.E5M2


def quantize_weight(w: Array) -> tuple[Array, Array]:
  """W [K, N] -> (codes float8_e4m3fn [K, N], scale fp32 []): per-tensor, just-in-time absmax."""
  return fp8.quantize_per_tensor(w, E4M3)


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """2-D dot_general of FP8 operands contracting a's axis contract[0] with b's contract[1],
  accumulated and returned in fp32."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fp8_matmul(x: Array, w: Array, w_codes: Array, w_scale: Array, dtypes: tuple) -> Array:
  y, _ = _fp8_matmul_fwd(x, w, w_codes, w_scale, dtypes)
  return y


def _fp8_matmul_fwd(x, w, w_codes, w_scale, dtypes):
  del w  # only its gradient is computed; the FP8 copy stands in for it
  out_dtype = dtypes[0]
  xq, sx = fp8.quantize_per_tensor(x, E4M3)
  y = _dot(xq, w_codes, (1, 0)) * (sx * w_scale)
  return y.astype(out_dtype), (xq, sx, w_codes, w_scale)


def _fp8_matmul_bwd(dtypes, res, g):
  _, x_dtype, w_dtype = dtypes
  # The barrier keeps the FP8 codes as what is saved: without it XLA (CPU) shared the forward's
  # f32 conversions of xq and Wq with the backward, keeping them alive in f32 in between. With g
  # in it, the codes are read only once this layer's cotangent has come.
  (xq, sx, w_codes, w_scale), g = jax.lax.optimization_barrier((res, g))
  gq, sg = fp8.quantize_per_tensor(g, E5M2)
  dx = (_dot(gq, w_codes, (1, 1)) * (sg * w_scale)).astype(x_dtype)
  dw = (_dot(xq, gq, (0, 0)) * (sx * sg)).astype(w_dtype)
  return dx, dw, None, None


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_matmul(x: Array, w: Array, w_fp8: tuple[Array, Array] | None = None, *,
               out_dtype: Any = jnp.bfloat16) -> Array:
  """COAT's FP8 matmul x @ w (module docstring) with FP8 residuals.

  Args:
    x: [..., K] float (bf16 or fp32), quantized per-tensor to E4M3 on the fly.
    w: [K, N] master weight (fp32); receives the straight-through gradient.
    w_fp8: (codes float8_e4m3fn [K, N], scale fp32 []) = `quantize_weight(w)` computed once per
      step, or None to quantize here. Treated as constants (no gradient flows through them).
    out_dtype: dtype of y.

  Returns:
    y [..., N] in `out_dtype`; dx in x's dtype, dw in w's dtype.
  """
  if w_fp8 is None:
    w_fp8 = quantize_weight(w)
  codes, scale = jax.lax.stop_gradient(w_fp8)
  lead = x.shape[:-1]
  dtypes = (jnp.dtype(out_dtype), jnp.dtype(x.dtype), jnp.dtype(w.dtype))
  y = _fp8_matmul(x.reshape(-1, x.shape[-1]), w, codes, scale, dtypes)
  return y.reshape(*lead, w.shape[-1])


class _StepCachedWeight:
  """The per-step FP8 copy of a layer's kernel (`weight_fp8`, None until the trainer hands one in
  through `use_step_cache`)."""

  def use_step_cache(self, cache: tuple[Array, Array]) -> None:
    """Uses `cache` (from `step_cache` of the same parameters) instead of re-quantizing."""
    self.weight_fp8 = nnx.data(WeightFP8(tuple(cache)))

  def cached_weight(self) -> tuple[Array, Array] | None:
    return self.weight_fp8.get_value() if self.weight_fp8 is not None else None


@registry.register("numerics")
class FP8Dense(_StepCachedWeight, nnx.Module):
  """A `common.nn.layers.Dense` computed with COAT's FP8 GEMMs (module docstring); a numerics rule
  target (`common/nn/numerics.py`): `("...", "coat.linear.FP8Dense", {})`.

  Attributes:
    kernel: nnx.Param fp32 [in, out], the master weight (the Dense's, same path and axis names).
    bias: nnx.Param fp32 [out] or None.
    out_dtype: dtype of the output (bf16 by default, as COAT's GEMMs).
  """

  replaces = layers.Dense

  def __init__(self, kernel: nnx.Param, bias: nnx.Param | None, *, in_features: int,
               out_features: int, names: tuple, out_dtype: Any = "bfloat16"):
    self.kernel, self.bias = kernel, bias
    self.in_features, self.out_features, self.names = in_features, out_features, tuple(names)
    self.out_dtype = layers.as_dtype(out_dtype)
    self.weight_fp8 = None

  @classmethod
  def from_module(cls, dense: layers.Dense, *, out_dtype: Any = "bfloat16") -> FP8Dense:
    """Takes over `dense`'s parameters (its initialisation and parameter paths)."""
    return cls(dense.kernel, dense.bias, in_features=dense.in_features,
               out_features=dense.out_features, names=dense.names, out_dtype=out_dtype)

  def step_cache(self) -> tuple[Array, Array]:
    """The kernel's FP8 copy (codes, scale), computed once per optimizer step by the trainer."""
    return quantize_weight(self.kernel[...])

  def __call__(self, x: Array) -> Array:
    """x: [..., in] -> [..., out] in `out_dtype`."""
    y = fp8_matmul(x, self.kernel[...], self.cached_weight(), out_dtype=self.out_dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.out_dtype)
    return y


@registry.register("numerics")
class FP8ExpertDense(_StepCachedWeight, nnx.Module):
  """A `common.nn.layers.ExpertDense` (one linear map per expert) computed with COAT's FP8 GEMMs: each
  expert's GEMM is an `fp8_matmul` with its own just-in-time per-tensor scales (x[:, e] and W[e]),
  as a grouped GEMM would run it. A numerics rule target: `("...", "coat.linear.FP8ExpertDense", {})`.

  Attributes:
    kernel: nnx.Param fp32 [E, in, out], the master weights (the ExpertDense's, same path).
    out_dtype: dtype of the output (bf16 by default).
  """

  replaces = layers.ExpertDense

  def __init__(self, kernel: nnx.Param, *, num_experts: int, in_features: int,
               out_features: int, names: tuple, out_dtype: Any = "bfloat16"):
    self.kernel = kernel
    self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
    self.names = tuple(names)
    self.out_dtype = layers.as_dtype(out_dtype)
    self.weight_fp8 = None

  @classmethod
  def from_module(cls, dense: layers.ExpertDense, *,
                  out_dtype: Any = "bfloat16") -> FP8ExpertDense:
    """Takes over `dense`'s parameters (its initialisation and parameter path)."""
    return cls(dense.kernel, num_experts=dense.num_experts, in_features=dense.in_features,
               out_features=dense.out_features, names=dense.names, out_dtype=out_dtype)

  def step_cache(self) -> tuple[Array, Array]:
    """Each expert's FP8 weight: (codes float8_e4m3fn [E, in, out], scales fp32 [E])."""
    return jax.vmap(quantize_weight)(self.kernel[...])

  def __call__(self, x: Array) -> Array:
    """x: [B, E, k, in] -> [B, E, k, out] in `out_dtype`."""
    w = self.kernel[...]
    codes, scales = self.cached_weight() or self.step_cache()

    def expert(xe, we, ce, se):
      return fp8_matmul(xe, we, (ce, se), out_dtype=self.out_dtype)
    return jax.vmap(expert, in_axes=(1, 0, 0, 0), out_axes=1)(x, w, codes, scales)


class WeightFP8(nnx.Variable):
  """The per-step FP8 copy (codes, scale) of a kernel; set inside a train step only, never part
  of the parameters or checkpoints."""
