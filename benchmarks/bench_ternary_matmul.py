"""Benchmark: packed-ternary matmul (Pallas, Triton) against a bf16 jnp.dot.

On a GPU:
  python benchmarks/bench_ternary_matmul.py
times ternary_matmul (impl="pallas" and impl="triton") and the bf16 dot x @ W for M in
{1, 16, 256, 4096} and (K, N) in {(1536, 4096), (3072, 8192), (8192, 3072)} (TerDiT-600M
and 4.2B layer shapes) and prints time, speedup vs bf16, achieved weight bandwidth
(packed bytes / time for ternary, bf16 weight bytes / time for the dot) and FLOP/s, each
against the H100's measured peaks (2.94 TB/s, 800 TFLOP/s bf16; --peak_tbps, --peak_tflops). Targets (H100):
>= 3x the bf16 dot for M <= 16, >= 0.9x at M = 4096.

On CPU it runs a tiny sanity version (Pallas in interpret mode, small shapes): the
timings are meaningless there, it only checks that the script and kernels run and agree.

The activations, the packed weights, alpha and the bf16 weight are arguments of the jitted
timing loop (never closed-over constants XLA could fold). Each timing runs the op `--reps`
times inside one jitted lax.fori_loop (a one-element
data dependency between iterations stops XLA from hoisting it), so per-call Python and
dispatch overhead is excluded; the median of `--trials` such loops is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from kernels import ternary_matmul as tm  # noqa: E402

GPU_MS = (1, 16, 256, 4096)
GPU_SHAPES = ((1536, 4096), (3072, 8192), (8192, 3072))
CPU_MS = (1, 5)
CPU_SHAPES = ((37, 19), (64, 48))


def _time_loop(fn, x, *weights, reps: int, trials: int) -> float:
  """Seconds per call of fn(x, *weights) -> [M, N], measured inside a jitted fori_loop.

  The weights are arguments of the jitted loop, not closed-over constants, so XLA cannot fold
  or pre-unpack them at compile time.
  """

  @jax.jit
  def loop(x, *weights):
    def body(_, carry):
      xc, acc = carry
      y = fn(xc, *weights)
      # A one-element dependency on y: the next call cannot be hoisted or CSE'd.
      xc = xc.at[0, 0].add((y[0, 0] * 0).astype(xc.dtype))
      return xc, acc + y[0, 0].astype(jnp.float32)
    return lax.fori_loop(0, reps, body, (x, jnp.float32(0)))

  jax.block_until_ready(loop(x, *weights))  # compile + warm up
  times = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(x, *weights))
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def _row(m, k, n, impl, t, t_bf16, weight_bytes, err, args) -> str:
  gbps = weight_bytes / t / 1e9
  tflops = 2 * m * k * n / t / 1e12
  return (f"{m:>5} {k:>5} {n:>5} {impl:>7} {t * 1e6:>9.1f} {t_bf16 / t:>8.2f} {gbps:>11.1f} "
          f"{100 * gbps / (args.peak_tbps * 1e3):>5.1f}% {tflops:>8.2f} "
          f"{100 * tflops / args.peak_tflops:>5.1f}% {err:>11}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--impls", default="pallas,triton", help="comma list of pallas,triton")
  p.add_argument("--m", default=None, help="comma list of M (default: GPU or CPU set)")
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--trials", type=int, default=5)
  p.add_argument("--peak_tflops", type=float, default=800.0,
                 help="bf16 matmul peak (H100, measured: 800 TFLOP/s)")
  p.add_argument("--peak_tbps", type=float, default=2.94,
                 help="memory bandwidth peak (H100, measured elementwise: 2.94 TB/s)")
  args = p.parse_args(argv)

  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  device = jax.devices()[0]
  if on_gpu:
    ms, shapes, reps, interpret = GPU_MS, GPU_SHAPES, args.reps or 50, False
  else:
    print(f"[{backend}] no GPU: tiny sanity run (Pallas in interpret mode); timings are "
          "meaningless. Run on a CUDA GPU for the real table.")
    ms, shapes, reps, interpret = CPU_MS, CPU_SHAPES, args.reps or 2, True
  if args.m:
    ms = tuple(int(v) for v in args.m.split(","))
  impls = [i for i in args.impls.split(",") if i]
  if not on_gpu and "triton" in impls:
    print("triton: skipped (needs a CUDA GPU and jax-triton).")
    impls = [i for i in impls if i != "triton"]

  print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}, reps={reps}")
  print(f"peaks: {args.peak_tflops:g} TFLOP/s bf16, {args.peak_tbps:g} TB/s (H100, measured); "
        "%bw = weight bytes / time against the bandwidth peak, %flop = 2MKN / time against "
        "the bf16 peak")
  header = (f"{'M':>5} {'K':>5} {'N':>5} {'impl':>7} {'time_us':>9} {'vs_bf16':>8} "
            f"{'weight_GB/s':>11} {'%bw':>6} {'TFLOP/s':>8} {'%flop':>6} {'max_rel_err':>11}")
  print(header)
  print("-" * len(header))
  rng = np.random.default_rng(0)
  ok = True
  for k, n in shapes:
    codes = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
    packed = tm.pack_ternary(codes)
    alpha = jnp.float32(0.02)
    w_bf16 = (alpha * jnp.asarray(codes, jnp.float32)).astype(jnp.bfloat16)
    packed_bytes = packed.size
    for m in ms:
      x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
      t_bf16 = _time_loop(jnp.dot, x, w_bf16, reps=reps, trials=args.trials)
      print(_row(m, k, n, "bf16", t_bf16, t_bf16, 2 * k * n, "-", args))
      ref = np.asarray(tm.ternary_matmul(x, packed, alpha, impl="reference"), np.float32)
      scale = float(np.abs(ref).max()) or 1.0
      for impl in impls:
        def fn(xx, pk, al, impl=impl):
          return tm.ternary_matmul(xx, pk, al, impl=impl, interpret=interpret)
        try:
          y = np.asarray(jax.jit(fn)(x, packed, alpha), np.float32)
          err = float(np.abs(y - ref).max()) / scale
          t = _time_loop(fn, x, packed, alpha, reps=reps, trials=args.trials)
        except Exception as e:  # pylint: disable=broad-except
          ok = False
          print(f"{m:>5} {k:>5} {n:>5} {impl:>7} FAILED: {type(e).__name__}: {e}")
          continue
        ok &= err < 1e-2
        print(_row(m, k, n, impl, t, t_bf16, packed_bytes, f"{err:.2e}", args))
  if on_gpu:
    print("targets (H100): vs_bf16 >= 3.0 for M <= 16, >= 0.9 at M = 4096")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
