"""COAT's compressed activations for non-linear layers (arXiv 2410.19313, Sec. 5, Table 2).

COAT saves for the backward pass only FP8 tensors: per-tensor E4M3 for the inputs of linear layers
(`coat.linear.FP8Dense` saves its quantized input), and **1x16 per-group E4M3 with bf16 group
scales** for the inputs of non-linear layers (norms, activation functions, the gated product),
because the quantization error of a norm's input grows with depth under coarser groups (Sec. 5,
Fig. 4a). The backward pass reads the dequantized FP8 values: this is real quantization of what is
stored, not a fake-quant straight-through estimator, so it cannot be a `jax.checkpoint` policy
(which cannot change a residual's dtype). It is a `custom_vjp` whose residuals are (codes, scales)
pairs.

`FP8Residuals` is the residual policy of `common.nn.layers`' non-linear layers (`NONLINEAR_LAYERS`:
RMSNorm, GroupNorm, FiLM, Activation; their `residuals` attribute): the layer computes
`policy(fn, *args)` with `fn` its pure forward function and `args` its inputs and parameters.
Forward: `fn(*args)` on the exact inputs. Saved: each input with the first input's shape (the
activation, the gate of a gated product) as 1x16 FP8; the others (parameters, FiLM's per-example
scale and shift, all small) as they are. Backward: `jax.vjp(fn, *dequantized)(dy)`, i.e. the
layer's backward evaluated at the dequantized inputs, as COAT's fused kernels do (e.g.
`silu_bwd` reads the FP8 input and the bf16 output grad). The grads it returns stay in the
inputs' dtypes (COAT: grads into non-linear layers stay bf16).

The last axis is grouped in 16s; a width that is not a multiple of 16 is zero-padded for the
quantization only (zeros do not change a group's max).

`FP8Residuals.from_module(layer)` makes it a numerics rule target (`common/nn/numerics.py`):
`(r"...", "coat.activations.FP8Residuals", {})` sets the policy on the matched layers and keeps
their parameters and paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp

from coat import fp8
from common.nn import layers
from common import registry

Array = jax.Array


def quantize_groups_1xg(x: Array, group_size: int = fp8.ACT_GROUP_SIZE) -> tuple[Array, Array]:
  """1xG E4M3 quantization along the last axis (zero-padded to a multiple of G).

  Args:
    x: [..., D] float.
  Returns:
    (codes float8_e4m3fn [..., D + pad], scales bfloat16 [..., ceil(D / G)]).
  """
  pad = (-x.shape[-1]) % group_size
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return fp8.quantize_per_group(x, group_size)


def dequantize_groups_1xg(codes: Array, scales: Array, width: int, dtype: Any) -> Array:
  """Inverse of `quantize_groups_1xg`: [..., width] in `dtype`."""
  return fp8.dequantize_per_group(codes, scales, dtype)[..., :width]


def _compresses(arg: Any, shape: tuple[int, ...]) -> bool:
  return (hasattr(arg, "shape") and hasattr(arg, "dtype") and tuple(arg.shape) == shape
          and len(shape) >= 1 and jnp.issubdtype(arg.dtype, jnp.floating))


def fp8_saved_call(fn: Callable[..., Array], *args: Any,
                   group_size: int = fp8.ACT_GROUP_SIZE) -> Array:
  """`fn(*args)` whose backward pass reads 1xG-FP8 copies of the activation-shaped inputs.

  Args:
    fn: a pure function of `args` (arrays or None) returning an array.
    *args: args[0] is the activation; every arg of its shape is saved as 1xG E4M3 codes with
      bf16 scales, the others as they are.
    group_size: G (COAT: 16).
  Returns:
    fn(*args), computed on the exact inputs.
  """
  shape = tuple(args[0].shape)
  mask = tuple(_compresses(a, shape) for a in args)
  dtypes = tuple(a.dtype if m else None for a, m in zip(args, mask))

  @jax.custom_vjp
  def call(*xs):
    return fn(*xs)

  def fwd(*xs):
    saved = tuple(quantize_groups_1xg(a, group_size) if m else a for a, m in zip(xs, mask))
    return fn(*xs), saved

  def bwd(saved, g):
    saved, g = jax.lax.optimization_barrier((saved, g))  # FP8 copies, read once g has come
    xs = tuple(dequantize_groups_1xg(*s, shape[-1], dt) if m else s
               for s, m, dt in zip(saved, mask, dtypes))
    _, vjp = jax.vjp(fn, *xs)
    return vjp(g)

  call.defvjp(fwd, bwd)
  return call(*args)


@dataclasses.dataclass(frozen=True)
@registry.register("numerics")
class FP8Residuals:
  """The residual policy saving a non-linear layer's inputs as 1xG FP8 (module docstring).

  Attributes:
    group_size: G, elements per group along the last axis (COAT: 16).
  """
  group_size: int = fp8.ACT_GROUP_SIZE

  replaces = layers.NONLINEAR_LAYERS

  @classmethod
  def from_module(cls, module: nnx.Module, *, group_size: int = fp8.ACT_GROUP_SIZE) -> nnx.Module:
    """Gives `module` (a `common.nn.layers.NONLINEAR_LAYERS` layer) this policy; returns it."""
    module.residuals = cls(group_size)
    return module

  def __call__(self, fn: Callable[..., Array], *args: Any) -> Array:
    return fp8_saved_call(fn, *args, group_size=self.group_size)
