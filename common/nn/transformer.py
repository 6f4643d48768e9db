"""The transformer pieces of the DiT-style denoisers, written once for every family (SiD2's U-ViT
blocks, MicroDiT, TerDiT): multi-head self- and cross-attention with optional QK-norm and RoPE,
GELU and SwiGLU MLPs, and adaLN(-Zero) modulation, parameterised where the papers differ.

Each family keeps the parameter layout of its official code: the parts of a layer are attributes
whose names the family gives (MicroDiT's "qkv" / "proj" / "ln_q", TerDiT's "wq" / "wk" / "wv" /
"wo", ...), so parameter paths, checkpoints, weight converters and numerics rules see the official
names. Every linear map is a `common.nn.layers.Dense` and every activation a
`common.nn.layers.Activation` (numerics rules reach them); conventions (dtypes, axis names, dropout)
are those of common/nn/layers.py.
"""

from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from common.nn import layers
from common.errors import ConfigError
from common.nn.layers import Dense, Names

Array = jax.Array
# A norm constructor: `norm(width, rngs=rngs) -> nnx.Module` (e.g. `layers.RMSNorm`).
NormFactory = Callable[..., nnx.Module]

_F32 = jnp.float32


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
  """Multi-head attention (Vaswani et al., arXiv 1706.03762, Sec. 3.2.2), self or cross:

    q, k, v = input projections of x (and of the context for cross-attention)     [B, T|S, H]
    q, k = QK-norm(q), QK-norm(k)     per head or over all H (Dehghani et al., arXiv 2302.05442)
    q, k = rope(q), rope(k)           the family's rotary embedding (Su et al., arXiv 2104.09864)
    out = out_proj(dropout(attention(q, k, v, mask)))

  with H = `hidden` = heads * head_dim. The input projections, by the number of `in_names`:
    1 ("qkv"): one fused map x -> [q | k | v] (self-attention);
    3 ("wq", "wk", "wv"): three maps of x (self-attention);
    2 ("q", "kv"): q from x and a fused map context -> [k | v] (cross-attention, `context_dim`).
  Parameters are created in the order input projections, output projection, QK-norms (which fixes
  each one's PRNG key).

  Args:
    dim: width of x and of the output.
    head_dim: width of one head.
    hidden: H, the q / k / v width (default `dim`).
    context_dim: width of the context tokens; given iff the layer is a cross-attention.
    context_axis: logical axis name of the context width (the kv map's input axis).
    in_names, out_name, norm_names: attribute names of the input projections, the output
      projection and the (q, k) norms.
    qk_norm: None, or the QK-norm's constructor, called `qk_norm(width, rngs=rngs)` with width
      head_dim (`qk_norm_per_head`: applied to each head) or H (applied before the split into
      heads).
    use_bias: biases in every projection.
    kernel_init, out_init: initialisers of the input and output projections (None: xavier-uniform).
    zero_init_out: zero-initialise the output projection (the residual branch starts at zero).
    dtype: compute dtype.
  """

  def __init__(self, dim: int, head_dim: int, *, hidden: int | None = None,
               context_dim: int | None = None, context_axis: str | None = None,
               in_names: Sequence[str] = ("qkv",), out_name: str = "out",
               norm_names: tuple[str, str] = ("q_norm", "k_norm"),
               qk_norm: NormFactory | None = None, qk_norm_per_head: bool = True,
               use_bias: bool = True, kernel_init: Any = None, out_init: Any = None,
               zero_init_out: bool = False, dtype: Any = _F32, rngs: nnx.Rngs):
    hidden = dim if hidden is None else hidden
    if hidden % head_dim:
      raise ConfigError(f"Attention width {hidden} is not divisible by head_dim {head_dim}.")
    in_names = tuple(in_names)
    if len(in_names) not in (1, 2, 3) or (len(in_names) == 2) != (context_dim is not None):
      raise ValueError(f"Attention in_names {in_names} with context_dim {context_dim}: expected 1 "
                       "or 3 input projections for self-attention, 2 (q, kv) for cross-attention.")
    self.num_heads, self.head_dim = hidden // head_dim, head_dim
    self.in_names, self.out_name, self.norm_names = in_names, out_name, tuple(norm_names)
    self.qk_norm_per_head = qk_norm_per_head
    proj = dict(use_bias=use_bias, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    if len(in_names) == 2:                                           # q, [k | v]
      widths = ((dim, hidden, "embed"), (context_dim, 2 * hidden, context_axis))
    else:                                                            # [q | k | v], or q, k, v
      widths = ((dim, 3 * hidden // len(in_names), "embed"),) * len(in_names)
    for name, (n_in, n_out, axis) in zip(in_names, widths):
      setattr(self, name, Dense(n_in, n_out, names=(axis, "heads"), **proj))
    setattr(self, out_name, Dense(hidden, dim, names=("heads", "embed"), use_bias=use_bias,
                                  zero_init=zero_init_out, kernel_init=out_init, dtype=dtype,
                                  rngs=rngs))
    norm_width = head_dim if qk_norm_per_head else hidden
    for name in self.norm_names:
      setattr(self, name, qk_norm(norm_width, rngs=rngs) if qk_norm is not None else None)

  def _project(self, x: Array, context: Array | None,
               heads: bool) -> tuple[Array, Array, Array]:
    """q [B, T, *F], k and v [B, S, *F] (S = T for self-attention): F = (N, D), split into heads,
    when `heads`, else (H,). A fused map's output is cut as the official codes cut it (reshaped
    into heads, or `split` before a whole-width QK-norm), which keeps their gradients bit for
    bit."""
    feat = (self.num_heads, self.head_dim) if heads else (self.num_heads * self.head_dim,)

    def unfuse(y: Array, n: int) -> list[Array]:                # [B, L, n H] -> n x [B, L, *F]
      if not heads:
        return jnp.split(y, n, axis=-1)
      y = y.reshape(y.shape[:2] + (n,) + feat)
      return [y[:, :, i] for i in range(n)]

    maps = [getattr(self, name) for name in self.in_names]
    if len(maps) == 1:
      return tuple(unfuse(maps[0](x), 3))
    if len(maps) == 3:
      return tuple(m(x).reshape(x.shape[:2] + feat) for m in maps)
    q = maps[0](x)
    k, v = unfuse(maps[1](context.astype(q.dtype)), 2)
    return q.reshape(x.shape[:2] + feat), k, v

  def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None, *,
               rope: Callable[[Array], Array] | None = None, dropout_rate: float = 0.0,
               dropout_key: Array | None = None) -> Array:
    """x: [B, T, dim] -> [B, T, dim].

    Args:
      context: [B, S, context_dim], the keys' and values' tokens of a cross-attention.
      mask: [B, S] (1 = attend) or None. A row whose mask is all zero attends to nothing and gets
        a zero output (not a uniform average).
      rope: the rotary position embedding, [B, T, N, D] -> [B, T, N, D], applied to q and k after
        their norms (e.g. `functools.partial(rope_2d, grid=(h, w))`).
      dropout_rate, dropout_key: dropout on the attention output before the output projection,
        active iff a key is given.
    """
    b, t, _ = x.shape
    q_norm, k_norm = (getattr(self, name) for name in self.norm_names)
    whole = q_norm is not None and not self.qk_norm_per_head     # QK-norm over all H features
    q, k, v = self._project(x, context, heads=not whole)
    if whole:
      q, k = q_norm(q), k_norm(k)
      q, k, v = (a.reshape(a.shape[:2] + (self.num_heads, self.head_dim)) for a in (q, k, v))
    elif q_norm is not None:
      q, k = q_norm(q), k_norm(k)
    if rope is not None:
      q, k = rope(q), rope(k)
    attn_mask = None
    if mask is not None:
      attn_mask = jnp.broadcast_to(mask.astype(bool)[:, None, None, :],
                                   (b, self.num_heads, t, k.shape[1]))
    o = attention(q, k, v, attn_mask)                                          # [B, T, N, D]
    if mask is not None:
      o = jnp.where(jnp.any(mask.astype(bool), axis=1)[:, None, None, None], o, 0).astype(o.dtype)
    o = layers.dropout(o.reshape(b, t, -1), dropout_rate, dropout_key)
    return getattr(self, self.out_name)(o)


class MLP(nnx.Module):
  """fc2(dropout(norm(act(fc1 x)))): the transformer MLP (GELU; the norm is optional, e.g.
  MicroDiT's caption projection).

  Args:
    dim, hidden: input and hidden widths; out_dim: output width (default `dim`).
    act: a key of `layers.ACTIVATIONS`.
    hidden_norm: None, or the constructor of a norm of the hidden activations,
      `hidden_norm(hidden, rngs=rngs)`.
    axes: logical axis names of fc1's and fc2's kernels.
    kernel_init: initialiser of both kernels (None: xavier-uniform); zero_init_out: fc2 starts at 0.
  """

  def __init__(self, dim: int, hidden: int, out_dim: int | None = None, *,
               act: str = "gelu_tanh", hidden_norm: NormFactory | None = None,
               axes: tuple[Names, Names] = (("embed", "mlp"), ("mlp", "embed")),
               use_bias: bool = True, kernel_init: Any = None, zero_init_out: bool = False,
               dtype: Any = _F32, rngs: nnx.Rngs):
    self.fc1 = Dense(dim, hidden, names=axes[0], use_bias=use_bias, kernel_init=kernel_init,
                     dtype=dtype, rngs=rngs)
    self.norm = hidden_norm(hidden, rngs=rngs) if hidden_norm is not None else None
    self.fc2 = Dense(hidden, dim if out_dim is None else out_dim, names=axes[1],
                     use_bias=use_bias, zero_init=zero_init_out, kernel_init=kernel_init,
                     dtype=dtype, rngs=rngs)
    self.act = layers.Activation(act)

  def __call__(self, x: Array, *, dropout_rate: float = 0.0,
               dropout_key: Array | None = None) -> Array:
    """x: [..., dim] -> [..., out_dim]."""
    h = self.act(self.fc1(x))
    if self.norm is not None:
      h = self.norm(h)
    return self.fc2(layers.dropout(h, dropout_rate, dropout_key))


class SwiGLU(nnx.Module):
  """down(SiLU(gate x) * up x), the SwiGLU feed-forward (Shazeer, arXiv 2002.05202, Sec. 2).

  Args:
    dim, hidden: model and hidden widths (each family rounds its hidden width its own way).
    names: attribute names of the (gate, up, down) maps: LLaMA's ("w1", "w3", "w2") (TerDiT),
      micro_diffusion's ("w1", "w2", "w3"). They are created in the order of their names (w1, w2,
      w3: both official codes declare them so), which fixes each one's PRNG key.
    kernel_init: the gate map's initialiser; out_init: the up and down maps' (None: xavier-uniform).
    zero_init_out: the down map starts at zero.
  """

  def __init__(self, dim: int, hidden: int, *, names: tuple[str, str, str] = ("w1", "w3", "w2"),
               use_bias: bool = False, kernel_init: Any = None, out_init: Any = None,
               zero_init_out: bool = False, dtype: Any = _F32, rngs: nnx.Rngs):
    self.names = tuple(names)
    gate, up, down = self.names
    specs = {gate: (dim, hidden, ("embed", "mlp"), kernel_init, False),
             up: (dim, hidden, ("embed", "mlp"), out_init, False),
             down: (hidden, dim, ("mlp", "embed"), out_init, zero_init_out)}
    for name in sorted(specs):
      n_in, n_out, axes, init, zero = specs[name]
      setattr(self, name, Dense(n_in, n_out, names=axes, use_bias=use_bias, zero_init=zero,
                                kernel_init=init, dtype=dtype, rngs=rngs))
    # The gated product as a layer, so numerics rules reach it (COAT saves its inputs in FP8).
    self.act = layers.Activation("silu")

  def __call__(self, x: Array) -> Array:
    """x: [..., dim] -> [..., dim]."""
    gate, up, down = (getattr(self, name) for name in self.names)
    return down(self.act(gate(x), gate=up(x)))


def adaln(linear: Dense, c: Array, num_chunks: int, *, act: str, norm: nnx.Module | None = None,
          dtype: Any) -> tuple[Array, ...]:
  """The adaLN modulation vectors of a DiT block (Peebles & Xie, arXiv 2212.09748, Sec. 3.2;
  adaLN-Zero when `linear` is zero-initialised): `linear(act(c))`, through `norm` when given
  (TerDiT's RMS-normalised adaLN, arXiv 2405.14854, Sec. 3.2), cast to `dtype` and split.

  Args:
    linear: Dense cond_dim -> num_chunks * D; c: [B, cond_dim] conditioning (not yet activated).
    act: a key of `layers.ACTIVATIONS`.
  Returns:
    num_chunks vectors [B, 1, D] in `dtype` (shift, scale, gate, ...: the order is the family's),
    broadcasting against tokens [B, T, D] in `layers.modulate` and the gates.
  """
  mod = linear(layers.ACTIVATIONS[act](c))
  if norm is not None:
    mod = norm(mod)
  return tuple(jnp.split(mod.astype(dtype)[:, None, :], num_chunks, axis=-1))
