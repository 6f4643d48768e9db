"""Deployment: a network's inference form, written to and read from an export folder.

A numerics implementation (common/nn/numerics.py) may define `deployed(self) -> nnx.Module`, the
layer's inference form: TerDiT's `TernaryDense` returns a layer that holds 2-bit packed codes and
runs a packed matmul. `deploy(model)` swaps every such layer in place; `common` names none of
them, so any family's layers may take part.

An export folder (written by `--mode=export`, read by `--mode=sample --checkpoint=DIR`):

  DIR/config.json        {"format": EXPORT_FORMAT, "config": the experiment config, "sha256":
                          {"params.safetensors": hex digest}, "source": {"workdir", "step"},
                          "bytes": {"export", "fp32", "bf16"}}
  DIR/params.safetensors every variable of the deployed network (uint8 packed codes, fp32 alpha,
                          biases and the full-precision layers), names "blocks.0.attn.qkv.codes"

The recorded SHA-256 is checked before the weights are used: a changed or damaged file is refused
(the safetensors format has no checksum of its own). An export of an older format (deployed-v1,
without checksums) is refused with the advice to export again.

`safetensors_nbytes` gives the exact size of such a file from shapes and dtypes alone, which the
benchmarks use for models too large to materialise.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Any, Mapping, Protocol, runtime_checkable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import numpy as st_numpy

from common.nn import numerics
from common.weights import tree_names
from common.errors import CheckpointError, ConfigError, DataNotFoundError, ShapeError, UserError
from common.paths import as_path

EXPORT_FORMAT = "frugal-diffusion/deployed-v2"
_FORMAT_FAMILY = "frugal-diffusion/deployed-"
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"


@runtime_checkable
class Deployable(Protocol):
  """A layer with an inference form (a numerics implementation, e.g. `terdit.ternary.TernaryDense`)."""

  def deployed(self) -> nnx.Module:
    """The layer's inference form, called like the layer (e.g. packed ternary codes)."""


@runtime_checkable
class TensorCountBound(Protocol):
  """A network class that bounds its parameter tensors from its constructor arguments alone
  (optional: classes without it are not checked by `check_tensor_count`)."""

  @staticmethod
  def min_param_tensors(kwargs: Mapping[str, Any]) -> int:
    """A lower bound on the parameter tensors of `cls(**kwargs)` (every argument given)."""


def deploy(model: nnx.Module) -> dict[str, str]:
  """Replaces, in place, every submodule that has a `deployed()` method (`Deployable`) by its
  inference form.

  Works on concrete and abstract (`nnx.eval_shape`) models. A module inside one that is swapped
  is not visited on its own.

  Returns:
    {module path ("blocks/0/attn/qkv"): class name of the deployed layer}.
  """
  found = []
  for path, node in nnx.iter_graph(model):
    if not path or not isinstance(node, nnx.Module) or not isinstance(node, Deployable):
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
  folder = as_path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  flat = {k: np.array(jax.device_get(v), order="C")  # keeps 0-d arrays 0-d
          for k, v in tree_names.flatten(nnx.to_pure_dict(nnx.state(model))).items()}
  data = st_numpy.save(flat)
  (folder / PARAMS_FILE).write_bytes(data)
  meta = {"format": EXPORT_FORMAT, "config": json.loads(config.to_json_best_effort()),
          "sha256": {PARAMS_FILE: sha256_hex(data)}, **(extra or {})}
  (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
  return len(data)


def config_path(directory: str | os.PathLike):
  """DIR/config.json of an export folder."""
  return as_path(directory) / CONFIG_FILE


def check_tensor_count(cls: Any, kwargs: Mapping[str, Any], num_tensors: int, weights: Any) -> None:
  """Raises when the constructor arguments `kwargs` (read from a file) imply more parameter tensors
  than the weights file holds, by `cls.min_param_tensors(all arguments)` (`TensorCountBound`;
  classes without it are not checked). Called before the network is traced, so a config cannot
  make us build, even abstractly, a network far larger than its weights (e.g. a million blocks).

  Raises:
    ConfigError: an argument the bound reads has the wrong type; ShapeError: too few tensors.
  """
  if not isinstance(cls, TensorCountBound):
    return
  defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
              if p.default is not p.empty}
  try:
    need = cls.min_param_tensors({**defaults, **kwargs})
  except (TypeError, ValueError, KeyError) as e:
    raise ConfigError(f"the config.json beside {weights} has arguments of the wrong type for "
                      f"{cls.__name__}: {type(e).__name__}: {e}") from e
  if num_tensors < need:
    raise ShapeError(f"{weights} holds {num_tensors} tensors, the config.json beside it implies "
                     f"at least {need}; is the config.json the one saved with these weights?")


