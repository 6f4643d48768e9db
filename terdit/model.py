"""TerDiT's backbone: the Large-DiT (LLaMA-style) class-conditional diffusion transformer.

TerDiT (Lu et al., arXiv 2405.14854) trains Large-DiT (Alpha-VLLM/LLaMA2-Accessory,
`Large-DiT-ImageNet/models.py`) with ternary weights. The forward pass below is the one of
`models.py::DiT_Llama` in Lucky-Lance/TerDiT:

  tokens = Linear(patchify_p(x))                              no absolute position embedding
  c      = MLP(timestep_embedding(t)) + Embed(label)          width min(dim, 1024)
  per block (TransformerBlock):
    mod = RMSNorm_{6 dim}(Linear_adaLN(SiLU(c)))              ONE norm over the joint 6*dim vector
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = split(mod, 6)
    x += gate_a * Attn(RMSNorm(x) * (1 + scale_a) + shift_a)  RoPE 1-D (interleaved pairs)
    x += gate_m * SwiGLU(RMSNorm(x) * (1 + scale_m) + shift_m)
  F = Linear(LayerNorm(x) * (1 + scale) + shift), (shift, scale) = Linear(SiLU(c))
  F: [B, H, W, 2 C] with learned sigma (eps in the first C channels, the variance
     interpolation v in the last C: the ADM recipe splits it)

The adaLN RMSNorm is TerDiT's addition (arXiv 2405.14854, Sec. 3.2, "RMS-normalized adaLN"):
with ternary weights the modulation grows large; `adaln_norm=False` removes it (the ablation of
TerDiT Fig. 7). Every linear layer is a `common.nn.layers.Dense`, so `config.numerics.rules` decide
which are ternary; TerDiT's choice (attention, SwiGLU and the block adaLN) is in configs/terdit.py.
Attention, SwiGLU and the adaLN modulation are the shared `common.nn.transformer` pieces with the
official parameter names; the 1-D RoPE is TerDiT's own (LLaMA's convention).

Initialisation as the official code: xavier-uniform for x_embedder, attention and SwiGLU, N(0, 0.02)
for the timestep MLP and the label table, zeros for every adaLN linear and for the final linear;
biases zero, norm scales one.

The noise condition is the DDPM timestep t in [0, 1000) (a float: DiT/ADM feed the original
timestep index to the network, also when sampling on a respaced grid).
"""

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from common.nn import layers
from common import registry
from common.nn import transformer
from common.errors import ConfigError, ShapeError
from common.nn.layers import timestep_embedding

Array = jax.Array
_F32 = jnp.float32


