"""MicroDiT building blocks (Sehwag et al., "Stretching Each Dollar", arXiv 2407.15811), computed
as the official code computes them (SonyResearch/micro_diffusion, `micro_diffusion/models/dit.py`
and `micro_diffusion/models/utils.py`).

Tokens are `[B, T, D]`; every linear map is a `common.layers.Dense` (so `config.numerics.rules`
applies to it), except the batched expert weights of the MoE FFN. LayerNorm statistics are float32.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from common import layers
from common.layers import Dense

Array = jax.Array
_F32 = jnp.float32


def gelu_tanh(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=True)


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
# Norms and embeddings.


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x [B, T, D] * (1 + scale [B, D]) + shift [B, D] (official `utils.modulate`)."""
  return x * (1 + scale[:, None, :].astype(x.dtype)) + shift[:, None, :].astype(x.dtype)


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = exp(-ln(max_period) i / (dim/2)),
  i = 0..dim/2-1 (official `TimestepEmbedder.timestep_embedding`; the DiT/ADM form).

  Args:
    t: [B] float (MicroDiT feeds c_noise = ln(sigma)/4).
  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=_F32) / half)
  args = t.astype(_F32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


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


class Mlp(nnx.Module):
  """fc1 -> GELU(tanh) -> LayerNorm (no bias) -> fc2 with biases (official `utils.Mlp` with a
  norm layer): the caption projection and the pooled-caption MLP."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, *, eps: float, dtype: Any,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.fc1 = Dense(in_dim, hidden, names=(None, "embed"), kernel_init=init, dtype=dtype,
                     rngs=rngs)
    self.norm = layers.LayerNorm(hidden, epsilon=eps, rngs=rngs)
    self.fc2 = Dense(hidden, out_dim, names=("embed", None), kernel_init=init, dtype=dtype,
                     rngs=rngs)
    self.act = layers.Activation("gelu_tanh")

  def __call__(self, x: Array) -> Array:
    return self.fc2(self.norm(self.act(self.fc1(x))))


# --------------------------------------------------------------------------------------------------
# Attention.


def _attend(q: Array, k: Array, v: Array, heads: int) -> Array:
  """QK-LayerNormed q [B, T, H], k, v [B, S, H] -> [B, T, H] over `heads` heads (SDPA, scale
  1/sqrt(head_dim), no mask)."""
  b, t, h = q.shape
  s = k.shape[1]
  hd = h // heads
  o = layers.attention(q.reshape(b, t, heads, hd), k.reshape(b, s, heads, hd),
                       v.reshape(b, s, heads, hd))
  return o.reshape(b, t, h)


class SelfAttention(nnx.Module):
  """Fused qkv (dim -> 3 hidden), QK-LayerNorm over the whole hidden width without affine (not per
  head), SDPA, projection hidden -> dim (official `utils.SelfAttention`)."""

  def __init__(self, dim: int, hidden: int, head_dim: int, *, use_bias: bool, eps: float,
               zero_init_out: bool = False, out_std: float = 0.02, dtype: Any, rngs: nnx.Rngs):
    self.heads = hidden // head_dim
    self.qkv = Dense(dim, 3 * hidden, names=("embed", "heads"), use_bias=use_bias,
                     kernel_init=nnx.initializers.truncated_normal(0.02), dtype=dtype, rngs=rngs)
    self.proj = Dense(hidden, dim, names=("heads", "embed"), use_bias=use_bias,
                      zero_init=zero_init_out,
                      kernel_init=nnx.initializers.truncated_normal(out_std), dtype=dtype,
                      rngs=rngs)
    self.ln_q = layers.LayerNorm(hidden, epsilon=eps, use_scale=False, rngs=rngs)
    self.ln_k = layers.LayerNorm(hidden, epsilon=eps, use_scale=False, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x: [B, T, dim] -> [B, T, dim]."""
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    return self.proj(_attend(self.ln_q(q), self.ln_k(k), v, self.heads))


class CrossAttention(nnx.Module):
  """q = Linear(x), (k, v) = Linear(context), the same QK-LayerNorm, full width (official
  `utils.CrossAttention`, compress_xattn=False); every context token is attended (no mask)."""

  def __init__(self, dim: int, head_dim: int, *, use_bias: bool, eps: float, out_std: float,
               dtype: Any, rngs: nnx.Rngs):
    self.heads = dim // head_dim
    init = nnx.initializers.truncated_normal(0.02)
    self.q_linear = Dense(dim, dim, names=("embed", "heads"), use_bias=use_bias, kernel_init=init,
                          dtype=dtype, rngs=rngs)
    self.kv_linear = Dense(dim, 2 * dim, names=("embed", "heads"), use_bias=use_bias,
                           kernel_init=init, dtype=dtype, rngs=rngs)
    self.proj = Dense(dim, dim, names=("heads", "embed"), use_bias=use_bias,
                      kernel_init=nnx.initializers.truncated_normal(out_std), dtype=dtype,
                      rngs=rngs)
    self.ln_q = layers.LayerNorm(dim, epsilon=eps, use_scale=False, rngs=rngs)
    self.ln_k = layers.LayerNorm(dim, epsilon=eps, use_scale=False, rngs=rngs)

  def __call__(self, x: Array, context: Array) -> Array:
    """x: [B, T, dim]; context: [B, S, dim] -> [B, T, dim]."""
    q = self.q_linear(x)
    k, v = jnp.split(self.kv_linear(context.astype(q.dtype)), 2, axis=-1)
    return self.proj(_attend(self.ln_q(q), self.ln_k(k), v, self.heads))


# --------------------------------------------------------------------------------------------------
# Feed-forward layers.


def round_up(n: int, multiple: int) -> int:
  return multiple * ((n + multiple - 1) // multiple)


class SwiGLU(nnx.Module):
  """w3(SiLU(w1 x) * w2 x), hidden = round_up(int(2 hidden / 3), multiple_of) (official
  `dit.FeedForward`)."""

  def __init__(self, dim: int, hidden: int, multiple_of: int, *, use_bias: bool,
               zero_init_out: bool = False, out_std: float = 0.02, dtype: Any, rngs: nnx.Rngs):
    self.hidden = round_up(int(2 * hidden / 3), multiple_of)
    init = nnx.initializers.truncated_normal(0.02)
    self.w1 = Dense(dim, self.hidden, names=("embed", "mlp"), use_bias=use_bias, kernel_init=init,
                    dtype=dtype, rngs=rngs)
    self.w2 = Dense(dim, self.hidden, names=("embed", "mlp"), use_bias=use_bias,
                    kernel_init=nnx.initializers.truncated_normal(out_std), dtype=dtype, rngs=rngs)
    self.w3 = Dense(self.hidden, dim, names=("mlp", "embed"), use_bias=use_bias,
                    zero_init=zero_init_out,
                    kernel_init=nnx.initializers.truncated_normal(out_std), dtype=dtype, rngs=rngs)
    self.act = layers.Activation("silu")  # the gated product SiLU(w1 x) * w2 x

  def __call__(self, x: Array) -> Array:
    """x: [B, T, dim] -> [B, T, dim]."""
    return self.w3(self.act(self.w1(x), gate=self.w2(x)))


class ExpertChoiceMoE(nnx.Module):
  """Expert-choice mixture of experts (Zhou et al., arXiv 2202.09368; official
  `dit.FeedForwardECMoe`): p = softmax(gate(x)) over experts per token; each expert takes its top
  k = int(capacity T / E) tokens of each sample by p, applies w2(GELU_exact(w1 x)), and its output,
  weighted by the token's p for that expert, is added back at the token. A token no expert picks
  gets 0. No auxiliary loss. Expert weights `expert_w1` [E, dim, H] and `expert_w2` [E, H, dim]
  (`common.layers.ExpertDense`, no bias; the official bare parameters w1, w2), H =
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