def sha256_hex(data: bytes) -> str:
  """The SHA-256 of `data` as 64 hex digits."""
  return hashlib.sha256(data).hexdigest()


def read_checked(path, recorded: Any, record_file: Any, redo: str) -> bytes:
  """The bytes of `path` after checking them against the SHA-256 `recorded` in `record_file`.

  Args:
    recorded: the hex digest written at export time (anything else is refused).
    redo: how to write the folder again, for the messages.

  Raises:
    DataNotFoundError: `path` is missing; CheckpointError: no digest recorded, or the bytes differ.
  """
  if not as_path(path).is_file():
    raise DataNotFoundError(f"{path} is missing: {redo}.")
  if not isinstance(recorded, str) or len(recorded) != 64:
    raise CheckpointError(f"{record_file} records no SHA-256 of {as_path(path).name}: {redo}.")
  data = as_path(path).read_bytes()
  if sha256_hex(data) != recorded.lower():
    raise CheckpointError(f"{path} does not match the checksum recorded in {record_file} at "
                          f"export time: changed or damaged; {redo}.")
  return data


def read_json_object(path) -> dict:
  """The JSON object in `path`; CheckpointError (one line) for anything else."""
  try:
    meta = json.loads(as_path(path).read_bytes())
  except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path} holds a JSON {type(meta).__name__}, not an object.")
  return meta


_REDO = "export again with launch/main.py --mode=export --config=CONFIG --workdir=WORKDIR"


def _export_meta(directory: str | os.PathLike) -> dict:
  """DIR/config.json of an export, checked: a JSON object of the current format whose "config" is
  an object and whose "sha256" records the weights file."""
  path = config_path(directory)
  if not path.is_file():
    raise DataNotFoundError(f"{path} is missing: {directory} is not an export folder; write one "
                            "with launch/main.py --mode=export --config=... --workdir=WORKDIR.")
  meta = read_json_object(path)
  fmt = meta.get("format")
  if fmt != EXPORT_FORMAT:
    if isinstance(fmt, str) and fmt.startswith(_FORMAT_FAMILY):
      raise CheckpointError(f"{path} is an export of an older format ({fmt}, without checksums); "
                            f"{_REDO} from the run it came from.")
    raise CheckpointError(f"{path} was not written by --mode=export (format {fmt!r:.80}, expected "
                          f"{EXPORT_FORMAT!r}).")
  if not isinstance(meta.get("config"), dict):
    raise CheckpointError(f"{path}: \"config\" is {type(meta.get('config')).__name__}, not an "
                          f"object; the export is damaged: {_REDO}.")
  if not isinstance(meta.get("sha256"), dict):
    raise CheckpointError(f"{path} records no checksums (\"sha256\"); {_REDO}.")
  return meta


def is_export(path: str | os.PathLike) -> bool:
  """Whether `path` holds an export's config.json (of any format version: loading it then says
  what is wrong with it)."""
  try:
    fmt = read_json_object(config_path(path)).get("format")
  except (UserError, OSError):
    return False
  return isinstance(fmt, str) and fmt.startswith(_FORMAT_FAMILY)


