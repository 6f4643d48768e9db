"""Reads PyTorch weight files into numpy arrays without torch and without running pickled code.

`load_torch_weights(path)` accepts

* `torch.save` zip archives (`.pt`, `.pth`, `.bin`, `.ckpt`): a state dict, possibly nested
  (`{"state_dict": {...}}`, `{"model": {...}, "ema": {...}}`); nested keys are joined with ".";
* the legacy (torch < 1.6, non-zip) `torch.save` format, e.g. pytorch-fid's 2019 Inception weights;
* TorchScript archives (`torch.jit.save`): the module tree in `data.pkl` is rebuilt from inert
  objects and flattened to the names of the module's `state_dict()` (e.g. `layers.conv.weight`);
* `.safetensors` files, through the `safetensors` package.

The format is recognised from the content (zip magic, safetensors header), not the extension.

Safety: a pickle is a program. The zip formats are read with a restricted `pickle.Unpickler` whose
`find_class` hands out only our own tensor-rebuild functions (standing in for
`torch._utils._rebuild_tensor_v2` and friends), storage-type markers, plain containers and, for
TorchScript, inert placeholder classes for `__torch__.*` modules. Any other global (`os.system`,
`builtins.eval`, a user's `nn.Module` class, ...) raises `CheckpointError` naming it; nothing from the
file is executed. Tensor views are checked against their storage's bounds before they are read.

The archive layout and pickle protocol follow torch's `torch/serialization.py` (`_save`, `_load`) and
`torch/_utils.py` (`_rebuild_tensor_v2`) in the pytorch/pytorch repository.
"""

import ast
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from common.errors import CheckpointError, DataNotFoundError
from common.paths import as_path

_ZIP_MAGIC = b"PK\x03\x04"

# torch storage class name -> numpy dtype (torch/storage.py `_dtype_to_storage_type_map`).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "UInt16Storage": np.uint16,
    "UInt32Storage": np.uint32,
    "UInt64Storage": np.uint64,
    "Float8_e4m3fnStorage": ml_dtypes.float8_e4m3fn,
    "Float8_e5m2Storage": ml_dtypes.float8_e5m2,
    "Float8_e4m3fnuzStorage": ml_dtypes.float8_e4m3fnuz,
    "Float8_e5m2fnuzStorage": ml_dtypes.float8_e5m2fnuz,
    "UntypedStorage": np.uint8,
}

# safetensors dtype strings (the format's README) -> numpy dtype.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "C64": np.complex64, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

# torch dtypes a pickle may name (`torch.<name>`) -> numpy dtype; `_rebuild_tensor_v3` (torch >= 2.1,
# used for float8 and unsigned types) reinterprets an untyped byte storage with it.
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "complex64": np.complex64, "cfloat": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
}


class _TorchDtype:
  """Stands in for a `torch.<dtype>` object."""

  def __init__(self, name: str):
    self.name = name
    self.numpy = np.dtype(_TORCH_DTYPES[name])


class _StorageType:
  """Stands in for a `torch.<X>Storage` class: only its element dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat storage read from the archive: `array` is 1-D of the storage's dtype.

  In legacy files `array` is None until the bytes after the pickle are read; a view of another
  storage (`root`, element `offset`) takes its slice then.
  """

  def __init__(self, array: np.ndarray | None, dtype=None, numel: int = 0, root=None, offset: int = 0):
    self.array = array
    self.dtype = dtype
    self.numel = numel
    self.root = root
    self.offset = offset


class TorchScriptObject:
  """An inert stand-in for a pickled TorchScript object (`__torch__.*`): it only keeps its state.

  Attributes hold what the pickle's BUILD opcode set (submodules, tensors as numpy arrays, ints...).
  `_torch_class` is the pickled class path, e.g. `__torch__.inceptionv3.Conv2dLayer`.
  """

  _torch_class = ""

  def __init__(self, *args, **kwargs):
    if args or kwargs:
      self._args = (args, kwargs)

  def __setstate__(self, state):
    if isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self._state = state

  def __repr__(self):
    return f"<inert {self._torch_class}>"


