"""`--mode=compile`: compile a config's real train step for hardware this machine does not have, and
say whether it fits, what it costs and what the compiler made of it.

The step is the one `--mode=train` runs (`Experiment.train_step`, the config's mesh rules, its
global batch and `train.grad_accum_steps`; `lower_train`) or, for an export, the deployed network's
sampling call (`lower_sampling`), lowered for abstract inputs sharded over the target's devices
(`common.training.targets`) inside `kernels.target.compiling_for(mesh)`, so every kernel choice is the
target's. Nothing is allocated and no data is read.

The report (`compile_for_target`) holds:

* per-device memory from XLA's compiled memory analysis (parameters, EMA, optimizer state, batch,
  temporaries, total) against the target's capacity; a TPU compile that does not fit raises
  `CompileTimeHbmOom`, whose figures are reported instead;
* FLOPs per optimizer step: XLA's cost analysis of the compiled step where the compiler gives it
  (TPU: per device, times the devices), else the cost analysis of the same step lowered for this
  CPU (GPU compiles give none). Pallas kernels count zero either way (opaque custom calls);
* the optimized HLO's custom calls by target (cuDNN, cuBLAS, Mosaic `tpu_custom_call`, Triton) and
  its dot/convolution instructions with float8 operands, inside fusions too (COAT's FP8 GEMMs);
* step time, whole-run time and cost at the given MFUs: FLOPs / (devices x peak x MFU).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import ml_collections

from common.training import memory
from common.training import sharding
from common.training.experiment import Experiment
from common.training.targets import GiB, Target
from kernels import target as kernel_target

HEADROOM = 0.10  # a config "fits" when it leaves this share of the device memory free
MFUS = (0.4, 0.6)

_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
# One HLO instruction: "[ROOT] %name = TYPE opcode(%operand, ...)"; operands print without types.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(([^()]*)\)", re.M)
_F8 = re.compile(r"^f8e\w+\[")
_HBM_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\).*?available HBM "
                      r"\(([\d.]+)([KMGT]?)\)", re.S)
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def hlo_summary(hlo_text: str) -> dict[str, Any]:
  """{"custom_calls": {target: count}, "dots": n, "f8_dots": n} of optimized HLO text: every
  dot/convolution instruction, in every computation (fusion bodies included), and those with a
  float8 operand."""
  types, dot_operands = {}, []
  for name, type_, opcode, operands in _INSTR.findall(hlo_text):
    types[name] = type_  # instruction names are unique in an HLO module
    if opcode in ("dot", "convolution"):
      dot_operands.append([o.strip().lstrip("%") for o in operands.split(",")])
  dots = len(dot_operands)
  f8 = sum(any(_F8.match(types.get(o, "")) for o in ops) for ops in dot_operands)
  calls = collections.Counter(_CUSTOM_CALL.findall(hlo_text))
  f8 += sum(n for t, n in calls.items() if "f8" in t.lower())  # cuBLASLt f8 GEMMs
  return {"custom_calls": dict(sorted(calls.items())), "dots": dots, "f8_dots": f8}


@dataclasses.dataclass
class Step:
  """One jitted step lowered for abstract inputs on a mesh.

  Attributes:
    lowered: the `jax.stages.Lowered` step.
    inputs: {name: abstract tree} of its inputs by role ("params", "ema", "optimizer_state",
      "batch"), for their per-device bytes.
    runs: how many times a whole run executes it (train: `train.steps`; sampling: the batches of
      `eval.num_samples` images).
  """
  lowered: Any
  inputs: dict[str, Any]
  runs: int


def lower_train(config: ml_collections.ConfigDict, mesh, batch_size: int) -> Step:
  """The train step `--mode=train` runs (`Experiment.train_step`), for the global batch."""
  exp = Experiment(config, mesh)
  with kernel_target.compiling_for(mesh):  # the lowering only: flax's abstract init reads the mesh
    lowered, batch = memory.lower_train_step(exp, batch_size)
  st = exp.abstract_state
  return Step(lowered, {"params": st["params"], "ema": st["ema"],
                        "optimizer_state": st["opt_state"], "batch": batch},
              int(config.train.steps))


def lower_sampling(config: ml_collections.ConfigDict, mesh, batch_size: int) -> Step:
  """The deployed network's sampling call (`Experiment(deployed=True).generator()`: every step of
  `config.sample`'s sampler on one batch of noise), for a batch of `batch_size` samples."""
  exp = Experiment(config, mesh, deployed=True)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        exp.abstract_params, exp.param_shardings)
  x, cond = exp.example_inputs(batch_size)  # placed as the generator places them (in_shardings)
  batch = {"x": x, "cond": cond}
  with kernel_target.compiling_for(mesh):
    lowered = exp.generator().lower(params, jax.random.key(0), batch)
  n = int(config.eval.get("num_samples", 0) or config.sample.num_samples)
  return Step(lowered, {"params": params, "batch": batch}, -(-n // batch_size))


def cpu_flops(lower: Callable[..., Step], config: ml_collections.ConfigDict,
              batch_size: int) -> float:
  """FLOPs of a whole step (`lower_train` or `lower_sampling`, global batch) from XLA's cost
  analysis of the step lowered, not compiled, for one CPU device."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for axis in sharding.AXES:
      c.mesh[axis] = 1
  cpu = jax.local_devices(backend="cpu")[:1]
  cost = lower(c, sharding.make_mesh(c.mesh, cpu), batch_size).lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def cpu_step_flops(config: ml_collections.ConfigDict, batch_size: int) -> float:
  """FLOPs of the whole train step (global batch), `cpu_flops` of `lower_train`."""
  return cpu_flops(lower_train, config, batch_size)


def _hbm_oom(e: Exception) -> tuple[int, int] | None:
  """(temporaries bytes, available bytes) of a TPU CompileTimeHbmOom, None for other errors."""
  m = _HBM_OOM.search(str(e))
  if "CompileTimeHbmOom" not in str(e) or not m:
    return None
  return (int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)]))


def compile_for_target(config: ml_collections.ConfigDict, tgt: Target, *,
                       sampling: bool = False, batch_size: int | None = None,
                       mfus: Sequence[float] = MFUS, headroom: float = HEADROOM) -> dict[str, Any]:
  """Compiles `config`'s train step (or, with `sampling`, its deployed sampling call) for `tgt`
  and reports (module docstring).

  Returns:
    A JSON-ready dict: "target", "devices", "device_kind", "step" ("train" or "sampling"),
    "global_batch", "per_device_gib", "capacity_gib", "headroom", "fits", "memory" ({key: GiB},
    common.training.memory.KEYS), "flops_per_step", "flops_source", "custom_calls", "dots", "f8_dots",
    "estimates" (per MFU: step seconds, run days, cost in USD; a sampling run draws
    `eval.num_samples` images), "advice" (what to change when it does not fit).
  """
  mesh = sharding.make_mesh(config.mesh, tgt.devices)
  lower = lower_sampling if sampling else lower_train
  b = int(batch_size or (config.sample.batch_size if sampling else config.train.batch_size))
  report: dict[str, Any] = {"target": tgt.name, "devices": tgt.num_devices,
                            "device_kind": tgt.device_kind, "step": "sampling" if sampling else
                            "train", "global_batch": b,
                            "capacity_gib": round(tgt.hbm_bytes / GiB, 2)}
  compiled = None
  step = lower(config, mesh, b)
  with kernel_target.compiling_for(mesh):
    try:
      compiled = step.lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      oom = _hbm_oom(e)
      if oom is None:
        raise
  mem = {k: memory.tree_shard_bytes(v) for k, v in step.inputs.items()}
  if compiled is not None:
    ma = memory.compiled_memory(compiled)
    mem.update(arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
               aliased=int(ma.alias_size_in_bytes), temporaries=int(ma.temp_size_in_bytes))
    mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
  else:  # the TPU compiler's own figures of what did not fit
    mem.update(arguments=sum(mem.values()), temporaries=oom[0])
    mem["total"] = mem["arguments"] + mem["temporaries"]
  per_device = mem["total"]
  report["memory"] = {k: round(v / GiB, 4) for k, v in mem.items()}
  report["per_device_gib"] = round(per_device / GiB, 4)
  report["headroom"] = round(1 - per_device / tgt.hbm_bytes, 3)
  report["fits"] = bool(compiled is not None and per_device <= (1 - headroom) * tgt.hbm_bytes)

  flops, source = None, "compiler"
  if compiled is not None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
      flops = float(cost["flops"]) * tgt.num_devices  # the partitioned program is one device's
  if flops is None:
    flops, source = cpu_flops(lower, config, b), "cpu cost analysis"
  report["flops_per_step"] = flops
  report["flops_source"] = source
  report.update(hlo_summary(compiled.as_text()) if compiled is not None else
                {"custom_calls": {}, "dots": 0, "f8_dots": 0})
  report["estimates"] = {}
  for mfu in mfus:
    step_s = flops / (tgt.num_devices * tgt.peak_flops * mfu)
    hours = step.runs * step_s / 3600
    report["estimates"][f"mfu_{mfu:g}"] = {
        "step_s": float(f"{step_s:.4g}"), "run_days": float(f"{hours / 24:.4g}"),
        "cost_usd": round(hours * tgt.num_devices * tgt.price_per_device_hour)}
  report["advice"] = "" if report["fits"] else advice(config, tgt, mem, b, headroom, sampling)
  return report


def advice(config: ml_collections.ConfigDict, tgt: Target, mem: dict[str, int], batch_size: int,
           headroom: float = HEADROOM, sampling: bool = False) -> str:
  """One line: by how much the step misses the target's memory, and what would bring it in."""
  budget = (1 - headroom) * tgt.hbm_bytes
  short = mem["total"] - budget
  fixed = mem["total"] - mem["temporaries"]  # state and batch: only sharding shrinks them
  accum = int(config.train.get("grad_accum_steps", 1))
  data_parallel = math.prod(int(config.mesh.get(a, 1)) for a in ("data", "fsdp")
                            if int(config.mesh.get(a, 1)) > 0) or 1
  per_device = batch_size // max(tgt.num_devices, 1)
  tips = []
  if sampling and fixed < budget:
    fit = int(batch_size * (budget - fixed) / max(mem["total"] - fixed, 1))
    tips.append(f"sample.batch_size={max(fit, 1)} (now {batch_size})")
  elif fixed < budget and mem["temporaries"] > 0:
    k = 2 ** math.ceil(math.log2(max(mem["temporaries"] / (budget - fixed), 1.0)))
    k *= accum
    if batch_size % k == 0:
      tips.append(f"train.grad_accum_steps={k} (micro-batches of {batch_size // k}; the "
                  "temporaries scale with the micro-batch)")
    tips.append(f"a per-device batch of about {max(per_device * budget // mem['total'], 1):.0f} "
                f"(now {per_device})")
  if not sampling and not config.model.get("remat", True):
    tips.append("model.remat=True (recompute block activations in the backward pass)")
  if fixed >= budget or int(config.mesh.get("fsdp", 1)) != -1:
    tips.append(f"mesh.fsdp=-1 (shard parameters and optimizer state over all "
                f"{tgt.num_devices} devices; data-parallel size now {data_parallel})")
  return (f"needs {mem['total'] / GiB:.2f} GiB per device, {budget / GiB:.2f} GiB is "
          f"{1 - headroom:.0%} of {tgt.hbm_bytes / GiB:.2f} GiB on {tgt.device_kind} "
          f"({short / GiB:.2f} GiB short); try " + ", or ".join(tips) + ".")


def report_lines(report: dict[str, Any]) -> list[str]:
  """The human-readable part of `--mode=compile`'s output (the JSON line follows it)."""
  m = report["memory"]
  what = "train step" if report["step"] == "train" else "deployed sampling call"
  lines = [f"compiled the {what} for {report['target']} ({report['devices']} x "
           f"{report['device_kind']}), global batch {report['global_batch']}:"]
  for k in memory.KEYS:
    if k in m:
      lines.append(f"  {k:<16} {memory.format_bytes(m[k] * GiB):>12} per device")
  lines.append(f"  capacity         {report['capacity_gib']:>8.2f} GiB per device: "
               f"{'fits' if report['fits'] else 'does NOT fit'} "
               f"(headroom {report['headroom']:.0%})")
  lines.append(f"  FLOPs per step   {report['flops_per_step']:.4g} ({report['flops_source']}); "
               f"{report['dots']} dots, {report['f8_dots']} with float8 operands")
  if report["custom_calls"]:
    lines.append("  custom calls     " + ", ".join(f"{k} x{v}" for k, v in
                                                  report["custom_calls"].items()))
  for name, e in report["estimates"].items():
    lines.append(f"  at {name.replace('mfu_', '')} MFU: {e['step_s']:.4g} s/step, "
                 f"{e['run_days']:.2f} days for the run, ${e['cost_usd']:,}")
  return lines
