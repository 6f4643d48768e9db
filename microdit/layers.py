"""MicroDiT building blocks (Sehwag et al., "Stretching Each Dollar", arXiv 2407.15811), computed
as the official code computes them (SonyResearch/micro_diffusion, `micro_diffusion/models/dit.py`
and `micro_diffusion/models/utils.py`).

Attention, the SwiGLU FFN and the caption MLPs are the shared `common.nn.transformer` layers, built
here with the official parameter names and initialisation; the expert-choice MoE, the fixed
position embedding and the activation sharding are MicroDiT's own. Tokens are `[B, T, D]`; every
linear map is a `common.nn.layers.Dense` (so `config.numerics.rules` applies to it), the experts'
batched weights `common.nn.layers.ExpertDense`. LayerNorm statistics are float32.
"""

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from common.nn import layers
from common.nn import transformer
from common.nn.layers import Dense

Array = jax.Array
_F32 = jnp.float32


# --------------------------------------------------------------------------------------------------
# Activation sharding.


def _mesh_axes(names: tuple[str, ...]) -> tuple[str, ...]:
  """The axes of `names` that the current abstract mesh has with size > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)


BATCH_AXES = ("data", "fsdp", "expert")


def constrain(x: Array, expert_dim: int | None = None) -> Array:
  """Pins activations `[B, ...]` to batch sharding over the mesh's data/fsdp/expert axes (and, with
  `expert_dim`, that dimension over the `expert` axis instead). A no-op outside a mesh context
  (`jax.set_mesh`) and for sizes the axes do not divide."""
  mesh = jax.sharding.get_abstract_mesh()
  expert = _mesh_axes(("expert",)) if expert_dim is not None else ()
  batch = tuple(a for a in _mesh_axes(BATCH_AXES) if a not in expert)
  spec = [None] * x.ndim
  if batch and x.shape[0] % int(np.prod([mesh.shape[a] for a in batch])) == 0:
    spec[0] = batch
  if expert and x.shape[expert_dim] % mesh.shape["expert"] == 0:
    spec[expert_dim] = "expert"
  if all(s is None for s in spec):
    return x
  return jax.lax.with_sharding_constraint(x, P(*spec))


# --------------------------------------------------------------------------------------------------
# Embeddings and the shared layers with the official layouts.


def sincos_pos_embed(dim: int, grid: int, base_size: int, interp_scale: float) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [grid * grid, dim] float32 of tokens in row-major order
  (official `utils.get_2d_sincos_pos_embed`). Grid coordinates are
  arange(grid) / (grid / base_size) / interp_scale, so at 512 px (grid 32, base 32, scale 2) the
  positions are 0, 0.5, ..., 15.5 as at 256 px they are 0, 1, ..., 15. Token (r, c) gets
  [sin(c w), cos(c w), sin(r w), cos(r w)], w_j = 10000^(-j / (dim/4)). Computed in float64 numpy
  (a constant of the traced forward pass, never a parameter)."""
  coords = np.arange(grid, dtype=np.float32) / np.float32(grid / base_size) / np.float32(
      interp_scale)

  def one_d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
    out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000**omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  cols, rows = np.meshgrid(coords, coords)           # [grid, grid] each: cols[r, c] = coords[c]
  return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1).astype(np.float32)


def caption_mlp(in_dim: int, hidden: int, out_dim: int, *, eps: float, dtype: Any,
                rngs: nnx.Rngs) -> transformer.MLP:
  """fc1 -> GELU(tanh) -> LayerNorm (no bias) -> fc2 with biases, N(0, 0.02) kernels (official
  `utils.Mlp` with a norm layer): the caption projection and the pooled-caption MLP."""
  return transformer.MLP(in_dim, hidden, out_dim, act="gelu_tanh",
                         hidden_norm=functools.partial(layers.LayerNorm, epsilon=eps),
                         axes=((None, "embed"), ("embed", None)),
                         kernel_init=nnx.initializers.normal(0.02), dtype=dtype, rngs=rngs)


def _qk_layer_norm(eps: float):
  """MicroDiT's QK-norm: LayerNorm over the whole q / k width without affine (not per head)."""
  return functools.partial(layers.LayerNorm, epsilon=eps, use_scale=False)


def self_attention(dim: int, hidden: int, head_dim: int, *, use_bias: bool, eps: float,
                   zero_init_out: bool = False, out_std: float = 0.02, dtype: Any,
                   rngs: nnx.Rngs) -> transformer.Attention:
  """Fused qkv (dim -> 3 hidden), QK-LayerNorm, SDPA (scale 1/sqrt(head_dim), no mask), projection
  hidden -> dim (official `utils.SelfAttention`); kernels truncated-normal, std 0.02 in and
  `out_std` out."""
  return transformer.Attention(
      dim, head_dim, hidden=hidden, out_name="proj", norm_names=("ln_q", "ln_k"),
      qk_norm=_qk_layer_norm(eps), qk_norm_per_head=False, use_bias=use_bias,
      kernel_init=nnx.initializers.truncated_normal(0.02),
      out_init=nnx.initializers.truncated_normal(out_std), zero_init_out=zero_init_out,
      dtype=dtype, rngs=rngs)