def export_step(directory: str | os.PathLike) -> int | None:
  """The training step an export was made from (None if unknown)."""
  try:
    step = read_json_object(config_path(directory))["source"]["step"]
  except (UserError, OSError, KeyError, TypeError):
    return None
  return step if isinstance(step, int) and not isinstance(step, bool) else None


def _tuples(v: Any) -> Any:
  if isinstance(v, dict):
    return {k: _tuples(x) for k, x in v.items()}
  if isinstance(v, list):
    return tuple(_tuples(x) for x in v)
  return v


def _kind(v: Any) -> str:
  """The JSON kind of a config value: "an object", "a list", "a bool", "an int", "a number",
  "a string" or "null"."""
  if isinstance(v, (dict, ml_collections.ConfigDict)):
    return "an object"
  if isinstance(v, (list, tuple)):
    return "a list"
  if isinstance(v, bool):
    return "a bool"
  if isinstance(v, int):
    return "an int"
  return "a number" if isinstance(v, float) else "a string" if isinstance(v, str) else "null"


def check_structure(value: dict, like: ml_collections.ConfigDict, where: str, key: str = "config"
                    ) -> None:
  """Raises CheckpointError, naming the first offending key, unless `value` has every key of `like`
  with a value of the same JSON kind (an int where a number is expected is fine; a None in `like`
  allows anything). Keys `like` does not have are not checked."""
  for k in like.keys():
    want, name = like[k], f"{key}.{k}"
    if k not in value:
      raise CheckpointError(f"{where}: {name} is missing; the export is damaged: {_REDO}.")
    if want is None:
      continue
    got, want_kind = _kind(value[k]), _kind(want)
    if got != want_kind and not (want_kind == "a number" and got == "an int"):
      raise CheckpointError(f"{where}: {name} is {got} ({value[k]!r:.60}), expected {want_kind}; "
                            f"the export is damaged: {_REDO}.")
    if want_kind == "an object":
      check_structure(value[k], want, where, name)


def load_export_config(directory: str | os.PathLike, like: ml_collections.ConfigDict | None = None
                       ) -> ml_collections.ConfigDict:
  """The experiment config stored in an export folder (lists read back as tuples).

  Args:
    like: the keys and value kinds it must have (`configs.base.structure()`; `check_structure`).

  Raises:
    DataNotFoundError: no config.json; CheckpointError: not JSON, not an object, another or an
    older format, "config" not an object, not shaped `like` or not a valid config.
  """
  path = config_path(directory)
  cfg = _export_meta(directory)["config"]
  if like is not None:
    check_structure(cfg, like, str(path))
  try:
    return ml_collections.ConfigDict(_tuples(cfg))
  except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as e:
    raise CheckpointError(f"{path}: \"config\" is not a valid config ({type(e).__name__}: "
                          f"{e}); {_REDO}.") from e


def read_export_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """DIR/params.safetensors as {dotted name: numpy array}, after checking its SHA-256 against the
  one config.json recorded at export time."""
  path = as_path(directory) / PARAMS_FILE
  data = read_checked(path, _export_meta(directory)["sha256"].get(PARAMS_FILE),
                      config_path(directory), _REDO)
  try:
    return st_numpy.load(data)
  except Exception as e:  # safetensors raises its own error types for corrupt files
    raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def load_export_state(directory: str | os.PathLike, abstract_state: Mapping[Any, Any], *,
                      weights: Mapping[str, np.ndarray] | None = None) -> dict:
  """Reads DIR/params.safetensors into the structure of `abstract_state` (a deployed network's pure
  state dict of ShapeDtypeStructs), checking its SHA-256 against config.json and every name, shape
  and dtype.

  Args:
    weights: the file's tensors if already read by `read_export_weights`.

  Returns:
    The pure state dict of numpy arrays.
  """
  path = as_path(directory) / PARAMS_FILE
  flat = weights if weights is not None else read_export_weights(directory)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(dict(abstract_state))
  names = [tree_names.key_path_str(p, ".") for p, _ in leaves]
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
