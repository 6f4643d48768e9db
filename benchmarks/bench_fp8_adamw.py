"""Benchmark: fused FP8 AdamW (kernels/fp8_adamw.py) against optax.adamw with fp32 states.

A step runs under one jit with params and optimizer state donated and the gradients an argument
(nothing is a closed-over constant). Two ways to take it:

  update:  `tx.update` + `optax.apply_updates` (optax's convention: the update is written, then read
           again to update the parameters);
  apply:   `common.training.optim.apply_gradients`, which uses the fused kernel's in-place form (parameters
           and moments aliased to the kernel's outputs) -- the trainer's path.

Bytes per parameter counted for the achieved bandwidth (read + written):

  optax.adamw (fused by XLA): params r/w 8 + grads r 4 + m, v fp32 r/w 16          = 28 B
  fp8_adamw apply (in place): params r/w 8 + grads r 4 + m, v fp8 r/w 4
                              + (s, k, c) r/w 2*2*12/128                           = 16.375 B
  fp8_adamw update path:      the above + the update written and read again (8 B)  = 24.375 B

The default tree on GPU/TPU is ~1B parameters (64 leaves of 4096x4096); elsewhere a ~1M-parameter
tree (the Pallas kernel then runs in interpret mode) so the script can be smoke-tested on CPU.
Percentages are against the H100's measured elementwise read+write peak (2.94 TB/s, --peak_tbps).

  python benchmarks/bench_fp8_adamw.py [--params N] [--leaf_cols C] [--steps S] [--peak_tbps 2.94]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from coat.optim import fp8_adamw, state_bytes  # pylint: disable=g-import-not-at-top
from common.training.optim import apply_gradients  # pylint: disable=g-import-not-at-top

OPTAX_BYTES = 28.0
FP8_BYTES = 8.0 + 4.0 + 4.0 + 2 * 2 * 12 / 128
FP8_UPDATE_BYTES = FP8_BYTES + 8.0


def make_tree(n_params: int, cols: int) -> dict[str, jax.Array]:
  """Leaves of [rows, cols] fp32 with rows <= cols, about n_params in all."""
  rows = min(cols, max(1, n_params // cols))
  n_leaves = max(1, round(n_params / (rows * cols)))
  return {f"w{i:03d}": jnp.full((rows, cols), 0.01 * (i + 1), jnp.float32)
          for i in range(n_leaves)}


def time_step(tx: optax.GradientTransformation, params, grads, steps: int,
              mode: str) -> tuple[float, int]:
  """Mean ms per optimizer step, and the optimizer state's bytes.

  mode "update": tx.update + optax.apply_updates; "apply": common.training.optim.apply_gradients.
  """
  state = tx.init(params)
  sbytes = state_bytes(state)

  def step(p, s, g):
    if mode == "apply":
      return apply_gradients(tx, g, s, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params)
  params, state = step(params, state, grads)  # compile + warm up
  jax.block_until_ready((params, state))
  t0 = time.perf_counter()
  for _ in range(steps):
    params, state = step(params, state, grads)
  jax.block_until_ready((params, state))
  return 1e3 * (time.perf_counter() - t0) / steps, sbytes


def main(argv=None):
  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=int, default=2**30 if on_gpu else 2**20)
  parser.add_argument("--leaf_cols", type=int, default=4096 if on_gpu else 1024)
  parser.add_argument("--steps", type=int, default=20 if on_gpu else 3)
  parser.add_argument("--peak_tbps", type=float, default=2.94,
                      help="measured elementwise read+write peak (H100: 2.94 TB/s)")
  parser.add_argument("--block_rows", type=int, default=None)
  args = parser.parse_args(argv)

  params = make_tree(args.params, args.leaf_cols)
  n = sum(p.size for p in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  interpret = backend not in ("gpu", "tpu")
  impl = "pallas"
  note = " (interpret)" if interpret else ""

  def fp8(**kw):
    return fp8_adamw(1e-4, weight_decay=0.1, impl=impl, interpret=interpret,
                     block_rows=args.block_rows, **kw)

  rows = [
      ("optax.adamw (fp32 m, v)", optax.adamw(1e-4, weight_decay=0.1), "update", OPTAX_BYTES),
      ("fp8_adamw jnp (XLA)", fp8_adamw(1e-4, weight_decay=0.1, impl="jnp"), "apply", FP8_BYTES),
      ("fp8_adamw pallas, update path" + note, fp8(), "update", FP8_UPDATE_BYTES),
      ("fp8_adamw pallas, in place" + note, fp8(), "apply", FP8_BYTES),
      ("fp8_adamw pallas, in place, no NaN chk" + note, fp8(skip_nonfinite=False), "apply",
       FP8_BYTES),
  ]
  print(f"device: {jax.devices()[0].device_kind} ({backend}); params: {n / 1e6:.1f}M in "
        f"{len(params)} leaves; jax {jax.__version__}; {args.steps} timed steps")
  print(f"{'optimizer':50s} {'ms/step':>9s} {'speedup':>8s} {'GB/s':>8s} {'% peak':>7s} "
        f"{'state B/param':>13s}")
  base = None
  for name, tx, mode, bytes_per_param in rows:
    ms, sbytes = time_step(tx, params, grads, args.steps, mode)
    base = base or ms
    gbps = bytes_per_param * n / (ms * 1e-3) / 1e9
    print(f"{name:50s} {ms:9.3f} {base / ms:7.2f}x {gbps:8.1f} "
          f"{100 * gbps / (args.peak_tbps * 1e3):6.1f}% {sbytes / n:13.4f}")


if __name__ == "__main__":
  main()
