"""Fused FP8 AdamW step over groups: dequantize, update, requantize, write the parameter in place.

COAT (arXiv 2410.19313, Sec. 4) keeps AdamW's first and second moments as float8_e4m3fn groups of
G = 128 with an fp32 (scale, k, c) per group (Dynamic Range Expansion, kernels/dre.py). One tensor is
laid out as groups [n_groups, G] (`coat.fp8.to_groups`). One step, per group:

  1. dequantize m and v (`kernels.dre.dre_dequantize_rows`);
  2. AdamW in fp32 on the scaled gradient g = grad_scale * grad (grad_scale: global-norm clipping):
       m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
       denom = (sqrt(v) / sqrt(1-b2^t) + eps) (1-b1^t);  u = -lr (m / denom + wd p)
     (COAT's form of the bias correction);
  3. requantize m and v per group (`kernels.dre.dre_quantize_rows_f32`);
  4. output = p + u (`out="params"`, the in-place step) or u (`out="update"`, what optax expects).

With `out="params"` the Pallas kernel aliases the parameter and both moments' buffers to its
outputs (`input_output_aliases`): under a jit whose parameters and state are donated, the step reads
grad (4 B), p (4 B), the two codes (2 B) and metadata, and writes p (4 B), the codes (2 B) and
metadata: 16.375 B per parameter, against 28 B for a fused fp32 `optax.adamw` step and the 28 B of
an update that `optax.apply_updates` writes again.

Non-finite values: a group whose new m, v or update would not be finite (an inf or NaN gradient in
the group, or a finite gradient whose square overflows fp32) keeps its old state and gets a zero
update. `skip` (a traced bool) keeps every group's state and parameter bit for bit: the caller passes
"some gradient of the tree is not finite" there, so the whole step is skipped inside the kernel,
without a `lax.cond` around it.

`fp8_adamw_rows(..., impl="pallas")` runs one Pallas program per block of `block_rows` groups
(per-group max/min reductions inside the kernel): Triton on GPU, Mosaic on TPU (blocks [rows, 128]
meet the (8, 128) rule; the metadata travels as [rows, 1] blocks), `interpret=True` on CPU.
The kernel converts float32 to float8_e4m3fn, which Triton supports from CUDA compute capability
8.9 (Ada, Hopper) on: on older GPUs (the A100 is 8.0) `impl="pallas"` raises `KernelUnsupported`
and callers use `impl="jnp"`, the reference: the same row functions applied to the whole array.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels import target
from kernels.dre import E4M3, dre_dequantize_rows, dre_quantize_rows_f32

# (codes [n, G] float8_e4m3fn, scale [n, 1], k [n, 1], c [n, 1]) for one moment.
MomentRows = tuple[jax.Array, jax.Array, jax.Array, jax.Array]

# Triton converts f32 -> float8_e4m3fn from compute capability 8.9 on.
MIN_CUDA_CAPABILITY = (8, 9)


class KernelUnsupported(ValueError):
  """The fused kernel cannot run on this device (e.g. a CUDA GPU below compute capability 8.9)."""


def _row_finite(x: jax.Array) -> jax.Array:
  """[rows, G] -> bool [rows, 1]: the whole row is finite (NaN compares False)."""
  bad = jnp.where(jnp.abs(x) < jnp.inf, 0.0, 1.0)
  return jnp.max(bad, axis=1, keepdims=True) == 0.0


def adamw_rows(g, p, m_rows: MomentRows, v_rows: MomentRows, lr, bc1, sqrt_bc2, grad_scale=None,
               skip=None, *, b1: float, b2: float, eps: float, weight_decay: float, expand: bool,
               out: str = "update"):
  """One FP8 AdamW step on groups; the math shared by the jnp path and the kernel.

  Args:
    g: gradient [rows, G] (any float; used as float32).
    p: parameter [rows, G] float32; may be None when weight_decay == 0 and out == "update".
    m_rows, v_rows: the moments as (codes, scale, k, c), codes [rows, G], metadata [rows, 1].
    lr: learning rate, float32 broadcastable to [rows, 1] (traced: schedules allowed).
    bc1: 1 - b1^t; sqrt_bc2: sqrt(1 - b2^t) (t = step number from 1), broadcastable to [rows, 1].
    grad_scale: None or float32 broadcastable to [rows, 1], multiplies the gradient (clipping).
    skip: None or a value broadcastable to [rows, 1], nonzero/True: keep everything unchanged.
    b1, b2, eps, weight_decay: static AdamW hyper-parameters.
    expand: requantize with Dynamic Range Expansion.
    out: "update" returns u; "params" returns p + u.

  Returns:
    (u or p + u [rows, G] float32, m_rows, v_rows): the update (or new parameter) and the
    requantized moments.
  """
  g = g.astype(jnp.float32)
  if grad_scale is not None:
    g = g * grad_scale
  m = dre_dequantize_rows(*m_rows)
  v = dre_dequantize_rows(*v_rows)
  m = b1 * m + (1.0 - b1) * g
  v = b2 * v + (1.0 - b2) * (g * g)
  denom = (jnp.sqrt(v) / sqrt_bc2 + eps) * bc1
  step = m / denom
  if weight_decay:
    step = step + weight_decay * p.astype(jnp.float32)
  u = -lr * step
  ok = _row_finite(m) & _row_finite(v) & _row_finite(u)
  if skip is not None:
    ok = ok & jnp.logical_not(jnp.asarray(skip) != 0)
  u = jnp.where(ok, u, 0.0)
  result = u if out == "update" else p.astype(jnp.float32) + u
  return result, _requant(m, m_rows, ok, expand), _requant(v, v_rows, ok, expand)


def _requant(x, old: MomentRows, ok, expand: bool) -> MomentRows:
  """Requantizes x [rows, G] per group; rows with ok False keep `old` (selects in float32)."""
  y, scale, k, c = dre_quantize_rows_f32(jnp.where(ok, x, 0.0), expand)
  codes = jnp.where(ok, y, old[0].astype(jnp.float32)).astype(E4M3)
  return (codes, jnp.where(ok, scale, old[1]), jnp.where(ok, k, old[2]), jnp.where(ok, c, old[3]))


def _kernel(*refs, has_p: bool, hyper: dict):
  """Pallas body: refs = (lr, bc1, sqrt_bc2, grad_scale, skip, g, [p], m x4, v x4,
  out, m x4, v x4), one block of rows each."""
  lr_ref, bc1_ref, bc2_ref, gs_ref, skip_ref, g_ref = refs[:6]
  rest = refs[6:]
  p = None
  if has_p:
    p = rest[0][...]
    rest = rest[1:]
  m_in, v_in, outs = rest[0:4], rest[4:8], rest[8:]
  m_rows = tuple(r[...] for r in m_in)
  v_rows = tuple(r[...] for r in v_in)
  res, new_m, new_v = adamw_rows(g_ref[...], p, m_rows, v_rows, lr_ref[...], bc1_ref[...],
                                 bc2_ref[...], gs_ref[...], skip_ref[...], **hyper)
  outs[0][...] = res.astype(outs[0].dtype)
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
  """Groups per program: 16 on GPU, 256 on TPU, 512 in CPU interpret mode.

  On GPU 16 groups (2048 elements, 4 warps) compile for sm_90 to 168 registers without spills;
  32 groups reach the 255-register cap and spill, 64 (8 warps) spill 388 bytes
  (kernels/cuda_inspect.py)."""
  backend = backend or target.platform()
  return {"gpu": 16, "tpu": 256}.get(backend, 512)


def check_supported(backend: str | None = None) -> None:
  """Raises `KernelUnsupported` when the fused kernel cannot compile for the target device.

  Args:
    backend: "gpu", "tpu" or "cpu" (default: the target's platform, `kernels.target`).
  """
  backend = backend or target.platform()
  if backend not in ("gpu", "tpu"):
    raise KernelUnsupported(
        f"fp8_adamw impl='pallas' compiles for GPU or TPU only (backend: {backend}); pass "
        "interpret=True to run the kernel on CPU, or use impl='jnp'")
  if backend == "gpu":
    cc = target.cuda_capability()
    if cc is not None and cc < MIN_CUDA_CAPABILITY:
      raise KernelUnsupported(
          f"fp8_adamw impl='pallas' needs CUDA compute capability >= 8.9 (float8_e4m3fn "
          f"conversion in Triton); {target.device().device_kind} has {cc[0]}.{cc[1]}. Use impl='jnp' "
          "(or impl='auto', which picks it on this GPU)")


def is_supported(backend: str | None = None) -> bool:
  """Whether `check_supported` passes (the fused kernel compiles here)."""
  try:
    check_supported(backend)
  except KernelUnsupported:
    return False
  return True


def _pallas_rows(g, p, m_rows, v_rows, scalars, *, hyper, interpret, block_rows, backend):
  n, group_size = g.shape
  if interpret:
    backend = "cpu"
  else:
    check_supported(backend)
    backend = backend or target.platform()
  block_rows = block_rows or default_block_rows(backend)
  bn = _pick_block_rows(n, block_rows, backend)
  grid = (pl.cdiv(n, bn),)
  scalar_spec = pl.BlockSpec((1, 1), lambda i: (0, 0))
  row_spec = pl.BlockSpec((bn, group_size), lambda i: (i, 0))
  meta_spec = pl.BlockSpec((bn, 1), lambda i: (i, 0))
  moment_specs = [row_spec, meta_spec, meta_spec, meta_spec]
  scalars = [jnp.reshape(jnp.asarray(s, jnp.float32), (1, 1)) for s in scalars]
  inputs = [*scalars, g]
  in_specs = [scalar_spec] * len(scalars) + [row_spec]
  has_p = p is not None
  if has_p:
    inputs.append(p)
    in_specs.append(row_spec)
  first_moment_input = len(inputs)
  inputs += [*m_rows, *v_rows]
  in_specs += moment_specs * 2
  in_place = hyper["out"] == "params"
  res_shape = jax.ShapeDtypeStruct((n, group_size), p.dtype if in_place else jnp.float32)
  out_shape = [res_shape, *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*m_rows, *v_rows)]]
  out_specs = [row_spec] + moment_specs * 2
  aliases = {}
  if in_place:
    aliases[first_moment_input - 1] = 0  # p -> the new parameter
    aliases.update({first_moment_input + i: 1 + i for i in range(8)})  # moments, in place
  compiler_params = None
  if backend == "tpu":
    # Each backend's Pallas module only where it compiles (~0.3 s to import).
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  elif backend == "gpu":
    # Each backend's Pallas module only where it compiles (~0.3 s to import).
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    compiler_params = plgpu.CompilerParams(num_warps=8 if bn * group_size >= 8192 else 4,
                                           num_stages=1)
  outs = pl.pallas_call(
      functools.partial(_kernel, has_p=has_p, hyper=hyper),
      out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      input_output_aliases=aliases, interpret=interpret, compiler_params=compiler_params,
      name="fp8_adamw")(*inputs)
  return outs[0], tuple(outs[1:5]), tuple(outs[5:9])


def fp8_adamw_rows(g, p, m_rows: MomentRows, v_rows: MomentRows, lr, bc1, sqrt_bc2,
                   grad_scale=None, skip=None, *, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, expand: bool = True,
                   out: str = "update", impl: str = "pallas", interpret: bool = False,
                   block_rows: int | None = None, backend: str | None = None):
  """One FP8 AdamW step on a tensor laid out as groups (see `adamw_rows` for the math).

  Args:
    g: gradient [n, G].
    p: parameter [n, G] float32; needed when weight_decay != 0 or out == "params" (not read
      otherwise).
    m_rows, v_rows: (codes float8_e4m3fn [n, G], scale [n, 1], k [n, 1], c [n, 1]) float32.
    lr, bc1, sqrt_bc2: float32 scalars (lr, 1 - b1^t, sqrt(1 - b2^t)).
    grad_scale: float32 scalar multiplying the gradient (global-norm clipping); None: 1.
    skip: bool scalar; True keeps parameter and state unchanged (a non-finite gradient tree).
    out: "update" returns u = new_p - p (optax's convention); "params" returns p + u, and the
      kernel writes it into p's buffer and the moments into theirs (donate them under jit).
    impl: "pallas" (fused kernel) or "jnp" (reference).
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    block_rows: groups per Pallas program (default `default_block_rows()`).
    backend: "gpu" or "tpu" to compile for that platform regardless of the target (lowering
      with `jax.export`); None: the target's platform (`kernels.target`).

  Returns:
    (u or p + u [n, G], m_rows, v_rows) with the inputs' shapes and dtypes (p + u in p's dtype,
    u in float32).

  Raises:
    ValueError: bad `impl` / `out`, or missing parameters.
    KernelUnsupported: impl="pallas" on a device the kernel does not compile for.
  """
  if out not in ("update", "params"):
    raise ValueError(f"fp8_adamw_rows out must be 'update' or 'params', got {out!r}")
  hyper = dict(b1=float(b1), b2=float(b2), eps=float(eps), weight_decay=float(weight_decay),
               expand=bool(expand), out=out)
  if p is None and (weight_decay or out == "params"):
    raise ValueError("fp8_adamw_rows needs the parameters when weight_decay != 0 or "
                     "out == 'params'")
  if not weight_decay and out == "update":
    p = None
  if grad_scale is None:
    grad_scale = jnp.float32(1.0)
  skip = jnp.asarray(False if skip is None else skip).astype(jnp.float32)
  if impl == "jnp":
    res, m_new, v_new = adamw_rows(g, p, tuple(m_rows), tuple(v_rows), lr, bc1, sqrt_bc2,
                                   jnp.asarray(grad_scale, jnp.float32), skip, **hyper)
    if out == "params":
      res = res.astype(p.dtype)
    return res, m_new, v_new
  if impl == "pallas":
    return _pallas_rows(g, p, tuple(m_rows), tuple(v_rows), (lr, bc1, sqrt_bc2, grad_scale, skip),
                        hyper=hyper, interpret=interpret, block_rows=block_rows, backend=backend)
  raise ValueError(f"impl must be 'jnp' or 'pallas', got {impl!r}")