def ffn_hidden_dim(dim: int, multiple_of: int = 256,
                   ffn_dim_multiplier: float | None = None) -> int:
  """SwiGLU width: int(2 * 4 dim / 3) (times the multiplier), rounded up to `multiple_of`
  (official models.py::FeedForward). 1536 -> 4096, 3072 -> 8192."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_1d(x: Array, theta: float = 10000.0) -> Array:
  """1-D rotary position embedding over the token index, LLaMA's interleaved-pair convention.

  Pairs (x[2i], x[2i+1]) are rotated by the angle pos * theta^(-2i / D), computed in float32
  (official models.py: `precompute_freqs_cis` and `apply_rotary_emb` through `view_as_complex`).

  Args:
    x: [B, T, N, D] with D even; position = token index 0..T-1 (raster order of the patches).
  Returns:
    [B, T, N, D] in x.dtype.
  """
  _, t, _, d = x.shape
  if d % 2:
    raise ConfigError(f"RoPE needs an even head_dim, got {d}.")
  freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=_F32)[: d // 2] / d))     # [D/2]
  ang = jnp.arange(t, dtype=_F32)[:, None] * freqs[None, :]                    # [T, D/2]
  cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
  x32 = x.astype(_F32).reshape(x.shape[:-1] + (d // 2, 2))
  a, b = x32[..., 0], x32[..., 1]
  y = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
  return y.astype(x.dtype)


class Block(nnx.Module):
  """Large-DiT transformer block with TerDiT's RMS-normalised adaLN (module docstring).

  Attention (official models.py::Attention): wq, wk, wv, wo without bias, xavier-uniform; the
  QK-norm (Large-DiT `--qk_norm`) is a LayerNorm with affine weight and bias over all
  num_heads * head_dim features, applied before the split into heads (not per head). SwiGLU
  (official models.py::FeedForward): w2(SiLU(w1 x) * w3 x), no biases, xavier-uniform.
  """

  def __init__(self, dim: int, cond_dim: int, num_heads: int, hidden: int, *,
               norm_eps: float = 1e-5, qk_norm: bool = False, adaln_norm: bool = True,
               rope_theta: float = 10000.0, dtype: Any = _F32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ConfigError(f"TerDiT width {dim} is not divisible by num_heads {num_heads}.")
    xavier = nnx.initializers.xavier_uniform()
    self.attn_norm = layers.RMSNorm(dim, epsilon=norm_eps, rngs=rngs)
    self.attn = transformer.Attention(
        dim, dim // num_heads, in_names=("wq", "wk", "wv"), out_name="wo",
        qk_norm=(functools.partial(layers.LayerNorm, use_bias=True, epsilon=1e-5) if qk_norm
                 else None),
        qk_norm_per_head=False, use_bias=False, kernel_init=xavier, out_init=xavier, dtype=dtype,
        rngs=rngs)
    self.rope_theta = rope_theta
    self.mlp_norm = layers.RMSNorm(dim, epsilon=norm_eps, rngs=rngs)
    self.mlp = transformer.SwiGLU(dim, hidden, names=("w1", "w3", "w2"), kernel_init=xavier,
                                  out_init=xavier, dtype=dtype, rngs=rngs)
    # The modulation is computed in float32: its RMSNorm sees an input ~ bias at init (zero-init
    # linear), where the norm's gradient is ~ 1/sqrt(eps) (arXiv 2405.14854, Sec. 3.2).
    self.adaln = layers.Dense(cond_dim, 6 * dim, names=(None, "embed"), zero_init=True,
                              dtype=_F32, rngs=rngs)
    self.adaln_norm = (layers.RMSNorm(6 * dim, epsilon=norm_eps, rngs=rngs) if adaln_norm
                       else None)
    self.dtype = layers.as_dtype(dtype)

  def __call__(self, x: Array, c: Array) -> Array:
    """x: [B, T, dim]; c: [B, cond_dim] float32 (not yet activated) -> [B, T, dim]."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = transformer.adaln(
        self.adaln, c, 6, act="silu", norm=self.adaln_norm, dtype=self.dtype)
    rope = functools.partial(rope_1d, theta=self.rope_theta)
    x = x + gate_a * self.attn(layers.modulate(self.attn_norm(x), shift_a, scale_a), rope=rope)
    x = x + gate_m * self.mlp(layers.modulate(self.mlp_norm(x), shift_m, scale_m))
    return x


def _call_block(block: Block, x: Array, c: Array) -> Array:
  return block(x, c)


_remat_call_block = nnx.remat(_call_block)


class FinalLayer(nnx.Module):
  """LayerNorm (no affine, eps 1e-6) -> full-precision adaLN modulation -> Linear to p*p*C_out."""

  def __init__(self, dim: int, cond_dim: int, out_features: int, *, dtype: Any = _F32,
               rngs: nnx.Rngs):
    self.adaln = layers.Dense(cond_dim, 2 * dim, names=(None, "embed"), zero_init=True,
                              dtype=_F32, rngs=rngs)
    self.linear = layers.Dense(dim, out_features, names=("embed", None), zero_init=True,
                               dtype=dtype, rngs=rngs)
    self.dtype = layers.as_dtype(dtype)

  def __call__(self, x: Array, c: Array) -> Array:
    """x: [B, T, dim]; c: [B, cond_dim] -> [B, T, out_features]."""
    shift, scale = transformer.adaln(self.adaln, c, 2, act="silu", dtype=self.dtype)
    return self.linear(layers.modulate(layers.layer_norm(x, None, epsilon=1e-6), shift, scale))


