"""FP8 quantization for COAT (arXiv 2410.19313): per-tensor, per-group and optimizer-state groups.

Three granularities:

* per-tensor (`quantize_per_tensor`): E4M3 or E5M2 with a just-in-time absmax scale
  `s = (max|x| + 1e-10) / fp8_max` (COAT's Group Scaling), used for GEMM operands and grads;
* per-group 1xG along the last axis (`quantize_per_group`, G = 16 for activations) with bf16
  group scales;
* optimizer groups of 128 consecutive elements of the flattened tensor with COAT's Dynamic Range
  Expansion (`quantize_groups` / `dequantize_groups`).

Every cast to float8 clips to the format's finite range first: `float8_e4m3fn` has no inf, so an
unclipped overflow becomes NaN.

Dynamic Range Expansion, per group of the flattened tensor: the formulas and the decisions beyond
the paper (constant and all-zero groups, the cap on k, the log2-domain evaluation) are documented
with the row math in `kernels/dre.py`, which this module re-exports and the fused kernel runs.

Sharding rule: with `num_shards = S` the tensor is split into S equal blocks along its leading axis
(the FSDP shard of a leading-axis-sharded parameter), each block is flattened and padded with zeros
to a multiple of the group size, and groups are cut per block. So no group straddles two shards, and
the result equals quantizing each shard on its own and concatenating the groups. Padding zeros do
not change the groups' max or (nonzero) min. `num_shards = 1` is COAT's layout (groups of 128
consecutive elements of the flattened tensor, the last group partial).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.errors import ShapeError
# The DRE row math and its constants are kernels/dre.py's (re-exported here for coat's users).
from kernels.dre import (DRE_EPS, E4M3, E4M3_MAX, EXPAND_STEP, K_MAX, K_MIN,  # noqa: F401
                         LOG2_TARGET_RANGE, PLAIN_EPS, dre_dequantize_rows, dre_quantize_rows,
                         dre_quantize_rows_f32)

E5M2 = jnp.float8_e5m2
E5M2_MAX = 57344.0
TENSOR_EPS = 1e-10  # per-tensor and 1xG scales: s = (max + 1e-10) / fp8_max
OPTIM_GROUP_SIZE = 128
ACT_GROUP_SIZE = 16


def fp8_max(dtype) -> float:
  """Largest finite value of a float8 dtype (448 for E4M3, 57344 for E5M2)."""
  return float(jnp.finfo(dtype).max)


def cast_to_fp8(y: jax.Array, dtype=E4M3) -> jax.Array:
  """Clips `y` to the finite range of `dtype` and casts (round to nearest even).

  The clip makes overflow saturate instead of becoming NaN (e4m3fn has no inf). NaN stays NaN.
  """
  bound = fp8_max(dtype)
  return jnp.clip(y, -bound, bound).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Per-tensor.


@functools.partial(jax.jit, static_argnames=("dtype",))
def quantize_per_tensor(x: jax.Array, dtype=E4M3, scale: jax.Array | None = None):
  """Per-tensor FP8 quantization with a just-in-time absmax scale.

  Args:
    x: any shape, float.
    dtype: `jnp.float8_e4m3fn` (forward activations, weights) or `jnp.float8_e5m2` (grads).
    scale: optional fp32 scalar to use instead of the absmax scale (e.g. a cached weight scale);
      values with |x / scale| beyond the format's max saturate.

  Returns:
    (codes, scale): codes of `dtype` with x's shape; scale fp32 [] with x ~= codes * scale.
  """
  x = jnp.asarray(x)
  if scale is None:
    amax = jnp.max(jnp.abs(x.astype(jnp.float32))) if x.size else jnp.float32(0)
    scale = (amax + TENSOR_EPS) / fp8_max(dtype)
  scale = jnp.asarray(scale, jnp.float32)
  return cast_to_fp8(x.astype(jnp.float32) / scale, dtype), scale


def dequantize_per_tensor(codes: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_per_tensor`: codes * scale in `dtype`, codes' shape."""
  return (codes.astype(jnp.float32) * scale).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Per-group 1xG along the last axis (activations).


@functools.partial(jax.jit, static_argnames=("group_size", "dtype"))
def quantize_per_group(x: jax.Array, group_size: int = ACT_GROUP_SIZE, dtype=E4M3):
  """1xG FP8 quantization along the last axis with bf16 group scales.

  The scale of each group is `bf16((max|x| + 1e-10) / fp8_max)`; bf16 rounding can make
  |x / scale| exceed fp8_max slightly, which the clip before the cast saturates.

  Args:
    x: [..., D] float with D divisible by `group_size`.
    group_size: G, 16 for activations.
    dtype: FP8 dtype of the codes.

  Returns:
    (codes, scales): codes `dtype` [..., D]; scales bfloat16 [..., D // G].
  """
  x = jnp.asarray(x)
  if x.ndim == 0 or x.shape[-1] % group_size:
    raise ShapeError(
        f"quantize_per_group needs a last axis divisible by group_size={group_size}; "
        f"got shape {x.shape}")
  xg = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
  amax = jnp.max(jnp.abs(xg), axis=-1)
  scales = ((amax + TENSOR_EPS) / fp8_max(dtype)).astype(jnp.bfloat16)
  codes = cast_to_fp8(xg / scales.astype(jnp.float32)[..., None], dtype)
  return codes.reshape(x.shape), scales


