"""Shared Flax NNX layers of every family: linear maps, convolutions, norms, FiLM / adaLN
modulation, conditioning embeddings, activations, patching. The transformer pieces built from them
(attention, MLPs, adaLN) are in common/nn/transformer.py.

Conventions:
  * Parameters are float32 and carry logical axis names (`nnx.with_partitioning`) from the vocabulary
    of docs/DESIGN.md: `embed`, `mlp`, `heads`, `conv_in`, `conv_out`, `vocab`, `None`. They are
    created with `eager_sharding=False`, so a model builds without a mesh; `common/training/sharding.py`
    places them by the rules in `config.mesh.rules`.
  * Activations are computed in a compute dtype (`dtype`, bfloat16 on accelerators); norms and the
    softmax statistics are computed in float32 and cast back.
  * Images and feature maps are `[B, H, W, C]` (NHWC); token sequences are `[B, T, C]`.
  * Dropout is a pure function of an explicit PRNG key: it is active iff a key is given.

Numerics hooks (`common/nn/numerics.py` rules choose them by module path):
  * Every linear layer a numerics choice may apply to is a `Dense`; a rule replaces it by another
    implementation (TerDiT's ternary QAT, COAT's FP8 GEMM).
  * The non-linear layers (`NONLINEAR_LAYERS`: `RMSNorm`, `LayerNorm`, `GroupNorm`, `FiLM`,
    `Activation`) compute their output as a pure function of their inputs and parameters,
    `fn(x, *others)`, through their `residuals` attribute: `None` (plain autodiff, the default) or
    a *residual policy*, a hashable callable `policy(fn, *args) -> fn(*args)` that may change what
    is saved for the backward pass (COAT's `coat.activations.FP8Residuals` saves the inputs as
    FP8). A rule sets it; the parameters and their paths stay as they are.
"""

from collections.abc import Sequence
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from common.errors import ConfigError

Array = jax.Array
Names = tuple[str | None, ...]

_F32 = jnp.float32


def as_dtype(dtype: Any) -> jnp.dtype:
  """`"bfloat16"`, `jnp.bfloat16` or a numpy dtype -> a jnp dtype."""
  try:
    return jnp.dtype(dtype)
  except TypeError as e:
    raise ConfigError(f"Unknown dtype {dtype!r}: expected e.g. 'float32' or 'bfloat16'.") from e


def param(rngs: nnx.Rngs, init: Any, shape: Sequence[int], names: Names) -> nnx.Param:
  """A float32 `nnx.Param` of `shape`, initialised by `init` and annotated with logical `names`."""
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} axis names {names} for a parameter of shape {tuple(shape)}")
  init = nnx.with_partitioning(init, names, eager_sharding=False)
  return nnx.Param(init(rngs.params(), tuple(shape), _F32))


