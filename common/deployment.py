"""Deployment: a network's inference form, written to and read from an export folder.

A numerics implementation (common/numerics.py) may define `deployed(self) -> nnx.Module`, the
layer's inference form: TerDiT's `TernaryDense` returns a layer that holds 2-bit packed codes and
runs a packed matmul. `deploy(model)` swaps every such layer in place; `common` names none of
them, so any family's layers may take part.

An export folder (written by `--mode=export`, read by `--mode=sample --checkpoint=DIR`):

  DIR/config.json        {"format": EXPORT_FORMAT, "config": the experiment config, "source":
                          {"workdir", "step"}, "bytes": {"export", "fp32", "bf16"}}
  DIR/params.safetensors every variable of the deployed network (uint8 packed codes, fp32 alpha,
                          biases and the full-precision layers), names "blocks.0.attn.qkv.codes"

`safetensors_nbytes` gives the exact size of such a file from shapes and dtypes alone, which the
benchmarks use for models too large to materialise.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import numerics, tree_names
from common.errors import CheckpointError, DataNotFoundError, ShapeError
from common.paths import as_path

EXPORT_FORMAT = "frugal-diffusion/deployed-v1"
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"


def deploy(model: nnx.Module) -> dict[str, str]:
  """Replaces, in place, every submodule that has a `deployed()` method by its inference form.

  Works on concrete and abstract (`nnx.eval_shape`) models. A module inside one that is swapped
  is not visited on its own.

  Returns:
    {module path ("blocks/0/attn/qkv"): class name of the deployed layer}.
  """
  found = []
  for path, node in nnx.iter_graph(model):
    if not path or not isinstance(node, nnx.Module) or not callable(getattr(node, "deployed", None)):
      continue
    parts = tuple(str(p) for p in path)
    if any(parts[:len(q)] == q for q, _ in found):
      continue
    found.append((parts, node))
  done = {}
  for parts, node in found:
    new = node.deployed()
    numerics._set_module(model, list(parts), new)  # pylint: disable=protected-access
    done["/".join(parts)] = type(new).__name__
  return done


# ---- the file format -----------------------------------------------------------------------------


# Order of safetensors' Dtype enum (huggingface/safetensors, safetensors/src/tensor.rs), used to sort
# tensors in the file: by dtype, descending, then by name.
_ST_DTYPES = {np.dtype(np.bool_): ("BOOL", 0), np.dtype(np.uint8): ("U8", 4),
              np.dtype(np.int8): ("I8", 5), np.dtype(np.int16): ("I16", 9),
              np.dtype(np.uint16): ("U16", 10), np.dtype(np.float16): ("F16", 11),
              np.dtype(jnp.bfloat16): ("BF16", 12), np.dtype(np.int32): ("I32", 13),
              np.dtype(np.uint32): ("U32", 14), np.dtype(np.float32): ("F32", 15),
              np.dtype(np.float64): ("F64", 17), np.dtype(np.int64): ("I64", 18),
              np.dtype(np.uint64): ("U64", 19)}


def safetensors_nbytes(specs: Mapping[str, Any]) -> int:
  """Exact byte size of the safetensors file holding tensors of these shapes and dtypes.

  Layout (huggingface/safetensors README "Format"): 8-byte little-endian header length, a compact
  JSON header {name: {"dtype", "shape", "data_offsets"}} padded with spaces to a multiple of 8,
  then the tensors' bytes back to back, sorted by dtype (descending) then name.

  Args:
    specs: {name: array or ShapeDtypeStruct}.
  """
  entries = []
  for name, s in specs.items():
    dt = np.dtype(s.dtype)
    if dt not in _ST_DTYPES:
      raise ShapeError(f"safetensors_nbytes: unsupported dtype {dt} of {name}.")
    entries.append((name, dt, tuple(int(d) for d in s.shape)))
  entries.sort(key=lambda e: (-_ST_DTYPES[e[1]][1], e[0]))
  parts, offset = [], 0
  for name, dt, shape in entries:
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    parts.append(f'{json.dumps(name)}:{{"dtype":"{_ST_DTYPES[dt][0]}","shape":'
                 f'[{",".join(map(str, shape))}],"data_offsets":[{offset},{offset + n}]}}')
    offset += n
  header = len(("{" + ",".join(parts) + "}").encode())
  return 8 + -(-header // 8) * 8 + offset


def model_sizes(qat_params: Mapping[Any, Any], deployed_state: Mapping[Any, Any]) -> dict[str, int]:
  """Bytes of the export file and of the same network's parameters as fp32 and bf16 files.

  Args:
    qat_params: the trained network's pure param dict (arrays or ShapeDtypeStructs).
    deployed_state: the deployed network's pure state dict (arrays or ShapeDtypeStructs).

  Returns:
    {"export": bytes, "fp32": bytes, "bf16": bytes, "params": parameter count}.
  """
  flat = tree_names.flatten(qat_params)
  as_dtype = lambda d: {k: jax.ShapeDtypeStruct(v.shape, d) for k, v in flat.items()}
  return {"export": safetensors_nbytes(tree_names.flatten(deployed_state)),
          "fp32": safetensors_nbytes(as_dtype(jnp.float32)),
          "bf16": safetensors_nbytes(as_dtype(jnp.bfloat16)),
          "params": int(sum(int(np.prod(v.shape)) for v in flat.values()))}


def format_sizes(sizes: Mapping[str, int]) -> str:
  """One line: the export's size next to the fp32 and bf16 sizes, with ratios."""
  mb = lambda b: f"{b / 2**20:.3f} MiB ({b} bytes)"
  e = sizes["export"]
  return (f"export {mb(e)}; the same {sizes['params']}-parameter network in fp32 "
          f"{mb(sizes['fp32'])} ({sizes['fp32'] / e:.2f}x the export), bf16 {mb(sizes['bf16'])} "
          f"({sizes['bf16'] / e:.2f}x)")