class _LazyTensor:
  """A tensor of a legacy file, whose storage bytes follow the pickle: made real by `_materialize`."""

  def __init__(self, storage, storage_offset, size, stride):
    self.args = (storage, storage_offset, size, stride)


def _as_tensor(storage, storage_offset, size, stride):
  """A copy of the strided view `storage[offset + sum(i_k * stride_k)]`, shape `size`."""
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"a tensor refers to {type(storage).__name__}, not to a storage record")
  if storage.array is None:
    return _LazyTensor(storage, storage_offset, size, stride)
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(storage_offset)
  flat = storage.array
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
    raise CheckpointError(f"invalid tensor view: size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointError(
        f"tensor view (size {size}, stride {stride}, offset {offset}) reads past its storage of "
        f"{flat.size} elements: the file is corrupt")
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _as_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  """torch._utils._rebuild_tensor_v3: an untyped (byte) storage viewed as `dtype`."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDtype):
    raise CheckpointError("malformed _rebuild_tensor_v3 call: the file is corrupt")
  if storage.array is None:
    raise CheckpointError("_rebuild_tensor_v3 in a legacy-format file: the file is corrupt")
  raw = storage.array.view(np.uint8)
  if raw.size % dtype.numpy.itemsize:
    raise CheckpointError(f"storage of {raw.size} bytes is not a whole number of {dtype.name}")
  return _as_tensor(_Storage(raw.view(dtype.numpy)), storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _as_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """torch._tensor._rebuild_from_type_v2: rebuild with `func` (one of ours), drop the subclass."""
  del new_type, state
  if func not in _REBUILD_FUNCTIONS:
    raise CheckpointError("a tensor subclass is rebuilt with a function that is not a tensor rebuild")
  return func(*args)


def _torch_device(*args):
  return str(args[0]) if args else "cpu"


def _codecs_encode(text, encoding="utf-8"):
  # Protocol-2 pickles written by Python 3 encode `bytes` as `_codecs.encode(str, "latin1")`.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise CheckpointError("refusing _codecs.encode with anything but a latin1 string")
  return text.encode("latin1")


def _build_list(*args):
  return list(args[0]) if len(args) == 1 else list(args)


def _restore_type_tag(value, type_str=None):
  del type_str
  return value


def _numpy_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise CheckpointError("refusing to rebuild a numpy array subclass")
  return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise CheckpointError("refusing a numpy object scalar")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


class _Inert:
  """An inert stand-in for plain record classes (argparse.Namespace) found in training checkpoints."""

  def __init__(self, *args, **kwargs):
    self.__dict__.update(kwargs)
    if args:
      self._args = args

  def __setstate__(self, state):
    if isinstance(state, dict):
      self.__dict__.update(state)


_REBUILD_FUNCTIONS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_tensor, _rebuild_parameter,
                      _rebuild_parameter_with_state)

_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "Tensor"): "torch.Tensor",
    ("torch", "Tensor"): "torch.Tensor",
    ("torch.nn.parameter", "Parameter"): "torch.nn.Parameter",
    ("torch", "Size"): tuple,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _codecs_encode,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("argparse", "Namespace"): _Inert,
}
# numpy arrays and scalars inside training checkpoints (hyperparameters, RNG states): rebuilding them
# runs only numpy's constructors on data, and every object inside goes through this unpickler too.
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
  _ALLOWED_GLOBALS[(_mod, "_reconstruct")] = _numpy_reconstruct
  _ALLOWED_GLOBALS[(_mod, "scalar")] = _numpy_scalar
_ALLOWED_GLOBALS[("numpy", "ndarray")] = np.ndarray
_ALLOWED_GLOBALS[("numpy", "dtype")] = np.dtype


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch archive's `data.pkl`: tensors come from `read_record`, nothing else runs."""

  def __init__(self, file, read_record, *, path: str, torchscript: bool = False, legacy: bool = False):
    super().__init__(file)
    self._legacy = legacy
    self._read_record = read_record
    self._path = path
    self._torchscript = torchscript
    self._storages: dict[str, _Storage] = {}
    self._script_classes: dict[tuple[str, str], type] = {}

  def find_class(self, module, name):
    key = (module, name)
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name)
    if self._torchscript and (module == "__torch__" or module.startswith("__torch__.")):
      if key not in self._script_classes:
        self._script_classes[key] = type(
            name, (TorchScriptObject,), {"_torch_class": f"{module}.{name}", "__module__": __name__})
      return self._script_classes[key]
    value = _ALLOWED_GLOBALS.get(key)
    if value == _numpy_reconstruct:
      value = _numpy_reconstruct
    elif value == _numpy_scalar:
      value = _numpy_scalar
    if value is None:
      raise CheckpointError(
          f"{self._path}: refusing to load: its pickle asks for the global '{module}.{name}', which "
          "is neither a tensor nor a plain container (the file is not executed; if it pickles a whole "
          "model, re-save its state_dict() or use safetensors)")
    return value

  def persistent_load(self, pid):
    if isinstance(pid, tuple) and pid and pid[0] == "module":
      raise CheckpointError(f"{self._path}: refusing to load: it pickles a whole nn.Module "
                            "(re-save its state_dict() or use safetensors)")
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise CheckpointError(f"{self._path}: unknown persistent id {pid!r:.80}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f"{self._path}: storage of unsupported type {storage_type!r:.80}")
    if self._legacy:
      # torch/serialization.py `_legacy_load`: ('storage', type, root_key, location, numel, view).
      if key not in self._storages:
        self._storages[key] = _Storage(None, storage_type.dtype, numel)
      view = pid[5] if len(pid) > 5 else None
      if view is None:
        return self._storages[key]
      view_key, offset, view_size = str(view[0]), int(view[1]), int(view[2])
      if view_key not in self._storages:
        self._storages[view_key] = _Storage(None, storage_type.dtype, view_size,
                                            root=self._storages[key], offset=offset)
      return self._storages[view_key]
    if key not in self._storages:
      raw = self._read_record(key)
      dtype = storage_type.dtype
      if len(raw) != numel * dtype.itemsize:
        raise CheckpointError(
            f"{self._path}: storage record {key} holds {len(raw)} bytes, expected "
            f"{numel} x {dtype.itemsize}: the file is corrupt")
      self._storages[key] = _Storage(np.frombuffer(raw, dtype=dtype))
    return self._storages[key]


def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray], seen: set | None = None) -> None:
  """Collects the arrays of nested dicts/lists under dotted names (a container seen twice, e.g. a
  self-referencing list, is visited once)."""
  seen = set() if seen is None else seen
  if isinstance(tree, np.ndarray):
    out[prefix] = tree
    return
  if not isinstance(tree, (dict, list, tuple)) or id(tree) in seen:
    return
  seen.add(id(tree))
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  for k, v in items:
    _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, seen)