def cross_attention(dim: int, head_dim: int, *, use_bias: bool, eps: float, out_std: float,
                    dtype: Any, rngs: nnx.Rngs) -> transformer.Attention:
  """q = Linear(x), (k, v) = Linear(context), the same QK-LayerNorm, full width (official
  `utils.CrossAttention`, compress_xattn=False); every context token is attended (no mask)."""
  return transformer.Attention(
      dim, head_dim, context_dim=dim, context_axis="embed", in_names=("q_linear", "kv_linear"),
      out_name="proj", norm_names=("ln_q", "ln_k"), qk_norm=_qk_layer_norm(eps),
      qk_norm_per_head=False, use_bias=use_bias,
      kernel_init=nnx.initializers.truncated_normal(0.02),
      out_init=nnx.initializers.truncated_normal(out_std), dtype=dtype, rngs=rngs)


def round_up(n: int, multiple: int) -> int:
  return multiple * ((n + multiple - 1) // multiple)


def feed_forward(dim: int, hidden: int, multiple_of: int, *, use_bias: bool,
                 zero_init_out: bool = False, out_std: float = 0.02, dtype: Any,
                 rngs: nnx.Rngs) -> transformer.SwiGLU:
  """SwiGLU w3(SiLU(w1 x) * w2 x) of width round_up(int(2 hidden / 3), multiple_of) (official
  `dit.FeedForward`); kernels truncated-normal, std 0.02 for w1 and `out_std` for w2 and w3."""
  return transformer.SwiGLU(
      dim, round_up(int(2 * hidden / 3), multiple_of), names=("w1", "w2", "w3"),
      use_bias=use_bias, kernel_init=nnx.initializers.truncated_normal(0.02),
      out_init=nnx.initializers.truncated_normal(out_std), zero_init_out=zero_init_out,
      dtype=dtype, rngs=rngs)


class ExpertChoiceMoE(nnx.Module):
  """Expert-choice mixture of experts (Zhou et al., arXiv 2202.09368; official
  `dit.FeedForwardECMoe`): p = softmax(gate(x)) over experts per token; each expert takes its top
  k = int(capacity T / E) tokens of each sample by p, applies w2(GELU_exact(w1 x)), and its output,
  weighted by the token's p for that expert, is added back at the token. A token no expert picks
  gets 0. No auxiliary loss. Expert weights `expert_w1` [E, dim, H] and `expert_w2` [E, H, dim]
  (`common.nn.layers.ExpertDense`, no bias; the official bare parameters w1, w2), H =
  round_up(hidden, multiple_of), logical axes ("expert", "embed", "mlp").
  """

  def __init__(self, dim: int, hidden: int, multiple_of: int, *, num_experts: int,
               capacity: float, out_std: float = 0.02, dtype: Any, rngs: nnx.Rngs):
    self.num_experts, self.capacity = num_experts, float(capacity)
    self.hidden = round_up(hidden, multiple_of)
    self.gate = Dense(dim, num_experts, names=("embed", None), use_bias=False,
                      kernel_init=nnx.initializers.truncated_normal(0.02), dtype=dtype, rngs=rngs)
    self.expert_w1 = layers.ExpertDense(
        num_experts, dim, self.hidden, names=("expert", "embed", "mlp"),
        kernel_init=nnx.initializers.truncated_normal(0.02), dtype=dtype, rngs=rngs)
    self.expert_w2 = layers.ExpertDense(
        num_experts, self.hidden, dim, names=("expert", "mlp", "embed"),
        kernel_init=nnx.initializers.truncated_normal(out_std), dtype=dtype, rngs=rngs)
    self.dtype = layers.as_dtype(dtype)
    self.act = layers.Activation("gelu")

  def tokens_per_expert(self, t: int) -> int:
    return int(self.capacity * t / self.num_experts)

  def __call__(self, x: Array) -> Array:
    """x: [B, T, dim] -> [B, T, dim]."""
    b, t, d = x.shape
    k = self.tokens_per_expert(t)
    probs = jax.nn.softmax(self.gate(x).astype(_F32), axis=-1)               # [B, T, E]
    g, idx = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), k)                     # [B, E, k]
    onehot = jax.nn.one_hot(idx, t, dtype=self.dtype)                        # [B, E, k, T]
    xin = constrain(jnp.einsum("bekt,btd->bekd", onehot, x.astype(self.dtype)), expert_dim=1)
    h = constrain(self.act(self.expert_w1(xin)), expert_dim=1)
    h = self.expert_w2(h)
    h = h * g[..., None].astype(self.dtype)
    return constrain(jnp.einsum("bekt,bekd->btd", onehot, h))

  def expert_params(self) -> int:
    return int(self.expert_w1.kernel.size + self.expert_w2.kernel.size)