def with_residuals(policy: Any, fn: Any, *args: Any) -> Any:
  """`fn(*args)`, through the residual policy `policy` when there is one (module docstring)."""
  return fn(*args) if policy is None else policy(fn, *args)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout: zeroes each element with probability `rate`; identity without a key."""
  if key is None or rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def fold_key(key: Array | None, *data: int) -> Array | None:
  """Derives a sub-key deterministically (`jax.random.fold_in` per datum); `None` stays `None`."""
  if key is None:
    return None
  for d in data:
    key = jax.random.fold_in(key, d)
  return key


# --------------------------------------------------------------------------------------------------
# Linear maps.


class Dense(nnx.Module):
  """y = x W + b over the last axis. W: [in, out] float32, computed in `dtype`.

  Args:
    in_features, out_features: widths.
    names: logical axis names of W, e.g. ("embed", "mlp"); the bias takes `names[1]`.
    zero_init: initialise W (and b) to zero, e.g. for the output layer of a residual branch.
  """

  def __init__(self, in_features: int, out_features: int, *, names: Names = (None, None),
               use_bias: bool = True, zero_init: bool = False, dtype: Any = _F32,
               kernel_init: Any = None, rngs: nnx.Rngs):
    init = nnx.initializers.zeros_init() if zero_init else (
        kernel_init or nnx.initializers.xavier_uniform())
    self.kernel = param(rngs, init, (in_features, out_features), names)
    self.bias = (param(rngs, nnx.initializers.zeros_init(), (out_features,), (names[1],))
                 if use_bias else None)
    self.in_features, self.out_features, self.names = in_features, out_features, tuple(names)
    self.dtype = as_dtype(dtype)

  def __call__(self, x: Array) -> Array:
    """x: [..., in] -> [..., out] in `dtype`."""
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ExpertDense(nnx.Module):
  """One linear map per expert, no bias: y[:, e] = x[:, e] W[e] (a mixture of experts' FFN layer).
  W: [E, in, out] float32, computed in `dtype`. Like `Dense`, a numerics rule target (COAT's
  `coat.linear.FP8ExpertDense`).

  Args:
    num_experts, in_features, out_features: E and the widths.
    names: logical axis names of W, e.g. ("expert", "embed", "mlp").
  """

  def __init__(self, num_experts: int, in_features: int, out_features: int, *,
               names: Names = ("expert", None, None), dtype: Any = _F32, kernel_init: Any = None,
               rngs: nnx.Rngs):
    self.kernel = param(rngs, kernel_init or nnx.initializers.xavier_uniform(),
                        (num_experts, in_features, out_features), names)
    self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
    self.names = tuple(names)
    self.dtype = as_dtype(dtype)

  def __call__(self, x: Array) -> Array:
    """x: [B, E, k, in] (k tokens per expert) -> [B, E, k, out] in `dtype`."""
    return jnp.einsum("bekd,edf->bekf", x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Conv(nnx.Module):
  """2-D convolution, NHWC input, HWIO kernel [k, k, in, out] (float32), "SAME" padding.

  Kernel axes are named (None, None, "conv_in", "conv_out").
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
               strides: int = 1, use_bias: bool = True, zero_init: bool = False,
               dtype: Any = _F32, rngs: nnx.Rngs):
    init = (nnx.initializers.zeros_init() if zero_init
            else nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"))
    self.kernel = param(rngs, init, (kernel_size, kernel_size, in_features, out_features),
                        (None, None, "conv_in", "conv_out"))
    self.bias = (param(rngs, nnx.initializers.zeros_init(), (out_features,), ("conv_out",))
                 if use_bias else None)
    self.strides = strides
    self.dtype = as_dtype(dtype)

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, in] -> [B, H/strides, W/strides, out] in `dtype`."""
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.strides, self.strides), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


# --------------------------------------------------------------------------------------------------
# Norms (statistics in float32).


def group_norm(x: Array, scale: Array | None, bias: Array | None, *, num_groups: int,
               epsilon: float) -> Array:
  """Group normalisation of a [B, H, W, C] map over (H, W, C/G), statistics in float32.

  scale, bias: [C] float32 or None. Returns x's shape and dtype.
  """
  b, h, w, c = x.shape
  g = num_groups
  x32 = x.astype(_F32).reshape(b, h, w, g, c // g)
  mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
  y = ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).reshape(b, h, w, c)
  if scale is not None:
    y = y * scale + bias
  return y.astype(x.dtype)


class GroupNorm(nnx.Module):
  """Group normalisation over (H, W, C/G) of a [B, H, W, C] map, statistics in float32.

  `num_groups` is reduced to gcd(num_groups, C) so any width works. Without `affine` the layer has
  no parameters (its scale and shift come from FiLM). `residuals`: see the module docstring.
  """

  def __init__(self, num_features: int, num_groups: int = 32, *, affine: bool = True,
               epsilon: float = 1e-6, rngs: nnx.Rngs):
    self.num_groups = math.gcd(num_groups, num_features)
    self.epsilon = epsilon
    self.scale = (param(rngs, nnx.initializers.ones_init(), (num_features,), (None,))
                  if affine else None)
    self.bias = (param(rngs, nnx.initializers.zeros_init(), (num_features,), (None,))
                 if affine else None)
    self.residuals = None

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> same shape and dtype."""
    fn = functools.partial(group_norm, num_groups=self.num_groups, epsilon=self.epsilon)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    return with_residuals(self.residuals, fn, x, scale, bias)


