"""Packed-ternary matmul: y = x @ (alpha * codes) from 2-bit packed weights.

TerDiT (arXiv 2405.14854) deploys its ternary layers as 2-bit codes plus one fp scale
alpha per tensor. The original deployment unpacks to a full fp32 weight on
every call; the kernels here read the packed bytes directly, unpack 2-bit tiles in
on-chip memory, accumulate in fp32 and apply alpha in the epilogue, so the full
precision weight never exists in device memory.

Packed layout (the one contract shared by `pack_ternary`, `unpack_ternary`, the
reference, the Pallas kernels and the Triton kernel):

  codes: int [K, N] in {-1, 0, +1} (flax kernel layout [in, out]).
  H = ceil(K / 4); codes are zero-padded to 4H rows; u = codes + 1 in {0, 1, 2}
  (2-bit value 3 is never written).
  packed: uint8 [H, N],
    packed[r, n] = u[r, n] | u[H + r, n] << 2 | u[2H + r, n] << 4 | u[3H + r, n] << 6

That is, *planar quarters along K over the whole tensor* (TerDiT's own layout,
but along the input dim K instead of torch's output dim, and least significant bits
first). Bit plane j of packed row block [r0, r0 + B) holds K rows [jH + r0, jH + r0 + B):
four *contiguous* slices of the activations, so a kernel step loads one packed tile
[B, bn] and four contiguous activation tiles [bm, B] at offsets jH + r0, with no
shuffles, for any tile size B (the layout does not depend on the kernel's tiles).
Padding rows (K <= k < 4H) hold u = 1, i.e. weight 0; the byte 0x55 is four zero codes.

Implementations (`ternary_matmul(..., impl=...)`):

  reference  plain jnp: unpack + dot (materialises the weight; the ground truth).
  pallas     one kernel body (`_accumulate_planes`) with two grid variants:
             "gpu" (Triton lowering): grid (M/bm, N/bn), programs run in parallel, the
               K loop runs inside the kernel (lax.fori_loop) with fp32 register
               accumulators. For small M (too few output tiles for the SMs) the K
               loop is split over a third grid axis (split-K) into fp32 partials that
               XLA adds, scales and casts in one fused pass.
             "tpu" (Mosaic): grid (M/bm, N/bn, H/bq) with the K axis last and
               "arbitrary", accumulating in VMEM scratch across sequential grid steps;
               bq divides H (no per-call padding of the packed weight).
             Both use the identity sum_k (c-1) x = sum_k c x - sum_k x:
             codes are unpacked to {0, 1, 2} (exact in bf16) and the row sums of x are
             subtracted once in the epilogue, before the alpha scale.
             On CPU pass interpret=True; `pallas_variant` picks the body's grid variant
             so both are testable in interpret mode.
  triton     a hand-written Triton kernel through jax-triton (CUDA only; see
             kernels/_triton_ternary.py): compile-time sizes (vectorized, pipelined
             loads), split-K for small M, tensor-core tl.dot on unpacked bf16 tiles.

Errors are plain ValueError (this package imports nothing of the project's);
terdit/ternary.py turns the ones a user can cause into common.errors.ShapeError.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import target


# The byte holding four zero codes (2-bit value 1 in every position).
ZERO_BYTE = 0x55

# Split-K sizing of the GPU variant assumes an H100 SXM (132 SMs).
GPU_NUM_SMS_HINT = 132
GPU_MIN_STEPS_PER_SPLIT = 3

Impl = Literal["reference", "pallas", "triton"]
PallasVariant = Literal["auto", "gpu", "tpu"]


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, b: int) -> int:
  return _cdiv(a, b) * b


def packed_rows(k: int) -> int:
  """Rows of the packed buffer for K input features: ceil(K / 4)."""
  return _cdiv(k, 4)


# ------------------------------------------------------------------------------------------
# Packing.
# ------------------------------------------------------------------------------------------


def pack_ternary(codes: jax.Array) -> jax.Array:
  """Packs ternary codes four to a byte (layout in the module docstring).

  Args:
    codes: integer or float array [K, N] with values in {-1, 0, +1}.

  Returns:
    uint8 [ceil(K / 4), N].
  """
  codes = jnp.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"pack_ternary expects codes of shape [K, N], got {codes.shape}.")
  k, n = codes.shape
  h = packed_rows(k)
  u = (codes.astype(jnp.int32) + 1).astype(jnp.uint8)  # {0, 1, 2}
  u = jnp.pad(u, ((0, 4 * h - k), (0, 0)), constant_values=1)  # pad rows = code 0
  u = u.reshape(4, h, n)
  return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)


def unpack_ternary(packed: jax.Array, k: int) -> jax.Array:
  """Inverse of `pack_ternary`.

  Args:
    packed: uint8 [ceil(K / 4), N].
    k: the number of code rows K.

  Returns:
    int8 [K, N] with values in {-1, 0, +1}.
  """
  packed = jnp.asarray(packed)
  _check_packed(packed, k)
  p = packed.astype(jnp.int32)
  planes = [(p >> (2 * j)) & 3 for j in range(4)]  # plane j: K rows [jH, (j+1)H)
  u = jnp.concatenate(planes, axis=0)  # [4H, N]
  return (u[:k] - 1).astype(jnp.int8)


def _check_packed(packed: jax.Array, k: int) -> None:
  if packed.ndim != 2 or packed.dtype != jnp.uint8:
    raise ValueError(
        f"packed ternary weights must be uint8 [ceil(K/4), N], got {packed.dtype} "
        f"{packed.shape}.")
  if packed.shape[0] != packed_rows(k):
    raise ValueError(
        f"packed ternary weights have {packed.shape[0]} rows but K={k} inputs need "
        f"ceil(K/4)={packed_rows(k)}.")


# ------------------------------------------------------------------------------------------
# Public entry point.
# ------------------------------------------------------------------------------------------


def ternary_matmul(
    x: jax.Array,
    packed: jax.Array,
    alpha: jax.Array | float,
    *,
    impl: Impl = "reference",
    interpret: bool = False,
    pallas_variant: PallasVariant = "auto",
    block_m: int | None = None,
    block_n: int | None = None,
    block_q: int | None = None,
    split_k: int | None = None,
    triton_config: dict[str, int] | None = None,
) -> jax.Array:
  """Computes x @ (alpha * unpack(packed)) without materialising the weight.

  Args:
    x: activations [..., K] (typically [M, K]), float32 or bfloat16.
    packed: uint8 [ceil(K / 4), N] from `pack_ternary`.
    alpha: the layer's scalar scale (shape () or (1,)), kept in fp32.
    impl: "reference" (jnp unpack + dot), "pallas" or "triton" (CUDA + jax-triton).
    interpret: run the Pallas kernel in interpret mode (required on CPU).
    pallas_variant: "gpu" (Triton-style grid, K loop in the kernel), "tpu"
      (Mosaic-style grid, K as a sequential grid axis with VMEM accumulators) or
      "auto" (tpu when the target is a TPU, `kernels.target`; gpu otherwise).
    block_m, block_n, block_q: Pallas tile sizes (rows of x, columns of the output,
      packed rows per K step; each step covers 4 * block_q inputs). None picks defaults.
    split_k: K splits of the Pallas gpu variant (must divide its K steps); None picks one
      for small M (about two programs per SM of an H100), 1 for large M.
    triton_config: overrides for the Triton kernel's heuristic config (keys BM, BN,
      BQ, SPLIT_K, GROUP_M, num_warps, num_stages).

  Returns:
    [..., N] in x's dtype; accumulation is fp32.
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"ternary_matmul expects x of shape [..., K], got {x.shape}.")
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"ternary_matmul supports float32 and bfloat16 x, got {x.dtype}.")
  k = x.shape[-1]
  packed = jnp.asarray(packed)
  _check_packed(packed, k)
  alpha = jnp.asarray(alpha, jnp.float32)
  if alpha.size != 1:
    raise ValueError(f"alpha must be a scalar (shape () or (1,)), got {alpha.shape}.")
  alpha = alpha.reshape(())
  lead = x.shape[:-1]
  n = packed.shape[1]
  x2 = x.reshape(math.prod(lead), k)
  if x2.shape[0] == 0:
    return jnp.zeros((*lead, n), x.dtype)

  if impl == "reference":
    y = ternary_matmul_reference(x2, packed, alpha)
  elif impl == "pallas":
    variant = pallas_variant
    if variant == "auto":
      variant = "tpu" if target.platform() == "tpu" else "gpu"
    if variant not in ("gpu", "tpu"):
      raise ValueError(f"pallas_variant must be 'auto', 'gpu' or 'tpu', got {variant!r}.")
    y = _pallas_matmul(x2, packed, alpha, variant=variant, interpret=interpret,
                       block_m=block_m, block_n=block_n, block_q=block_q, split_k=split_k)
  elif impl == "triton":
    y = _triton_matmul(x2, packed, alpha, triton_config)
  else:
    raise ValueError(
        f"ternary_matmul impl must be 'reference', 'pallas' or 'triton', got {impl!r}.")
  return y.reshape(*lead, n)