def _script_state_names(zf: zipfile.ZipFile, code_prefix: str, torch_class: str,
                        cache: dict[str, tuple[set, set] | None]):
  """(`__parameters__`, `__buffers__`) of a TorchScript class, parsed (not run) from its code file."""
  if torch_class in cache:
    return cache[torch_class]
  module, _, cls = torch_class.rpartition(".")
  result = None
  try:
    source = zf.read(code_prefix + module.replace(".", "/") + ".py").decode("utf-8")
    for node in ast.parse(source).body:
      if isinstance(node, ast.ClassDef) and node.name == cls:
        lists = {}
        for stmt in node.body:
          if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
              and isinstance(stmt.targets[0], ast.Name)
              and stmt.targets[0].id in ("__parameters__", "__buffers__")):
            lists[stmt.targets[0].id] = set(ast.literal_eval(stmt.value))
        if len(lists) == 2:
          result = (lists["__parameters__"], lists["__buffers__"])
  except (KeyError, SyntaxError, ValueError, UnicodeDecodeError):
    result = None
  cache[torch_class] = result
  return result


def _flatten_script_module(obj: TorchScriptObject, prefix: str, out: dict[str, np.ndarray],
                           zf: zipfile.ZipFile, code_prefix: str, cache: dict, seen: set) -> None:
  """Flattens a TorchScript module tree into its `state_dict()` names (parameters and buffers).

  A class whose code lists `__parameters__`/`__buffers__` contributes exactly those tensors; when the
  code is missing every tensor attribute is taken.
  """
  if id(obj) in seen:
    return
  seen.add(id(obj))
  names = _script_state_names(zf, code_prefix, type(obj)._torch_class, cache)  # pylint: disable=protected-access
  for key, value in vars(obj).items():
    full = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, TorchScriptObject):
      _flatten_script_module(value, full, out, zf, code_prefix, cache, seen)
    elif isinstance(value, np.ndarray) and (names is None or key in names[0] or key in names[1]):
      out[full] = value


