"""MicroDiT (Sehwag et al., "Stretching Each Dollar: Diffusion Training from Scratch on a
Micro-Budget", arXiv 2407.15811): a text-to-image DiT with deferred masking, expert-choice MoE
and layer-wise scaling, computed as the official `micro_diffusion/models/dit.py` (SonyResearch/
micro_diffusion) computes it:

  x = PatchEmbed(latents) + pos                   fixed 2-D sin-cos (base grid, interpolation scale)
  t = TimestepEmbedder(c_noise)
  y = PromptBlock(CaptionProjection(tokens));  c = t + PooledMLP(mean_tokens(y))
  x = PatchMixer(LN-Linear(x), LN-Linear(y), c)   k_m DiT blocks on ALL tokens (width D_m)
  x = x[kept]                                     per-sample random masking (training only)
  x = LN-Linear(x)                                D_m -> D, after masking to save compute
  x = Blocks(x, y, c)                             L DiT blocks, layer-wise scaled widths
  F = unpatchify(scatter(FinalLayer(x, c)))       removed tokens get the all-zero mask token

DiT block (adaLN-Zero on self-attention and FFN; cross-attention ungated and unmodulated):
  (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(GELU_tanh(c))
  x += gate1 * SelfAttn(modulate(LN1(x), shift1, scale1))
  x += CrossAttn(LN2(x), y)
  x += gate2 * FFN(modulate(LN3(x), shift2, scale2))        FFN: SwiGLU, or expert-choice MoE
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.nn import layers
from common import registry
from common.nn import transformer
from common.errors import ConfigError, ShapeError
from common.nn.layers import Dense, modulate, timestep_embedding
from microdit.layers import (ExpertChoiceMoE, caption_mlp, constrain, cross_attention,
                             feed_forward, self_attention, sincos_pos_embed)

Array = jax.Array

FREQ_DIM = 512           # timestep frequencies (official TimestepEmbedder default)


def qkv_width(dim: int, ratio: float, head_dim: int) -> int:
  """Layer-wise scaled attention width: a multiple of 2 head_dim, or dim when ratio == 1
  (official `DiTBlock.__init__`)."""
  if ratio == 1:
    return dim
  return 2 * head_dim * ((int(dim * ratio) + 2 * head_dim - 1) // (2 * head_dim))


class DiTBlock(nnx.Module):
  """One MicroDiT block (module docstring) of width `dim` conditioned on c [B, cond_dim]."""

  def __init__(self, dim: int, *, head_dim: int, mlp_ratio: float, qkv_ratio: float,
               multiple_of: int, cond_dim: int, eps: float, init_std: float, use_bias: bool,
               moe: bool, num_experts: int, capacity: float, dtype: Any, rngs: nnx.Rngs):
    hidden = qkv_width(dim, qkv_ratio, head_dim)
    self.norm1 = layers.LayerNorm(dim, epsilon=eps, rngs=rngs)
    self.attn = self_attention(dim, hidden, head_dim, use_bias=use_bias, eps=eps,
                               out_std=init_std, dtype=dtype, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, epsilon=eps, rngs=rngs)
    self.cross_attn = cross_attention(dim, head_dim, use_bias=use_bias, eps=eps, out_std=init_std,
                                      dtype=dtype, rngs=rngs)
    self.norm3 = layers.LayerNorm(dim, epsilon=eps, rngs=rngs)
    mlp_hidden = int(dim * mlp_ratio)
    self.mlp = (ExpertChoiceMoE(dim, mlp_hidden, multiple_of, num_experts=num_experts,
                                capacity=capacity, out_std=init_std, dtype=dtype, rngs=rngs)
                if moe else feed_forward(dim, mlp_hidden, multiple_of, use_bias=use_bias,
                                         out_std=init_std, dtype=dtype, rngs=rngs))
    self.adaLN_modulation = Dense(cond_dim, 6 * dim, names=(None, "embed"), zero_init=True,
                                  dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, y: Array, c: Array) -> Array:
    """x: [B, T, dim]; y: [B, S, dim] caption tokens; c: [B, cond_dim] -> [B, T, dim]."""
    shift1, scale1, gate1, shift2, scale2, gate2 = transformer.adaln(
        self.adaLN_modulation, c, 6, act="gelu_tanh", dtype=x.dtype)
    x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
    x = constrain(x)
    x = x + self.cross_attn(self.norm2(x), y)
    x = x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))
    return constrain(x)


class PromptBlock(nnx.Module):
  """Pre-LN transformer block without modulation on the caption tokens (official
  `AttentionBlockPromptEmbedding`): x += Attn(LN1(x)); x += SwiGLU(LN2(x)), mlp ratio 4. Its
  attention projection and w3 start at zero, so it starts as the identity."""

  def __init__(self, dim: int, *, head_dim: int, multiple_of: int, eps: float, use_bias: bool,
               dtype: Any, rngs: nnx.Rngs):
    self.norm1 = layers.LayerNorm(dim, epsilon=eps, rngs=rngs)
    self.attn = self_attention(dim, dim, head_dim, use_bias=use_bias, eps=eps, zero_init_out=True,
                               dtype=dtype, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, epsilon=eps, rngs=rngs)
    self.mlp = feed_forward(dim, int(dim * 4.0), multiple_of, use_bias=use_bias,
                            zero_init_out=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class LNLinear(nnx.Module):
  """LayerNorm (no bias) then Linear: the patch-mixer's width maps."""

  def __init__(self, in_dim: int, out_dim: int, *, eps: float, use_bias: bool, dtype: Any,
               rngs: nnx.Rngs):
    self.norm = layers.LayerNorm(in_dim, epsilon=eps, rngs=rngs)
    self.linear = Dense(in_dim, out_dim, names=("embed", None), use_bias=use_bias,
                        dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.linear(self.norm(x))


class FinalLayer(nnx.Module):
  """(shift, scale) = Linear(GELU_tanh(c)); out = Linear(modulate(LN(x), shift, scale)), no gate
  (official `utils.T2IFinalLayer`). Both linears start at zero."""

  def __init__(self, dim: int, out_dim: int, *, eps: float, dtype: Any, rngs: nnx.Rngs):
    self.norm_final = layers.LayerNorm(dim, epsilon=eps, rngs=rngs)
    self.adaLN_modulation = Dense(dim, 2 * dim, names=(None, "embed"), zero_init=True,
                                  dtype=dtype, rngs=rngs)
    self.linear = Dense(dim, out_dim, names=("embed", None), zero_init=True, dtype=dtype,
                        rngs=rngs)

  def __call__(self, x: Array, c: Array) -> Array:
    shift, scale = transformer.adaln(self.adaLN_modulation, c, 2, act="gelu_tanh", dtype=x.dtype)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class TimestepEmbedder(nnx.Module):
  """Linear(512 -> D) -> GELU(tanh) -> Linear(D -> D) on the sinusoidal embedding of c_noise
  (official `utils.TimestepEmbedder`)."""

  def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.fc1 = Dense(FREQ_DIM, dim, names=(None, "embed"), kernel_init=init, dtype=dtype,
                     rngs=rngs)
    self.fc2 = Dense(dim, dim, names=("embed", None), kernel_init=init, dtype=dtype, rngs=rngs)

  def __call__(self, t: Array) -> Array:
    """t: [B] -> [B, D]."""
    e = timestep_embedding(t, FREQ_DIM).astype(self.fc1.dtype)
    return self.fc2(jax.nn.gelu(self.fc1(e), approximate=True))


def _call(block: DiTBlock, x: Array, y: Array, c: Array) -> Array:
  return block(x, y, c)


_remat_call = nnx.remat(_call)


def _moe_layers(depth: int, every_n: int, start: int, stop: int) -> set[int]:
  return {i for i in range(start, stop) if (i + 1) % every_n == 0}


@registry.register("model")
class MicroDiT(nnx.Module):
  """The MicroDiT denoiser (module docstring), the network contract of docs/DESIGN.md.

  Args mirror the official `DiT` (micro_diffusion `models/dit.py`):
    input_size: latent side H = W the model is built for (the position-embedding base grid is
      input_size / patch_size).
    patch_size, in_channels: p and latent channels C (output has C channels too).
    dim, depth, head_dim: backbone width D, blocks L, attention head width.
    multiple_of: FFN widths are rounded up to a multiple of this.
    caption_channels, caption_len: width and number of the caption token embeddings.
    pos_interp_scale: position-embedding interpolation (1 at 256 px, 2 at 512 px).
    norm_eps: LayerNorm epsilon.
    qkv_ratio, mlp_ratio: (first, last) layer-wise scaling of the backbone's attention and FFN
      widths, linearly spaced over the L blocks (np.linspace).
    use_patch_mixer: False removes the mixer (naive masking).
    patch_mixer_depth, patch_mixer_dim, patch_mixer_qkv_ratio, patch_mixer_mlp_ratio: k_m, D_m and
      the mixer's fixed ratios.
    use_bias: biases in the attention, FFN and mixer maps.
    num_experts, expert_capacity, experts_every_n: MoE FFN in blocks i with (i + 1) % n == 0
      (never the backbone's last block, never the mixer's first).
    mask_ratio: fraction r of tokens removed after the mixer in training; masking is active iff
      r > 0 and a `dropout_key` is given (the recipe passes one in training, none at sampling).
    remat: rematerialise each block.
    dtype: compute dtype ("bfloat16" on accelerators); parameters float32.
  """

  # The caption tokens enter the prompt block, the pooled mean and every cross-attention without a
  # mask (official `dit.py`): all caption_len positions, padding included, are read
  # (common.training.contracts.ReadsCaptionPadding; latents with --trim_padding are refused).
  reads_caption_padding = True

  def __init__(self, *, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
               dim: int = 1024, depth: int = 28, head_dim: int = 64, multiple_of: int = 256,
               caption_channels: int = 1024, caption_len: int = 77,
               pos_interp_scale: float = 1.0, norm_eps: float = 1e-6,
               qkv_ratio: tuple[float, float] = (0.5, 1.0),
               mlp_ratio: tuple[float, float] = (0.5, 4.0), use_patch_mixer: bool = True,
               patch_mixer_depth: int = 6, patch_mixer_dim: int = 768,
               patch_mixer_qkv_ratio: float = 1.0, patch_mixer_mlp_ratio: float = 4.0,
               use_bias: bool = False, num_experts: int = 8, expert_capacity: float = 2.0,
               experts_every_n: int = 2, mask_ratio: float = 0.0, remat: bool = False,
               dtype: Any = "float32", rngs: nnx.Rngs):
    if input_size % patch_size:
      raise ConfigError(f"model.input_size={input_size} is not divisible by patch_size="
                        f"{patch_size}.")
    if not 0.0 <= mask_ratio < 1.0:
      raise ConfigError(f"model.mask_ratio={mask_ratio} must lie in [0, 1).")
    for w, name in ((dim, "dim"), (patch_mixer_dim, "patch_mixer_dim")):
      if w % head_dim:
        raise ConfigError(f"model.{name}={w} is not divisible by head_dim={head_dim}.")
    self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
    self.dim, self.caption_channels, self.caption_len = dim, caption_channels, caption_len
    self.pos_interp_scale, self.base_size = float(pos_interp_scale), input_size // patch_size
    self.mask_ratio, self.remat = float(mask_ratio), remat
    self.num_experts, self.expert_capacity = num_experts, float(expert_capacity)
    self.dtype = layers.as_dtype(dtype)
    eps, dt = norm_eps, self.dtype

    self.x_embedder = Dense(patch_size * patch_size * in_channels, dim,
                            names=("conv_in", "conv_out"), dtype=dt, rngs=rngs)
    self.t_embedder = TimestepEmbedder(dim, dtype=dt, rngs=rngs)
    self.y_embedder = caption_mlp(caption_channels, dim, dim, eps=eps, dtype=dt, rngs=rngs)
    self.y_emb_preprocess = PromptBlock(dim, head_dim=head_dim, multiple_of=multiple_of, eps=eps,
                                        use_bias=use_bias, dtype=dt, rngs=rngs)
    self.pooled_y_emb_process = caption_mlp(dim, dim, dim, eps=eps, dtype=dt, rngs=rngs)

    block_kw = dict(head_dim=head_dim, multiple_of=multiple_of, cond_dim=dim, eps=eps,
                    use_bias=use_bias, num_experts=num_experts, capacity=expert_capacity,
                    dtype=dt, rngs=rngs)
    self.use_patch_mixer = use_patch_mixer
    self.mixer_maps = use_patch_mixer and patch_mixer_dim != dim
    if use_patch_mixer:
      moe = _moe_layers(patch_mixer_depth, experts_every_n, 1, patch_mixer_depth)
      self.patch_mixer = nnx.List([
          DiTBlock(patch_mixer_dim, mlp_ratio=patch_mixer_mlp_ratio,
                   qkv_ratio=patch_mixer_qkv_ratio, init_std=0.02 / (2 * depth)**0.5,
                   moe=i in moe, **block_kw) for i in range(patch_mixer_depth)])
      if self.mixer_maps:
        lk = dict(eps=eps, use_bias=use_bias, dtype=dt, rngs=rngs)
        self.patch_mixer_map_xin = LNLinear(dim, patch_mixer_dim, **lk)
        self.patch_mixer_map_xout = LNLinear(patch_mixer_dim, dim, **lk)
        self.patch_mixer_map_y = LNLinear(dim, patch_mixer_dim, **lk)

    qkv_ratios = np.linspace(qkv_ratio[0], qkv_ratio[1], num=depth, dtype=float)
    mlp_ratios = np.linspace(mlp_ratio[0], mlp_ratio[1], num=depth, dtype=float)
    moe = _moe_layers(depth, experts_every_n, 0, depth - 1)
    self.blocks = nnx.List([
        DiTBlock(dim, mlp_ratio=float(mlp_ratios[i]), qkv_ratio=float(qkv_ratios[i]),
                 init_std=0.02 / (2 * (i + 1))**0.5, moe=i in moe, **block_kw)
        for i in range(depth)])
    self.final_layer = FinalLayer(dim, patch_size * patch_size * in_channels, eps=eps, dtype=dt,
                                  rngs=rngs)

  # ---- the network contract ------------------------------------------------------------------
  @staticmethod
  def min_param_tensors(kwargs: dict) -> int:
    """A lower bound on the parameter tensors of `MicroDiT(**kwargs)` (all arguments given), from
    its arguments alone: 2 per backbone block and per patch-mixer block (each has at least one
    Dense with two). An export's weights file must hold at least this many before the network is
    traced (`common.weights.deployment.check_tensor_count`)."""
    mixer = int(kwargs["patch_mixer_depth"]) if kwargs["use_patch_mixer"] else 0
    return 2 * (int(kwargs["depth"]) + mixer)

  def example_inputs(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, dict]:
    """x: latents [B, H, W, C] float32; cond: {"tokens": [B, caption_len, caption_channels]}
    (the official model reads the caption tokens only: no mask, the pooled vector is derived)."""
    x = jax.ShapeDtypeStruct((batch_size, self.input_size, self.input_size, self.in_channels),
                             jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch_size, self.caption_len, self.caption_channels),
                                  jnp.float32)
    return x, {"tokens": tokens}

  def null_cond(self, cond: dict) -> dict:
    """All-zero caption embeddings (official `forward_with_cfg`); other entries unchanged."""
    return {k: (jnp.zeros_like(v) if k in ("tokens", "pooled") else v) for k, v in cond.items()}

  def active_params_per_token(self) -> int:
    """Parameters one token uses on average: all but the MoE experts, plus capacity / E of them
    (expert choice: E experts x capacity T / E tokens = capacity experts per token)."""
    total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(self, nnx.Param)))
    experts = sum(m.expert_params() for _, m in nnx.iter_graph(self)
                  if isinstance(m, ExpertChoiceMoE))
    return int(round(total - experts + experts * self.expert_capacity / self.num_experts))

  # ---- forward -------------------------------------------------------------------------------
  def _check_inputs(self, x: Array, noise_cond: Array, cond: dict) -> None:
    b = x.shape[0]
    if x.ndim != 4 or x.shape[3] != self.in_channels or x.shape[1] != x.shape[2] or (
        x.shape[1] % self.patch_size):
      raise ShapeError(f"MicroDiT expects square latents [B, H, H, {self.in_channels}] with H "
                       f"divisible by {self.patch_size}, got {tuple(x.shape)}.")
    if jnp.shape(noise_cond) != (b,):
      raise ShapeError(f"MicroDiT expects noise_cond [{b}], got {tuple(jnp.shape(noise_cond))}.")
    tokens = cond.get("tokens") if isinstance(cond, dict) else None
    if tokens is None or tokens.ndim != 3 or tokens.shape[0] != b or (
        tokens.shape[2] != self.caption_channels):
      raise ShapeError(f"MicroDiT expects cond['tokens'] [{b}, S, {self.caption_channels}], got "
                       f"{jax.tree.map(jnp.shape, cond)}.")

  def pos_embed(self, grid: int) -> np.ndarray:
    """[grid * grid, D] fixed position embedding for a grid x grid token map."""
    return sincos_pos_embed(self.dim, grid, self.base_size, self.pos_interp_scale)

  def _block(self, block: DiTBlock, x: Array, y: Array, c: Array) -> Array:
    return (_remat_call if self.remat else _call)(block, x, y, c)

  def __call__(self, x: Array, noise_cond: Array, cond: dict, *,
               dropout_key: Array | None = None, mask_noise: Array | None = None):
    """Raw network output F.

    Args:
      x: [B, H, W, C] latents (already scaled by the recipe: c_in x).
      noise_cond: [B] float, c_noise = ln(sigma) / 4.
      cond: {"tokens": [B, S, caption_channels]}.
      dropout_key: PRNG key; with mask_ratio > 0 it draws the random mask (training).
      mask_noise: [B, T] float, optional: the uniform noise whose per-sample argsort picks the
        kept tokens (the first int(T (1 - r)) of the ascending order, official `utils.get_mask`);
        replaces the draw from `dropout_key` (parity tests feed the official noise).
    Returns:
      F [B, H, W, C] float32 when no masking; with masking (F, {"loss_mask": float32 [B, H, W]},
      1 on the pixels of kept patches) and F = 0 on removed patches.
    """
    self._check_inputs(x, noise_cond, cond)
    b, hgt, _, _ = x.shape
    p = self.patch_size
    g = hgt // p
    n = g * g
    dt = self.dtype

    h = self.x_embedder(layers.patchify(x, p).reshape(b, n, -1).astype(dt))
    h = constrain(h + jnp.asarray(self.pos_embed(g), dt)[None])
    t = self.t_embedder(noise_cond)
    y = self.y_emb_preprocess(self.y_embedder(cond["tokens"].astype(dt)))
    c = t + self.pooled_y_emb_process(jnp.mean(y, axis=1))

    if self.use_patch_mixer:
      y_mixer = self.patch_mixer_map_y(y) if self.mixer_maps else y
      if self.mixer_maps:
        h = self.patch_mixer_map_xin(h)
      for block in self.patch_mixer:
        h = self._block(block, h, y_mixer, c)

    masked = self.mask_ratio > 0 and (dropout_key is not None or mask_noise is not None)
    if masked:
      keep = int(n * (1 - self.mask_ratio))
      if mask_noise is None:
        mask_noise = jax.random.uniform(layers.fold_key(dropout_key, 0), (b, n))
      ids_shuffle = jnp.argsort(mask_noise, axis=1)
      ids_keep = ids_shuffle[:, :keep]                                          # [B, keep]
      h = jnp.take_along_axis(h, ids_keep[..., None], axis=1)
    if self.mixer_maps:
      h = self.patch_mixer_map_xout(h)

    for block in self.blocks:
      h = self._block(block, h, y, c)
    out = self.final_layer(h, c).astype(jnp.float32)                           # [B, T', p*p*C]

    if masked:
      kept = jnp.zeros((b, n), jnp.float32).at[jnp.arange(b)[:, None], ids_keep].set(1.0)
      out = jnp.zeros((b, n, out.shape[-1]), jnp.float32).at[
          jnp.arange(b)[:, None], ids_keep].set(out)            # the mask token is all zero
      f = layers.unpatchify(out.reshape(b, g, g, -1), p, self.in_channels)
      loss_mask = jnp.repeat(jnp.repeat(kept.reshape(b, g, g), p, axis=1), p, axis=2)
      return f, {"loss_mask": loss_mask}
    return layers.unpatchify(out.reshape(b, g, g, -1), p, self.in_channels)
