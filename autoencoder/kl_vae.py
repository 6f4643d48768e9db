"""The Stable Diffusion / SDXL / SD3 / FLUX KL autoencoder (diffusers `AutoencoderKL`) in Flax NNX.

The architecture follows huggingface/diffusers, src/diffusers/models/autoencoders/vae.py (`Encoder`,
`Decoder`, `DiagonalGaussianDistribution`), autoencoder_kl.py (`AutoencoderKL`), resnet.py
(`ResnetBlock2D`, `Downsample2D`, `Upsample2D`), unets/unet_2d_blocks.py (`DownEncoderBlock2D`,
`UpDecoderBlock2D`, `UNetMidBlock2D`) and attention_processor.py (`Attention`, `AttnProcessor2_0`),
itself the `AutoencoderKL` of Rombach et al. 2022 (arXiv:2112.10752, Sec. 3 and App. G):

  encoder:  conv_in -> [ResnetBlock2D x layers_per_block, Downsample2D (not after the last level)]
            -> mid (ResnetBlock2D, single-head attention, ResnetBlock2D) -> GroupNorm -> SiLU
            -> conv_out (2 * latent_channels: mean and log-variance) -> quant_conv (1x1, optional)
  decoder:  post_quant_conv (1x1, optional) -> conv_in -> mid -> [ResnetBlock2D x
            (layers_per_block + 1), Upsample2D (not after the last level)] -> GroupNorm -> SiLU
            -> conv_out

Images and feature maps are NHWC. All GroupNorms use eps 1e-6, as diffusers passes `resnet_eps=1e-6`
to every block of the VAE. Parameter paths equal diffusers' state-dict keys with `.weight` renamed
to `.kernel` (convolutions, linears) or `.scale` (GroupNorm), so a checkpoint maps by name
(`torch_to_params`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import registry
from common.weights import convert
from common.nn import layers
from common.errors import ConfigError, ShapeError

Array = jax.Array

# diffusers' config.json keys that this module reads, with the defaults of `AutoencoderKL.__init__`.
CONFIG_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_EPS = 1e-6


class Conv2d(nnx.Module):
  """A 2-D convolution with explicit zero padding, NHWC input, HWIO kernel [k, k, in, out].

  Args:
    padding: ((top, bottom), (left, right)) zero padding in pixels; default `k // 2` on every side
      (torch's `padding=k//2`).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
               stride: int = 1, padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.kernel = layers.param(rngs, init, (kernel_size, kernel_size, in_features, out_features),
                               (None, None, "conv_in", "conv_out"))
    self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (out_features,), ("conv_out",))
    p = kernel_size // 2
    self.padding = tuple(tuple(q) for q in padding) if padding is not None else ((p, p), (p, p))
    self.stride = stride
    self.dtype = layers.as_dtype(dtype)

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, in] -> [B, H', W', out] in `dtype`."""
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class ResnetBlock2D(nnx.Module):
  """diffusers `ResnetBlock2D` without a time embedding (resnet.py):

    h = conv2(SiLU(norm2(conv1(SiLU(norm1(x))))));  out = shortcut(x) + h

  with `shortcut` a 1x1 conv when the width changes (`conv_shortcut`), the identity otherwise.
  """

  def __init__(self, in_channels: int, out_channels: int, *, groups: int, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.norm1 = layers.GroupNorm(in_channels, groups, epsilon=_EPS, rngs=rngs)
    self.conv1 = Conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.norm2 = layers.GroupNorm(out_channels, groups, epsilon=_EPS, rngs=rngs)
    self.conv2 = Conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, in] -> [B, H, W, out]."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Downsample2D(nnx.Module):
  """diffusers `Downsample2D(use_conv=True, padding=0)`: zero-pad bottom and right by one pixel
  (`F.pad(x, (0, 1, 0, 1))`), then a 3x3 conv with stride 2 and no further padding."""

  def __init__(self, channels: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                       rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, floor((H - 2) / 2) + 1, ..., C] (H/2 for even H)."""
    return self.conv(x)


class Upsample2D(nnx.Module):
  """diffusers `Upsample2D(use_conv=True)`: nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, 2H, 2W, C]."""
    return self.conv(layers.upsample_nearest2(x))