def dequantize_per_group(codes: jax.Array, scales: jax.Array,
                         dtype=jnp.bfloat16) -> jax.Array:
  """Inverse of `quantize_per_group`: codes [..., D], scales [..., D // G] -> `dtype` [..., D]."""
  group_size = codes.shape[-1] // scales.shape[-1]
  cg = codes.astype(jnp.float32).reshape(*scales.shape, group_size)
  return (cg * scales.astype(jnp.float32)[..., None]).reshape(codes.shape).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Optimizer groups with Dynamic Range Expansion: the row math (`dre_quantize_rows`,
# `dre_dequantize_rows`) lives in kernels/dre.py, the jnp reference the fused kernel shares.


def group_layout(shape: tuple[int, ...], group_size: int = OPTIM_GROUP_SIZE,
                 num_shards: int = 1) -> tuple[int, int]:
  """Returns (groups_per_shard, n_groups) of a tensor of `shape` (see the module's shard rule)."""
  size = int(np.prod(shape, dtype=np.int64))
  if num_shards < 1 or (num_shards > 1 and (len(shape) == 0 or shape[0] % num_shards)):
    raise ShapeError(
        f"num_shards={num_shards} must divide the leading axis of shape {tuple(shape)}")
  per_shard = size // num_shards
  groups_per_shard = max(1, -(-per_shard // group_size))
  return groups_per_shard, groups_per_shard * num_shards


def to_groups(x: jax.Array, group_size: int = OPTIM_GROUP_SIZE,
              num_shards: int = 1) -> jax.Array:
  """Lays `x` (any shape) out as zero-padded groups [n_groups, G], per leading-axis shard."""
  groups_per_shard, n_groups = group_layout(x.shape, group_size, num_shards)
  flat = jnp.reshape(x, (num_shards, -1))
  pad = groups_per_shard * group_size - flat.shape[1]
  if pad:
    flat = jnp.pad(flat, ((0, 0), (0, pad)))
  return flat.reshape(n_groups, group_size)


def from_groups(rows: jax.Array, shape: tuple[int, ...], num_shards: int = 1) -> jax.Array:
  """Inverse of `to_groups`: [n_groups, G] -> `shape` (padding dropped)."""
  size = int(np.prod(shape, dtype=np.int64))
  flat = rows.reshape(num_shards, -1)[:, :size // num_shards]
  return flat.reshape(shape)


@dataclasses.dataclass(frozen=True)
class QuantizedGroups:
  """A tensor quantized in groups with Dynamic Range Expansion (a JAX pytree).

  Attributes:
    codes: float8_e4m3fn [n_groups, G].
    scale: float32 [n_groups], the group scale s.
    k: float32 [n_groups], the expansion exponent (1 without expansion).
    c: float32 [n_groups], the geometric centre sqrt(max min) (1 without expansion).
    shape: static, the original tensor's shape.
    num_shards: static, the number of leading-axis shards the groups were cut in.
  """
  codes: jax.Array
  scale: jax.Array
  k: jax.Array
  c: jax.Array
  shape: tuple[int, ...] = ()
  num_shards: int = 1

  @property
  def group_size(self) -> int:
    return self.codes.shape[-1]

  @property
  def nbytes(self) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in (self.codes, self.scale, self.k, self.c))


jax.tree_util.register_dataclass(
    QuantizedGroups, data_fields=["codes", "scale", "k", "c"],
    meta_fields=["shape", "num_shards"])


def empty_groups(shape: tuple[int, ...], group_size: int = OPTIM_GROUP_SIZE,
                 num_shards: int = 1) -> QuantizedGroups:
  """A zero tensor in the optimizer's state-init form: codes 0, s = 0, k = 1, c = 1."""
  _, n_groups = group_layout(tuple(shape), group_size, num_shards)
  return QuantizedGroups(
      codes=jnp.zeros((n_groups, group_size), E4M3),
      scale=jnp.zeros((n_groups,), jnp.float32),
      k=jnp.ones((n_groups,), jnp.float32),
      c=jnp.ones((n_groups,), jnp.float32),
      shape=tuple(int(d) for d in shape), num_shards=num_shards)


@functools.partial(jax.jit, static_argnames=("group_size", "expand", "num_shards"))
def quantize_groups(x: jax.Array, group_size: int = OPTIM_GROUP_SIZE, expand: bool = True,
                    *, num_shards: int = 1) -> QuantizedGroups:
  """Quantizes `x` to E4M3 in groups with COAT's Dynamic Range Expansion.

  Args:
    x: any shape (scalars included), float; it is handled as float32.
    group_size: G, 128 for optimizer states.
    expand: apply Dynamic Range Expansion (otherwise s = (max + 1e-20) / 448, k = c = 1).
    num_shards: cut the groups per block of the leading axis (see the module's shard rule).

  Returns:
    QuantizedGroups with codes [n_groups, G] and fp32 scale/k/c [n_groups].
  """
  x = jnp.asarray(x)
  rows = to_groups(x.astype(jnp.float32), group_size, num_shards)
  codes, scale, k, c = dre_quantize_rows(rows, expand)
  return QuantizedGroups(codes=codes, scale=scale[:, 0], k=k[:, 0], c=c[:, 0],
                         shape=tuple(int(d) for d in x.shape), num_shards=num_shards)


@jax.jit
def dequantize_groups(q: QuantizedGroups) -> jax.Array:
  """Inverse of `quantize_groups`: float32 with the original tensor's shape."""
  rows = dre_dequantize_rows(q.codes, q.scale[:, None], q.k[:, None], q.c[:, None])
  return from_groups(rows, q.shape, q.num_shards)


def tree_nbytes(tree: Any) -> int:
  """Bytes occupied by the arrays of a pytree."""
  return sum(int(np.prod(a.shape, dtype=np.int64)) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(tree))
