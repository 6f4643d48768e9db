"""What do the GPU kernels compile to? Registers, spills, shared memory and load kinds, without a GPU.

Compiles, for a CUDA target (default sm_90, the H100) with the `triton` package (its bundled ptxas):

  * jax-triton  the packed-ternary kernel of kernels/_triton_ternary.py, with the same signature,
                16-byte pointer alignment and constexprs that jax-triton gives it;
  * pallas-gpu  the Triton IR that Pallas generates for `ternary_matmul(impl="pallas",
                pallas_variant="gpu")`, captured while lowering under an abstract H100 device
                (`jax.export` for "cuda");
  * fp8-adamw   the same for the fused FP8 AdamW kernel (kernels/fp8_adamw.py, in-place form);

and reports per kernel: registers and spill bytes (`ptxas -v`), shared memory (Triton's
allocation), global loads by kind (16-byte vectors `ld.global[.nc].v4.b32` vs single-byte
`ld.global*.b8`), `cp.async` copies (the software pipeline's async global->shared stages) and
tensor-core instructions (`wgmma` on sm_90, `mma.sync`).

  python benchmarks/inspect_triton.py                      # TerDiT shapes, M = 1 and 16
  python benchmarks/inspect_triton.py --m 1,16,4096 --kn 3072x8192 --dtype bfloat16
  python benchmarks/inspect_triton.py --kernels jax-triton --dump /tmp/ptx   # keep the PTX

Needs `triton` (pip install triton; any OS with its wheel; no GPU, no CUDA driver).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

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
  import triton  # pylint: disable=g-import-not-at-top
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


def _report(kernel: str, shape: str, compiled, num_warps: int, num_stages: int, arch: str,
            dump: str | None) -> Report:
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
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  return GPUTarget("cuda", capability, 32)


# ------------------------------------------------------------------------------------------------
# jax-triton kernel: compiled as jax-triton compiles it.

_TRITON_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "uint8": "u8"}


def compile_jax_triton(m: int, k: int, n: int, dtype: str, capability: int,
                       config: dict | None = None):
  """Compiles kernels/_triton_ternary.py's kernel for one problem; (compiled, cfg, consts)."""
  import triton  # pylint: disable=g-import-not-at-top
  from kernels import _triton_ternary as tt  # pylint: disable=g-import-not-at-top
  from kernels.ternary_matmul import packed_rows  # pylint: disable=g-import-not-at-top

  h = packed_rows(k)
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
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top

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
  from jax import export  # pylint: disable=g-import-not-at-top
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType  # pylint: disable=g-import-not-at-top

  dev = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    return export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)


def compile_pallas(fn, args, capability: int) -> list[tuple[object, int, int]]:
  """Lowers fn(*args) for CUDA, compiles each captured Pallas kernel; [(compiled, warps, stages)]."""
  import warnings  # pylint: disable=g-import-not-at-top

  import triton  # pylint: disable=g-import-not-at-top

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
  from kernels import ternary_matmul as tm  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((m, k), jnp.dtype(dtype))
  packed = jax.ShapeDtypeStruct((tm.packed_rows(k), n), jnp.uint8)
  alpha = jax.ShapeDtypeStruct((), jnp.float32)
  fn = lambda x, p, a: tm.ternary_matmul(x, p, a, impl="pallas", pallas_variant="gpu")
  return compile_pallas(fn, (x, packed, alpha), capability)


def pallas_fp8_adamw(n_groups: int, capability: int):
  from kernels import fp8_adamw as fa  # pylint: disable=g-import-not-at-top
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


# ------------------------------------------------------------------------------------------------


def _fmt(counter: dict[str, int]) -> str:
  return ", ".join(f"{k} x{v}" for k, v in sorted(counter.items())) or "-"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kernels", default="jax-triton,pallas-gpu,fp8-adamw")
  p.add_argument("--m", default="1,16", help="comma list of M")
  p.add_argument("--kn", default="3072x8192", help="comma list of KxN")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--capability", type=int, default=90, help="CUDA compute capability x10")
  p.add_argument("--fp8_groups", type=int, default=8192, help="groups of the FP8 AdamW tensor")
  p.add_argument("--dump", default=None, help="write each kernel's PTX to this directory")
  args = p.parse_args(argv)

  import triton  # pylint: disable=g-import-not-at-top
  arch = f"sm_{args.capability}" + ("a" if args.capability == 90 else "")
  kernels = [s for s in args.kernels.split(",") if s]
  ms = [int(v) for v in args.m.split(",")]
  kns = [tuple(int(v) for v in s.split("x")) for s in args.kn.split(",")]
  print(f"triton {triton.__version__}, jax {jax.__version__}, target cuda {args.capability} "
        f"({arch}), dtype {args.dtype}")
  reports = []
  for k, n in kns:
    for m in ms:
      shape = f"M={m} K={k} N={n}"
      if "jax-triton" in kernels:
        compiled, cfg, consts = compile_jax_triton(m, k, n, args.dtype, args.capability)
        r = _report("jax-triton", shape, compiled, cfg["num_warps"], cfg["num_stages"], arch,
                    args.dump)
        reports.append(r)
        print(f"\n[jax-triton] {shape} BM={cfg['BM']} BN={cfg['BN']} BQ={cfg['BQ']} "
              f"split={consts['grid'][1]} steps={consts['STEPS']} grid={consts['grid']}")
        _print(r)
      if "pallas-gpu" in kernels:
        for compiled, warps, stages in pallas_ternary(m, k, n, args.dtype, args.capability):
          r = _report("pallas-gpu", shape, compiled, warps, stages, arch, args.dump)
          reports.append(r)
          print(f"\n[pallas-gpu] {shape}")
          _print(r)
  if "fp8-adamw" in kernels:
    for compiled, warps, stages in pallas_fp8_adamw(args.fp8_groups, args.capability):
      r = _report("fp8-adamw", f"groups={args.fp8_groups}x128", compiled, warps, stages, arch,
                  args.dump)
      reports.append(r)
      print(f"\n[fp8-adamw] groups={args.fp8_groups}x128 (in place, wd != 0)")
      _print(r)
  print("\n| kernel | shape | regs | spills (st/ld B) | smem KiB | 16B vector loads | byte loads "
        "| cp.async | wgmma | mma.sync |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in reports:
    print(f"| {r.kernel} | {r.shape} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
          f"{r.shared_bytes / 1024:.1f} | {r.vector_loads} | {r.byte_loads} | "
          f"{sum(r.cp_async.values())} | {r.wgmma} | {r.mma_sync} |")
  return 0


def _print(r: Report) -> None:
  print(f"  warps={r.num_warps} stages={r.num_stages} registers={r.registers} "
        f"spills={r.spill_stores}/{r.spill_loads} B shared={r.shared_bytes} B")
  print(f"  global loads: {_fmt(r.loads)}")
  print(f"  cp.async: {_fmt(r.cp_async)}")
  print(f"  wgmma: {r.wgmma}  mma.sync: {r.mma_sync}")


if __name__ == "__main__":
  np.set_printoptions(linewidth=120)
  sys.exit(main())
