"""Benchmark: FID and precision/recall on random Inception-sized features (common/eval/metrics.py).

Times the pieces of an ADM-style evaluation once the features exist: the streaming mean/covariance
of N x D features (float64), the Frechet distance (scipy's sqrtm of a D x D product) and precision/
recall with k = 3 (three N x N squared-distance passes in row blocks: two for the radii, one for
coverage; 2 N^2 D flops each). Features are non-negative like `pool_3` (|N(0, 1)| * 0.5).

  python benchmarks/bench_eval_metrics.py [--num 50000] [--pr_num 10000] [--dim 2048] [--dtype float16]

`--pr_num` may be smaller than `--num` (precision/recall costs N^2); the script then also prints the
N^2 extrapolation to `--num`. Each figure is wall-clock seconds and, in brackets, the CPU seconds of
this process (all threads): on a shared machine the latter is the fairer number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from common.eval import metrics  # pylint: disable=g-import-not-at-top


class _Timer:
  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

  def __str__(self):
    return f"{self.wall:.1f} s ({self.cpu:.1f} s CPU)"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=50000, help="samples per set for FID")
  parser.add_argument("--pr_num", type=int, default=None, help="samples per set for P/R (default --num)")
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                      help="precision/recall distance precision (ADM: float16)")
  parser.add_argument("--row_batch_size", type=int, default=1024)
  args = parser.parse_args()
  pr_num = args.pr_num or args.num
  rng = np.random.default_rng(0)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, N={args.num}, D={args.dim}, "
        f"P/R N={pr_num}, {args.dtype}", flush=True)

  a = (np.abs(rng.standard_normal((args.num, args.dim), dtype=np.float32)) * 0.5)
  b = (np.abs(rng.standard_normal((args.num, args.dim), dtype=np.float32)) * 0.55)
  with _Timer() as t_stats:
    mu1, s1 = metrics.feature_statistics(a)
  mu2, s2 = metrics.feature_statistics(b)
  print(f"statistics (mean + cov of {args.num} x {args.dim}, one set): {t_stats}", flush=True)
  with _Timer() as t_fid:
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
  print(f"frechet distance (sqrtm {args.dim} x {args.dim}): {t_fid}  (fid {fid:.4f})", flush=True)

  dtype = jnp.dtype(args.dtype)
  small_a, small_b = a[:min(pr_num, 2048)], b[:min(pr_num, 2048)]
  metrics.precision_recall(small_a, small_b, dtype=dtype, row_batch_size=args.row_batch_size)
  with _Timer() as t_pr:
    p, r = metrics.precision_recall(a[:pr_num], b[:pr_num], dtype=dtype,
                                    row_batch_size=args.row_batch_size)
  flops = 3 * 2.0 * pr_num * pr_num * args.dim
  print(f"precision/recall ({pr_num} vs {pr_num}): {t_pr} incl. compiling the large blocks, "
        f"{flops / t_pr.wall / 1e9:.0f} GFLOP/s  (precision {p:.4f}, recall {r:.4f})", flush=True)
  scale = (args.num / pr_num) ** 2
  if scale != 1:
    print(f"precision/recall at {args.num} (N^2 extrapolation): ~{t_pr.wall * scale:.0f} s "
          f"(~{t_pr.cpu * scale:.0f} s CPU)", flush=True)
  wall = 2 * t_stats.wall + t_fid.wall + t_pr.wall * scale
  cpu = 2 * t_stats.cpu + t_fid.cpu + t_pr.cpu * scale
  print(f"total FID + P/R at N={args.num}: ~{wall:.0f} s (~{cpu:.0f} s CPU)", flush=True)


if __name__ == "__main__":
  main()
