"""What the GPU kernels compile to: registers, spills, shared memory, load kinds (no GPU needed).

Compiles, for a CUDA target (default sm_90, the H100) with the `triton` package (its bundled
ptxas), through kernels/cuda_inspect.py:

  * jax-triton  the packed-ternary kernel of kernels/_triton_ternary.py, with the same signature,
                16-byte pointer alignment and constexprs that jax-triton gives it;
  * pallas-gpu  the Triton IR that Pallas generates for `ternary_matmul(impl="pallas",
                pallas_variant="gpu")`, captured while lowering under an abstract H100 device
                (`jax.export` for "cuda");
  * fp8-adamw   the same for the fused FP8 AdamW kernel (kernels/fp8_adamw.py, in-place form);

and prints per kernel: registers and spill bytes (`ptxas -v`), shared memory (Triton's
allocation), global loads by kind (16-byte vectors `ld.global[.nc].v4.b32` vs single-byte
`ld.global*.b8`), `cp.async` copies (the software pipeline's async global->shared stages) and
tensor-core instructions (`wgmma` on sm_90, `mma.sync`).

  python benchmarks/bench_triton_ptx.py                      # TerDiT shapes, M = 1 and 16
  python benchmarks/bench_triton_ptx.py --m 1,16,4096 --kn 3072x8192 --dtype bfloat16
  python benchmarks/bench_triton_ptx.py --kernels jax-triton --dump /tmp/ptx   # keep the PTX

Needs `triton` (pip install triton; any OS with its wheel; no GPU, no CUDA driver).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kernels.cuda_inspect import (Report, compile_jax_triton, pallas_fp8_adamw,  # noqa: E402
                                  pallas_ternary, report)


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

  import triton  # pylint: disable=g-import-not-at-top  (needed only past --help)
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
        r = report("jax-triton", shape, compiled, cfg["num_warps"], cfg["num_stages"], arch,
                   args.dump)
        reports.append(r)
        print(f"\n[jax-triton] {shape} BM={cfg['BM']} BN={cfg['BN']} BQ={cfg['BQ']} "
              f"split={consts['grid'][1]} steps={consts['STEPS']} grid={consts['grid']}")
        _print(r)
      if "pallas-gpu" in kernels:
        for compiled, warps, stages in pallas_ternary(m, k, n, args.dtype, args.capability):
          r = report("pallas-gpu", shape, compiled, warps, stages, arch, args.dump)
          reports.append(r)
          print(f"\n[pallas-gpu] {shape}")
          _print(r)
  if "fp8-adamw" in kernels:
    for compiled, warps, stages in pallas_fp8_adamw(args.fp8_groups, args.capability):
      r = report("fp8-adamw", f"groups={args.fp8_groups}x128", compiled, warps, stages, arch,
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