@registry.register("model")
class TerDiT(nnx.Module):
  """Large-DiT / TerDiT class-conditional denoiser (module docstring).

  The shapes of TerDiT-600M (dim 1536, depth 16, 32 heads) and TerDiT-4.2B (dim 3072, depth 32,
  32 heads) are in configs/terdit.py. Full precision as built; `config.numerics.rules` make
  its attention, SwiGLU and block-adaLN linears ternary.

  Args:
    image_size: side of the (latent) input, e.g. 32 for 256 px through the SD VAE.
    in_channels: C of the input (4 for SD latents).
    patch_size: p.
    dim: model width.
    depth: number of blocks.
    num_heads: attention heads (head_dim = dim / num_heads).
    num_classes: class labels 0..num_classes-1; label num_classes is the null class (CFG).
    learn_sigma: output 2 C channels (eps and the ADM variance interpolation) instead of C.
    multiple_of, ffn_dim_multiplier: SwiGLU width (`ffn_hidden_dim`).
    norm_eps: eps of the RMSNorms (pre-norms and the adaLN norm).
    qk_norm: LayerNorm on the whole q and k projections.
    adaln_norm: TerDiT's RMSNorm after each block's adaLN linear (False: plain Large-DiT adaLN).
    rope_theta: RoPE base.
    max_cond_dim: the conditioning width is min(dim, max_cond_dim) (1024 in Large-DiT).
    remat: rematerialise each block in the backward pass.
    dtype: compute dtype of the blocks (parameters stay float32).
  """

  def __init__(self, *, image_size: int = 32, in_channels: int = 4, patch_size: int = 2,
               dim: int = 1536, depth: int = 16, num_heads: int = 32, num_classes: int = 1000,
               learn_sigma: bool = True, multiple_of: int = 256,
               ffn_dim_multiplier: float | None = None, norm_eps: float = 1e-5,
               qk_norm: bool = False, adaln_norm: bool = True, rope_theta: float = 10000.0,
               max_cond_dim: int = 1024, remat: bool = False, dtype: Any = "float32",
               rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ConfigError(f"TerDiT: image_size {image_size} is not divisible by patch_size "
                        f"{patch_size}.")
    if num_classes < 1:
      raise ConfigError(f"TerDiT is class-conditional: num_classes must be >= 1, got "
                        f"{num_classes}.")
    self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.num_classes, self.remat = num_classes, remat
    self.dtype = layers.as_dtype(dtype)
    cond_dim = min(dim, max_cond_dim)
    normal = nnx.initializers.normal(0.02)
    self.x_embedder = layers.Dense(patch_size * patch_size * in_channels, dim,
                                   names=("conv_in", "embed"), dtype=dtype, rngs=rngs)
    self.t_embedder = nnx.List([
        layers.Dense(256, cond_dim, names=(None, "embed"), kernel_init=normal, dtype=_F32,
                     rngs=rngs),
        layers.Dense(cond_dim, cond_dim, names=("embed", None), kernel_init=normal, dtype=_F32,
                     rngs=rngs)])
    self.y_embedder = layers.ClassEmbedding(num_classes, cond_dim, rngs=rngs)
    hidden = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
    self.blocks = nnx.List([
        Block(dim, cond_dim, num_heads, hidden, norm_eps=norm_eps, qk_norm=qk_norm,
              adaln_norm=adaln_norm, rope_theta=rope_theta, dtype=dtype, rngs=rngs)
        for _ in range(depth)])
    self.final = FinalLayer(dim, cond_dim, patch_size * patch_size * self.out_channels,
                            dtype=dtype, rngs=rngs)

  @staticmethod
  def min_param_tensors(kwargs: dict) -> int:
    """A lower bound on the parameter tensors of `TerDiT(**kwargs)` (all arguments given), from its
    arguments alone: 2 per block (each has at least one linear layer with two). An export's weights
    file must hold at least this many before the network is traced
    (`common.weights.deployment.check_tensor_count`)."""
    return 2 * int(kwargs["depth"])

  def __call__(self, x: Array, noise_cond: Array, cond: dict, *,
               dropout_key: Array | None = None) -> Array:
    """x: [B, H, W, C]; noise_cond: [B] timesteps t in [0, 1000); cond: {"label": int [B]}
    (label num_classes = unconditional); dropout_key: unused (no dropout).

    Returns F: [B, H, W, 2 C] (learned sigma) or [B, H, W, C], in the compute dtype.
    """
    del dropout_key
    b, h, w, ch = x.shape
    if (h, w, ch) != (self.image_size, self.image_size, self.in_channels):
      raise ShapeError(f"TerDiT expects [B, {self.image_size}, {self.image_size}, "
                       f"{self.in_channels}] inputs, got {x.shape}.")
    p = self.patch_size
    tokens = layers.patchify(x.astype(self.dtype), p).reshape(b, (h // p) * (w // p), -1)
    tokens = self.x_embedder(tokens)
    t_emb = self.t_embedder[1](jax.nn.silu(self.t_embedder[0](timestep_embedding(noise_cond,
                                                                                 256))))
    c = t_emb + self.y_embedder(cond["label"])                                # [B, cond_dim]
    for block in self.blocks:
      tokens = _remat_call_block(block, tokens, c) if self.remat else block(tokens, c)
    out = self.final(tokens, c).reshape(b, h // p, w // p, -1)
    return layers.unpatchify(out, p, self.out_channels)

  def null_cond(self, cond: dict) -> dict:
    """The null class (label num_classes) for every example."""
    return {"label": jnp.full_like(cond["label"], self.num_classes)}

  def example_inputs(self, batch_size: int):
    """(x [B, S, S, C] float32, {"label": int32 [B]}) ShapeDtypeStructs."""
    s = self.image_size
    return (jax.ShapeDtypeStruct((batch_size, s, s, self.in_channels), _F32),
            {"label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)})
