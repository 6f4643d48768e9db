"""Shared Flax NNX layers for the denoiser networks (SiD2 Residual U-ViT, MicroDiT, TerDiT).

Conventions:
  * Parameters are float32 and carry logical axis names (`nnx.with_partitioning`) from the vocabulary
    of docs/DESIGN.md: `embed`, `mlp`, `heads`, `conv_in`, `conv_out`, `vocab`, `None`. They are
    created with `eager_sharding=False`, so a model builds without a mesh; `common/sharding.py`
    places them by the rules in `config.mesh.rules`.
  * Activations are computed in a compute dtype (`dtype`, bfloat16 on accelerators); norms and the
    softmax statistics are computed in float32 and cast back.
  * Images and feature maps are `[B, H, W, C]` (NHWC); token sequences are `[B, T, C]`.
  * Dropout is a pure function of an explicit PRNG key: it is active iff a key is given.

Numerics hooks (`common/numerics.py` rules choose them by module path):
  * Every linear layer a numerics choice may apply to is a `Dense`; a rule replaces it by another
    implementation (TerDiT's ternary QAT, COAT's FP8 GEMM).
  * The non-linear layers (`NONLINEAR_LAYERS`: `RMSNorm`, `LayerNorm`, `GroupNorm`, `FiLM`,
    `Activation`) compute
    their output as a pure function of their inputs and parameters, `fn(x, *others)`, through
    their `residuals` attribute: `None` (plain autodiff, the default) or a *residual policy*, a
    hashable callable `policy(fn, *args) -> fn(*args)` that may change what is saved for the
    backward pass (COAT's `coat.activations.FP8Residuals` saves the inputs as FP8). A rule sets it;
    the parameters and their paths stay as they are.
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


def layer_norm(x: Array, scale: Array | None, *, epsilon: float) -> Array:
  """(x - mean) / sqrt(var + eps) over the last axis (times `scale` [C]; no bias), statistics in
  float32."""
  x32 = x.astype(_F32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    y = y * scale
  return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis without bias (torch `nn.LayerNorm(dim, eps, bias=False)`),
  statistics in float32; `use_scale=False` is the parameter-free form (e.g. QK-norms).

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
    fn = functools.partial(layer_norm, epsilon=self.epsilon)
    scale = self.scale[...] if self.scale is not None else None
    return with_residuals(self.residuals, fn, x, scale)


def film(x: Array, scale: Array, shift: Array) -> Array:
  """x * (1 + scale) + shift (scale, shift broadcast against x)."""
  return x * (1 + scale) + shift


class FiLM(nnx.Module):
  """Feature-wise modulation y = x * (1 + scale(c)) + shift(c) from a global conditioning vector.

  (scale, shift) = Dense(c), zero-initialised so the layer starts as the identity. `c` is the
  already activated conditioning vector [B, cond_dim] (float32); the map is computed in float32.
  `residuals` (module docstring) applies to the modulation `film(x, scale, shift)`.
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
    return with_residuals(self.residuals, film, x, scale, shift)


class AdaRMSNorm(nnx.Module):
  """FiLM-RMSNorm: RMSNorm without affine, then x * (1 + scale(c)) + shift(c)."""

  def __init__(self, num_features: int, cond_dim: int, *, epsilon: float = 1e-6, rngs: nnx.Rngs):
    self.norm = RMSNorm(num_features, use_scale=False, epsilon=epsilon, rngs=rngs)
    self.film = FiLM(cond_dim, num_features, rngs=rngs)

  def __call__(self, x: Array, c: Array) -> Array:
    """x: [B, ..., C]; c: [B, cond_dim] -> [B, ..., C]."""
    return self.film(self.norm(x), c)


# --------------------------------------------------------------------------------------------------
# Conditioning embeddings.


