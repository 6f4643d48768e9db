"""Our small KL autoencoder for low-resolution data (Fashion-MNIST 28x28x1 -> 7x7x4 latents).

The building blocks are those of the Stable Diffusion VAE (`kl_vae`: diffusers-style ResnetBlock2D
with GroupNorm + SiLU, stride-2 conv downsampling, nearest + conv upsampling), arranged without the
mid-block attention and with fewer blocks, so it trains in minutes on a CPU:

  encoder:  conv_in -> per level [ResnetBlock2D x blocks_per_level, Downsample2D except at the last]
            -> ResnetBlock2D x mid_blocks -> GroupNorm -> SiLU -> conv_out (2 * latent_channels)
  decoder:  conv_in -> ResnetBlock2D x mid_blocks -> per level, reversed [ResnetBlock2D x
            blocks_per_level, Upsample2D except at the last] -> GroupNorm -> SiLU -> conv_out

With `len(channels)` levels the latents are `2 ** (len(channels) - 1)` times smaller per side.
It follows the network contract of docs/DESIGN.md (constructor keyword arguments from
`config.model`, `rngs`, only `nnx.Param` state) and is trained by
`autoencoder.recipe.KLAutoencoderRecipe` (its `KLAutoencoderNet`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from common.nn import layers
from common import registry
from common.errors import ConfigError
from autoencoder.kl_vae import Conv2d, Downsample2D, ResnetBlock2D, Upsample2D

Array = jax.Array


@registry.register("model", "autoencoder")
class SmallKLAutoencoder(nnx.Module):
  """A convolutional KL autoencoder: images [B, H, W, C] <-> latents [B, H/f, W/f, latent_channels].

  Args:
    image_size: side of the (square) training images, e.g. 28; must be divisible by f.
    in_channels: image channels C.
    channels: width per resolution level; f = 2 ** (len(channels) - 1).
    blocks_per_level: ResnetBlock2D per level in the encoder and in the decoder.
    mid_blocks: ResnetBlock2D at the latent resolution, in the encoder and in the decoder.
    latent_channels: latent channels c.
    norm_groups: GroupNorm groups (reduced to gcd(groups, width) where needed).
    dtype: compute dtype ("float32" or "bfloat16").
  """

  def __init__(self, *, image_size: int = 28, in_channels: int = 1,
               channels: Sequence[int] = (32, 64, 64), blocks_per_level: int = 1,
               mid_blocks: int = 1, latent_channels: int = 4, norm_groups: int = 8,
               dtype: Any = "float32", rngs: nnx.Rngs):
    ch = tuple(int(c) for c in channels)
    if not ch:
      raise ConfigError("SmallKLAutoencoder: channels must list at least one width")
    self.downsample_factor = 2 ** (len(ch) - 1)
    if image_size % self.downsample_factor:
      raise ConfigError(f"SmallKLAutoencoder: image_size={image_size} is not divisible by the "
                        f"downsampling factor {self.downsample_factor} of channels={ch}")
    self.image_size, self.in_channels, self.latent_channels = image_size, in_channels, latent_channels
    kw = dict(groups=norm_groups, dtype=dtype, rngs=rngs)

    def res(a, b):
      return ResnetBlock2D(a, b, **kw)

    # Encoder.
    self.enc_in = Conv2d(in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
    self.enc_blocks = nnx.List([
        nnx.List([res(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i]) for j in range(blocks_per_level)])
        for i in range(len(ch))])
    self.enc_down = nnx.List([Downsample2D(ch[i], dtype=dtype, rngs=rngs)
                              for i in range(len(ch) - 1)])
    self.enc_mid = nnx.List([res(ch[-1], ch[-1]) for _ in range(mid_blocks)])
    self.enc_norm = layers.GroupNorm(ch[-1], norm_groups, epsilon=1e-6, rngs=rngs)
    self.enc_out = Conv2d(ch[-1], 2 * latent_channels, 3, dtype=dtype, rngs=rngs)
    # Decoder.
    rev = ch[::-1]
    self.dec_in = Conv2d(latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
    self.dec_mid = nnx.List([res(rev[0], rev[0]) for _ in range(mid_blocks)])
    self.dec_blocks = nnx.List([
        nnx.List([res(rev[max(i - 1, 0)] if j == 0 else rev[i], rev[i]) for j in range(blocks_per_level)])
        for i in range(len(rev))])
    self.dec_up = nnx.List([Upsample2D(rev[i], dtype=dtype, rngs=rngs) for i in range(len(rev) - 1)])
    self.dec_norm = layers.GroupNorm(rev[-1], norm_groups, epsilon=1e-6, rngs=rngs)
    self.dec_out = Conv2d(rev[-1], in_channels, 3, dtype=dtype, rngs=rngs)

  @staticmethod
  def min_param_tensors(kwargs: dict) -> int:
    """A lower bound on the number of parameter tensors of `SmallKLAutoencoder(**kwargs)` (all
    arguments given) from its arguments alone: 8 per ResnetBlock2D (two GroupNorms and two
    convolutions, weight and bias each), blocks_per_level per level and mid_blocks, in the encoder
    and in the decoder (`common.autoencoders` compares it with the weights file)."""
    levels = len(tuple(kwargs["channels"]))
    return 8 * 2 * (levels * int(kwargs["blocks_per_level"]) + int(kwargs["mid_blocks"]))

  def encode_moments(self, x: Array) -> tuple[Array, Array]:
    """x: images [B, H, W, C] in [-1, 1] -> (mean, logvar), float32 [B, H/f, W/f, latent_channels].

    logvar is clipped to [-30, 20] as in diffusers' DiagonalGaussianDistribution.
    """
    h = self.enc_in(x)
    for i, blocks in enumerate(self.enc_blocks):
      for b in blocks:
        h = b(h)
      if i < len(self.enc_down):
        h = self.enc_down[i](h)
    for b in self.enc_mid:
      h = b(h)
    moments = self.enc_out(jax.nn.silu(self.enc_norm(h))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """z: latents [B, h, w, latent_channels] -> images float32 [B, h*f, w*f, C] (~[-1, 1])."""
    h = self.dec_in(z)
    for b in self.dec_mid:
      h = b(h)
    for i, blocks in enumerate(self.dec_blocks):
      for b in blocks:
        h = b(h)
      if i < len(self.dec_up):
        h = self.dec_up[i](h)
    return self.dec_out(jax.nn.silu(self.dec_norm(h))).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """The reconstruction of x through the posterior mean: [B, H, W, C] -> [B, H, W, C]."""
    return self.decode(self.encode_moments(x)[0])

  def example_inputs(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, dict]:
    """What the network takes: images [B, H, W, C] and no conditioning."""
    shape = (batch_size, self.image_size, self.image_size, self.in_channels)
    return jax.ShapeDtypeStruct(shape, jnp.float32), {}
