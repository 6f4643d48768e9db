"""What the GPU kernels compile to: registers, spills, shared memory and load kinds, without a GPU.

Compiles for a CUDA target (e.g. 90: sm_90, the H100) with the `triton` package (its bundled
ptxas; no GPU, no CUDA driver):

  * `compile_jax_triton`: the packed-ternary kernel of kernels/_triton_ternary.py, with the same
    signature, 16-byte pointer alignment and constexprs that jax-triton gives it;
  * `pallas_ternary`, `pallas_fp8_adamw`: the Triton IR that Pallas generates for
    `ternary_matmul(impl="pallas", pallas_variant="gpu")` and for the fused FP8 AdamW kernel
    (kernels/fp8_adamw.py, in-place form), captured while `lower_for_cuda` lowers them under an
    abstract H100 (`jax.export` for "cuda");

and `report` reads each compiled kernel: registers and spill bytes (`ptxas -v`), shared memory
(Triton's allocation), global loads by kind (16-byte vectors `ld.global[.nc].v4.b32` vs single-byte
`ld.global*.b8`), `cp.async` copies (the software pipeline's async global->shared stages) and
tensor-core instructions (`wgmma` on sm_90, `mma.sync`). `lower_for_cuda` alone needs no triton:
tests/test_kernel_lowering.py lowers every kernel entry point with it. The table of these reports:
benchmarks/bench_triton_ptx.py.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
import warnings

import jax
from jax import export
from jax._src.pallas.triton import lowering
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from kernels import fp8_adamw as fa
from kernels import ternary_matmul as tm

H100_KIND = "NVIDIA H100 80GB HBM3"
H100_SMS = 132


@dataclasses.dataclass
class Report:
  """What one compiled kernel looks like."""
  kernel: str
  shape: str
  registers: int
  spill_stores: int
  spill_loads: int
  shared_bytes: int
  loads: dict[str, int]
  cp_async: dict[str, int]
  wgmma: int
  mma_sync: int
  num_warps: int
  num_stages: int

  @property
  def vector_loads(self) -> int:
    return sum(v for k, v in self.loads.items() if ".v4" in k or ".v2" in k)

  @property
  def byte_loads(self) -> int:
    return sum(v for k, v in self.loads.items() if k.endswith((".b8", ".u8", ".s8")))


# ------------------------------------------------------------------------------------------------
# PTX analysis.


def _ptxas_path() -> str:
  import triton  # optional heavy dependency: only the compilers here need it
  path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  if not os.path.exists(path):
    raise FileNotFoundError(f"the triton wheel's ptxas is missing at {path}")
  return path


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int, int]:
  """(registers, spill store bytes, spill load bytes) from `ptxas -v` on `ptx`."""
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "k.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    proc = subprocess.run([_ptxas_path(), "-v", f"-arch={arch}", src, "-o",
                           os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
  out = proc.stdout + proc.stderr
  if proc.returncode:
    raise RuntimeError(f"ptxas failed: {out}")
  regs = int(re.search(r"Used (\d+) registers", out).group(1))
  spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
  return regs, int(spill.group(1)), int(spill.group(2))


def ptx_instructions(ptx: str) -> tuple[dict[str, int], dict[str, int], int, int]:
  """(global loads by opcode, cp.async by opcode + size, wgmma count, mma.sync count)."""
  loads = collections.Counter(re.findall(r"\b(ld\.global(?:\.[a-z0-9]+)*)", ptx))
  cp = collections.Counter(
      f"{op} {int(size, 0)}B"
      for op, size in re.findall(
          r"\b(cp\.async\.c[ag]\.shared\.global)\S*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)",
          ptx))
  cp.update(re.findall(r"\b(cp\.async\.bulk\.tensor\S*)", ptx))  # TMA (sm_90)
  wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
  mma = len(re.findall(r"\bmma\.sync", ptx))
  return dict(loads), dict(cp), wgmma, mma


def report(kernel: str, shape: str, compiled, num_warps: int, num_stages: int, arch: str,
           dump: str | None = None) -> Report:
  """What a compiled Triton kernel (`triton.compile`'s result) looks like on `arch` ("sm_90a");
  its PTX is also written to `dump`/KERNEL_SHAPE.ptx when `dump` is given."""
  ptx = compiled.asm["ptx"]
  if dump:
    os.makedirs(dump, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{kernel}_{shape}")
    with open(os.path.join(dump, name + ".ptx"), "w") as f:
      f.write(ptx)
  regs, st, ld = ptxas_usage(ptx, arch)
  loads, cp, wgmma, mma = ptx_instructions(ptx)
  return Report(kernel, shape, regs, st, ld, int(compiled.metadata.shared), loads, cp, wgmma, mma,
                num_warps, num_stages)


def _target(capability: int):
  from triton.backends.compiler import GPUTarget  # optional heavy dependency (see _ptxas_path)
  return GPUTarget("cuda", capability, 32)


# ------------------------------------------------------------------------------------------------
# jax-triton kernel: compiled as jax-triton compiles it.

_TRITON_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "uint8": "u8"}


def compile_jax_triton(m: int, k: int, n: int, dtype: str, capability: int,
                       config: dict | None = None):
  """Compiles kernels/_triton_ternary.py's kernel for one problem; (compiled, cfg, consts)."""
  import triton  # optional heavy dependency (see _ptxas_path)
  from kernels import _triton_ternary as tt  # imports triton (see _ptxas_path)

  h = tm.packed_rows(k)
  cfg = tt.default_config(m, n, h)
  cfg.update(config or {})
  consts, grid = tt.kernel_constexprs(m, k, n, h, jnp.dtype(dtype), cfg)
  out_dtype = "fp32" if grid[1] > 1 else _TRITON_DTYPE[dtype]
  fn = tt.ternary_matmul_kernel
  pointers = {"x_ptr": "*" + _TRITON_DTYPE[dtype], "p_ptr": "*u8", "a_ptr": "*fp32",
              "o_ptr": "*" + out_dtype}
  signature = {name: pointers.get(name, "constexpr") for name in fn.arg_names}
  # jax-triton assumes 16-byte aligned array arguments (jax_triton/triton_lib.py).
  attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
  src = triton.compiler.ASTSource(fn, signature, constexprs=consts, attrs=attrs)
  compiled = triton.compile(src, target=_target(capability),
                            options=dict(num_warps=cfg["num_warps"],
                                         num_stages=cfg["num_stages"]))
  return compiled, cfg, dict(consts, grid=grid)


# ------------------------------------------------------------------------------------------------
# Pallas kernels: capture the Triton IR that Pallas lowers to, then compile it.


@contextlib.contextmanager
def _capture_pallas_triton_ir():
  """Collects the Triton modules (MLIR text) Pallas lowers to while the context is open."""
  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def wrapper(*args, **kwargs):
    result = original(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = wrapper
  try:
    yield captured
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def lower_for_cuda(fn, *args, device_kind: str = H100_KIND, num_cores: int = H100_SMS):
  """`jax.export` of jit(fn)(*args) for "cuda" under an abstract GPU; returns the Exported."""
  dev = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    return export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)


def compile_pallas(fn, args, capability: int) -> list[tuple[object, int, int]]:
  """Lowers fn(*args) for CUDA and compiles each Pallas kernel in it; [(compiled, warps, stages)]."""
  import triton  # optional heavy dependency (see _ptxas_path)

  with _capture_pallas_triton_ir() as modules, warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    exported = lower_for_cuda(fn, *args)
  text = exported.mlir_module()
  params = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)
  if len(params) != len(modules):
    raise RuntimeError(f"found {len(modules)} kernels but {len(params)} Triton custom calls")
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, (mod, (stages, warps)) in enumerate(zip(modules, params)):
      path = os.path.join(tmp, f"k{i}.ttir")
      with open(path, "w") as f:
        f.write(mod)
      compiled = triton.compile(path, target=_target(capability),
                                options=dict(num_warps=int(warps), num_stages=int(stages)))
      out.append((compiled, int(warps), int(stages)))
  return out