def save_export(directory: str | os.PathLike, config: ml_collections.ConfigDict,
                model: nnx.Module, *, extra: Mapping[str, Any] | None = None) -> int:
  """Writes DIR/params.safetensors (every variable of `model`) and DIR/config.json.

  Returns:
    The size of params.safetensors in bytes.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  folder = as_path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  flat = {k: np.array(jax.device_get(v), order="C")  # keeps 0-d arrays 0-d
          for k, v in tree_names.flatten(nnx.to_pure_dict(nnx.state(model))).items()}
  data = st_numpy.save(flat)
  (folder / PARAMS_FILE).write_bytes(data)
  meta = {"format": EXPORT_FORMAT, "config": json.loads(config.to_json_best_effort()),
          **(extra or {})}
  (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
  return len(data)


def config_path(directory: str | os.PathLike):
  """DIR/config.json of an export folder."""
  return as_path(directory) / CONFIG_FILE


def is_export(path: str | os.PathLike) -> bool:
  """Whether `path` is a folder written by `save_export`."""
  cfg = as_path(path) / CONFIG_FILE
  if not cfg.is_file():
    return False
  try:
    return json.loads(cfg.read_text()).get("format") == EXPORT_FORMAT
  except (ValueError, AttributeError):
    return False


def export_step(directory: str | os.PathLike) -> int | None:
  """The training step an export was made from (None if unknown)."""
  try:
    meta = json.loads((as_path(directory) / CONFIG_FILE).read_text())
    return int(meta["source"]["step"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _tuples(v: Any) -> Any:
  if isinstance(v, dict):
    return {k: _tuples(x) for k, x in v.items()}
  if isinstance(v, list):
    return tuple(_tuples(x) for x in v)
  return v


def load_export_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
  """The experiment config stored in an export folder (lists read back as tuples)."""
  path = as_path(directory) / CONFIG_FILE
  if not path.is_file():
    raise DataNotFoundError(f"{path} is missing: {directory} is not an export folder; write one "
                            "with launch/main.py --mode=export --config=... --workdir=WORKDIR.")
  try:
    meta = json.loads(path.read_text())
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e
  if meta.get("format") != EXPORT_FORMAT or "config" not in meta:
    raise CheckpointError(f"{path} was not written by --mode=export (format "
                          f"{meta.get('format')!r}, expected {EXPORT_FORMAT!r}).")
  return ml_collections.ConfigDict(_tuples(meta["config"]))


def load_export_state(directory: str | os.PathLike, abstract_state: Mapping[Any, Any]) -> dict:
  """Reads DIR/params.safetensors into the structure of `abstract_state` (a deployed network's pure
  state dict of ShapeDtypeStructs), checking every name, shape and dtype.

  Returns:
    The pure state dict of numpy arrays.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  path = as_path(directory) / PARAMS_FILE
  if not path.is_file():
    raise DataNotFoundError(f"{path} is missing: export again with --mode=export.")
  try:
    flat = st_numpy.load(path.read_bytes())
  except Exception as e:  # safetensors raises its own error types for corrupt files
    raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
  leaves, treedef = jax.tree_util.tree_flatten_with_path(dict(abstract_state))
  names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in leaves]
  if set(names) != set(flat):
    diff = sorted(set(names) ^ set(flat))
    raise CheckpointError(f"{path} does not hold the deployed network of its config "
                          f"(names differ, e.g. {diff[:3]}); export it again.")
  for name, (_, want) in zip(names, leaves):
    got = flat[name]
    if tuple(got.shape) != tuple(want.shape) or got.dtype != np.dtype(want.dtype):
      raise CheckpointError(f"{path}: {name} is {got.dtype} {got.shape}, the deployed network "
                            f"expects {np.dtype(want.dtype)} {tuple(want.shape)}.")
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])
