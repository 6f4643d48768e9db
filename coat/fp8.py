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
not change the groups' max or (nonzero) min. `num_shards = (s0, s1, ...)` cuts the tensor into the
s0 x s1 x ... blocks of a parameter sharded on several dimensions (blocks in row-major order, as a
mesh orders them), each block laid out the same way. `num_shards = 1` is COAT's layout (groups of
128 consecutive elements of the flattened tensor, the last group partial).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec

from common.errors import ConfigError, ShapeError
from common.training.sharding import spec_axes
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


Shards = int | tuple[int, ...]


def shard_grid(shape: tuple[int, ...], num_shards: Shards = 1) -> tuple[int, ...]:
  """Shards per dimension of a tensor of `shape`: an int n is n shards of the leading axis, a
  tuple gives one count per (leading) dimension, the missing trailing ones 1.

  Raises:
    ShapeError: a count does not divide its dimension, or is below 1.
  """
  shape = tuple(int(d) for d in shape)
  if isinstance(num_shards, (int, np.integer)):
    grid = (int(num_shards),) if int(num_shards) != 1 else ()
  else:
    grid = tuple(int(n) for n in num_shards)
  while grid and grid[-1] == 1:
    grid = grid[:-1]
  if len(grid) > len(shape) or any(n < 1 for n in grid) or any(
      d % n for d, n in zip(shape, grid)):
    raise ShapeError(f"num_shards={num_shards} must divide the dimensions of shape {shape}")
  return grid + (1,) * (len(shape) - len(grid))