def pallas_ternary(m: int, k: int, n: int, dtype: str, capability: int):
  """The Pallas GPU ternary matmul for [m, k] x packed [k, n], compiled; compile_pallas's list."""
  x = jax.ShapeDtypeStruct((m, k), jnp.dtype(dtype))
  packed = jax.ShapeDtypeStruct((tm.packed_rows(k), n), jnp.uint8)
  alpha = jax.ShapeDtypeStruct((), jnp.float32)
  fn = lambda x, p, a: tm.ternary_matmul(x, p, a, impl="pallas", pallas_variant="gpu")
  return compile_pallas(fn, (x, packed, alpha), capability)


def pallas_fp8_adamw(n_groups: int, capability: int):
  """The fused FP8 AdamW kernel (in place, weight decay 0.1) on [n_groups, 128], compiled;
  compile_pallas's list."""
  rows = jax.ShapeDtypeStruct((n_groups, 128), jnp.float32)
  meta = jax.ShapeDtypeStruct((n_groups, 1), jnp.float32)
  codes = jax.ShapeDtypeStruct((n_groups, 128), jnp.float8_e4m3fn)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)

  def fn(g, p, mc, ms, mk, mcc, vc, vs, vk, vcc, lr, bc1, bc2, gs):
    return fa.fp8_adamw_rows(g, p, (mc, ms, mk, mcc), (vc, vs, vk, vcc), lr, bc1, bc2, gs,
                             jnp.bool_(False), weight_decay=0.1, out="params", impl="pallas",
                             backend="gpu")

  args = (rows, rows, codes, meta, meta, meta, codes, meta, meta, meta, scalar, scalar, scalar,
          scalar)
  return compile_pallas(fn, args, capability)
