"""Benchmark: TerDiT deployment from packed 2-bit weights (checkpoint bytes, peak sampling memory).

    python benchmarks/bench_terdit_deploy.py [--config configs/terdit.py:600M_256] [--batches 1,8]
                                       [--sampler_steps 250] [--skip_sampler]

(a) Checkpoint bytes of TerDiT-600M (arXiv 2405.14854; `configs/terdit.py:600M_256`, the network of
    `terdit/model.py` with the shapes of Lucky-Lance/TerDiT `models.py` `DiT_Llama_600M_patch2`:
    dim 1536, 16 blocks, 32 heads, SwiGLU hidden 4096, patch 2 on 32x32x4 latents, adaLN from a
    1024-d condition, learned sigma): the export (`--mode=export`, a
    safetensors file of uint8 packed codes + fp32 alpha, biases and full-precision layers) against
    the same network's parameters as fp32 and bf16 safetensors files. Computed from abstract
    shapes with `common.weights.deployment.safetensors_nbytes`; the script first checks that formula
    against a real export of a small model of the same family (file size equal to the byte).
    Goal: the export at least 7x smaller than fp32 (the paper: about 10x).
(b) Peak memory of sampling, from XLA's compiled memory analysis on CPU (deterministic; no
    weights are materialised: everything is lowered from ShapeDtypeStructs): one denoiser
    forward (one denoising step) and the whole sampler of the config (`--sampler_steps` respaced
    DDPM steps with its classifier-free guidance), at batch 1 and 8, for the packed network
    (`--mode=sample` on an export: ternary layers through `kernels.ternary_matmul`'s Pallas kernel,
    in interpret mode on CPU) against the full-precision twin (`..._fp`) with fp32 weights and
    compute, and with bf16 weights and bf16 compute. The paper reports about 6x less memory.
    CPU caveats: XLA's CPU backend computes bf16 dots in fp32 (it converts the bf16 weights to
    fp32 temporaries), and interpret-mode Pallas copies each kernel's inputs and outputs into
    temporaries; both inflate "temp" on CPU relative to a GPU/TPU, where the kernel reads the
    packed weight in place.

"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common.weights import deployment
from common.training import sharding
from common.weights import tree_names
from common.training.experiment import Experiment, build_model, numerics_rules  # noqa: E402
from configs.base import load_config  # noqa: E402
from terdit.deploy import PackedTernaryDense  # noqa: E402


def experiments(spec: str) -> dict[str, tuple[Experiment, dict]]:
  """{network: (Experiment, abstract params)} for "packed" (the config deployed, as sampling from
  its export runs), "fp32" and "bf16" (its full-precision twin, `spec` + ",fp", with fp32 or bf16
  weights and compute). Everything abstract: no weight is materialised."""
  mesh = sharding.make_mesh(load_config(spec).mesh)
  out = {}
  packed = Experiment(load_config(spec), mesh, deployed=True)
  out["packed"] = (packed, packed.abstract_params)
  for dtype in ("float32", "bfloat16"):
    c = load_config(spec + ",fp")
    c.model.dtype = dtype
    exp = Experiment(c, mesh, deployed=True)  # no ternary layer: the network as trained, no optimizer
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype)),
                          exp.abstract_params)
    out["fp32" if dtype == "float32" else "bf16"] = (exp, params)
  return out


def sizes(spec: str) -> dict[str, int]:
  """Export, fp32 and bf16 file bytes of the config's network (`deployment.model_sizes`), plus
  "ternary": the number of ternary weights."""
  c = load_config(spec)
  key = jax.random.key(0)
  qat = nnx.eval_shape(lambda: build_model(c.model, key, numerics_rules(c)))
  packed = nnx.eval_shape(lambda: build_model(c.model, key, numerics_rules(c), deployed=True))
  out = deployment.model_sizes(nnx.to_pure_dict(nnx.state(qat, nnx.Param)),
                               nnx.to_pure_dict(nnx.state(packed)))
  out["ternary"] = sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(qat))
                       if type(v).__name__ == "TernaryKernel")
  return out


def check_formula_on_a_real_export() -> tuple[int, int]:
  """Exports the small TerDiT of `configs/terdit.py:runlocal` for real; returns (file bytes,
  formula bytes)."""
  c = load_config("configs/terdit.py:runlocal")
  m = build_model(c.model, jax.random.key(0), numerics_rules(c), deployed=True)
  with tempfile.TemporaryDirectory() as d:
    nbytes = deployment.save_export(d, c, m)
    on_disk = os.path.getsize(os.path.join(d, deployment.PARAMS_FILE))
  assert on_disk == nbytes
  formula = deployment.safetensors_nbytes(tree_names.flatten(nnx.to_pure_dict(nnx.state(m))))
  return on_disk, formula


def memory(exp: Experiment, params: dict, batch: int, *, sampler_steps: int = 0) -> dict[str, int]:
  """Compiled memory analysis of one denoiser forward (sampler_steps=0) or the config's whole
  sampler (`Experiment.generator`, with its guidance) at `batch` images."""
  x, cond = exp.example_inputs(batch)
  if sampler_steps:
    fn = exp.generator(num_steps=sampler_steps)
    args = (params, jax.ShapeDtypeStruct((), jax.random.key(0).dtype), {"x": x, "cond": cond})
  else:
    fn = jax.jit(lambda p, x, t, c: nnx.merge(exp.graphdef, p)(x, t, c))
    args = (params, x, jax.ShapeDtypeStruct((batch,), jnp.float32), cond)
  ma = fn.lower(*args).compile().memory_analysis()
  out = {"args": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
         "output": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes}
  out["peak"] = out["args"] + out["temp"] + out["output"] - out["alias"]
  return out


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except OSError:
    return "?"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/terdit.py:600M_256", help="a ternary TerDiT config")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--sampler_steps", type=int, default=250)
  ap.add_argument("--skip_sampler", action="store_true")
  ap.add_argument("--packed_impl", default="pallas", choices=("pallas", "reference"),
                  help="the packed layers' matmul (reference: jnp unpack + dot, one layer's weight "
                  "at a time, as the official deployment does)")
  ap.add_argument("--only", default="packed,bf16,fp32", help="networks for (b)")
  args = ap.parse_args()
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {_commit()}, "
        f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, {args.config}")

  on_disk, formula = check_formula_on_a_real_export()
  print(f"byte formula vs a real export (configs/terdit.py:runlocal): file {on_disk} B, formula "
        f"{formula} B: {'equal' if on_disk == formula else 'DIFFERENT'}")

  s = sizes(args.config)
  print(f"\n(a) {args.config}: {s['params'] / 1e6:.2f}M parameters, {s['ternary'] / 1e6:.2f}M ternary")
  print("| file | bytes | MiB | fp32 / file |")
  print("|---|---|---|---|")
  for k in ("export", "bf16", "fp32"):
    print(f"| {k} | {s[k]:,} | {s[k] / 2**20:,.1f} | {s['fp32'] / s[k]:.2f}x |")
  ratio = s["fp32"] / s["export"]
  print(f"goal >= 7x smaller than fp32: {'met' if ratio >= 7 else 'NOT met'} ({ratio:.2f}x)")

  nets = {k: v for k, v in experiments(args.config).items() if k in args.only.split(",")}
  if "packed" in nets:  # the matmul is a static attribute of the graph: set it, split again
    packed = nets["packed"][0]
    for _, node in nnx.iter_graph(packed.abstract_model):
      if isinstance(node, PackedTernaryDense):
        node.impl = args.packed_impl
    packed.graphdef = nnx.split(packed.abstract_model)[0]
  runs = [("one denoising step (forward)", 0)]
  if not args.skip_sampler:
    runs.append((f"whole sampler ({args.sampler_steps} steps, CFG)", args.sampler_steps))
  print(f"\n(b) peak memory, XLA compiled memory analysis (args + temp + output - alias); packed "
        f"layers impl={args.packed_impl}")
  print("| what | batch | network | args | temp | peak |")
  print("|---|---|---|---|---|---|")
  for what, steps in runs:
    for b in (int(v) for v in args.batches.split(",")):
      for k, (exp, params) in nets.items():
        r = memory(exp, params, b, sampler_steps=steps)
        print(f"| {what} | {b} | {k} | {mib(r['args'])} | {mib(r['temp'])} | {mib(r['peak'])} |",
              flush=True)


if __name__ == "__main__":
  main()
