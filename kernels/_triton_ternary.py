"""The Triton packed-ternary matmul kernel, called through jax-triton (CUDA only).

Imported lazily by `kernels.ternary_matmul` (impl="triton"): it needs `triton` at import
time and `jax_triton` when called. The packed layout is documented in
kernels/ternary_matmul.py: packed[r, n] holds K rows r, H + r, 2H + r, 3H + r (H =
ceil(K / 4)) in bits 0-1, 2-3, 4-5, 6-7 as code + 1.

Design (H100 targets: >= 3x a bf16 dot for M <= 16, >= 0.9x at M = 4096):
  * Every size and stride is a `tl.constexpr`: jax-triton passes Python ints as runtime
    scalars that Triton does not know to be multiples of 16, and then loads the packed
    bytes one at a time without async copies. As constants (one compile per layer shape,
    which jax-triton caches), the packed tile [BQ, BN] loads as 16-byte vectors and the
    K loop, whose trip count `STEPS` is a constant too, is software-pipelined
    (`num_stages` cp.async stages on sm_80+). `EVEN_N` / `EVEN_Q` drop the bounds masks
    when the tiles divide the shape (all TerDiT layers).
  * Each program owns a [BM, BN] output tile and `STEPS` packed-row blocks of BQ
    (split-K). Per step it loads one packed tile [BQ, BN] (each byte read exactly once
    per M tile) and the four activation tiles [BM, BQ] at K offsets jH + r0, unpacks bit
    plane j to (u - 1) in {-1, 0, 1} in x's dtype (exact) and issues
    tl.dot(x_j, w_j) with an fp32 accumulator (tensor cores for bf16; 3xTF32 for f32).
  * Small M (memory bound): BM = 16 (the tl.dot minimum), narrow BN and split-K so that
    enough programs stream the packed weights at full bandwidth; partial sums go to an
    fp32 [SPLIT_K, M, N] buffer that XLA reduces, scales by alpha and casts in one fused
    pass (tiny for M <= 64).
  * Large M (compute bound): 128 x 128 tiles, GROUP_M swizzled program order for L2
    reuse of the activations, no split; alpha is applied in the kernel epilogue.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

NUM_SMS_HINT = 132  # H100 SXM; only used to size split-K.


@triton.jit
def ternary_matmul_kernel(
    x_ptr, p_ptr, a_ptr, o_ptr,
    M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
    STEPS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr, F32_IN: tl.constexpr, EVEN_N: tl.constexpr, EVEN_Q: tl.constexpr,
):
  """x [M, K] @ (alpha * (unpack(p) [K, N])) -> o [M, N] (or fp32 partials [S, M, N]).

  Grid: (cdiv(M, BM) * cdiv(N, BN), SPLIT_K). Program (t, s) handles output tile t and
  packed rows [s * STEPS * BQ, min((s + 1) * STEPS * BQ, H)). Row strides are K (x), N
  (packed, output) and M * N (split partials): contiguous arrays.
  """
  pid = tl.program_id(0)
  pid_k = tl.program_id(1)
  num_pid_m: tl.constexpr = (M + BM - 1) // BM
  num_pid_n: tl.constexpr = (N + BN - 1) // BN
  num_pid_in_group: tl.constexpr = GROUP_M * num_pid_n
  group_id = pid // num_pid_in_group
  first_pid_m = group_id * GROUP_M
  group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
  pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
  pid_n = (pid % num_pid_in_group) // group_size_m

  offs_m = pid_m * BM + tl.arange(0, BM)
  offs_n = tl.max_contiguous(tl.multiple_of(pid_n * BN + tl.arange(0, BN), BN), BN)
  offs_q = tl.arange(0, BQ)
  m_mask = offs_m < M
  n_mask = offs_n < N

  q_start = pid_k * (STEPS * BQ)
  acc = tl.zeros((BM, BN), dtype=tl.float32)
  for i in range(STEPS):  # a compile-time trip count: pipelined
    rows = tl.multiple_of(q_start + i * BQ, BQ) + offs_q
    p_ptrs = p_ptr + rows[:, None] * N + offs_n[None, :]
    if EVEN_Q and EVEN_N:
      p = tl.load(p_ptrs)
    else:
      r_mask = rows < H
      p = tl.load(p_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=85)  # 0x55: zeros
    p = p.to(tl.int32)
    for j in tl.static_range(4):
      kk = j * H + rows
      x_ptrs = x_ptr + offs_m[:, None] * K + kk[None, :]
      if EVEN_Q:
        xj = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
      else:
        xj = tl.load(x_ptrs, mask=m_mask[:, None] & ((rows < H) & (kk < K))[None, :],
                     other=0.0)
      # int -> f32 -> x dtype: exact for {-1, 0, 1}; one cvt more than int -> bf16, shared
      # by the BM rows, and it keeps the kernel runnable in triton's interpreter.
      wj = (((p >> (2 * j)) & 3) - 1).to(tl.float32).to(x_ptr.dtype.element_ty)
      if F32_IN:
        acc = tl.dot(xj, wj, acc, input_precision="tf32x3")
      else:
        acc = tl.dot(xj, wj, acc)

  o_mask = m_mask[:, None] & n_mask[None, :]
  if SPLIT:
    o = o_ptr + pid_k * (M * N) + offs_m[:, None] * N + offs_n[None, :]
    tl.store(o, acc, mask=o_mask)
  else:
    alpha = tl.load(a_ptr)
    o = o_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(o, (acc * alpha).to(o_ptr.dtype.element_ty), mask=o_mask)


MIN_STEPS_PER_SPLIT = 3  # K steps a split-K program runs, so its cp.async pipeline fills


def default_config(m: int, n: int, h: int) -> dict[str, int]:
  """Heuristic tiles: see the module docstring. Returns BM, BN, BQ, SPLIT_K, GROUP_M,
  num_warps, num_stages.

  SPLIT_K divides the K steps (every program runs the same constant trip count, no row
  masks): the fewest splits that give about two programs per SM, among those that leave
  each program at least MIN_STEPS_PER_SPLIT steps (else the most such splits)."""
  if m <= 16:
    cfg = dict(BM=16, BN=64, BQ=32, num_warps=4, num_stages=4)
  elif m <= 64:
    cfg = dict(BM=max(16, 1 << (m - 1).bit_length()), BN=64, BQ=64, num_warps=4,
               num_stages=4)
  elif m <= 256:
    cfg = dict(BM=64, BN=128, BQ=32, num_warps=4, num_stages=4)
  else:
    cfg = dict(BM=128, BN=128, BQ=32, num_warps=8, num_stages=3)
  tiles = -(-m // cfg["BM"]) * -(-n // cfg["BN"])
  steps = -(-h // cfg["BQ"])
  split = 1
  if tiles < 2 * NUM_SMS_HINT:
    candidates = [s for s in range(1, steps + 1)
                  if steps % s == 0 and steps // s >= min(MIN_STEPS_PER_SPLIT, steps)]
    enough = [s for s in candidates if tiles * s >= 2 * NUM_SMS_HINT]
    split = enough[0] if enough else candidates[-1]
  cfg["SPLIT_K"] = split
  cfg["GROUP_M"] = 8
  return cfg


def launch_geometry(m: int, n: int, h: int, cfg: dict[str, int]) -> dict[str, int]:
  """The kernel's compile-time geometry for a config.

  Returns:
    dict with tiles (output tiles), split (non-empty K splits), steps (BQ blocks per split),
    even_n (BN divides N) and even_q (every split's rows lie inside H).
  """
  bq = cfg["BQ"]
  total_steps = -(-h // bq)
  steps = -(-total_steps // cfg["SPLIT_K"])
  split = -(-total_steps // steps)
  tiles = -(-m // cfg["BM"]) * -(-n // cfg["BN"])
  return dict(tiles=tiles, split=split, steps=steps, even_n=n % cfg["BN"] == 0,
              even_q=split * steps * bq == h)


def kernel_constexprs(m: int, k: int, n: int, h: int, dtype, cfg: dict[str, int]
                      ) -> tuple[dict[str, Any], tuple[int, int]]:
  """The kernel's constexpr arguments and grid for a problem (shared by the launcher, the
  tests and kernels/cuda_inspect.py)."""
  geo = launch_geometry(m, n, h, cfg)
  consts = dict(M=m, N=n, K=k, H=h, STEPS=geo["steps"], BM=cfg["BM"], BN=cfg["BN"],
                BQ=cfg["BQ"], GROUP_M=cfg["GROUP_M"], SPLIT=geo["split"] > 1,
                F32_IN=jnp.dtype(dtype) == jnp.float32, EVEN_N=geo["even_n"],
                EVEN_Q=geo["even_q"])
  return consts, (geo["tiles"], geo["split"])


def ternary_matmul_triton(x: jax.Array, packed: jax.Array, alpha: jax.Array,
                          config: dict[str, Any] | None = None) -> jax.Array:
  """x [M, K] (f32/bf16), packed uint8 [H, N], alpha f32 () -> [M, N] in x's dtype."""
  import jax_triton as jt  # the optional `gpu` extra  pylint: disable=g-import-not-at-top

  m, k = x.shape
  h, n = packed.shape
  cfg = default_config(m, n, h)
  cfg.update(config or {})
  consts, grid = kernel_constexprs(m, k, n, h, x.dtype, cfg)
  split = grid[1]
  out_shape = (jax.ShapeDtypeStruct((split, m, n), jnp.float32) if split > 1
               else jax.ShapeDtypeStruct((m, n), x.dtype))
  a = alpha.reshape(1).astype(jnp.float32)
  out = jt.triton_call(
      x, packed, a,
      kernel=ternary_matmul_kernel,
      out_shape=out_shape,
      grid=grid,
      num_warps=cfg["num_warps"],
      num_stages=cfg["num_stages"],
      **consts,
  )
  if split > 1:
    out = (alpha.reshape(()) * out.sum(axis=0)).astype(x.dtype)
  return out
