"""TerDiT ternary weights (arXiv 2405.14854): the QAT dense layer and the whole-tree export.

QAT (TerDiT, arXiv 2405.14854; `fairscale/fairscale/nn/model_parallel/layers.py::ternary` of
Lucky-Lance/TerDiT): W_eff = alpha * Wt with Wt the absmean codes of the latent weight W
(`terdit.codes.ternarize`), y = x W_eff (+ b); backward: identity straight-through estimator,
dL/dW = dL/dWt, dL/dalpha = sum(dL/dW_eff * Wt).

Deployment: the codes packed four to a byte (`terdit.codes.pack`) run through the packed matmul
with alpha; `TernaryDense.deployed()` is that inference form (`terdit.deploy.PackedTernaryDense`).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import registry
from common.errors import ConfigError, ShapeError
from terdit.codes import pack, packed_dense, ternarize, ternary_codes, unpack
from terdit.deploy import PackedTernaryDense


class TernaryKernel(nnx.Param):
  """The fp32 latent weight [in, out] of a ternary layer (marks it for export)."""


class TernaryScale(nnx.Param):
  """The learnable per-tensor scale alpha of a ternary layer, fp32 shape ()."""


@registry.register("numerics")
class TernaryDense(nnx.Module):
  """Dense layer with TerDiT ternary weights, trained with QAT.

  Forward: y = x @ (alpha * Wt) + b, Wt = ternarize(kernel). The identity STE
  is written as Wt_ste = Wt + (W - stop_gradient(W)): the same gradient as the official
  W + stop_gradient(Wt - W) form (dL/dW = dL/dWt, no 1/gamma factor, no clip
  mask), but its forward value is exactly Wt in floating point, so the QAT forward and
  the packed deployment use the very same weights.

  alpha init (`alpha_init`): the official code uses torch.randn(1), which can start
  negative or near zero. The default "gamma" is deterministic and positive: alpha =
  mean|W_init|, so alpha * Wt has the scale of the initial fp weight (BitNet-style) and
  the layer starts with the output scale its fp init was designed for. For a zero-init
  kernel (TerDiT's adaLN) gamma = 0 would freeze the layer (dL/dW = alpha dL/dW_eff = 0),
  so alpha falls back to 1/sqrt(in_features), the scale at which a {-1, 0, 1} matrix
  roughly preserves activation variance. "normal" is the official init, alpha ~ N(0, 1)
  (drawn from the "params" stream). A float gives a fixed init value.

  Attributes:
    kernel: TernaryKernel fp32 [in_features, out_features], logical axes `kernel_axes`.
    alpha: TernaryScale fp32 ().
    bias: nnx.Param fp32 [out_features] (logical axis kernel_axes[1]) or None.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = False,
      kernel_init: Callable[..., jax.Array] = nnx.initializers.xavier_uniform(),
      bias_init: Callable[..., jax.Array] = nnx.initializers.zeros_init(),
      alpha_init: str | float = "gamma",
      kernel_axes: Sequence[str | None] | None = ("embed", "mlp"),
      dtype: Any = None,
      rngs: nnx.Rngs,
  ):
    """Args:
      in_features, out_features: K and N.
      use_bias: add an fp32 bias (kept fp in deployment).
      kernel_init: initializer of the latent fp32 kernel [K, N] (TerDiT: xavier_uniform;
        zeros for the adaLN modulation).
      bias_init: initializer of the bias.
      alpha_init: "gamma", "normal" (see the class docstring) or a float.
      kernel_axes: logical axis names of the kernel, e.g. ("embed", "mlp") or
        ("mlp", "embed"); None for no sharding annotation.
      dtype: compute dtype of the matmul (None: the input's dtype); accumulation fp32.
      rngs: nnx.Rngs with a "params" stream.
    """
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    w = jnp.asarray(kernel_init(rngs.params(), (in_features, out_features), jnp.float32),
                    jnp.float32)
    axes = tuple(kernel_axes) if kernel_axes is not None else None
    kmeta = {"out_sharding": axes} if axes else {}
    self.kernel = TernaryKernel(w, **kmeta)
    if alpha_init == "gamma":
      gamma = jnp.mean(jnp.abs(w))
      alpha = jnp.where(gamma > 0, gamma, 1.0 / np.sqrt(in_features))
    elif alpha_init == "normal":
      alpha = jax.random.normal(rngs.params(), (), jnp.float32)
    elif isinstance(alpha_init, (int, float)) and not isinstance(alpha_init, bool):
      alpha = jnp.asarray(alpha_init)
    else:
      raise ConfigError(f"alpha_init must be 'gamma', 'normal' or a float, got {alpha_init!r}.")
    self.alpha = TernaryScale(jnp.asarray(alpha, jnp.float32).reshape(()))
    if use_bias:
      b = jnp.asarray(bias_init(rngs.params(), (out_features,), jnp.float32), jnp.float32)
      bmeta = {"out_sharding": (axes[1],)} if axes else {}
      self.bias = nnx.Param(b, **bmeta)
    else:
      self.bias = nnx.data(None)

  @classmethod
  def from_dense(cls, dense: Any, alpha_init: str | float = "gamma", seed: int = 0,
                 path: str = "") -> "TernaryDense":
    """A `config.numerics.rules` implementation (common/nn/numerics.py): the ternary QAT version of
    a built `common.nn.layers.Dense`, keeping its widths, axis names, compute dtype and its
    initialised kernel (the latent weight) and bias.

    Args:
      dense: the built layer.
      alpha_init: see the class docstring.
      seed: with `path`, seeds the random alpha init ("normal"): each layer draws from
        fold_in(key(seed), crc32(path)), so layers differ and a rebuild gives the same values.
      path: the layer's module path (passed by common.nn.numerics.apply_rules).
    """
    names = tuple(dense.names)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
    layer = cls(dense.in_features, dense.out_features, use_bias=dense.bias is not None,
                kernel_init=lambda *_: dense.kernel[...], alpha_init=alpha_init,
                kernel_axes=names if any(n is not None for n in names) else None,
                dtype=dense.dtype, rngs=nnx.Rngs(params=key))
    if dense.bias is not None:
      layer.bias[...] = dense.bias[...]
    return layer

  def effective_kernel(self) -> jax.Array:
    """alpha * Wt with the identity STE: fp32 [in, out]; gradients reach kernel and alpha."""
    w = self.kernel[...]
    codes, _ = ternary_codes(w)
    wt = jax.lax.stop_gradient(codes) + (w - jax.lax.stop_gradient(w))
    return self.alpha[...] * wt

  def __call__(self, x: jax.Array) -> jax.Array:
    """QAT forward. x: [..., in_features] -> [..., out_features] in the compute dtype."""
    if x.shape[-1] != self.in_features:
      raise ShapeError(f"TernaryDense expects [..., {self.in_features}] inputs, got {x.shape}.")
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), self.effective_kernel().astype(dtype),
                preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(dtype)

  def deployed(self) -> nnx.Module:
    """The inference form (`common.weights.deployment.deploy`): a `terdit.deploy.PackedTernaryDense`
    holding only the packed codes, alpha and the bias; same outputs up to float rounding."""
    return PackedTernaryDense.from_ternary(self)