def fourier_features(x: Array, num_features: int, min_period: float, max_period: float) -> Array:
  """Sinusoidal features of a scalar per example, in float32.

  Periods are geometric from `max_period` down to `min_period`, both included (num_features/2 of
  them); the output is [cos(2 pi x / P_i), sin(2 pi x / P_i)]. This is not the DiT / ADM timestep
  embedding: its freqs exp(-ln(1e4) i / half), i < half, are periods 2 pi 1e4^(i / half), from 2 pi
  up to 2 pi 1e4^(1 - 1/half), in the reverse order (the families that need it exactly build it).

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
# Attention and MLP.


def rope_2d(x: Array, grid: tuple[int, int], base: float = 100.0) -> Array:
  """Axial 2-D rotary position embedding on tokens laid out row-major on an (h, w) grid.

  The first half of the head dimension rotates with the row index, the second half with the column
  index (each half in pairs (i, i + quarter), frequencies base^(-i / quarter)). Computed in float32.

  Args:
    x: [B, T, N, D] with T = h * w and D divisible by 4.
  Returns:
    [B, T, N, D] in x.dtype.
  """
  h, w = grid
  d = x.shape[-1]
  quarter = d // 4
  freqs = base ** (-jnp.arange(quarter, dtype=_F32) / quarter)                 # [D/4]
  rows = jnp.repeat(jnp.arange(h, dtype=_F32), w)                              # [T]
  cols = jnp.tile(jnp.arange(w, dtype=_F32), h)                                # [T]

  def rotate(part, pos):
    ang = pos[:, None] * freqs[None, :]                                        # [T, D/4]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    a, b = part[..., :quarter], part[..., quarter:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

  x32 = x.astype(_F32)
  y = jnp.concatenate([rotate(x32[..., :2 * quarter], rows), rotate(x32[..., 2 * quarter:], cols)],
                      axis=-1)
  return y.astype(x.dtype)


def attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  """Softmax attention whose backward pass keeps only its inputs: q [B, T, N, D], k and v
  [B, S, N, D], mask None or bool broadcastable to [B, N, T, S] (True = attend) -> [B, T, N, D].

  XLA's attention (`jax.nn.dot_product_attention(implementation="xla")`, scale 1/sqrt(D), softmax
  statistics in float32) under `jax.checkpoint`: the backward pass recomputes the logits and
  probabilities from q and k instead of keeping them, as a fused flash attention does. Kept, they
  are float32 [B, N, T, S] tensors per layer (at T = S = 256, 32 heads, batch 8: 64 MiB each, two
  or more per layer), more than all the layer's other activations. The recomputation costs the
  QK^T product and the softmax once more in the backward pass. (In jax 0.12,
  `implementation=None` is XLA's attention on every platform, cuDNN's only when asked for.)
  """
  def attend(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  return jax.checkpoint(attend)(q, k, v, mask)


class Attention(nnx.Module):
  """Multi-head self-attention with QK-RMSNorm (per head, learned scale) and optional 2-D RoPE.

  The attention itself is `attention` (XLA's, recomputed in the backward pass; float32 softmax).

  Args:
    dim: model width (= num_heads * head_dim).
    head_dim: width of one head.
    zero_init_out: zero-initialise the output projection (residual branch starts at zero).
  """

  def __init__(self, dim: int, head_dim: int, *, qk_norm: bool = True, use_rope: bool = True,
               zero_init_out: bool = True, dtype: Any = _F32, rngs: nnx.Rngs):
    if dim % head_dim:
      raise ConfigError(f"Attention width {dim} is not divisible by head_dim {head_dim}.")
    if use_rope and head_dim % 4:
      raise ConfigError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}.")
    self.num_heads, self.head_dim = dim // head_dim, head_dim
    self.use_rope = use_rope
    self.qkv = Dense(dim, 3 * dim, names=("embed", "heads"), dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(head_dim, rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, rngs=rngs) if qk_norm else None
    self.out = Dense(dim, dim, names=("heads", "embed"), zero_init=zero_init_out, dtype=dtype,
                     rngs=rngs)

  def __call__(self, x: Array, *, grid: tuple[int, int] | None = None, dropout_rate: float = 0.0,
               dropout_key: Array | None = None) -> Array:
    """x: [B, T, dim]; grid: (h, w) with h * w = T, needed for RoPE -> [B, T, dim].

    Dropout (if a key is given) acts on the attention output before the output projection.
    """
    b, t, _ = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                        # [B, T, N, D]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      if grid is None:
        raise ValueError("Attention with RoPE needs the token grid (h, w).")
      q, k = rope_2d(q, grid), rope_2d(k, grid)
    o = attention(q, k, v)                                                     # [B, T, N, D]
    o = dropout(o.reshape(b, t, -1), dropout_rate, dropout_key)
    return self.out(o)


class CrossAttention(nnx.Module):
  """Multi-head attention from tokens x to a context (e.g. caption token embeddings), with a key
  mask; QK-RMSNorm per head. The output projection is zero-initialised (the branch starts at 0).

  Args:
    dim: width of x (= num_heads * head_dim).
    context_dim: width of the context tokens.
    head_dim: width of one head.
  """

  def __init__(self, dim: int, context_dim: int, head_dim: int, *, qk_norm: bool = True,
               zero_init_out: bool = True, dtype: Any = _F32, rngs: nnx.Rngs):
    if dim % head_dim:
      raise ConfigError(f"CrossAttention width {dim} is not divisible by head_dim {head_dim}.")
    self.num_heads, self.head_dim = dim // head_dim, head_dim
    self.q = Dense(dim, dim, names=("embed", "heads"), dtype=dtype, rngs=rngs)
    self.kv = Dense(context_dim, 2 * dim, names=(None, "heads"), dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(head_dim, rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, rngs=rngs) if qk_norm else None
    self.out = Dense(dim, dim, names=("heads", "embed"), zero_init=zero_init_out, dtype=dtype,
                     rngs=rngs)

  def __call__(self, x: Array, context: Array, mask: Array | None = None) -> Array:
    """x: [B, T, dim]; context: [B, S, context_dim]; mask: [B, S] (1 = attend) -> [B, T, dim].

    A row whose mask is all zero attends to nothing and gets a zero output."""
    b, t, _ = x.shape
    s = context.shape[1]
    q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
    kv = self.kv(context.astype(q.dtype)).reshape(b, s, 2, self.num_heads, self.head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    attn_mask = None
    if mask is not None:
      attn_mask = jnp.broadcast_to(mask.astype(bool)[:, None, None, :], (b, self.num_heads, t, s))
    o = attention(q, k, v, attn_mask)
    if mask is not None:  # fully masked rows: softmax over nothing -> 0, not a uniform average
      o = jnp.where(jnp.any(mask.astype(bool), axis=1)[:, None, None, None], o, 0).astype(o.dtype)
    return self.out(o.reshape(b, t, -1))


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


class MLP(nnx.Module):
  """Dense(dim -> hidden) -> GELU(tanh) -> dropout -> Dense(hidden -> dim), output zero-init."""

  def __init__(self, dim: int, hidden: int, *, zero_init_out: bool = True, dtype: Any = _F32,
               rngs: nnx.Rngs):
    self.fc1 = Dense(dim, hidden, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.act = Activation("gelu_tanh")
    self.fc2 = Dense(hidden, dim, names=("mlp", "embed"), zero_init=zero_init_out, dtype=dtype,
                     rngs=rngs)

  def __call__(self, x: Array, *, dropout_rate: float = 0.0,
               dropout_key: Array | None = None) -> Array:
    """x: [..., dim] -> [..., dim]."""
    h = self.act(self.fc1(x))
    return self.fc2(dropout(h, dropout_rate, dropout_key))


# --------------------------------------------------------------------------------------------------
# Convolutional blocks and resampling.


class ResBlock(nnx.Module):
  """Conditioned conv residual block (SiD2, arXiv 2410.19324; DFoT-style):

    h = conv3x3(SiLU(GN(x)))
    h = SiLU(GN(h) * (1 + scale(c)) + shift(c))
    out = x + conv3x3_zero(dropout(h))

  The last conv is zero-initialised, so the block starts as the identity.
  """

  def __init__(self, channels: int, cond_dim: int, *, dropout: float = 0.0,
               num_groups: int = 32, dtype: Any = _F32, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(channels, num_groups, rngs=rngs)
    self.conv1 = Conv(channels, channels, 3, dtype=dtype, rngs=rngs)
    self.norm2 = GroupNorm(channels, num_groups, affine=False, rngs=rngs)
    self.film = FiLM(cond_dim, channels, rngs=rngs)
    self.conv2 = Conv(channels, channels, 3, zero_init=True, dtype=dtype, rngs=rngs)
    self.act1, self.act2 = Activation("silu"), Activation("silu")
    self.dropout_rate = dropout
    self.dtype = as_dtype(dtype)

  def __call__(self, x: Array, c: Array, dropout_key: Array | None = None) -> Array:
    """x: [B, H, W, C]; c: [B, cond_dim] (activated) -> [B, H, W, C]."""
    x = x.astype(self.dtype)
    h = self.conv1(self.act1(self.norm1(x)))
    h = self.act2(self.film(self.norm2(h), c))
    h = dropout(h, self.dropout_rate, dropout_key)
    return x + self.conv2(h)


def avg_pool2(x: Array) -> Array:
  """[B, H, W, C] -> [B, H/2, W/2, C], mean over 2x2 windows."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=_F32).astype(x.dtype)


def upsample_nearest2(x: Array) -> Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], nearest neighbour."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Down(nnx.Module):
  """2x downsampling: average pool 2x2, then 3x3 conv (in -> out channels)."""

  def __init__(self, in_features: int, out_features: int, *, dtype: Any = _F32, rngs: nnx.Rngs):
    self.conv = Conv(in_features, out_features, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, in] -> [B, H/2, W/2, out]."""
    return self.conv(avg_pool2(x))


class Up(nnx.Module):
  """2x upsampling: 3x3 conv (in -> out channels) at the low resolution, then nearest x2.

  Conv-then-upsample is 4x cheaper than upsample-then-conv and, being linear with zero
  bias at init, maps a zero input to zero, which the residual skip relies on.
  """

  def __init__(self, in_features: int, out_features: int, *, dtype: Any = _F32, rngs: nnx.Rngs):
    self.conv = Conv(in_features, out_features, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, in] -> [B, 2H, 2W, out]."""
    return upsample_nearest2(self.conv(x))