def _load_zip(path: str) -> dict[str, np.ndarray]:
  with as_path(path).open("rb") as f:
    try:
      zf = zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
      raise CheckpointError(f"{path}: not a readable zip archive ({e})") from None
    with zf:
      names = zf.namelist()
      pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
      if not pickles:
        raise CheckpointError(f"{path}: a zip file without a torch 'data.pkl' record: not a torch file")
      prefix = pickles[0][: -len("data.pkl")]
      torchscript = any(n.startswith(prefix + "code/") for n in names) or (
          prefix + "constants.pkl" in names)
      byteorder = "little"
      if prefix + "byteorder" in names:
        byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()

      def read_record(key: str) -> bytes:
        try:
          raw = zf.read(f"{prefix}data/{key}")
        except KeyError:
          raise CheckpointError(f"{path}: missing storage record data/{key}: the file is corrupt") from None
        return raw

      unpickler = _RestrictedUnpickler(
          io.BytesIO(zf.read(prefix + "data.pkl")), read_record, path=path, torchscript=torchscript)
      try:
        root = unpickler.load()
      except CheckpointError:
        raise
      except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot unpickle data.pkl ({type(e).__name__}: {e})") from None
      out: dict[str, np.ndarray] = {}
      try:
        if isinstance(root, TorchScriptObject):
          _flatten_script_module(root, "", out, zf, prefix + "code/", {}, set())
        elif isinstance(root, np.ndarray):
          out[""] = root
        else:
          _flatten(root, "", out)
      except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply: the file is corrupt") from None
    if byteorder != "little":  # tensors were copied from big-endian bytes read as little-endian
      out = {k: v.byteswap() for k, v in out.items()}
    return out


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def _materialize(tree):
  if isinstance(tree, _LazyTensor):
    return _as_tensor(*tree.args)
  if isinstance(tree, dict):
    return type(tree)((k, _materialize(v)) for k, v in tree.items())
  if isinstance(tree, (list, tuple)):
    return type(tree)(_materialize(v) for v in tree)
  return tree