class AttentionBlock(nnx.Module):
  """The VAE's mid-block attention: diffusers `Attention(heads=1, dim_head=C, norm_num_groups,
  residual_connection=True, bias=True)` run by `AttnProcessor2_0`:

    h = GroupNorm(x) as tokens [B, HW, C];  out = x + to_out(softmax(q k^T / sqrt(C)) v)

  with q, k, v = to_q(h), to_k(h), to_v(h) (linear maps with bias); softmax in float32.
  """

  def __init__(self, channels: int, *, groups: int, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    def dense():
      return layers.Dense(channels, channels, names=("embed", "heads"), dtype=dtype,
                          kernel_init=nnx.initializers.lecun_normal(), rngs=rngs)
    self.group_norm = layers.GroupNorm(channels, groups, epsilon=_EPS, rngs=rngs)
    self.to_q, self.to_k, self.to_v = dense(), dense(), dense()
    self.to_out = nnx.List([dense()])  # diffusers' `to_out` is [Linear, Dropout]

  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, 1, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)            # [B, HW, 1, C]
    o = jax.nn.dot_product_attention(q, k, v, implementation=None)  # scale 1/sqrt(C)
    return x + self.to_out[0](o).reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nnx.Module):
  """diffusers `UNetMidBlock2D` (num_layers=1): resnet, attention (optional), resnet."""

  def __init__(self, channels: int, *, groups: int, attention: bool, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, dtype=dtype, rngs=rngs)
                             for _ in range(2)])
    self.attentions = (nnx.List([AttentionBlock(channels, groups=groups, dtype=dtype, rngs=rngs)])
                       if attention else None)

  def __call__(self, x: Array) -> Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
  """`num_layers` ResnetBlock2D (in -> out, then out -> out), then an optional Downsample2D."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, downsample: bool,
               groups: int, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                      dtype=dtype, rngs=rngs) for i in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(out_channels, dtype=dtype, rngs=rngs)])
                         if downsample else None)

  def __call__(self, x: Array) -> Array:
    for r in self.resnets:
      x = r(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """`num_layers` ResnetBlock2D (in -> out, then out -> out), then an optional Upsample2D."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, upsample: bool,
               groups: int, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                      dtype=dtype, rngs=rngs) for i in range(num_layers)])
    self.upsamplers = (nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)])
                       if upsample else None)

  def __call__(self, x: Array) -> Array:
    for r in self.resnets:
      x = r(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class Encoder(nnx.Module):
  """diffusers `Encoder(double_z=True)`: images [B, H, W, in] -> moments [B, h, w, 2 * latent]."""

  def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
               layers_per_block: int, groups: int, mid_attention: bool, *,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    ch = tuple(block_out_channels)
    self.conv_in = Conv2d(in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=layers_per_block,
                           downsample=i < len(ch) - 1, groups=groups, dtype=dtype, rngs=rngs)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], groups=groups, attention=mid_attention, dtype=dtype, rngs=rngs)
    self.conv_norm_out = layers.GroupNorm(ch[-1], groups, epsilon=_EPS, rngs=rngs)
    self.conv_out = Conv2d(ch[-1], 2 * latent_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """diffusers `Decoder(norm_type="group")`: latents [B, h, w, latent] -> images [B, H, W, out]."""

  def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
               layers_per_block: int, groups: int, mid_attention: bool, *,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    rev = tuple(reversed(tuple(block_out_channels)))
    self.conv_in = Conv2d(latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(rev[0], groups=groups, attention=mid_attention, dtype=dtype, rngs=rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], num_layers=layers_per_block + 1,
                         upsample=i < len(rev) - 1, groups=groups, dtype=dtype, rngs=rngs)
        for i in range(len(rev))])
    self.conv_norm_out = layers.GroupNorm(rev[-1], groups, epsilon=_EPS, rngs=rngs)
    self.conv_out = Conv2d(rev[-1], out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z: Array) -> Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


