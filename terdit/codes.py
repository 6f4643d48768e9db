"""Ternary codes (TerDiT, arXiv 2405.14854): the absmean quantizer and the 2-bit packed form.

Quantizer (`fairscale/fairscale/nn/model_parallel/layers.py::ternary` of Lucky-Lance/TerDiT):
  gamma = mean(|W|) over the whole tensor, Wt = clip(round(W / (gamma + 1e-6)), -1, 1) (round half
  to even).

Codes are packed four to a byte (kernels/ternary_matmul.py documents the layout) and multiplied
through `kernels.ternary_matmul.ternary_matmul` with the layer's scale alpha; the kernels' plain
ValueErrors become the project's ConfigError / ShapeError here. The QAT layer (`terdit.ternary`) and
its inference form (`terdit.deploy`) both build on this module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from common.errors import ConfigError, ShapeError
from kernels import ternary_matmul as tm

EPS = 1e-6  # TerDiT's gamma + 1e-6 (official layers.py).

# Words of the kernels' ValueError messages about options (ConfigError), not inputs (ShapeError).
_OPTION_WORDS = ("impl", "variant", "block_", "split_k", "CUDA", "jax-triton")


def _user_errors(fn):
  """Wraps a kernels function: its ValueErrors (kernels/ is a leaf and raises plain ValueError)
  become common.errors.ConfigError (a bad option) or ShapeError (bad shapes or dtypes)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ValueError as e:
      msg = str(e)
      err = ConfigError if any(w in msg for w in _OPTION_WORDS) else ShapeError
      raise err(msg) from e

  return wrapped


pack = _user_errors(tm.pack_ternary)
unpack = _user_errors(tm.unpack_ternary)
_ternary_matmul = _user_errors(tm.ternary_matmul)


def ternarize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """TerDiT's absmean ternary quantizer (arXiv 2405.14854; official layers.py::ternary).

  Args:
    w: weight tensor of any shape.

  Returns:
    (codes, gamma): int8 codes of w's shape in {-1, 0, +1}, and the fp32 scalar
    gamma = mean|w|. An all-zero w gives gamma = 0 and codes 0 (0 / 1e-6 = 0).
  """
  codes, gamma = ternary_codes(w)
  return codes.astype(jnp.int8), gamma


def ternary_codes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Like `ternarize` but returns the codes as fp32 (for the QAT forward)."""
  w32 = jnp.asarray(w, jnp.float32)
  gamma = jnp.mean(jnp.abs(w32))
  codes = jnp.clip(jnp.round(w32 / (gamma + EPS)), -1.0, 1.0)  # jnp.round: half to even
  return codes, gamma


def packed_dense(params: dict[str, jax.Array], x: jax.Array, **matmul_kwargs) -> jax.Array:
  """Runs a deployed ternary layer: x [..., K] -> [..., N] in x's dtype.

  Args:
    params: a layer's export ("packed", "alpha", optional "bias"; "in_features" unused).
    x: activations, float32 or bfloat16.
    **matmul_kwargs: passed to `ternary_matmul` (impl, interpret, pallas_variant, ...).
  """
  y = _ternary_matmul(x, params["packed"], params["alpha"], **matmul_kwargs)
  if params.get("bias") is not None:
    y = (y.astype(jnp.float32) + params["bias"]).astype(x.dtype)
  return y
