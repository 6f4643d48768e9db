"""Fused FP8 AdamW step over groups: dequantize, update, requantize (COAT, spec B2).

One tensor is laid out as groups [n_groups, G] (`coat.fp8.to_groups`); its first and second
moments are float8_e4m3fn codes [n_groups, G] with fp32 (scale, k, c) per group. One step, per
group (spec B2):

  1. dequantize m and v (`coat.fp8.dre_dequantize_rows`);
  2. AdamW in fp32: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
     denom = (sqrt(v) / sqrt(1-b2^t) + eps) (1-b1^t);  u = -lr (m / denom + wd p);
  3. requantize m and v per group (`coat.fp8.dre_quantize_rows`, Dynamic Range Expansion).

Returned is the update u (= new_p - p, what optax expects), not the new parameter, so the weight
is not read at all when wd = 0.

Groups whose new m, v or update would not be finite (an inf or NaN gradient in the group, or a
finite gradient whose square overflows fp32) keep their old state and get a zero update, so the
state never holds NaN; `coat.optim.fp8_adamw` additionally skips whole steps with non-finite grads.

`fp8_adamw_rows(..., impl="pallas")` runs one Pallas program per block of `block_rows` groups
(per-group max/min reductions inside the kernel): Triton on GPU, Mosaic on TPU (blocks [rows, 128]
meet the (8, 128) rule; the metadata travels as [rows, 1] blocks), `interpret=True` on CPU.
`impl="jnp"` is the reference: the same row functions applied to the whole array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from coat.fp8 import E4M3, dre_dequantize_rows, dre_quantize_rows_f32

# (codes [n, G] float8_e4m3fn, scale [n, 1], k [n, 1], c [n, 1]) for one moment.
MomentRows = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _row_finite(x: jax.Array) -> jax.Array:
  """[rows, G] -> bool [rows, 1]: the whole row is finite (NaN compares False)."""
  bad = jnp.where(jnp.abs(x) < jnp.inf, 0.0, 1.0)
  return jnp.max(bad, axis=1, keepdims=True) == 0.0


def adamw_rows(g, p, m_rows: MomentRows, v_rows: MomentRows, lr, bc1, sqrt_bc2, *, b1: float,
               b2: float, eps: float, weight_decay: float, expand: bool):
  """One FP8 AdamW step on groups; the math shared by the jnp path and the kernel.

  Args:
    g: gradient [rows, G] (any float; used as float32).
    p: parameter [rows, G] float32, or None when weight_decay == 0.
    m_rows, v_rows: the moments as (codes, scale, k, c), codes [rows, G], metadata [rows, 1].
    lr: learning rate, float32 broadcastable to [rows, 1] (traced: schedules allowed).
    bc1: 1 - b1^t; sqrt_bc2: sqrt(1 - b2^t) (t = step number from 1), broadcastable to [rows, 1].
    b1, b2, eps, weight_decay: static AdamW hyper-parameters.
    expand: requantize with Dynamic Range Expansion.

  Returns:
    (u, m_rows, v_rows): the update [rows, G] float32 and the requantized moments.
  """
  g = g.astype(jnp.float32)
  m = dre_dequantize_rows(*m_rows)
  v = dre_dequantize_rows(*v_rows)
  m = b1 * m + (1.0 - b1) * g
  v = b2 * v + (1.0 - b2) * (g * g)
  denom = (jnp.sqrt(v) / sqrt_bc2 + eps) * bc1
  step = m / denom
  if p is not None and weight_decay:
    step = step + weight_decay * p.astype(jnp.float32)
  u = -lr * step
  ok = _row_finite(m) & _row_finite(v) & _row_finite(u)
  return jnp.where(ok, u, 0.0), _requant(m, m_rows, ok, expand), _requant(v, v_rows, ok, expand)


def _requant(x, old: MomentRows, ok, expand: bool) -> MomentRows:
  """Requantizes x [rows, G] per group; rows with ok False keep `old` (selects in float32)."""
  y, scale, k, c = dre_quantize_rows_f32(jnp.where(ok, x, 0.0), expand)
  codes = jnp.where(ok, y, old[0].astype(jnp.float32)).astype(E4M3)
  return (codes, jnp.where(ok, scale, old[1]), jnp.where(ok, k, old[2]), jnp.where(ok, c, old[3]))


def _kernel(*refs, has_p: bool, hyper: dict):
  """Pallas body: refs = (lr, bc1, sqrt_bc2, g, [p], m x4, v x4, u, m x4, v x4), one block."""
  lr_ref, bc1_ref, bc2_ref, g_ref = refs[:4]
  rest = refs[4:]
  p = None
  if has_p:
    p = rest[0][...]
    rest = rest[1:]
  m_in, v_in, outs = rest[0:4], rest[4:8], rest[8:]
  m_rows = tuple(r[...] for r in m_in)
  v_rows = tuple(r[...] for r in v_in)
  u, new_m, new_v = adamw_rows(g_ref[...], p, m_rows, v_rows, lr_ref[...], bc1_ref[...],
                               bc2_ref[...], **hyper)
  outs[0][...] = u
  for ref, val in zip(outs[1:5], new_m):
    ref[...] = val.astype(ref.dtype)
  for ref, val in zip(outs[5:9], new_v):
    ref[...] = val.astype(ref.dtype)


def _pick_block_rows(n: int, block_rows: int, backend: str) -> int:
  """Rows per program: a power of two (Triton); on TPU a multiple of 8 or the whole array."""
  if backend == "tpu":
    return n if n <= block_rows else block_rows
  return min(block_rows, 1 << max(0, (n - 1).bit_length()))


def default_block_rows(backend: str | None = None) -> int:
  """Groups per program: 64 (8192 elements) on GPU, 256 on TPU, 512 in CPU interpret mode."""
  backend = backend or jax.default_backend()
  return {"gpu": 64, "tpu": 256}.get(backend, 512)


def _pallas_rows(g, p, m_rows, v_rows, lr, bc1, sqrt_bc2, *, hyper, interpret, block_rows):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  n, group_size = g.shape
  backend = "cpu" if interpret else jax.default_backend()
  if not interpret and backend not in ("gpu", "tpu"):
    raise ValueError(f"impl='pallas' compiles for GPU or TPU only (backend: {backend}); "
                     "pass interpret=True to run the kernel on CPU")
  block_rows = block_rows or default_block_rows(backend)
  bn = _pick_block_rows(n, block_rows, backend)
  grid = (pl.cdiv(n, bn),)
  scalar_spec = pl.BlockSpec((1, 1), lambda i: (0, 0))
  row_spec = pl.BlockSpec((bn, group_size), lambda i: (i, 0))
  meta_spec = pl.BlockSpec((bn, 1), lambda i: (i, 0))
  moment_specs = [row_spec, meta_spec, meta_spec, meta_spec]
  scalars = [jnp.reshape(jnp.asarray(s, jnp.float32), (1, 1)) for s in (lr, bc1, sqrt_bc2)]
  inputs = [*scalars, g]
  in_specs = [scalar_spec] * 3 + [row_spec]
  has_p = p is not None
  if has_p:
    inputs.append(p)
    in_specs.append(row_spec)
  inputs += [*m_rows, *v_rows]
  in_specs += moment_specs * 2
  moment_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in m_rows]
  out_shape = [jax.ShapeDtypeStruct((n, group_size), jnp.float32), *moment_shapes,
               *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in v_rows]]
  out_specs = [row_spec] + moment_specs * 2
  compiler_params = None
  if not interpret and backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  elif not interpret and backend == "gpu":
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    compiler_params = plgpu.CompilerParams(num_warps=8 if bn * group_size >= 8192 else 4,
                                           num_stages=1)
  outs = pl.pallas_call(
      functools.partial(_kernel, has_p=has_p, hyper=hyper),
      out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      interpret=interpret, compiler_params=compiler_params, name="fp8_adamw")(*inputs)
  return outs[0], tuple(outs[1:5]), tuple(outs[5:9])


def fp8_adamw_rows(g, p, m_rows: MomentRows, v_rows: MomentRows, lr, bc1, sqrt_bc2, *,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, expand: bool = True, impl: str = "pallas",
                   interpret: bool = False, block_rows: int | None = None):
  """One FP8 AdamW step on a tensor laid out as groups (see `adamw_rows` for the arguments).

  Args:
    g: gradient [n, G]; p: parameter [n, G] float32 or None (not read when weight_decay == 0).
    m_rows, v_rows: (codes float8_e4m3fn [n, G], scale [n, 1], k [n, 1], c [n, 1]) float32.
    lr, bc1, sqrt_bc2: float32 scalars (lr, 1 - b1^t, sqrt(1 - b2^t)).
    impl: "pallas" (fused kernel) or "jnp" (reference).
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    block_rows: groups per Pallas program (default `default_block_rows()`).

  Returns:
    (u [n, G] float32, m_rows, v_rows) with the inputs' shapes and dtypes.
  """
  hyper = dict(b1=float(b1), b2=float(b2), eps=float(eps), weight_decay=float(weight_decay),
               expand=bool(expand))
  if not weight_decay:
    p = None
  elif p is None:
    raise ValueError("fp8_adamw_rows needs the parameters when weight_decay != 0")
  if impl == "jnp":
    return adamw_rows(g, p, tuple(m_rows), tuple(v_rows), lr, bc1, sqrt_bc2, **hyper)
  if impl == "pallas":
    return _pallas_rows(g, p, tuple(m_rows), tuple(v_rows), lr, bc1, sqrt_bc2, hyper=hyper,
                        interpret=interpret, block_rows=block_rows)
  raise ValueError(f"impl must be 'jnp' or 'pallas', got {impl!r}")
