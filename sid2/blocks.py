"""The blocks of SiD2's Residual U-ViT (Hoogeboom et al., "Simpler Diffusion", arXiv 2410.19324):
conditioned conv ResBlocks, 2x resampling, patch (un)embedding, and the parallel transformer block
with 2-D RoPE. Only SiD2 builds them; the shared layers they use are in common/nn/layers.py and
common/nn/transformer.py.
"""

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from common.nn import layers
from common.nn import transformer
from common.errors import ConfigError
from common.nn.layers import Conv, Dense

Array = jax.Array
_F32 = jnp.float32


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


class AdaRMSNorm(nnx.Module):
  """FiLM-RMSNorm: RMSNorm without affine, then x * (1 + scale(c)) + shift(c)."""

  def __init__(self, num_features: int, cond_dim: int, *, epsilon: float = 1e-6, rngs: nnx.Rngs):
    self.norm = layers.RMSNorm(num_features, use_scale=False, epsilon=epsilon, rngs=rngs)
    self.film = layers.FiLM(cond_dim, num_features, rngs=rngs)

  def __call__(self, x: Array, c: Array) -> Array:
    """x: [B, ..., C]; c: [B, cond_dim] -> [B, ..., C]."""
    return self.film(self.norm(x), c)


class ResBlock(nnx.Module):
  """Conditioned conv residual block (SiD2, arXiv 2410.19324; DFoT-style):

    h = conv3x3(SiLU(GN(x)))
    h = SiLU(GN(h) * (1 + scale(c)) + shift(c))
    out = x + conv3x3_zero(dropout(h))

  The last conv is zero-initialised, so the block starts as the identity.
  """

  def __init__(self, channels: int, cond_dim: int, *, dropout: float = 0.0,
               num_groups: int = 32, dtype: Any = _F32, rngs: nnx.Rngs):
    self.norm1 = layers.GroupNorm(channels, num_groups, rngs=rngs)
    self.conv1 = Conv(channels, channels, 3, dtype=dtype, rngs=rngs)
    self.norm2 = layers.GroupNorm(channels, num_groups, affine=False, rngs=rngs)
    self.film = layers.FiLM(cond_dim, channels, rngs=rngs)
    self.conv2 = Conv(channels, channels, 3, zero_init=True, dtype=dtype, rngs=rngs)
    self.act1, self.act2 = layers.Activation("silu"), layers.Activation("silu")
    self.dropout_rate = dropout
    self.dtype = layers.as_dtype(dtype)

  def __call__(self, x: Array, c: Array, dropout_key: Array | None = None) -> Array:
    """x: [B, H, W, C]; c: [B, cond_dim] (activated) -> [B, H, W, C]."""
    x = x.astype(self.dtype)
    h = self.conv1(self.act1(self.norm1(x)))
    h = self.act2(self.film(self.norm2(h), c))
    h = layers.dropout(h, self.dropout_rate, dropout_key)
    return x + self.conv2(h)


def avg_pool2(x: Array) -> Array:
  """[B, H, W, C] -> [B, H/2, W/2, C], mean over 2x2 windows."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=_F32).astype(x.dtype)


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
    return layers.upsample_nearest2(self.conv(x))


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
    return self.proj(layers.patchify(x, self.patch_size))


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
    return layers.unpatchify(self.proj(x), self.patch_size, self.out_channels)




class TransformerBlock(nnx.Module):
  """Parallel transformer block (DFoT-style, as SiD2-style re-implementations build it):

    y = AdaRMSNorm(x, c);  out = x + Attn(y) + MLP(y) [+ CrossAttn(y, text tokens)]

  Attention with per-head QK-RMSNorm and 2-D RoPE on the token grid, GELU(tanh) MLP of ratio
  `mlp_ratio`; every branch output zero-init. With `context_dim` > 0 a cross-attention branch to the
  caption tokens (QK-RMSNorm, key mask) joins the parallel sum (our text-to-image variant: SiD2
  publishes none). Operates on a [B, H, W, C] map (flattened to H*W tokens internally).
  """

  def __init__(self, channels: int, cond_dim: int, *, head_dim: int, mlp_ratio: float,
               dropout: float = 0.0, context_dim: int = 0, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if head_dim % 4:
      raise ConfigError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}.")
    attn = dict(qk_norm=layers.RMSNorm, zero_init_out=True, dtype=dtype, rngs=rngs)
    self.norm = AdaRMSNorm(channels, cond_dim, rngs=rngs)
    self.attn = transformer.Attention(channels, head_dim, **attn)
    self.mlp = transformer.MLP(channels, int(round(channels * mlp_ratio)), zero_init_out=True,
                               dtype=dtype, rngs=rngs)
    self.cross = (transformer.Attention(channels, head_dim, context_dim=context_dim,
                                        in_names=("q", "kv"), **attn)
                  if context_dim else None)
    self.dropout_rate = dropout
    self.dtype = layers.as_dtype(dtype)

  def __call__(self, x: Array, c: Array, dropout_key: Array | None = None,
               context: tuple[Array, Array] | None = None) -> Array:
    """x: [B, H, W, C]; c: [B, cond_dim] (activated); context: (tokens [B, S, D], mask [B, S])
    when the block has cross-attention -> [B, H, W, C]."""
    b, h, w, ch = x.shape
    t = x.astype(self.dtype).reshape(b, h * w, ch)
    y = self.norm(t, c)
    a = self.attn(y, rope=functools.partial(rope_2d, grid=(h, w)),
                  dropout_rate=self.dropout_rate, dropout_key=layers.fold_key(dropout_key, 0))
    m = self.mlp(y, dropout_rate=self.dropout_rate, dropout_key=layers.fold_key(dropout_key, 1))
    out = t + a + m
    if self.cross is not None:
      out = out + self.cross(y, *context)
    return out.reshape(b, h, w, ch)
