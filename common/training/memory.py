"""Train-step memory per device, read before running: XLA's compiled memory analysis.

`train_step_memory(exp)` lowers and compiles `exp.train_step` for abstract inputs (the train
state's ShapeDtypeStructs with their shardings, a batch of `example_inputs` sharded like
`common.training.sharding.global_batch` shards it), so nothing is allocated and no data is needed. On CPU the
analysis is deterministic; on GPU/TPU it is the same compiler's plan for that device.

Figures (bytes per device):

* `params`, `ema`, `optimizer_state`, `batch`: the per-device shards of the step's inputs
  (from their shardings: a leaf sharded S ways counts 1/S of its bytes);
* `arguments`, `outputs`, `aliased`: XLA's sizes of all inputs, all outputs and of the outputs
  written into donated input buffers (the new state reuses the old state's memory);
* `temporaries`: XLA's temporary buffers: the activations saved for the backward pass, the
  gradients, and the optimizer's and the network's intermediates;
* `total` = arguments + outputs - aliased + temporaries: what the step holds at once (XLA's own
  peak estimate, as `jax`'s memory statistics compute it).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.training import sharding

KEYS = ("params", "ema", "optimizer_state", "batch", "arguments", "outputs", "aliased",
        "temporaries", "total")


def _shard_bytes(x: Any) -> int:
  """Bytes of one device's shard of a ShapeDtypeStruct (or array) with a sharding."""
  shape = tuple(x.shape)
  s = getattr(x, "sharding", None)
  if s is not None and shape:
    shape = s.shard_shape(shape)
  return int(math.prod(shape)) * jnp.dtype(x.dtype).itemsize


def tree_shard_bytes(tree: Any) -> int:
  """Per-device bytes of a tree of sharded arrays or ShapeDtypeStructs."""
  return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def abstract_batch(exp, batch_size: int) -> dict:
  """{"x", "cond"} ShapeDtypeStructs of `batch_size` examples, sharded as the trainer's batches
  (leading axis over the mesh axes of the logical `batch` axis)."""
  x, cond = exp.example_inputs(batch_size)

  def place(s):
    return jax.ShapeDtypeStruct(s.shape, s.dtype,
                                sharding=sharding.batch_sharding(exp.mesh, exp.rules, len(s.shape)))
  return {"x": place(x), "cond": jax.tree.map(place, cond)}


def compiled_memory(compiled: Any) -> Any:
  """XLA's memory analysis of a compiled computation (`jax.stages.Compiled`)."""
  ma = compiled.memory_analysis()
  if isinstance(ma, (list, tuple)):  # one analysis per computation on some jax versions
    ma = ma[0]
  return ma


def temporaries_mib(fn: Any, *args: Any, donate_argnums: Any = ()) -> float:
  """MiB of XLA temporaries of `jax.jit(fn, donate_argnums=...)` compiled for `args` (arrays or
  ShapeDtypeStructs); nothing runs."""
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  return compiled_memory(compiled).temp_size_in_bytes / 2**20


def lower_train_step(exp, batch_size: int | None = None) -> tuple[Any, dict]:
  """(`jax.stages.Lowered` of `exp.train_step` for abstract inputs, the abstract batch).

  Args:
    exp: the experiment (its config, mesh and optimizer decide the step).
    batch_size: global batch; default `config.train.batch_size`.
  """
  b = int(batch_size or exp.config.train.batch_size)
  batch = abstract_batch(exp, b)
  return exp.train_step.lower(exp.abstract_state, batch, jax.random.key(0)), batch


def step_memory(exp, compiled: Any, batch: dict) -> dict[str, int]:
  """Per-device memory of the compiled train step of `exp` (`lower_train_step(...)[0].compile()`).

  Returns:
    {key: bytes per device} for the keys of the module docstring (`KEYS`), plus "devices" (mesh
    size) and "batch_size" (global).
  """
  ma = compiled_memory(compiled)
  st = exp.abstract_state
  out = {
      "params": tree_shard_bytes(st["params"]),
      "ema": tree_shard_bytes(st["ema"]),
      "optimizer_state": tree_shard_bytes(st["opt_state"]),
      "batch": tree_shard_bytes(batch),
      "arguments": int(ma.argument_size_in_bytes),
      "outputs": int(ma.output_size_in_bytes),
      "aliased": int(ma.alias_size_in_bytes),
      "temporaries": int(ma.temp_size_in_bytes),
  }
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  out["devices"] = int(np.prod(list(exp.mesh.shape.values())))
  out["batch_size"] = int(jax.tree.leaves(batch)[0].shape[0])
  return out


def train_step_memory(exp, batch_size: int | None = None) -> dict[str, int]:
  """Per-device memory of one train step of `exp` (a `common.training.experiment.Experiment`), from XLA's
  compiled memory analysis: `step_memory` of the step compiled for `batch_size` (default
  `config.train.batch_size`)."""
  lowered, batch = lower_train_step(exp, batch_size)
  return step_memory(exp, lowered.compile(), batch)


def format_bytes(n: float) -> str:
  """n bytes in GiB, MiB, KiB or B, two decimals."""
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def memory_lines(mem: dict[str, int]) -> list[str]:
  """Human-readable lines of `train_step_memory`'s figures."""
  lines = [f"train-step memory per device (global batch {mem['batch_size']}, "
           f"{mem['devices']} device(s); XLA memory analysis):"]
  for k in KEYS:
    lines.append(f"  {k:<16} {format_bytes(mem[k]):>12}")
  return lines
