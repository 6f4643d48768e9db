"""Train-step throughput and MFU of any config (fwd + bwd + optimizer + EMA, synthetic data).

Prints one table row per config: img/s, ms/step, achieved TFLOP/s and MFU against the H100's measured
800 TFLOP/s bf16 peak. Model FLOPs per image = 3 x the forward pass's XLA flops
(forward + backward, the usual MFU convention: rematerialised recomputation is not counted; an
unmasked forward, so masked MicroDiT steps read low); "step-FLOPs MFU" uses XLA's cost analysis of
the whole train step instead (masking and recomputation included). The step's peak device memory
(`memory_stats`, where the device reports it) stands next to `--mode=compile`'s prediction for the
same step (`common.training.memory.train_step_memory`). A spec may add `batch=N` and `precision=coat`.

  python benchmarks/bench_train_step.py             # the default GPU set below
  python benchmarks/bench_train_step.py --configs sid2_in256.py:batch=64 sid2_in512.py:p4,batch=64
  python benchmarks/bench_train_step.py --cpu_smoke # tiny runlocal configs, to check the script
"""

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common.training import sharding
from common.training.experiment import Experiment  # noqa: E402
from common.training.compile_report import cpu_step_flops  # noqa: E402
from common.training.memory import train_step_memory  # noqa: E402
from common.training.random_batch import random_batch  # noqa: E402
from common.training.summary import forward_flops  # noqa: E402

PEAK_TFLOPS = 800.0  # H100 bf16 dense matmul, measured
DEFAULT = ["sid2_in256.py:batch=64", "sid2_in512.py:p4,batch=64", "sid2_in512.py:p2,batch=32"]


def load(spec: str):
  """'terdit.py:600M_256_fp,batch=32,precision=coat' -> config; 'batch=' and 'precision=' are ours,
  the rest goes to get_config."""
  name, _, arg = spec.partition(":")
  parts = [a for a in arg.split(",") if a]
  ours = {a.split("=")[0]: a.split("=")[1] for a in parts if a.startswith(("batch=", "precision="))}
  cfg_arg = ",".join(a for a in parts if not a.startswith(("batch=", "precision=")))
  mod = importlib.import_module("configs." + name.removesuffix(".py"))
  c = mod.get_config(cfg_arg or None)
  with c.unlocked():
    if "batch" in ours:
      c.train.batch_size = int(ours["batch"])
    if "precision" in ours:
      c.precision = ours["precision"]
  return c


def bench(spec: str, warmup: int, iters: int) -> dict:
  c = load(spec)
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  b = c.train.batch_size
  x1, cond1 = exp.example_inputs(1)
  fwd = forward_flops(exp.abstract_model, (x1, jax.ShapeDtypeStruct((1,), jnp.float32), cond1))
  state = exp.init_state(0)
  batch = random_batch(exp, b)
  step = exp.train_step
  for i in range(warmup):
    state, met = step(state, batch, exp.step_key(i))
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(iters):
    state, met = step(state, batch, exp.step_key(warmup + i))
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t0) / iters
  tflops = 3 * fwd * b / dt / 1e12
  step_tflops = cpu_step_flops(c, b) / dt / 1e12
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
  return {"config": spec, "params_M": exp.num_params / 1e6, "fwd_gflop_img": fwd / 1e9,
          "img_s": b / dt, "ms": dt * 1e3, "tflops": tflops, "mfu": tflops / PEAK_TFLOPS,
          "step_mfu": step_tflops / PEAK_TFLOPS, "loss": float(met["loss"]),
          "predicted_gib": train_step_memory(exp)["total"] / 2**30,
          "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--configs", nargs="*", default=None)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--cpu_smoke", action="store_true", help="tiny runlocal configs on any backend")
  a = ap.parse_args()
  specs = a.configs or (["sid2_in256.py:runlocal,batch=8"] if a.cpu_smoke else DEFAULT)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}")
  print("| config | params (M) | fwd GFLOP/img (XLA) | img/s | ms/step | TFLOP/s | MFU vs 800 | "
        "step-FLOPs MFU | predicted GiB | peak GiB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for s in specs:
    r = bench(s, a.warmup if not a.cpu_smoke else 1, a.iters if not a.cpu_smoke else 2)
    print(f"| {r['config']} | {r['params_M']:.1f} | {r['fwd_gflop_img']:.1f} | {r['img_s']:.1f} | "
          f"{r['ms']:.1f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | {100 * r['step_mfu']:.1f}% | "
          f"{r['predicted_gib']:.2f} | {r['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
