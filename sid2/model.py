"""SiD2 Residual U-ViT (Hoogeboom et al., "Simpler Diffusion", arXiv 2410.19324).

A U-Net whose high-resolution levels are conv ResBlocks and whose low-resolution levels (including
the middle) are transformer blocks, with ONE residual skip per downsampling instead of per-block
concatenation skips:

  h = PatchEmbed_p(x)
  for l = 0..L-2:   h = Blocks_l(h); skip_pos[l] = h; h = Down_l(h); skip_neg[l] = h
  h = MidBlocks(h)
  for l = L-2..0:   h = Up_l(h - skip_neg[l]) + skip_pos[l]; h = Blocks'_l(h)
  F = Unpatchify_p(SiLU(GN(h)))                             (zero-init projection)

Every block is a residual branch with a zero-initialised output layer, so at init each level is the
identity, the mid/decoder corrections vanish (h - skip_neg = 0, Up(0) = 0) and F = 0 exactly.
The exact SiD2 widths/depths are not public (not published); the configs choose them to hit the
published compute (137 / 653 GFLOPs for UViT/4 / UViT/2 at 512). Its blocks are in
sid2/blocks.py.
"""

from collections.abc import Sequence
import itertools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from common.nn import layers
from common import registry
from common.errors import ConfigError, ShapeError
from sid2 import blocks

Array = jax.Array


def _call_block(block: nnx.Module, x: Array, c: Array, key: Array | None,
                context: tuple[Array, Array] | None) -> Array:
  if isinstance(block, blocks.TransformerBlock):
    return block(x, c, key, context)
  return block(x, c, key)


_remat_call_block = nnx.remat(_call_block)