def group_layout(shape: tuple[int, ...], group_size: int = OPTIM_GROUP_SIZE,
                 num_shards: Shards = 1) -> tuple[int, int]:
  """Returns (groups_per_shard, n_groups) of a tensor of `shape` (see the module's shard rule)."""
  size = int(np.prod(shape, dtype=np.int64))
  total = int(np.prod(shard_grid(shape, num_shards), dtype=np.int64))
  per_shard = size // total
  groups_per_shard = max(1, -(-per_shard // group_size))
  return groups_per_shard, groups_per_shard * total


def _to_blocks(x: jax.Array, grid: tuple[int, ...]) -> jax.Array:
  """[d0, d1, ...] -> [prod(grid), block size]: row i is shard i of the grid (row-major over the
  sharded dimensions, as a mesh orders a dimension sharded over several axes)."""
  total = int(np.prod(grid, dtype=np.int64)) if grid else 1
  if total == 1 or x.ndim == 0:
    return jnp.reshape(x, (1, -1))
  if all(n == 1 for n in grid[1:]):  # leading axis only: a plain reshape
    return jnp.reshape(x, (total, -1))
  split = []
  for d, n in zip(x.shape, grid):
    split += [n, d // n]
  perm = tuple(range(0, 2 * x.ndim, 2)) + tuple(range(1, 2 * x.ndim, 2))
  return jnp.transpose(x.reshape(split), perm).reshape(total, -1)


def _from_blocks(flat: jax.Array, shape: tuple[int, ...], grid: tuple[int, ...]) -> jax.Array:
  """Inverse of `_to_blocks`: [prod(grid), block size] -> `shape`."""
  if len(shape) == 0 or all(n == 1 for n in grid[1:]):
    return flat.reshape(shape)
  nd = len(shape)
  x = flat.reshape(tuple(grid) + tuple(d // n for d, n in zip(shape, grid)))
  perm = [0] * (2 * nd)
  for i in range(nd):
    perm[2 * i], perm[2 * i + 1] = i, nd + i
  return jnp.transpose(x, perm).reshape(shape)


def to_groups(x: jax.Array, group_size: int = OPTIM_GROUP_SIZE,
              num_shards: Shards = 1) -> jax.Array:
  """Lays `x` (any shape) out as zero-padded groups [n_groups, G], per shard (`shard_grid`)."""
  grid = shard_grid(x.shape, num_shards)
  groups_per_shard, n_groups = group_layout(x.shape, group_size, num_shards)
  flat = _to_blocks(jnp.asarray(x), grid)
  pad = groups_per_shard * group_size - flat.shape[1]
  if pad:
    flat = jnp.pad(flat, ((0, 0), (0, pad)))
  return flat.reshape(n_groups, group_size)


def from_groups(rows: jax.Array, shape: tuple[int, ...], num_shards: Shards = 1) -> jax.Array:
  """Inverse of `to_groups`: [n_groups, G] -> `shape` (padding dropped)."""
  grid = shard_grid(shape, num_shards)
  total = int(np.prod(grid, dtype=np.int64)) if grid else 1
  size = int(np.prod(shape, dtype=np.int64))
  flat = rows.reshape(total, -1)[:, :size // total]
  return _from_blocks(flat, tuple(shape), grid)


@dataclasses.dataclass(frozen=True)
class QuantizedGroups:
  """A tensor quantized in groups with Dynamic Range Expansion (a JAX pytree).

  Attributes:
    codes: float8_e4m3fn [n_groups, G].
    scale: float32 [n_groups], the group scale s.
    k: float32 [n_groups], the expansion exponent (1 without expansion).
    c: float32 [n_groups], the geometric centre sqrt(max min) (1 without expansion).
    shape: static, the original tensor's shape.
    num_shards: static, the shards the groups were cut in (`shard_grid`: an int for the leading
      axis, or one count per dimension).
  """
  codes: jax.Array
  scale: jax.Array
  k: jax.Array
  c: jax.Array
  shape: tuple[int, ...] = ()
  num_shards: Shards = 1

  @property
  def group_size(self) -> int:
    return self.codes.shape[-1]

  @property
  def nbytes(self) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in (self.codes, self.scale, self.k, self.c))

  def partition_specs(self, param_spec: PartitionSpec) -> "QuantizedGroups":
    """Declared placement (`common.training.sharding.state_partition`) given the parameter's mesh-axis spec.

    The group axis is sharded over the parameter's mesh axes in dimension order (shard i of
    `shard_grid` holds groups [i n / S, (i + 1) n / S)), the group's elements are not; the
    layout must have been cut for that spec (`num_shards` = the parameter's shards per dimension).

    Raises:
      ConfigError: the groups were cut for a different set of sharded dimensions.
    """
    grid = shard_grid(self.shape, self.num_shards)
    spec = tuple(param_spec) + (None,) * (len(self.shape) - len(tuple(param_spec)))
    sharded = tuple(a is not None for a in spec[:len(self.shape)])
    if sharded != tuple(n > 1 for n in grid):
      raise ConfigError(
          f"FP8 optimizer groups of a {self.shape} parameter were cut for {grid} shards per "
          f"dimension but the parameter is placed as {param_spec}: build the optimizer with the "
          "parameters' placement (coat.optim.fp8_adamw(placement=...), which the trainer passes).")
    axes = spec_axes(PartitionSpec(*spec))
    group_axis = (axes[0] if len(axes) == 1 else axes) if axes else None
    meta = PartitionSpec(group_axis)
    return QuantizedGroups(codes=PartitionSpec(group_axis, None), scale=meta, k=meta, c=meta,
                           shape=self.shape, num_shards=self.num_shards)


jax.tree_util.register_dataclass(
    QuantizedGroups, data_fields=["codes", "scale", "k", "c"],
    meta_fields=["shape", "num_shards"])


def empty_groups(shape: tuple[int, ...], group_size: int = OPTIM_GROUP_SIZE,
                 num_shards: Shards = 1) -> QuantizedGroups:
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
                    *, num_shards: Shards = 1) -> QuantizedGroups:
  """Quantizes `x` to E4M3 in groups with COAT's Dynamic Range Expansion.

  Args:
    x: any shape (scalars included), float; it is handled as float32.
    group_size: G, 128 for optimizer states.
    expand: apply Dynamic Range Expansion (otherwise s = (max + 1e-20) / 448, k = c = 1).
    num_shards: cut the groups per shard (see the module's shard rule and `shard_grid`).

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