@registry.register("model", "autoencoder")
class AutoencoderKL(nnx.Module):
  """diffusers `AutoencoderKL` (the SD 1.x/2.x, SDXL, SD3 and FLUX VAEs; 4 or 16 latent channels).

  Constructor arguments are diffusers' config.json keys (`read_diffusers_config` reads them).
  `encode_moments` and `decode` work on unscaled latents; `common.autoencoders.Autoencoder` applies
  the scaling and shift factors.
  """

  def __init__(self, *, in_channels: int = 3, out_channels: int = 3,
               block_out_channels: Sequence[int] = (64,), layers_per_block: int = 1,
               latent_channels: int = 4, norm_num_groups: int = 32, use_quant_conv: bool = True,
               use_post_quant_conv: bool = True, mid_block_add_attention: bool = True,
               dtype: Any = "float32", rngs: nnx.Rngs):
    for c in block_out_channels:
      if c % norm_num_groups:
        raise ConfigError(f"AutoencoderKL: block_out_channels {tuple(block_out_channels)} must be "
                          f"divisible by norm_num_groups={norm_num_groups}")
    self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block,
                           norm_num_groups, mid_block_add_attention, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                           norm_num_groups, mid_block_add_attention, dtype=dtype, rngs=rngs)
    self.quant_conv = (Conv2d(2 * latent_channels, 2 * latent_channels, 1, dtype=dtype, rngs=rngs)
                       if use_quant_conv else None)
    self.post_quant_conv = (Conv2d(latent_channels, latent_channels, 1, dtype=dtype, rngs=rngs)
                            if use_post_quant_conv else None)
    self.in_channels, self.latent_channels = in_channels, latent_channels
    self.downsample_factor = 2 ** (len(tuple(block_out_channels)) - 1)

  # The loader of diffusers folders (`common.autoencoders.load_diffusers_vae`) reaches this family
  # only through the registered class (common/ imports no family), so it calls these two.
  @staticmethod
  def read_diffusers_config(config: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """(constructor arguments, latent shift, latent scale) of a diffusers config.json dict:
    `model_kwargs(config)` and `latent_normalization(config)` (float32 [latent_channels] each)."""
    return (model_kwargs(config), *latent_normalization(config))

  @staticmethod
  def params_from_torch(state_dict: dict[str, np.ndarray], abstract_params: dict,
                        source: str) -> dict:
    """A diffusers state dict -> this network's pure param dict (`torch_to_params`)."""
    return torch_to_params(state_dict, abstract_params, source)

  @staticmethod
  def min_param_tensors(kwargs: dict) -> int:
    """A lower bound on the number of parameter tensors of `AutoencoderKL(**kwargs)` from its
    arguments alone: 8 per ResnetBlock2D (two GroupNorms and two convolutions, weight and bias
    each), of which the encoder has n * layers_per_block, the decoder n * (layers_per_block + 1)
    and each mid block 2 (n = len(block_out_channels)). Compared with a weights file's tensor
    count before the network is traced, so a config.json cannot make us build a network far
    larger than its weights."""
    n, per_level = len(tuple(kwargs["block_out_channels"])), int(kwargs["layers_per_block"])
    return 8 * (n * (2 * per_level + 1) + 4)

  def encode_moments(self, x: Array) -> tuple[Array, Array]:
    """x: images [B, H, W, in] in [-1, 1] -> (mean, logvar), each float32 [B, H/f, W/f, latent].

    logvar is clipped to [-30, 20] as diffusers' `DiagonalGaussianDistribution` does.
    """
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """z: unscaled latents [B, h, w, latent] -> images float32 [B, h*f, w*f, out] (~[-1, 1])."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)


_INT_KEYS = ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
_BOOL_KEYS = ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def _positive_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def model_kwargs(config: dict) -> dict:
  """`AutoencoderKL` constructor arguments from a diffusers config.json dict.

  Raises ConfigError for configurations this module does not implement (other block types,
  activations or the spatial-norm decoder of MoVQ) and for keys of the wrong type.
  """
  cfg = {**CONFIG_DEFAULTS, **config}
  channels = cfg["block_out_channels"]
  if not isinstance(channels, (list, tuple)) or not channels or not all(map(_positive_int, channels)):
    raise ConfigError(f"AutoencoderKL config: block_out_channels={channels!r:.80} must be a list of "
                      "positive integers")
  n = len(channels)
  if tuple(cfg["down_block_types"]) != ("DownEncoderBlock2D",) * n or (
      tuple(cfg["up_block_types"]) != ("UpDecoderBlock2D",) * n):
    raise ConfigError(f"AutoencoderKL config: only DownEncoderBlock2D / UpDecoderBlock2D blocks (one per "
                      f"block_out_channels entry) are supported, got {cfg['down_block_types']} and "
                      f"{cfg['up_block_types']}")
  if cfg["act_fn"] not in ("silu", "swish"):
    raise ConfigError(f"AutoencoderKL config: act_fn={cfg['act_fn']!r:.80} is not supported (only "
                      "silu)")
  for k in _INT_KEYS:
    if not _positive_int(cfg[k]):
      raise ConfigError(f"AutoencoderKL config: {k}={cfg[k]!r:.80} must be a positive integer")
  for k in _BOOL_KEYS:
    if not isinstance(cfg[k], bool):
      raise ConfigError(f"AutoencoderKL config: {k}={cfg[k]!r:.80} must be true or false")
  return {k: (tuple(cfg[k]) if k == "block_out_channels" else cfg[k])
          for k in ("block_out_channels", *_INT_KEYS, *_BOOL_KEYS)}


def latent_normalization(config: dict) -> tuple[np.ndarray, np.ndarray]:
  """(shift, scale) such that model latents are `(z - shift) * scale`, float32 [latent_channels].

  diffusers pipelines use `(z - shift_factor) * scaling_factor` (SD3, FLUX; shift 0 for SD/SDXL) or,
  when the config has `latents_mean` / `latents_std`, `(z - mean) * scaling_factor / std`
  (pipeline_stable_diffusion_xl.py, per channel).
  """
  cfg = {**CONFIG_DEFAULTS, **config}
  c = model_kwargs(config)["latent_channels"]
  keys = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
  try:
    scale = np.full((c,), float(cfg["scaling_factor"]), np.float32)
    shift = np.full((c,), float(cfg["shift_factor"] or 0.0), np.float32)
    if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
      mean = np.asarray(cfg["latents_mean"], np.float32).reshape(-1)
      std = np.asarray(cfg["latents_std"], np.float32).reshape(-1)
      if mean.shape != (c,) or std.shape != (c,):
        raise ConfigError(f"AutoencoderKL config: latents_mean/latents_std must have {c} entries")
      shift, scale = mean, scale / std
  except (TypeError, ValueError) as e:
    raise ConfigError(f"AutoencoderKL config: {'/'.join(keys)} must be numbers (lists of {c} for "
                      f"latents_mean/std): {e}") from e
  if not (np.isfinite(shift).all() and np.isfinite(scale).all() and (scale != 0).all()):
    raise ConfigError(f"AutoencoderKL config: {'/'.join(keys)} give a non-finite or zero latent "
                      "scaling")
  return shift, scale


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_name(name: str) -> str:
  """Legacy attention names (`query`, `key`, `value`, `proj_attn`) renamed as diffusers does on
  load."""
  parts = name.split(".")
  if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
    parts[-2:-1] = _LEGACY_ATTENTION[parts[-2]].split(".")
  return ".".join(parts)


# Parameter paths equal diffusers' names: every layer is a torch module (a legacy attention
# projection stored as a 1x1 conv becomes a linear kernel through `torch_kernel`).
TABLE = convert.Table(rules=(convert.Rule(r".*", r"\g<0>", convert.TORCH),), rename=_modern_name,
                      hint="our shapes are what the config.json beside it implies: is it the one "
                           "saved with these weights?")


def torch_to_params(state_dict: dict[str, np.ndarray], abstract_params: dict,
                    source: str) -> dict:
  """Maps a diffusers state dict onto this module's pure param dict (numpy float32).

  Convolutions [out, in, kh, kw] become HWIO [kh, kw, in, out]; linears [out, in] become [in, out]
  (legacy attention weights stored as 1x1 convs are accepted); GroupNorm `weight` becomes `scale`.
  Legacy attention names (`query`, `key`, `value`, `proj_attn`) are renamed as diffusers does on load.

  Args:
    state_dict: torch parameter name -> array.
    abstract_params: `nnx.to_pure_dict` of the module's params (arrays or ShapeDtypeStructs).
    source: the weights file, for error messages.

  Raises:
    ShapeError: parameters missing, unexpected or of the wrong shape.
  """
  return convert.apply(TABLE, state_dict, abstract_params, source, error=ShapeError)
