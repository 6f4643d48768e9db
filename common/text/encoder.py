"""`TextEncoder`: a tokenizer plus a frozen NNX text network, batched and jitted.

Also the small layers the text towers share (LayerNorm, multi-head self-attention), written to match
PyTorch's `nn.LayerNorm` and `nn.MultiheadAttention` numerics in float32.
"""

from collections.abc import Callable, Sequence
import logging
from typing import Any, Protocol

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.weights import convert
from common.weights import tree_names
from common.errors import ShapeError
from common.nn.layers import Dense

Array = jax.Array
_F32 = jnp.float32

log = logging.getLogger(__name__)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with learned scale and bias (PyTorch `nn.LayerNorm`), float32."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (dim,), _F32))
    self.bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), (dim,), _F32))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    """x: [..., dim] -> [..., dim]; biased variance, as PyTorch."""
    x = x.astype(_F32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


def dense(in_features: int, out_features: int, rngs: nnx.Rngs) -> Dense:
  """A float32 `common.nn.layers.Dense` with random N(0, 0.02) kernel (replaced when weights load)."""
  return Dense(in_features, out_features, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def self_attention(q: Array, k: Array, v: Array, num_heads: int, *, key_mask: Array | None = None,
                   causal: bool = False) -> Array:
  """Scaled dot-product self-attention, softmax in float32 (scale 1/sqrt(head_dim)).

  Args:
    q, k, v: [B, T, W] projections, W = num_heads * head_dim.
    num_heads: number of heads.
    key_mask: [B, T] int/bool, 1 for keys that may be attended (padding = 0), or None.
    causal: token i attends only to tokens j <= i (OpenCLIP's text mask).

  Returns:
    [B, T, W] concatenated head outputs (before the output projection).
  """
  b, t, w = q.shape
  shape = (b, t, num_heads, w // num_heads)
  mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]
  o = jax.nn.dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask=mask,
                                   is_causal=causal, implementation="xla")
  return o.reshape(b, t, w)


def param_names(build: Callable[[], nnx.Module]) -> dict[str, Any]:
  """The nested dict of the parameters of the module `build()` makes, every leaf None: what a
  converter table walks to name a tower's weights without its sizes (`load_state` checks them)."""
  return jax.tree.map(lambda _: None, nnx.to_pure_dict(nnx.state(nnx.eval_shape(build))))


def load_state(abstract_model: nnx.Module, params: dict[str, Any], source: str) -> nnx.Module:
  """Builds a concrete module from an abstract one (`nnx.eval_shape`) and a nested dict of arrays.

  Raises `CheckpointError` naming the missing, unexpected and wrongly shaped parameters.
  """
  graphdef, state = nnx.split(abstract_model)
  params = convert.apply(convert.PARAM_PATHS, tree_names.flatten(params, sep="/"),
                         nnx.to_pure_dict(state), source)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, _F32), params))
  return nnx.merge(graphdef, state)


class Tokenizer(Protocol):
  """Turns prompts into padded token ids and their mask."""

  max_length: int

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [N, max_length], mask int32 [N, max_length], 1 = real token)."""


class TextEncoder:
  """A frozen text encoder: `encode(prompts)` -> per-token states, their mask and a pooled vector.

  The network is any NNX module with `__call__(ids [B, T] int32, mask [B, T] int32) ->
  (tokens float32 [B, T, width], pooled float32 [B, pooled_width])`. `encode` tokenizes, splits the
  prompts into batches of at most `batch_size`, pads each batch to a power of two (at most
  `batch_size`) by repeating its first row, and runs one jitted forward per batch: each padded
  batch size compiles once. Matrix products use full float32 precision on every backend.

  Attributes:
    name: what was loaded (for logs and `samples.npz`).
    max_length: T, the token length of every output (prompts are padded or truncated to it).
    width: D of `tokens`; `pooled_width`: D of `pooled` (equal for MiniLM and OpenCLIP ViT-H-14).
  """

  def __init__(self, model: nnx.Module, tokenizer: Tokenizer, *, width: int, pooled_width: int,
               name: str, batch_size: int = 64):
    self.name = name
    self.tokenizer = tokenizer
    self.max_length = tokenizer.max_length
    self.width = width
    self.pooled_width = pooled_width
    self.batch_size = batch_size
    graphdef, self._state = nnx.split(model)

    def forward(state, ids, mask):
      with jax.default_matmul_precision("float32"):
        return nnx.merge(graphdef, state)(ids, mask)

    self._forward: Callable = jax.jit(forward)

  def encode(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Encodes N prompts.

    Returns:
      {"tokens": float32 [N, T, width], "mask": int32 [N, T] (1 = real token),
       "pooled": float32 [N, pooled_width]} as numpy arrays, T = `max_length`.
    """
    if isinstance(prompts, str):
      raise TypeError("encode() takes a sequence of prompts, not one string.")
    ids, mask = self.tokenizer(list(prompts))
    return self.encode_ids(ids, mask)

  def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Runs the network on already tokenized prompts: ids, mask int [N, T], T <= max_length.

    Returns the dict of `encode` with T tokens.
    """
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[1] > self.max_length:
      raise ShapeError(f"{self.name}: token ids {ids.shape} and mask {mask.shape} must both be "
                       f"[N, T] with T <= {self.max_length}.")
    n, t = ids.shape
    tokens = np.zeros((n, t, self.width), np.float32)
    pooled = np.zeros((n, self.pooled_width), np.float32)
    for start in range(0, n, self.batch_size):
      stop = min(start + self.batch_size, n)
      rows = stop - start
      padded = min(self.batch_size, 1 << (rows - 1).bit_length())
      pad = [(0, padded - rows), (0, 0)]
      b_ids = np.pad(ids[start:stop], pad, mode="edge")
      b_mask = np.pad(mask[start:stop], pad, mode="edge")
      b_tokens, b_pooled = self._forward(self._state, b_ids, b_mask)
      tokens[start:stop] = np.asarray(b_tokens)[:rows]
      pooled[start:stop] = np.asarray(b_pooled)[:rows]
    return {"tokens": tokens, "mask": mask, "pooled": pooled}

  def __repr__(self) -> str:
    return (f"TextEncoder({self.name}, max_length={self.max_length}, width={self.width}, "
            f"pooled_width={self.pooled_width})")


def warn_truncated(count: int, total: int, max_length: int, name: str) -> None:
  """Logs how many prompts were cut to `max_length` tokens."""
  if count:
    log.warning("%s: %d of %d prompts are longer than %d tokens and were truncated.", name, count,
                total, max_length)