def rms_norm(x: Array, scale: Array | None, *, epsilon: float) -> Array:
  """x / sqrt(mean(x^2) + eps) over the last axis (times `scale` [C]), statistics in float32."""
  x32 = x.astype(_F32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
  if scale is not None:
    y = y * scale
  return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMS normalisation over the last axis, statistics in float32; optional learned scale.

  `residuals`: see the module docstring.
  """

  def __init__(self, num_features: int, *, use_scale: bool = True, epsilon: float = 1e-6,
               rngs: nnx.Rngs):
    self.epsilon = epsilon
    self.scale = (param(rngs, nnx.initializers.ones_init(), (num_features,), (None,))
                  if use_scale else None)
    self.residuals = None

  def __call__(self, x: Array) -> Array:
    """x: [..., C] -> same shape and dtype."""
    fn = functools.partial(rms_norm, epsilon=self.epsilon)
    scale = self.scale[...] if self.scale is not None else None
    return with_residuals(self.residuals, fn, x, scale)


def layer_norm(x: Array, scale: Array | None, bias: Array | None = None, *,
               epsilon: float) -> Array:
  """(x - mean) / sqrt(var + eps) over the last axis (biased variance), times `scale` [C] and plus
  `bias` [C] when given, statistics in float32."""
  x32 = x.astype(_F32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32: torch's `nn.LayerNorm(dim, eps,
  bias=use_bias)` (scale initialised to one, bias to zero); `use_scale=False` is the
  parameter-free form (e.g. MicroDiT's QK-norms).

  `residuals`: see the module docstring.
  """

  def __init__(self, num_features: int, *, use_scale: bool = True, use_bias: bool = False,
               epsilon: float = 1e-6, rngs: nnx.Rngs):
    self.epsilon = epsilon
    self.scale = (param(rngs, nnx.initializers.ones_init(), (num_features,), (None,))
                  if use_scale else None)
    self.bias = (param(rngs, nnx.initializers.zeros_init(), (num_features,), (None,))
                 if use_bias else None)
    self.residuals = None

  def __call__(self, x: Array) -> Array:
    """x: [..., C] -> same shape and dtype."""
    fn = functools.partial(layer_norm, epsilon=self.epsilon)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    return with_residuals(self.residuals, fn, x, scale, bias)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x * (1 + scale) + shift, shift and scale broadcast against x: FiLM, and the adaLN modulation
  of DiT blocks (Peebles & Xie, arXiv 2212.09748, Sec. 3.2)."""
  return x * (1 + scale) + shift


class FiLM(nnx.Module):
  """Feature-wise modulation y = x * (1 + scale(c)) + shift(c) from a global conditioning vector.

  (scale, shift) = Dense(c), zero-initialised so the layer starts as the identity. `c` is the
  already activated conditioning vector [B, cond_dim] (float32); the map is computed in float32.
  `residuals` (module docstring) applies to the modulation `modulate(x, shift, scale)`.
  """

  def __init__(self, cond_dim: int, num_features: int, *, rngs: nnx.Rngs):
    self.proj = Dense(cond_dim, 2 * num_features, names=(None, "embed"), zero_init=True,
                      dtype=_F32, rngs=rngs)
    self.residuals = None

  def __call__(self, x: Array, c: Array) -> Array:
    """x: [B, ..., C]; c: [B, cond_dim] -> [B, ..., C] in x.dtype."""
    scale, shift = jnp.split(self.proj(c), 2, axis=-1)
    bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    scale = scale.reshape(bshape).astype(x.dtype)
    shift = shift.reshape(bshape).astype(x.dtype)
    return with_residuals(self.residuals, modulate, x, shift, scale)


# --------------------------------------------------------------------------------------------------
# Conditioning embeddings.


def fourier_features(x: Array, num_features: int, min_period: float, max_period: float) -> Array:
  """Sinusoidal features of a scalar per example, in float32.

  Periods are geometric from `max_period` down to `min_period`, both included (num_features/2 of
  them); the output is [cos(2 pi x / P_i), sin(2 pi x / P_i)]. This is not the DiT / ADM timestep
  embedding (`timestep_embedding`): its freqs exp(-ln(1e4) i / half), i < half, are periods
  2 pi 1e4^(i / half), from 2 pi up to 2 pi 1e4^(1 - 1/half), in the reverse order.

  Args:
    x: [B] float.
  Returns:
    [B, num_features] float32.
  """
  if num_features % 2:
    raise ConfigError(f"fourier_features needs an even num_features, got {num_features}.")
  half = num_features // 2
  log_periods = jnp.linspace(math.log(max_period), math.log(min_period), half, dtype=_F32)
  freqs = 2 * math.pi * jnp.exp(-log_periods)
  args = x.astype(_F32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """The GLIDE / ADM / DiT sinusoidal timestep embedding: [cos(t f_i), sin(t f_i)],
  f_i = exp(-ln(max_period) i / half), i = 0..half-1, half = dim // 2 (DiT `models.py::
  TimestepEmbedder.timestep_embedding`; MicroDiT and TerDiT copy it); an odd `dim` gets a zero
  column, as the original.

  Args:
    t: [B] float (the timestep, or MicroDiT's c_noise = ln(sigma) / 4).
  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=_F32) / half)
  args = t.astype(_F32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class NoiseEmbedding(nnx.Module):
  """Fourier embedding of a noise level followed by a Dense, all in float32.

  The defaults suit logSNR values in about [-20, 20]: periods from 200 (no wrap-around over the
  whole range) down to 0.5 (resolves logSNR steps well below 0.1).
  """

  def __init__(self, out_dim: int, *, num_features: int = 256, min_period: float = 0.5,
               max_period: float = 200.0, rngs: nnx.Rngs):
    self.num_features, self.min_period, self.max_period = num_features, min_period, max_period
    self.proj = Dense(num_features, out_dim, names=(None, "embed"), dtype=_F32, rngs=rngs)

  def __call__(self, noise_cond: Array) -> Array:
    """noise_cond: [B] float -> [B, out_dim] float32."""
    f = fourier_features(noise_cond, self.num_features, self.min_period, self.max_period)
    return self.proj(f)


class ClassEmbedding(nnx.Module):
  """Table of num_classes + 1 vectors; index num_classes is the learned null (unconditional) class."""

  def __init__(self, num_classes: int, out_dim: int, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.table = param(rngs, nnx.initializers.normal(0.02), (num_classes + 1, out_dim),
                       ("vocab", "embed"))

  def __call__(self, labels: Array) -> Array:
    """labels: [B] int in [0, num_classes] -> [B, out_dim] float32."""
    return jnp.take(self.table[...], labels.astype(jnp.int32), axis=0)


# --------------------------------------------------------------------------------------------------
# Activations.


ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


def activate(x: Array, gate: Array | None = None, *, name: str) -> Array:
  """ACTIVATIONS[name](x), times `gate` when given (the gated product of GLU MLPs)."""
  y = ACTIVATIONS[name](x)
  return y if gate is None else y * gate


class Activation(nnx.Module):
  """An element-wise non-linearity as a module (so numerics rules can reach it), optionally gated:
  y = act(x), or act(x) * gate (SwiGLU: `Activation("silu")(x W1, gate=x W3)`).

  Args:
    name: a key of `ACTIVATIONS` ("gelu_tanh", "gelu", "silu").
  `residuals`: see the module docstring.
  """

  def __init__(self, name: str = "gelu_tanh"):
    if name not in ACTIVATIONS:
      raise ConfigError(f"Unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}.")
    self.name = name
    self.residuals = None

  def __call__(self, x: Array, gate: Array | None = None) -> Array:
    """x: any shape; gate: None or x's shape -> x's shape."""
    return with_residuals(self.residuals, functools.partial(activate, name=self.name), x, gate)


# --------------------------------------------------------------------------------------------------
# Resampling and patching.


def upsample_nearest2(x: Array) -> Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], nearest neighbour."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def patchify(x: Array, patch_size: int) -> Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C], patch pixels in (row, col, channel) order."""
  b, h, w, c = x.shape
  p = patch_size
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def unpatchify(x: Array, patch_size: int, channels: int) -> Array:
  """[B, h, w, p*p*C] -> [B, h*p, w*p, C]; the inverse of `patchify`."""
  b, h, w, _ = x.shape
  p = patch_size
  x = x.reshape(b, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, channels)


# The layer classes a numerics rule may give a residual policy (module docstring).
NONLINEAR_LAYERS = (RMSNorm, LayerNorm, GroupNorm, FiLM, Activation)