def ternary_matmul_reference(x: jax.Array, packed: jax.Array, alpha: jax.Array) -> jax.Array:
  """Plain-jnp reference: [M, K] x uint8 [ceil(K/4), N] -> [M, N] in x's dtype."""
  w = unpack_ternary(packed, x.shape[-1]).astype(x.dtype)  # {-1, 0, 1}: exact
  acc = jnp.dot(x, w, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
  return (jnp.asarray(alpha, jnp.float32).reshape(()) * acc).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# Pallas: one body, two grid variants.
# ------------------------------------------------------------------------------------------


def _accumulate_planes(x_planes, p, acc, rowsum):
  """The shared kernel body: one K step.

  Args:
    x_planes: 4 activation tiles [bm, bq]; tile j holds K rows [jH + r0, jH + r0 + bq).
    p: the packed tile [bq, bn] (uint8) for packed rows [r0, r0 + bq).
    acc: fp32 [bm, bn], running sum_k u x with u = code + 1 in {0, 1, 2}.
    rowsum: fp32 [bm, 1], running sum_k x (for sum (u - 1) x = sum u x - sum x).

  Returns:
    The updated (acc, rowsum).
  """
  dtype = x_planes[0].dtype
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  p = p.astype(jnp.int32)
  for j, xj in enumerate(x_planes):
    # u in {0, 1, 2} is exact in bf16; going through f32 keeps Mosaic's int->bf16 simple.
    uj = ((p >> (2 * j)) & 3).astype(jnp.float32).astype(dtype)
    acc = acc + jnp.dot(xj, uj, preferred_element_type=jnp.float32, precision=precision)
    rowsum = rowsum + jnp.sum(xj.astype(jnp.float32), axis=1, keepdims=True)
  return acc, rowsum


def _epilogue(acc, rowsum, alpha, out_dtype):
  """alpha * (sum u x - sum x) = alpha * sum (u - 1) x, cast to the output dtype."""
  return (alpha * (acc - rowsum)).astype(out_dtype)


def _gpu_kernel(x_ref, p_ref, a_ref, o_ref, *, hp: int, bq: int, steps: int, split: int):
  """Triton-style: this program owns one [bm, bn] output tile and loops over `steps` K blocks.

  With split > 1 (split-K, grid axis 2) program s covers packed rows [s * steps * bq,
  (s + 1) * steps * bq) and writes its fp32 partial sum (before alpha) to o_ref; the caller
  adds the partials.
  """
  bm, bn = o_ref.shape
  k0 = pl.program_id(2) * (steps * bq) if split > 1 else 0

  def step(s, carry):
    acc, rowsum = carry
    r0 = pl.multiple_of(k0 + s * bq, bq)
    p = p_ref[pl.ds(r0, bq), :]
    x_planes = [x_ref[:, pl.ds(j * hp + r0, bq)] for j in range(4)]
    return _accumulate_planes(x_planes, p, acc, rowsum)

  init = (jnp.zeros((bm, bn), jnp.float32), jnp.zeros((bm, 1), jnp.float32))
  acc, rowsum = lax.fori_loop(0, steps, step, init)
  if split > 1:
    o_ref[...] = acc - rowsum
  else:
    o_ref[...] = _epilogue(acc, rowsum, a_ref[...], o_ref.dtype)


def _tpu_kernel(x0_ref, x1_ref, x2_ref, x3_ref, p_ref, a_ref, o_ref, acc_ref, rs_ref, *, nq: int):
  """Mosaic-style: K is the last (sequential) grid axis (nq steps); accumulate in VMEM scratch.

  The step count is a static argument rather than `pl.num_programs(2)`: jax 0.11's interpreter
  reused a stale grid size across calls with different shapes."""
  s = pl.program_id(2)

  @pl.when(s == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    rs_ref[...] = jnp.zeros_like(rs_ref)

  x_planes = [r[...] for r in (x0_ref, x1_ref, x2_ref, x3_ref)]
  acc, rowsum = _accumulate_planes(x_planes, p_ref[...], acc_ref[...], rs_ref[...])
  acc_ref[...] = acc
  rs_ref[...] = rowsum

  @pl.when(s == nq - 1)
  def _done():
    o_ref[...] = _epilogue(acc_ref[...], rs_ref[...], a_ref[...], o_ref.dtype)


def _next_pow2(v: int) -> int:
  return 1 << max(0, (v - 1).bit_length())


def _largest_dividing_block(total: int, cap: int, quantum: int) -> int | None:
  """The largest multiple of `quantum` <= cap that divides `total` (None if there is none)."""
  for b in range(cap - cap % quantum, 0, -quantum):
    if total % b == 0:
      return b
  return None


def _pallas_blocks(variant: str, m: int, n: int, h: int, block_m, block_n, block_q):
  """Default tile sizes. gpu: powers of two >= 16 (Triton tl.dot minimum). tpu: bm a
  multiple of 16 (bf16 sublanes), bn and bq multiples of 128 (bq is the lane dim of the
  x blocks [bm, bq] and the sublane dim of the uint8 blocks [bq, bn], whose tiling is 32),
  so every block obeys Mosaic's (8, 128) rules; bq and bn divide H and N where a multiple
  of 128 does (every TerDiT layer), so the packed weight is never padded per call."""
  if variant == "gpu":
    bm = block_m or min(128, max(16, _next_pow2(m)))
    bn = block_n or (64 if m <= 64 else 128)
    bq = block_q or (64 if 16 < m <= 64 else 32)
    for name, v in (("block_m", bm), ("block_n", bn), ("block_q", bq)):
      if v < 16 or v & (v - 1):
        raise ValueError(f"pallas gpu variant needs {name} a power of two >= 16, got {v}.")
  else:
    bm = block_m or min(256, _round_up(m, 16))
    bn = block_n or _largest_dividing_block(n, 512, 128) or min(512, _round_up(n, 128))
    bq = block_q or _largest_dividing_block(h, 512, 128) or min(512, _round_up(h, 128))
  return bm, bn, bq


def _gpu_split_k(m_tiles: int, n_tiles: int, steps: int, split_k: int | None) -> int:
  """K splits for the GPU variant: they divide the K steps and leave each program at least
  GPU_MIN_STEPS_PER_SPLIT steps (so its cp.async pipeline fills); the fewest that give about
  two programs per SM when the output tiles alone do not (small M), else the most allowed."""
  if split_k is not None:
    if split_k < 1 or steps % split_k:
      raise ValueError(f"split_k={split_k} must be >= 1 and divide the {steps} K steps.")
    return split_k
  tiles = m_tiles * n_tiles
  if tiles >= 2 * GPU_NUM_SMS_HINT:
    return 1
  candidates = [s for s in range(1, steps + 1)
                if steps % s == 0 and steps // s >= min(GPU_MIN_STEPS_PER_SPLIT, steps)]
  enough = [s for s in candidates if tiles * s >= 2 * GPU_NUM_SMS_HINT]
  return enough[0] if enough else candidates[-1]


def _pallas_matmul(x, packed, alpha, *, variant: str, interpret: bool, block_m, block_n,
                   block_q, split_k=None):
  """x [M, K], packed [H, N] -> [M, N]; pads every dim to its tile (K per plane).

  The default tiles divide H and N for TerDiT's layers, so the packed weight goes to the
  kernel as it is (no per-call copy); only the small activations are padded (to bm rows)."""
  m, k = x.shape
  h, n = packed.shape
  if interpret and variant == "gpu":
    # Interpret mode runs each grid step as its own program: on a CPU one tile over all of M
    # and few over N (the K loop stays inside) is 7.5x faster than GPU-sized tiles at M = 16000.
    # bn is the largest power of two dividing N, so the packed weight is not padded per call.
    block_m = block_m or max(16, _next_pow2(m))
    block_n = block_n or (n & -n if n % 16 == 0 else max(16, _next_pow2(n)))
    split_k = split_k or 1
  bm, bn, bq = _pallas_blocks(variant, m, n, h, block_m, block_n, block_q)
  mp, np_, hp = _round_up(m, bm), _round_up(n, bn), _round_up(h, bq)

  # Activations: plane j of the padded layout holds K rows [jH, jH + H); re-space the
  # planes to hp rows each (a no-op copy-free reshape when K == 4 * hp).
  xp = x
  if 4 * hp != k:
    xp = jnp.pad(xp, ((0, 0), (0, 4 * h - k))).reshape(m, 4, h)
    xp = jnp.pad(xp, ((0, 0), (0, 0), (0, hp - h))).reshape(m, 4 * hp)
  if mp != m:
    xp = jnp.pad(xp, ((0, mp - m), (0, 0)))
  pp = packed
  if (hp, np_) != (h, n):
    pp = jnp.pad(pp, ((0, hp - h), (0, np_ - n)), constant_values=ZERO_BYTE)
  a = alpha.reshape(1, 1)
  out_shape = jax.ShapeDtypeStruct((mp, np_), x.dtype)

  if variant == "gpu":
    # Each backend's Pallas module only where it compiles (~0.3 s to import).
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    steps = hp // bq
    split = _gpu_split_k(mp // bm, np_ // bn, steps, split_k)
    params = pl_triton.CompilerParams(num_warps=4 if bm * bn <= 64 * 128 else 8, num_stages=3)
    kernel = functools.partial(_gpu_kernel, hp=hp, bq=bq, steps=steps // split, split=split)
    in_specs = [
        pl.BlockSpec((bm, 4 * hp), lambda i, j, *_: (i, 0)),
        pl.BlockSpec((hp, bn), lambda i, j, *_: (0, j)),
        pl.BlockSpec((1, 1), lambda i, j, *_: (0, 0)),
    ]
    if split == 1:
      return pl.pallas_call(
          kernel, out_shape=out_shape, grid=(mp // bm, np_ // bn), in_specs=in_specs,
          out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
          compiler_params=params, interpret=interpret, name="ternary_matmul_gpu",
      )(xp, pp, a)[:m, :n]
    partials = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((split, mp, np_), jnp.float32),
        grid=(mp // bm, np_ // bn, split), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        compiler_params=params, interpret=interpret, name="ternary_matmul_gpu_splitk",
    )(xp, pp, a)
    return (alpha * partials[:, :m, :n].sum(axis=0)).astype(x.dtype)
  else:
    # Each backend's Pallas module only where it compiles (~0.3 s to import).
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    nq = hp // bq
    grid = (mp // bm, np_ // bn, nq)

    def x_spec(plane):
      return pl.BlockSpec((bm, bq), lambda i, j, s: (i, plane * nq + s))

    y = pl.pallas_call(
        functools.partial(_tpu_kernel, nq=nq),
        out_shape=out_shape,
        grid=grid,
        in_specs=[
            *[x_spec(plane) for plane in range(4)],
            pl.BlockSpec((bq, bn), lambda i, j, s: (s, j)),
            pl.BlockSpec((1, 1), lambda i, j, s: (0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, s: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((bm, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="ternary_matmul_tpu",
    )(xp, xp, xp, xp, pp, a)
  return y[:m, :n]


# ------------------------------------------------------------------------------------------
# jax-triton.
# ------------------------------------------------------------------------------------------


def _triton_matmul(x, packed, alpha, config: dict[str, Any] | None):
  if target.platform() != "gpu" or target.is_rocm():
    raise ValueError(
        f"ternary_matmul impl='triton' needs a CUDA GPU (jax-triton), but the target is "
        f"{target.platform()!r}{' (ROCm)' if target.is_rocm() else ''}. Use impl='pallas' "
        "(with interpret=True on CPU) or impl='reference'.")
  try:  # jax-triton is the optional `gpu` extra: say so in one line when it is missing
    import jax_triton  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError as e:
    raise ValueError(
        "ternary_matmul impl='triton' needs jax-triton: pip install 'jax-triton==0.3.1' "
        f"(the 'gpu' extra of frugal-diffusion). Import failed with: {e}") from e
  # Imports triton (the optional `gpu` extra) at its top.
  from kernels import _triton_ternary  # pylint: disable=g-import-not-at-top
  return _triton_ternary.ternary_matmul_triton(x, packed, alpha, config)