# --------------------------------------------------------------------------------------------------
# Patching.


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


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> Dense (equivalent to a conv with kernel p, stride p)."""

  def __init__(self, in_channels: int, patch_size: int, out_features: int, *, dtype: Any = _F32,
               rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.proj = Dense(patch_size * patch_size * in_channels, out_features,
                      names=("conv_in", "conv_out"), dtype=dtype,
                      kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in",
                                                                    "truncated_normal"),
                      rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H/p, W/p, out_features]."""
    return self.proj(patchify(x, self.patch_size))


class Unpatchify(nnx.Module):
  """Dense(in -> p*p*C) then un-patching: the inverse layout of `PatchEmbed` (a transposed conv).

  Zero-initialised by default, so a network ending in it outputs exactly zero at init.
  """

  def __init__(self, in_features: int, patch_size: int, out_channels: int, *,
               zero_init: bool = True, dtype: Any = _F32, rngs: nnx.Rngs):
    self.patch_size, self.out_channels = patch_size, out_channels
    self.proj = Dense(in_features, patch_size * patch_size * out_channels,
                      names=("conv_in", "conv_out"), zero_init=zero_init, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x: [B, h, w, in] -> [B, h*p, w*p, out_channels]."""
    return unpatchify(self.proj(x), self.patch_size, self.out_channels)


# The layer classes a numerics rule may give a residual policy (module docstring).
NONLINEAR_LAYERS = (RMSNorm, LayerNorm, GroupNorm, FiLM, Activation)