@registry.register("model")
class ResidualUViT(nnx.Module):
  """SiD2 Residual U-ViT denoiser, the network contract of docs/DESIGN.md.

  Args:
    image_size: input side H = W (pixels).
    in_channels: image channels C (input and output).
    patch_size: p of the patch embedding (UViT/p); the level-0 grid is image_size / p.
    channels: width per level, e.g. (128, 256, 512, 1024); level l has grid (image_size/p) / 2^l.
    level_types: "conv" (ResBlocks) or "transformer" per level; the last entry is the mid type.
    blocks_per_level: blocks per encoder level (len(channels) - 1); the decoder mirrors it.
    mid_blocks: blocks at the lowest level.
    num_heads: heads per transformer level (head_dim = width / num_heads); if None, `head_dim`.
    head_dim: attention head width when num_heads is None.
    mlp_ratio: transformer MLP hidden / width.
    dropout: rate per level, incl. the mid level (len(channels)); must be 0 at level 0.
    num_classes: 0 for no class labels; otherwise labels in [0, num_classes], num_classes = null.
    text_dim: 0 for no text; otherwise the width D of caption embeddings, cond = {"tokens":
      [B, text_len, D], "mask": [B, text_len], "pooled": [B, D]}: the pooled vector joins the
      global conditioning, the transformer blocks cross-attend to the tokens; the null caption is
      all-zero embeddings (as MicroDiT, micro_diffusion `models/dit.py`).
    text_len: caption tokens T (what `example_inputs` declares).
    cond_dim: width of the global conditioning vector c.
    remat: rematerialise each block (`nnx.remat`) to save activation memory.
    dtype: compute dtype ("bfloat16" on accelerators); parameters are float32.
    rngs: `nnx.Rngs(params=key)`.
  """

  def __init__(self, *, image_size: int, in_channels: int, patch_size: int,
               channels: Sequence[int], level_types: Sequence[str],
               blocks_per_level: Sequence[int], mid_blocks: int,
               num_heads: int | None = None, head_dim: int = 64, mlp_ratio: float = 4.0,
               dropout: Sequence[float] | None = None, num_classes: int = 0,
               cond_dim: int = 1024, text_dim: int = 0, text_len: int = 0,
               remat: bool = False, dtype: Any = "float32", rngs: nnx.Rngs):
    channels, level_types = tuple(int(c) for c in channels), tuple(level_types)
    blocks_per_level = tuple(int(n) for n in blocks_per_level)
    num_levels = len(channels)
    dropout = tuple(float(d) for d in dropout) if dropout is not None else (0.0,) * num_levels
    self._validate(image_size, patch_size, channels, level_types, blocks_per_level, mid_blocks,
                   dropout, num_classes)
    self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
    self.num_levels, self.num_classes = num_levels, num_classes
    self.text_dim, self.text_len = int(text_dim), int(text_len)
    if self.text_dim and self.text_len < 1:
      raise ConfigError(f"model.text_dim={text_dim} needs model.text_len >= 1 (caption tokens).")
    self.remat = remat
    self.dtype = layers.as_dtype(dtype)

    def make_block(level: int) -> nnx.Module:
      ch = channels[level]
      if level_types[level] == "conv":
        return blocks.ResBlock(ch, cond_dim, dropout=dropout[level], dtype=self.dtype, rngs=rngs)
      hd = ch // num_heads if num_heads else head_dim
      if num_heads and ch % num_heads:
        raise ConfigError(f"model.channels[{level}]={ch} is not divisible by num_heads={num_heads}.")
      return blocks.TransformerBlock(ch, cond_dim, head_dim=hd, mlp_ratio=mlp_ratio,
                                     dropout=dropout[level], context_dim=self.text_dim,
                                     dtype=self.dtype, rngs=rngs)

    # Conditioning: c = SiLU(MLP(NoiseEmb(logSNR) + ClassEmb(label) + Dense(pooled))), float32.
    self.noise_embed = layers.NoiseEmbedding(cond_dim, rngs=rngs)
    self.class_embed = (layers.ClassEmbedding(num_classes, cond_dim, rngs=rngs)
                        if num_classes > 0 else None)
    self.pooled_embed = (layers.Dense(self.text_dim, cond_dim, names=(None, "embed"), rngs=rngs)
                         if self.text_dim else None)
    self.cond_fc1 = layers.Dense(cond_dim, cond_dim, names=(None, "embed"), rngs=rngs)
    self.cond_fc2 = layers.Dense(cond_dim, cond_dim, names=("embed", None), rngs=rngs)

    self.patch_embed = blocks.PatchEmbed(in_channels, patch_size, channels[0], dtype=self.dtype,
                                         rngs=rngs)
    self.enc_blocks = nnx.List([nnx.List([make_block(l) for _ in range(blocks_per_level[l])])
                                for l in range(num_levels - 1)])
    self.downs = nnx.List([blocks.Down(channels[l], channels[l + 1], dtype=self.dtype, rngs=rngs)
                           for l in range(num_levels - 1)])
    self.mid = nnx.List([make_block(num_levels - 1) for _ in range(mid_blocks)])
    self.ups = nnx.List([blocks.Up(channels[l + 1], channels[l], dtype=self.dtype, rngs=rngs)
                         for l in range(num_levels - 1)])
    self.dec_blocks = nnx.List([nnx.List([make_block(l) for _ in range(blocks_per_level[l])])
                                for l in range(num_levels - 1)])
    self.out_norm = layers.GroupNorm(channels[0], rngs=rngs)
    self.out_proj = blocks.Unpatchify(channels[0], patch_size, in_channels, zero_init=True,
                                      dtype=self.dtype, rngs=rngs)

  @staticmethod
  def min_param_tensors(kwargs: dict) -> int:
    """A lower bound on the parameter tensors of `ResidualUViT(**kwargs)` (all arguments given),
    from its arguments alone: 2 per block (each has at least one Dense or norm with two), the
    encoder's and decoder's `blocks_per_level` and `mid_blocks`. An export's weights file must
    hold at least this many before the network is traced (`common.weights.deployment.check_tensor_count`)."""
    return 2 * (2 * sum(int(n) for n in kwargs["blocks_per_level"]) + int(kwargs["mid_blocks"]))

  @staticmethod
  def _validate(image_size, patch_size, channels, level_types, blocks_per_level, mid_blocks,
                dropout, num_classes):
    n = len(channels)
    if n < 1:
      raise ConfigError("model.channels must list at least one level.")
    if len(level_types) != n or any(t not in ("conv", "transformer") for t in level_types):
      raise ConfigError(f"model.level_types={level_types}: need {n} entries, each 'conv' or "
                        "'transformer'.")
    if len(blocks_per_level) != n - 1:
      raise ConfigError(f"model.blocks_per_level={blocks_per_level}: need len(channels) - 1 = "
                        f"{n - 1} entries (the decoder mirrors the encoder).")
    if mid_blocks < 0 or any(b < 0 for b in blocks_per_level):
      raise ConfigError("model.blocks_per_level and model.mid_blocks must be >= 0.")
    if len(dropout) != n:
      raise ConfigError(f"model.dropout={dropout}: need one rate per level incl. the mid level "
                        f"({n} entries).")
    if dropout[0] != 0.0:
      raise ConfigError(f"model.dropout[0]={dropout[0]}: dropout must be 0 at the highest-"
                        "resolution level (SiD: it only helps at lower resolutions).")
    if any(not 0.0 <= d < 1.0 for d in dropout):
      raise ConfigError(f"model.dropout={dropout}: rates must lie in [0, 1).")
    if num_classes < 0:
      raise ConfigError(f"model.num_classes={num_classes} must be >= 0.")
    factor = patch_size * 2 ** (n - 1)
    if image_size % factor:
      raise ConfigError(f"model.image_size={image_size} must be divisible by patch_size * "
                        f"2^(levels-1) = {factor}.")

  def example_inputs(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, dict]:
    """What the network denoises and its conditioning, for `batch_size` examples:
    x [B, H, W, C] float32 and {"label": int32 [B]} (empty for an unconditional model)."""
    x = jax.ShapeDtypeStruct((batch_size, self.image_size, self.image_size, self.in_channels),
                             jnp.float32)
    cond = {}
    if self.num_classes > 0:
      cond["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    if self.text_dim:
      cond["tokens"] = jax.ShapeDtypeStruct((batch_size, self.text_len, self.text_dim), jnp.float32)
      cond["mask"] = jax.ShapeDtypeStruct((batch_size, self.text_len), jnp.int32)
      cond["pooled"] = jax.ShapeDtypeStruct((batch_size, self.text_dim), jnp.float32)
    return x, cond

  def null_cond(self, cond: dict) -> dict:
    """The null class (index num_classes) and all-zero caption embeddings (tokens, pooled; the
    mask is kept); {} stays {}."""
    null = {"label": lambda v: jnp.full_like(v, self.num_classes), "tokens": jnp.zeros_like,
            "pooled": jnp.zeros_like}
    return {k: null.get(k, lambda v: v)(v) for k, v in cond.items()}

  def _conditioning(self, noise_cond: Array, cond: dict) -> Array:
    """[B] logSNR, {"label": [B]} -> activated global conditioning c [B, cond_dim] float32."""
    e = self.noise_embed(noise_cond)
    if self.class_embed is not None:
      e = e + self.class_embed(cond["label"])
    if self.pooled_embed is not None:
      e = e + self.pooled_embed(cond["pooled"].astype(jnp.float32))
    return jax.nn.silu(self.cond_fc2(jax.nn.silu(self.cond_fc1(e))))

  def _check_inputs(self, x: Array, noise_cond: Array, cond: dict) -> None:
    want = (self.image_size, self.image_size, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ShapeError(f"ResidualUViT expects images [B, {want[0]}, {want[1]}, {want[2]}] (from "
                       f"config.model), got {tuple(x.shape)}.")
    b = x.shape[0]
    if jnp.shape(noise_cond) != (b,):
      raise ShapeError(f"ResidualUViT expects noise_cond of shape [{b}], got "
                       f"{tuple(jnp.shape(noise_cond))}.")
    if self.num_classes > 0:
      labels = cond.get("label") if isinstance(cond, dict) else None
      if labels is None or jnp.shape(labels) != (b,):
        raise ShapeError(f"ResidualUViT (num_classes={self.num_classes}) expects cond = "
                         f"{{'label': int labels [{b}]}}, got "
                         f"{jax.tree.map(jnp.shape, cond)}.")
      if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ShapeError(f"ResidualUViT expects integer class labels, got dtype "
                         f"{jnp.result_type(labels)}.")
    if self.text_dim:
      want = {"tokens": (b, self.text_len, self.text_dim), "mask": (b, self.text_len),
              "pooled": (b, self.text_dim)}
      got = {k: tuple(jnp.shape(cond[k])) if k in cond else None for k in want}
      if got != want:
        raise ShapeError(f"ResidualUViT (text_dim={self.text_dim}, text_len={self.text_len}) "
                         f"expects caption embeddings {want}, got {got}.")

  def _run(self, block: nnx.Module, h: Array, c: Array, key: Array | None, context) -> Array:
    if self.remat:
      return _remat_call_block(block, h, c, key, context)
    return _call_block(block, h, c, key, context)

  def __call__(self, x: Array, noise_cond: Array, cond: dict, *,
               dropout_key: Array | None = None) -> Array:
    """Raw network output F.

    Args:
      x: [B, H, W, C] network input (already scaled by the diffusion recipe).
      noise_cond: [B] float logSNR.
      cond: {"label": int32 [B] class labels in [0, num_classes]} ({} if num_classes == 0).
      dropout_key: PRNG key; dropout is active iff given (per-block keys by fold_in).
    Returns:
      [B, H, W, C] float32 (computed in `dtype`, cast up for the loss and the sampler).
    """
    self._check_inputs(x, noise_cond, cond)
    c = self._conditioning(noise_cond, cond)
    context = (cond["tokens"], cond["mask"]) if self.text_dim else None
    counter = itertools.count()

    def key():
      return layers.fold_key(dropout_key, next(counter))

    h = self.patch_embed(x.astype(self.dtype))
    skip_pos, skip_neg = [], []
    for l in range(self.num_levels - 1):
      for block in self.enc_blocks[l]:
        h = self._run(block, h, c, key(), context)
      skip_pos.append(h)
      h = self.downs[l](h)
      skip_neg.append(h)
    for block in self.mid:
      h = self._run(block, h, c, key(), context)
    for l in reversed(range(self.num_levels - 1)):
      h = self.ups[l](h - skip_neg[l]) + skip_pos[l]        # one residual skip per level (A.5)
      for block in self.dec_blocks[l]:
        h = self._run(block, h, c, key(), context)
    return self.out_proj(jax.nn.silu(self.out_norm(h))).astype(jnp.float32)
