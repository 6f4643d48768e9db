"""Where a CPU demo's time goes: the train step, sampling and the FID Inception forward.

For each of the three compiled calls of a demo (`--config`: configs/sid2_digits.py for `make demo`,
configs/sid2_t2i_fashion.py for `make t2i-demo`, configs/microdit.py:fashion for `make
microdit-demo`, with `--set key=value` overrides such as the latent demos' autoencoder and data
paths) it prints XLA's FLOPs (`cost_analysis` of the compiled call), the compile time, the time of
a few calls after compiling, the achieved GFLOP/s, and that rate as a fraction of an sgemm (numpy
and jnp, 2048^3 float32) timed in the same process just before: a ratio taken under the same load,
so it stays meaningful on a shared machine where absolute seconds do not. It also counts XLA
compilations (the `/jax/core/compile/backend_compile_duration` event) while each call runs again,
to show that nothing recompiles per call.

Sampling FLOPs: XLA's cost analysis counts a while-loop body once, so the sampler's rate uses
(network forward FLOPs per sample) x (batch) x (network calls per sample: one per evaluation of
the sampler, two for those inside the CFG guidance interval). The host work of a train step (data
iterator and batch placement) is timed on its own.

  python benchmarks/bench_demo_profile.py [--config configs/X.py[:arg]] [--set key=value ...]
      [--iters 3] [--inception_batch 150] [--inception_size 8] [--sample_batch 500]
      [--skip train sample inception]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common.data import make_train_iterator  # noqa: E402
from common.diffusion import parametrization as param  # noqa: E402
from common.diffusion import recipes  # noqa: E402
from common.diffusion import samplers  # noqa: E402
from common.diffusion import schedules  # noqa: E402
from common.training import sharding  # noqa: E402
from common.training.experiment import Experiment  # noqa: E402
from common.training.random_batch import random_batch  # noqa: E402
from common.training.summary import forward_flops  # noqa: E402
from configs.base import load_config, override  # noqa: E402

_COMPILES = [0]


def _count(event: str, duration: float, **_) -> None:
  del duration
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


def sgemm_gflops(n: int = 2048, iters: int = 5) -> tuple[float, float]:
  """(numpy, jnp) float32 n^3 matmul GFLOP/s, best of `iters`."""
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  best_np = min(_timed(lambda: a @ a) for _ in range(iters))
  f = jax.jit(lambda x: x @ x)
  aj = jnp.asarray(a)
  f(aj).block_until_ready()
  best_j = min(_timed(lambda: f(aj).block_until_ready()) for _ in range(iters))
  return 2 * n**3 / best_np / 1e9, 2 * n**3 / best_j / 1e9


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def evaluation_logsnrs(exp: Experiment) -> np.ndarray:
  """The logSNR of every network evaluation of one sample, as the recipe's sampler makes them:
  VP (DDPM/DDIM), one per step; EDM Heun (`samplers.edm_heun_sample`, deterministic), one at each
  step's sigma and one more (the Heun correction) at the next sigma of all steps but the last."""
  s, recipe = exp.config.sample, exp.recipe
  n = int(s.num_steps)
  if isinstance(recipe, recipes.EDMDiffusion):
    sig = np.asarray(schedules.edm_sigmas(n, recipe.sigma_min, recipe.sigma_max, recipe.rho))
    evaluated = np.concatenate([sig[:n], sig[1:n]])
    return np.asarray(param.edm_logsnr(jnp.asarray(evaluated), recipe.sigma_data))
  return np.asarray(samplers.vp_logsnr_grid(recipe.schedule, n))


def network_evaluations(exp: Experiment) -> int:
  """Network calls per sample: one per evaluation, two (CFG) at those inside the guidance interval
  (`samplers.guided_apply` skips the unconditional branch outside it)."""
  s = exp.config.sample
  lams = evaluation_logsnrs(exp)
  if float(s.guidance_scale) == 1.0:
    return len(lams)
  lo, hi = s.get("guidance_interval") or (-np.inf, np.inf)
  return int(len(lams) + np.sum((lams >= lo) & (lams <= hi)))


def host_batch_seconds(c, exp: Experiment, n: int = 50) -> float:
  """Seconds of host work per train step: the data iterator, `model_batch` and the sharded
  `global_batch`, as the trainer's loop does them (`common.training.trainer.train`)."""
  data = make_train_iterator(c.data, global_batch_size=c.train.batch_size, seed=c.seed,
                             process_index=0, process_count=1)
  jax.block_until_ready(sharding.global_batch(exp.model_batch(next(data)), exp.mesh, exp.rules))
  t0 = time.perf_counter()
  for _ in range(n):
    batch = sharding.global_batch(exp.model_batch(next(data)), exp.mesh, exp.rules)
  jax.block_until_ready(batch)
  return (time.perf_counter() - t0) / n


