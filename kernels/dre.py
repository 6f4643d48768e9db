"""FP8 E4M3 group quantization with COAT's Dynamic Range Expansion: the row math.

COAT (arXiv 2410.19313, Sec. 4) quantizes each optimizer-state group of G elements with
an exponent k that stretches the group's range (max / min) to fill E4M3's range. The functions here
work on [rows, G] blocks (one row per group) with [rows, 1] metadata and use only element-wise ops
and row reductions, so the fused Pallas kernel (kernels/fp8_adamw.py) runs the very same code on its
blocks. This module is the jnp reference; `coat.fp8` builds tensors of groups on top of it.

Per group (row):

  M  = max|x| + 1e-30,   mn = min_{x != 0}|x| + 1e-30        (a true masked min)
  R  = M / mn,           c  = sqrt(M) * sqrt(mn)
  k  = floor(16 * log2(448^2 / 2) / log2 R) / 16               (not clamped to k >= 1)
  x' = sign(x) * (|x| / c)^k,   s = (M / c)^k / 448,   code = e4m3(clip(x' / s, +-448))
  dequant: x = sign(code s) * |code s|^(1/k) * c

Decisions beyond the paper:

* constant groups (R = 1, log2 R = 0) get k = 1; all-zero groups store (s, k, c) = (0, 1, 1)
  (the state-init values) and dequantize to zeros;
* k is capped at `K_MAX` = 4096 (it only acts on nearly constant groups, R < 1.046, where the fp32
  rounding of |x|/c raised to a power of 1e5 or more would overflow) and is at least 1/16;
* the formulas are evaluated in the log2 domain (`log2 R = log2 M - log2 mn`), which cannot overflow
  for any finite fp32 input (the direct M / mn overflows once M > 3e8 and mn ~ 1e-30).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
# log2(448^2 / 2): the target range of Dynamic Range Expansion.
LOG2_TARGET_RANGE = math.log2(E4M3_MAX * E4M3_MAX / 2.0)
EXPAND_STEP = 16  # k is a multiple of 1/16 (COAT's expand_min)
K_MAX = 4096.0
K_MIN = 1.0 / EXPAND_STEP
DRE_EPS = 1e-30  # added to max and min before the range
PLAIN_EPS = 1e-20  # the non-expanded scale: s = (max + 1e-20) / 448


def dre_quantize_rows(x: jax.Array, expand: bool = True):
  """Quantizes each row (one group) of `x` to E4M3 with Dynamic Range Expansion.

  Args:
    x: [rows, G] float32; zeros (including padding) are ignored by the min.
    expand: apply Dynamic Range Expansion; False gives COAT's plain per-group scaling
      s = (max + 1e-20) / 448 with k = 1, c = 1.

  Returns:
    (codes, scale, k, c): codes float8_e4m3fn [rows, G]; scale, k, c float32 [rows, 1].
  """
  y, scale, k, c = dre_quantize_rows_f32(x, expand)
  return y.astype(E4M3), scale, k, c


def dre_quantize_rows_f32(x: jax.Array, expand: bool = True):
  """`dre_quantize_rows` with the codes before the final cast: float32 in [-448, 448].

  The kernel selects between these and old codes in float32 (old codes convert exactly) and casts
  once, which avoids selects on float8 values.
  """
  x = x.astype(jnp.float32)
  a = jnp.abs(x)
  amax = jnp.max(a, axis=1, keepdims=True)
  nonzero = amax > 0
  one = jnp.ones_like(amax)
  if expand:
    amin = jnp.min(jnp.where(a > 0, a, jnp.inf), axis=1, keepdims=True)
    amin = jnp.where(nonzero, amin, amax)  # all-zero group: R = 1
    log2_big = jnp.log2(amax + DRE_EPS)
    log2_small = jnp.log2(amin + DRE_EPS)
    log2_range = log2_big - log2_small  # log2 R >= 0
    safe = jnp.where(log2_range > 0, log2_range, one)
    k = jnp.floor(EXPAND_STEP * LOG2_TARGET_RANGE / safe) / EXPAND_STEP
    k = jnp.where(log2_range > 0, k, one)  # constant group: k = 1
    k = jnp.clip(k, K_MIN, K_MAX)
    log2_c = 0.5 * (log2_big + log2_small)  # c = sqrt(M) sqrt(mn)
    log2_scale = k * (log2_big - log2_c) - math.log2(E4M3_MAX)  # s = (M/c)^k / 448
    # |code| = (|x|/c)^k / s
    mag = jnp.where(a > 0, jnp.exp2(k * (jnp.log2(jnp.where(a > 0, a, one)) - log2_c)
                                     - log2_scale), 0.0)
    scale = jnp.exp2(log2_scale)
    c = jnp.exp2(log2_c)
  else:
    k = one
    c = one
    scale = (amax + PLAIN_EPS) / E4M3_MAX
    mag = a / scale
  y = jnp.clip(jnp.where(x < 0, -mag, mag), -E4M3_MAX, E4M3_MAX)
  scale = jnp.where(nonzero, scale, 0.0)
  k = jnp.where(nonzero, k, one)
  c = jnp.where(nonzero, c, one)
  return y, scale, k, c


def dre_dequantize_rows(codes: jax.Array, scale: jax.Array, k: jax.Array,
                        c: jax.Array) -> jax.Array:
  """Inverse of `dre_quantize_rows`: codes [rows, G], scale/k/c [rows, 1] -> float32 [rows, G].

  x = code * s;  value = sign(x) |x|^(1/k) c; groups with k = 1 and c = 1 (plain scaling, all-zero
  groups, fresh state) decode exactly as code * s.
  """
  x = codes.astype(jnp.float32) * scale
  a = jnp.abs(x)
  one = jnp.ones_like(a)
  mag = jnp.where(a > 0, jnp.exp2(jnp.log2(jnp.where(a > 0, a, one)) / k + jnp.log2(c)), 0.0)
  plain = (k == 1.0) & (c == 1.0)
  return jnp.where(plain, x, jnp.where(x < 0, -mag, mag))