def _load_legacy(path: str) -> dict[str, np.ndarray]:
  """torch.save's pre-1.6 format: magic, protocol, sys_info and data pickles, then the raw storages
  (each an int64 element count and its bytes), as torch/serialization.py `_legacy_load` reads it."""
  with as_path(path).open("rb") as f:
    def plain_load():
      return _RestrictedUnpickler(f, None, path=path).load()
    try:
      magic = plain_load()
      if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: a pickle file, not a torch checkpoint (no torch magic number)")
      if plain_load() != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported legacy torch protocol version")
      sys_info = plain_load()
      if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise CheckpointError(f"{path}: big-endian legacy torch files are not supported")
      unpickler = _RestrictedUnpickler(f, None, path=path, legacy=True)
      root = unpickler.load()
      keys = plain_load()
    except CheckpointError:
      raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
      raise CheckpointError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None
    storages = unpickler._storages  # pylint: disable=protected-access
    for key in keys:
      storage = storages.get(str(key))
      if storage is None or storage.root is not None:
        raise CheckpointError(f"{path}: storage {key} listed but not referenced: the file is corrupt")
      header = f.read(8)
      numel = struct.unpack("<q", header)[0] if len(header) == 8 else -1
      raw = f.read(max(numel, 0) * storage.dtype.itemsize)
      if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
        raise CheckpointError(f"{path}: storage {key} is truncated or corrupt")
      storage.array = np.frombuffer(raw, dtype=storage.dtype)
  for storage in storages.values():
    if storage.root is not None:
      if storage.root.array is None or storage.offset + storage.numel > storage.root.array.size:
        raise CheckpointError(f"{path}: a storage view lies outside its storage: the file is corrupt")
      storage.array = storage.root.array[storage.offset: storage.offset + storage.numel]
    elif storage.array is None:
      raise CheckpointError(f"{path}: storage data missing: the file is corrupt")
  out: dict[str, np.ndarray] = {}
  try:
    root = _materialize(root)
    if isinstance(root, np.ndarray):
      out[""] = root
    else:
      _flatten(root, "", out)
  except RecursionError:
    raise CheckpointError(f"{path}: nested too deeply: the file is corrupt") from None
  return out


def _is_safetensors(path: str, head: bytes) -> bool:
  if len(head) < 9:
    return False
  (n,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and 0 < n <= as_path(path).stat().length - 8


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=import-outside-toplevel
  data = as_path(path).read_bytes()
  try:
    records = safetensors.deserialize(data)
  except Exception as e:  # safetensors raises its own SafetensorError (and others) on a bad header
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
  out = {}
  for name, rec in records:
    dtype = _SAFETENSORS_DTYPES.get(rec["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name} has unsupported safetensors dtype {rec['dtype']}")
    out[name] = np.frombuffer(rec["data"], dtype=dtype).reshape(rec["shape"])
  return out


def load_torch_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the tensors of a PyTorch weight file (torch.save zip, TorchScript, or safetensors).

  Args:
    path: a local or gs:// file. `.pt/.pth/.bin/.ckpt` files written by `torch.save` (zip, or the legacy
      pre-1.6 format) or `torch.jit.save`, or a `.safetensors` file; the format is detected from the
      content.

  Returns:
    `{name: array}` with the stored dtype (float32, float16, `ml_dtypes.bfloat16`, float8, int64, ...)
    and shape; views are materialised with their strides and storage offset. Nested dicts (and lists)
    are flattened with "." (`{"model": {"w": t}}` -> `"model.w"`); non-tensor leaves (epoch counters,
    strings) are dropped. A TorchScript module gives its `state_dict()` names, e.g.
    `"layers.conv.weight"`. A file holding one bare tensor gives `{"": tensor}`.

  Raises:
    DataNotFoundError: `path` does not exist.
    CheckpointError: unknown or corrupt format, a tar-based (pre-0.4) torch file, or a pickle that refers
      to anything but tensors and plain containers (named in the message; it is never executed).
  """
  if not as_path(path).is_file():
    raise DataNotFoundError(f"weights file not found: {path}")
  with as_path(path).open("rb") as f:
    head = f.read(64)
  if head.startswith(_ZIP_MAGIC):
    out = _load_zip(path)
  elif _is_safetensors(path, head):
    out = _load_safetensors(path)
  elif head[:1] == b"\x80":
    out = _load_legacy(path)
  elif _is_tar(path):
    raise CheckpointError(
        f"{path}: the tar-based torch format (torch < 0.4) is not read; re-save it with a current "
        "torch: torch.save(torch.load(old), new) or safetensors.torch.save_file")
  else:
    raise CheckpointError(f"{path}: not a torch zip archive, TorchScript or safetensors file")
  if not out:
    raise CheckpointError(f"{path}: holds no tensors")
  return out


def _is_tar(path: str) -> bool:
  import tarfile  # pylint: disable=import-outside-toplevel
  try:
    with as_path(path).open("rb") as f:
      return tarfile.is_tarfile(f)
  except OSError:
    return False