def profile(name: str, jitted, args: tuple, iters: int, flops: float | None = None) -> dict:
  """Compile time (the first call less a later one), XLA flops, seconds per call (mean of
  `iters` after the first), compilations during those calls."""
  lowered = jitted.lower(*args)
  cost = lowered.cost_analysis()  # of the HLO, without compiling
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
  t0 = time.perf_counter()
  jax.block_until_ready(jitted(*args))  # compiles, then runs once
  t_first = time.perf_counter() - t0
  before = _COMPILES[0]
  t0 = time.perf_counter()
  for _ in range(iters):
    out = jitted(*args)
  jax.block_until_ready(out)
  dt = (time.perf_counter() - t0) / iters
  return {"name": name, "compile_s": max(t_first - dt, 0.0), "xla_flops": xla_flops,
          "flops": flops or xla_flops, "s": dt, "calls": iters,
          "compiles_after": _COMPILES[0] - before}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/sid2_digits.py",
                  help="the demo's config, configs/X.py[:arg] (default: make demo's)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override, e.g. --set data.path=workdirs/fashion_latents")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--inception_batch", type=int, default=150)
  ap.add_argument("--sample_batch", type=int, default=500)
  ap.add_argument("--inception_size", type=int, default=8,
                  help="side of the judged images (8: digits, 28: Fashion-MNIST)")
  ap.add_argument("--skip", nargs="*", default=[], choices=["train", "sample", "inception"])
  a = ap.parse_args()
  jax.monitoring.register_event_duration_secs_listener(_count)
  print(f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
  c = override(load_config(a.config), a.set)
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  rows = []
  x1, cond1 = exp.example_inputs(1)
  fwd = forward_flops(exp.abstract_model, (x1, jax.ShapeDtypeStruct((1,), jnp.float32), cond1))
  print(f"network forward: {fwd / 1e6:.1f} MFLOP/image", flush=True)
  if "train" not in a.skip:
    state = exp.init_state(0)
    batch = random_batch(exp, c.train.batch_size)
    step = jax.jit(exp._train_step)  # pylint: disable=protected-access  # no donation: re-callable
    rows.append(profile(f"train step (batch {c.train.batch_size})", step,
                        (state, batch, exp.step_key(0)), a.iters))
    host = host_batch_seconds(c, exp)
    print(f"host work per train step (data, model_batch, global_batch): {1e3 * host:.2f} ms",
          flush=True)
  if "sample" not in a.skip:
    params = exp.init_state(0)["ema"]
    b = a.sample_batch
    batch, _ = exp.preview_batch(b)
    nfe = network_evaluations(exp)
    est = fwd * b * nfe
    rows.append(profile(f"sampling (batch {b}, {c.sample.num_steps} steps, {nfe} NFE)",
                        exp.generator(), (params, jax.random.key(0), batch), 1, flops=est))
  if "inception" not in a.skip:
    from common.eval.features import fid_network  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    net = fid_network()
    graphdef, nstate = nnx.split(net)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    size = a.inception_size
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (a.inception_batch, size, size, 1),
                                                      dtype=np.uint8))
    rows.append(profile(f"FID Inception (batch {a.inception_batch}, {size}x{size} -> 299x299)", fn,
                        (nstate, x), a.iters))
  gnp, gj = sgemm_gflops()
  print(f"sgemm 2048^3 float32, same process: numpy {gnp:.1f} GFLOP/s, jnp {gj:.1f} GFLOP/s "
        f"(load average now {os.getloadavg()[0]:.1f})")
  print("| call | compile s | XLA GFLOP/call | GFLOP/call used | s/call | GFLOP/s | vs jnp sgemm | "
        "compiles in the timed calls |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    rate = r["flops"] / r["s"] / 1e9
    print(f"| {r['name']} | {r['compile_s']:.1f} | {r['xla_flops'] / 1e9:.1f} | "
          f"{r['flops'] / 1e9:.1f} | {r['s']:.3f} | {rate:.1f} | {100 * rate / gj:.0f}% | "
          f"{r['compiles_after']} in {r['calls']} |")


if __name__ == "__main__":
  main()
