"""Reads PyTorch weight files into numpy arrays without torch and without running pickled code.

`load_torch_weights(path)` accepts

* `torch.save` zip archives (`.pt`, `.pth`, `.bin`, `.ckpt`): a state dict, possibly nested
  (`{"state_dict": {...}}`, `{"model": {...}, "ema": {...}}`); nested keys are joined with ".";
* the legacy (torch < 1.6, non-zip) `torch.save` format, e.g. pytorch-fid's 2019 Inception weights;
* TorchScript archives (`torch.jit.save`): the module tree in `data.pkl` is rebuilt from inert
  objects and flattened to the names of the module's `state_dict()` (e.g. `layers.conv.weight`);
* `.safetensors` files, through the `safetensors` package.

The format is recognised from the content (zip magic, safetensors header), not the extension.

A weight file is data, never code. A pickle is a program, so the zip and legacy formats are run by a
restricted pure-Python unpickler that accepts only what describes tensors:

* Globals: `torch._utils._rebuild_tensor`, `_rebuild_tensor_v2`, `_rebuild_tensor_v3`,
  `_rebuild_parameter`, `_rebuild_parameter_with_state`, `torch._tensor._rebuild_from_type_v2`, the
  `torch.<X>Storage` types and `torch.<dtype>`s of the tables below, `torch.Size`, `torch.device`,
  `torch.Tensor`, `torch.nn.Parameter`, `collections.OrderedDict`, `set`, `frozenset`, `slice`,
  `complex`, `bytearray` (of bytes), `_codecs.encode` (latin1), `torch.jit._pickle`'s list builders,
  `argparse.Namespace` (an inert record), numpy scalars of a plain numeric dtype (`numpy.dtype` with
  the state numpy writes for one, `numpy.core.multiarray.scalar`; read as Python numbers) and, in
  TorchScript archives, inert placeholders for `__torch__.*` classes. Each maps to a function or
  placeholder of this module. Any other global (`os.system`, `builtins.eval`, a user's `nn.Module`,
  `numpy.ndarray`, `numpy.core.multiarray._reconstruct`) is refused by name.
* Opcodes: REDUCE and NEWOBJ only on those functions and classes; BUILD only on an inert placeholder,
  never on a function or class (it would change them for the rest of the process); APPEND(S),
  SETITEM(S) and ADDITEMS only on lists, dicts and sets; INST, OBJ, EXT1/2/4 and the protocol-5 buffer
  opcodes are refused. The memo is a dict and every read stops at the bytes present.
* Arrays: every array returned is made by the reader from a storage record (a zip entry `data/<key>`
  or a legacy storage blob), with the dtype of its storage type (or `_rebuild_tensor_v3`'s torch
  dtype) from the fixed tables below; nothing the pickle builds is returned. A storage's declared size
  must equal its record's size; a view must lie inside its storage and address at most `max_expansion`
  times its elements (stride-0 views); the arrays returned, and the bytes inflated from a zip, may each
  total at most `max_expansion` times the file's size. Every size is checked before anything is
  allocated or inflated.
* Zip records must be stored (as torch writes them) or deflated, declare a size the bytes present can
  hold, and pass their CRC-32; `byteorder` must be exactly "little" or "big".

Anything else raises `CheckpointError` naming what was refused; nothing from the file is executed.

The archive layout and pickle protocol follow torch's `torch/serialization.py` (`_save`, `_load`,
`_legacy_load`) and `torch/_utils.py` (`_rebuild_tensor_v2`) in the pytorch/pytorch repository.
"""

import ast
import collections
import io
import math
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import safetensors

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


class _BadPickle(Exception):
  """Raised inside unpickling for what a file may not contain; `_unpickle` adds the file's path."""


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
  """A flat storage record named by the pickle: `numel` elements of `dtype`, bytes read later.

  `data` (bytes) is filled by the format's reader once every declared size has been checked. In legacy
  files a storage may be a view of another (`root`, element `offset`).
  """

  def __init__(self, key: str, dtype: np.dtype, numel: int, root=None, offset: int = 0):
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.root = root
    self.offset = offset
    self.data: bytes | memoryview | None = None

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize


class _Tensor:
  """A tensor the pickle describes: a strided view (`size`, `stride`, element `offset`) of `storage`.

  Nothing is allocated while unpickling; `_materialize` checks the view against its storage and the
  file's budget, then copies it into a new array. `dtype` (from `_rebuild_tensor_v3`) reinterprets an
  untyped storage's bytes; None means the storage's own dtype.
  """

  def __init__(self, storage, offset, size, stride, dtype: np.dtype | None = None):
    if not isinstance(storage, _Storage):
      raise _BadPickle(f"a tensor refers to {_describe(storage)}, not to a storage record: the file is "
                       "corrupt")
    if not (_is_int(offset) and type(size) is tuple and type(stride) is tuple
            and all(_is_int(n) for n in size) and all(_is_int(s) for s in stride)
            and len(size) == len(stride) <= _MAX_DIMS and offset >= 0
            and all(n >= 0 for n in size) and all(s >= 0 for s in stride)):
      raise _BadPickle(f"invalid tensor view (size {_short(size)}, stride {_short(stride)}, offset "
                       f"{_short(offset)}): the file is corrupt")
    self.storage = storage
    self.offset = offset
    self.size = size
    self.stride = stride
    self.dtype = storage.dtype if dtype is None else dtype


_MAX_DIMS = 64  # numpy's limit on the number of dimensions


def _is_int(x) -> bool:
  return type(x) is int  # not bool, not a float, not a stand-in object


def _short(x) -> str:
  """`repr(x)` cut to 60 characters, without building the repr of a huge or deeply nested value."""
  if type(x) in (tuple, list) and len(x) > 8:
    return f"<{type(x).__name__} of {len(x)} items>"
  try:
    text = repr(x)
  except (RecursionError, ValueError):  # ValueError: an int with more than 4300 digits
    return f"<{type(x).__name__}>"
  return text if len(text) <= 60 else text[:57] + "..."


def _clip(error) -> str:
  text = str(error)
  return text if len(text) <= 200 else text[:197] + "..."


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  """torch._utils._rebuild_tensor_v3: an untyped (byte) storage viewed as `dtype`."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _TorchDtype):
    raise _BadPickle(f"_rebuild_tensor_v3 with dtype {_describe(dtype)}: the file is corrupt")
  return _Tensor(storage, storage_offset, size, stride, dtype.numpy)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """torch._tensor._rebuild_from_type_v2: rebuild with `func` (one of ours), drop the subclass."""
  del new_type, state
  if not any(func is f for f in _REBUILD_FUNCTIONS) or type(args) is not tuple:
    raise _BadPickle("a tensor subclass is rebuilt with something that is not a tensor rebuild")
  return func(*args)


def _torch_device(*args):
  return str(args[0]) if args else "cpu"


def _codecs_encode(text, encoding="utf-8"):
  # Protocol-2 pickles written by Python 3 encode `bytes` as `_codecs.encode(str, "latin1")`.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _BadPickle("refusing _codecs.encode with anything but a latin1 string")
  return text.encode("latin1")


def _sequence_arg(name, args):
  if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
    raise _BadPickle(f"refusing {name} of anything but a list or tuple")
  return args[0] if args else ()


def _build_list(*args):
  return list(_sequence_arg("a TorchScript list", args))


def _tuple(*args):  # torch.Size
  return tuple(_sequence_arg("torch.Size", args))


def _set(*args):
  return set(_sequence_arg("set", args))


def _frozenset(*args):
  return frozenset(_sequence_arg("frozenset", args))


def _bytearray(*args):
  """bytearray pickles as `bytearray(bytes)` or, protocol 2, `bytearray(str, "latin-1")`; never as
  `bytearray(n)`, which would allocate n bytes the file does not hold."""
  if not args:
    return bytearray()
  if len(args) == 1 and type(args[0]) is bytes:
    return bytearray(args[0])
  if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
    return bytearray(args[0], "latin-1")
  raise _BadPickle("refusing bytearray() of anything but bytes or a latin1 string")


def _restore_type_tag(value, type_str=None):
  del type_str
  return value


# numpy dtype descriptors a pickled numpy scalar may name (`numpy.dtype("f8", False, True)`): plain
# numbers only, never objects, strings, records or sub-arrays.
_NUMPY_DESCRIPTORS = {
    "b1": np.bool_, "i1": np.int8, "i2": np.int16, "i4": np.int32, "i8": np.int64,
    "u1": np.uint8, "u2": np.uint16, "u4": np.uint32, "u8": np.uint64,
    "f2": np.float16, "f4": np.float32, "f8": np.float64, "c8": np.complex64, "c16": np.complex128,
}


class _NumpyDtype:
  """Stands in for `numpy.dtype(descr, align, copy)`, the dtype of a pickled numpy scalar.

  Only the descriptors above, and only the state numpy writes for them (`__reduce__` gives
  `(3, byteorder, None, None, None, -1, -1, 0)`: no sub-array, no fields, no flags), so a pickled dtype
  can neither hide an object field nor declare a field larger than its itemsize.
  """

  def __init__(self, descr=None, align=False, copy=False):
    del align, copy
    if type(descr) is not str or descr not in _NUMPY_DESCRIPTORS:
      raise _BadPickle(f"refusing the numpy dtype {_short(descr)}: only plain numeric numpy scalars "
                       "are read")
    self.dtype = np.dtype(_NUMPY_DESCRIPTORS[descr])

  def __setstate__(self, state):
    if not (type(state) is tuple and len(state) == 8 and state[0] == 3 and type(state[1]) is str
            and len(state[1]) == 1 and state[1] in "<>|=" and state[2:] == (None, None, None, -1, -1, 0)):
      raise _BadPickle(f"refusing a numpy dtype with the state {_short(state)}: only plain numeric "
                       "dtypes are read")
    if state[1] == ">":
      self.dtype = self.dtype.newbyteorder(">")


def _numpy_scalar(dtype, data=None):
  """numpy.core.multiarray.scalar: a numpy scalar in a checkpoint's metadata, read as a Python number."""
  if not isinstance(dtype, _NumpyDtype) or type(data) is not bytes or len(data) != dtype.dtype.itemsize:
    raise _BadPickle("refusing a malformed numpy scalar")
  return np.frombuffer(data, dtype.dtype)[0].item()


class TorchScriptObject:
  """An inert stand-in for a pickled TorchScript object (`__torch__.*`): it only keeps its state.

  Attributes hold what the pickle's BUILD opcode set (submodules, tensors, ints...).
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
    ("torch", "Size"): _tuple,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _codecs_encode,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("argparse", "Namespace"): _Inert,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}
# What REDUCE may call, NEWOBJ may instantiate and BUILD may set the state of (besides the
# TorchScript placeholder classes): by identity, never by equality.
_CALLABLE_IDS = {id(v) for v in _ALLOWED_GLOBALS.values() if callable(v)}
_NEWOBJ_CLASSES = (collections.OrderedDict, _Inert)
_STATEFUL = (TorchScriptObject, _Inert, _NumpyDtype)
_GLOBAL_NAMES = {id(v): f"{m}.{n}" for (m, n), v in _ALLOWED_GLOBALS.items() if callable(v)}


def _describe(obj) -> str:
  """What a pickled object is, for a message: the global it came from, or its type."""
  if id(obj) in _GLOBAL_NAMES:
    return f"'{_GLOBAL_NAMES[id(obj)]}'"
  if isinstance(obj, type):
    return f"the class '{getattr(obj, '_torch_class', '') or obj.__name__}'"
  if isinstance(obj, _StorageType):
    return f"'torch.{obj.name}'"
  if isinstance(obj, _TorchDtype):
    return f"'torch.{obj.name}'"
  return f"a {type(obj).__name__}"


def _refused_opcode(name: str, why: str):
  def load(unpickler):
    del unpickler
    raise _BadPickle(f"refusing to load: its pickle uses the {name} opcode ({why}), which a weight file "
                     "never needs")
  return load


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickles a torch archive's `data.pkl` into inert objects and `_Tensor` records.

  It is Python's pure-Python unpickler with a restricted dispatch table (the C unpickler's opcodes
  cannot be overridden): globals come only from `_ALLOWED_GLOBALS` (and inert placeholders for
  TorchScript classes), REDUCE/NEWOBJ only call those, BUILD only sets the state of an inert
  placeholder, APPEND/SETITEM only fill lists/dicts, and the opcodes a weight file never needs are
  refused. Its memo is a dict and its reads stop at the bytes present, so no opcode argument
  allocates more than the file holds. Storage references go to `storage_record(key, dtype, numel)`.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, storage_record=None, *, torchscript: bool = False, legacy: bool = False):
    super().__init__(file)
    self._legacy = legacy
    self._storage_record = storage_record
    self._torchscript = torchscript
    self.storages: dict[str, _Storage] = {}
    self._script_classes: dict[tuple[str, str], type] = {}

  def find_class(self, module, name):
    if module == "__builtin__":  # protocol-2 pickles name builtins the Python 2 way
      module = "builtins"
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
    if value is None:
      raise _BadPickle(
          f"refusing to load: its pickle asks for the global '{module:.80}.{name:.80}', which is neither "
          "a tensor nor a plain container (the file is not executed; if it pickles a whole model or "
          "numpy arrays, re-save its state_dict() of tensors or use safetensors)")
    return value

  def _check_callable(self, func, opcode: str) -> None:
    if id(func) in _CALLABLE_IDS or (isinstance(func, type) and issubclass(func, TorchScriptObject)):
      return
    raise _BadPickle(f"refusing to load: its pickle applies {opcode} to {_describe(func)}, which is "
                     "not a tensor rebuild or container constructor")

  def load_reduce(self):
    args = self.stack.pop()
    func = self.stack[-1]
    self._check_callable(func, "REDUCE (a call)")
    if type(args) is not tuple:
      raise _BadPickle(f"a call with arguments {_describe(args)}, not a tuple: the file is corrupt")
    self.stack[-1] = func(*args)

  def _new(self, cls, args, kwargs):
    if not (any(cls is c for c in _NEWOBJ_CLASSES)
            or (isinstance(cls, type) and issubclass(cls, TorchScriptObject))):
      raise _BadPickle(f"refusing to load: its pickle instantiates {_describe(cls)} with NEWOBJ")
    if type(args) is not tuple or type(kwargs) is not dict:
      raise _BadPickle("a NEWOBJ with malformed arguments: the file is corrupt")
    return cls.__new__(cls, *args, **kwargs)

  def load_newobj(self):
    args = self.stack.pop()
    cls = self.stack.pop()
    self.append(self._new(cls, args, {}))

  def load_newobj_ex(self):
    kwargs = self.stack.pop()
    args = self.stack.pop()
    cls = self.stack.pop()
    self.append(self._new(cls, args, kwargs))

  def load_build(self):
    # Python's BUILD sets attributes of whatever is on the stack, functions and classes included
    # (`_rebuild_tensor_v2.__defaults__`, for the rest of the process): only our placeholders take state.
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, type) or not isinstance(inst, _STATEFUL):
      raise _BadPickle(f"refusing to load: its pickle applies BUILD (set state) to {_describe(inst)}")
    type(inst).__setstate__(inst, state)

  def _target(self, kinds, opcode):
    target = self.stack[-1]
    if type(target) not in kinds:
      raise _BadPickle(f"refusing to load: its pickle applies {opcode} to {_describe(target)}")
    return target

  def load_append(self):
    value = self.stack.pop()
    self._target((list,), "APPEND").append(value)

  def load_appends(self):
    items = self.pop_mark()
    self._target((list,), "APPENDS").extend(items)

  def load_setitem(self):
    value = self.stack.pop()
    key = self.stack.pop()
    self._target((dict, collections.OrderedDict), "SETITEM")[key] = value

  def load_setitems(self):
    items = self.pop_mark()
    target = self._target((dict, collections.OrderedDict), "SETITEMS")
    for i in range(0, len(items), 2):
      target[items[i]] = items[i + 1]

  def load_additems(self):
    items = self.pop_mark()
    self._target((set,), "ADDITEMS").update(items)

  for _op, _name in ((pickle.REDUCE, "load_reduce"), (pickle.NEWOBJ, "load_newobj"),
                     (pickle.NEWOBJ_EX, "load_newobj_ex"), (pickle.BUILD, "load_build"),
                     (pickle.APPEND, "load_append"), (pickle.APPENDS, "load_appends"),
                     (pickle.SETITEM, "load_setitem"), (pickle.SETITEMS, "load_setitems"),
                     (pickle.ADDITEMS, "load_additems")):
    dispatch[_op[0]] = locals()[_name]
  for _op, _name, _why in ((pickle.INST, "INST", "instantiates a class"),
                           (pickle.OBJ, "OBJ", "instantiates a class"),
                           (pickle.EXT1, "EXT1", "a copyreg extension code"),
                           (pickle.EXT2, "EXT2", "a copyreg extension code"),
                           (pickle.EXT4, "EXT4", "a copyreg extension code"),
                           (pickle.BYTEARRAY8, "BYTEARRAY8", "protocol 5"),
                           (pickle.NEXT_BUFFER, "NEXT_BUFFER", "an out-of-band buffer"),
                           (pickle.READONLY_BUFFER, "READONLY_BUFFER", "an out-of-band buffer")):
    dispatch[_op[0]] = _refused_opcode(_name, _why)
  del _op, _name, _why

  def persistent_load(self, pid):
    if type(pid) is tuple and pid and pid[0] == "module":
      raise _BadPickle("refusing to load: it pickles a whole nn.Module (re-save its state_dict() or use "
                       "safetensors)")
    # zip: ('storage', type, key, location, numel); legacy adds a view: (view_key, offset, numel) or None
    # (torch/serialization.py `_save` / `_legacy_save`, `persistent_id`).
    length = 6 if self._legacy else 5
    if not (type(pid) is tuple and len(pid) == length and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and type(pid[2]) is str and type(pid[3]) is str
            and _is_int(pid[4]) and pid[4] >= 0):
      raise _BadPickle(f"a malformed storage reference {_short(pid)} in its pickle: the file is corrupt")
    storage = self._storage(pid[2], pid[1].dtype, pid[4])
    if not self._legacy or pid[5] is None:
      return storage
    view = pid[5]
    if not (type(view) is tuple and len(view) == 3 and type(view[0]) is str and _is_int(view[1])
            and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0):
      raise _BadPickle(f"a malformed storage view {_short(view)} in its pickle: the file is corrupt")
    if view[1] + view[2] > storage.numel:
      raise _BadPickle(f"a storage view (offset {view[1]}, {view[2]} elements) lies outside its storage "
                       f"of {storage.numel}: the file is corrupt")
    return self._storage(view[0], storage.dtype, view[2], root=storage, offset=view[1])

  def _storage(self, key, dtype, numel, root=None, offset=0) -> _Storage:
    """The storage `key`, made on first reference; later references must declare the same."""
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(key, dtype, numel, root, offset)
      if self._storage_record is not None:
        self._storage_record(storage)
    elif (storage.dtype, storage.numel, storage.root, storage.offset) != (dtype, numel, root, offset):
      raise _BadPickle(f"storage {key} is declared twice, differently: the file is corrupt")
    return storage


# What a damaged pickle makes the unpickler raise (an unknown opcode is a KeyError of its dispatch).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
                    KeyError, struct.error, OverflowError, RecursionError)


def _unpickle(unpickler: _RestrictedUnpickler, path: str):
  try:
    return unpickler.load()
  except _BadPickle as e:
    raise CheckpointError(f"{path}: {e}") from None
  except _UNPICKLE_ERRORS as e:
    raise CheckpointError(f"{path}: cannot unpickle ({type(e).__name__}: {_clip(e)}): the file is "
                          "corrupt or not a torch file") from None


class _Budget:
  """Bytes the reader may make from a file: `max_expansion` times the file's size."""

  def __init__(self, path: str, file_size: int, max_expansion: float):
    self.path, self.file_size, self.max_expansion = path, file_size, max_expansion
    self.used = 0

  def spend(self, nbytes: int, what: str) -> None:
    self.used += nbytes
    if self.used > self.max_expansion * self.file_size:
      raise CheckpointError(
          f"{self.path}: {what} ({nbytes} bytes) would bring what the reader makes of this file of "
          f"{self.file_size} bytes to {self.used} bytes, more than max_expansion={self.max_expansion:g} "
          "times its size: refusing a damaged or hostile file (a trusted one may be read with "
          "load_torch_weights(path, max_expansion=...))")


def _view_nbytes(t: _Tensor, max_expansion: float, path: str) -> int:
  """Checks that the view `t` lies inside its storage and addresses at most `max_expansion` times its
  elements (a stride-0 view must not turn a few bytes into gigabytes); returns its bytes."""
  itemsize = t.dtype.itemsize
  if t.storage.nbytes % itemsize:
    raise CheckpointError(f"{path}: storage {t.storage.key} of {t.storage.nbytes} bytes is not a whole "
                          f"number of {t.dtype} elements: the file is corrupt")
  elements = t.storage.nbytes // itemsize
  numel = math.prod(t.size)
  where = f"tensor view (size {_short(t.size)}, stride {_short(t.stride)}, offset {t.offset})"
  if numel == 0:
    if math.prod(n for n in t.size if n) * itemsize >= 2**62:  # numpy refuses such an empty shape too
      raise CheckpointError(f"{path}: {where} has impossible dimensions: the file is corrupt")
    return 0
  last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
  if last >= elements:
    raise CheckpointError(f"{path}: {where} reads past its storage of {elements} elements: the file is "
                          "corrupt")
  if numel > max_expansion * elements:
    raise CheckpointError(
        f"{path}: {where} addresses {numel} elements of a storage of {elements}, more than "
        f"max_expansion={max_expansion:g} times: refusing a damaged or hostile file (a trusted one may "
        "be read with load_torch_weights(path, max_expansion=...))")
  return numel * itemsize


def _copy_view(t: _Tensor, data, swap: bool) -> np.ndarray:
  """A new array holding the checked view `t` of the storage bytes `data`."""
  if math.prod(t.size) == 0:
    return np.zeros(t.size, t.dtype)
  flat = np.frombuffer(data, dtype=t.dtype)
  view = np.lib.stride_tricks.as_strided(
      flat[t.offset:], shape=t.size, strides=tuple(s * t.dtype.itemsize for s in t.stride),
      writeable=False)
  out = np.array(view, copy=True)
  if swap:  # the bytes are big-endian, read as little-endian
    out.byteswap(inplace=True)
  return out


def _materialize(tensors: dict[str, _Tensor], read_storage, *, budget: _Budget, max_expansion: float,
                 path: str, swap: bool = False) -> dict[str, np.ndarray]:
  """The arrays of `tensors`, each made once, after every view and the total size are checked.

  `read_storage(storage)` gives a storage's bytes (its size already checked against the file);
  storages are read one at a time, in order of first use, and dropped when their tensors are made.
  """
  distinct = list({id(t): t for t in tensors.values()}.values())
  budget.spend(sum(_view_nbytes(t, max_expansion, path) for t in distinct), "its tensors")
  by_storage: dict[int, list[_Tensor]] = {}
  for t in distinct:
    by_storage.setdefault(id(t.storage), []).append(t)
  arrays = {}
  for group in by_storage.values():
    data = read_storage(group[0].storage)
    for t in group:
      arrays[id(t)] = _copy_view(t, data, swap)
  return {name: arrays[id(t)] for name, t in tensors.items()}


def _flatten(tree: Any, prefix: str, out: dict[str, _Tensor], seen: set | None = None) -> None:
  """Collects the tensors of nested dicts/lists under dotted names (a container seen twice, e.g. a
  self-referencing list, is visited once)."""
  seen = set() if seen is None else seen
  if isinstance(tree, _Tensor):
    out[prefix] = tree
    return
  if not isinstance(tree, (dict, list, tuple)) or id(tree) in seen:
    return
  seen.add(id(tree))
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  for k, v in items:
    _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, seen)


def _script_state_names(read_code, torch_class: str, cache: dict[str, tuple[set, set] | None]):
  """(`__parameters__`, `__buffers__`) of a TorchScript class, parsed (not run) from its code file.

  `read_code(name)` gives the bytes of `code/<name>`, or None when the archive has no such file.
  """
  if torch_class in cache:
    return cache[torch_class]
  module, _, cls = torch_class.rpartition(".")
  result = None
  try:
    source = read_code(module.replace(".", "/") + ".py")
    for node in ast.parse(source.decode("utf-8")).body if source is not None else ():
      if isinstance(node, ast.ClassDef) and node.name == cls:
        lists = {}
        for stmt in node.body:
          if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
              and isinstance(stmt.targets[0], ast.Name)
              and stmt.targets[0].id in ("__parameters__", "__buffers__")):
            lists[stmt.targets[0].id] = set(ast.literal_eval(stmt.value))
        if len(lists) == 2:
          result = (lists["__parameters__"], lists["__buffers__"])
  except (SyntaxError, ValueError, TypeError, UnicodeDecodeError, RecursionError, MemoryError):
    result = None
  cache[torch_class] = result
  return result


def _flatten_script_module(obj: TorchScriptObject, prefix: str, out: dict[str, _Tensor], read_code,
                           cache: dict, seen: set) -> None:
  """Flattens a TorchScript module tree into its `state_dict()` names (parameters and buffers).

  A class whose code lists `__parameters__`/`__buffers__` contributes exactly those tensors; when the
  code is missing every tensor attribute is taken.
  """
  if id(obj) in seen:
    return
  seen.add(id(obj))
  names = _script_state_names(read_code, type(obj)._torch_class, cache)  # pylint: disable=protected-access
  for key, value in vars(obj).items():
    full = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, TorchScriptObject):
      _flatten_script_module(value, full, out, read_code, cache, seen)
    elif isinstance(value, _Tensor) and (names is None or key in names[0] or key in names[1]):
      out[full] = value


def _tensors_of(root: Any, path: str, flatten_script=None) -> dict[str, _Tensor]:
  """{dotted name: _Tensor} of an unpickled tree (non-tensor leaves dropped)."""
  out: dict[str, _Tensor] = {}
  try:
    if isinstance(root, _Tensor):
      out[""] = root
    elif isinstance(root, TorchScriptObject) and flatten_script is not None:
      flatten_script(root, out)
    else:
      _flatten(root, "", out)
  except (RecursionError, ValueError):  # ValueError: a key that is an int of over 4300 digits
    raise CheckpointError(f"{path}: nested too deeply or malformed keys: the file is corrupt") from None
  return out


# DEFLATE's largest possible ratio (RFC 1951: a 258-byte match costs at least 2 bits), so a deflated
# record declaring more than this many times its compressed bytes lies about its size.
_DEFLATE_MAX_RATIO = 1032


class _ZipReader:
  """Reads the records of a torch zip archive, each checked before it is inflated: a method torch or
  `zip` writes (stored, deflated), a declared size that the bytes present can hold, the caller's
  expected size, the file's budget, and its CRC-32 (checked by zipfile as the record is read)."""

  def __init__(self, zf: zipfile.ZipFile, *, path: str, file_size: int, budget: _Budget):
    self.zf, self.path, self.file_size, self.budget = zf, path, file_size, budget

  def info(self, name: str) -> zipfile.ZipInfo | None:
    try:
      return self.zf.getinfo(name)
    except KeyError:
      return None

  def check(self, info: zipfile.ZipInfo, expected: int | None = None) -> None:
    name = info.filename
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      raise CheckpointError(
          f"{self.path}: record {name} uses zip compression method {info.compress_type}; only stored "
          "(what torch.save writes) or deflated records are read")
    if expected is not None and info.file_size != expected:
      raise CheckpointError(f"{self.path}: record {name} holds {info.file_size} bytes, its pickle "
                            f"declares {expected}: the file is corrupt")
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO
    if (info.header_offset + info.compress_size > self.file_size
        or info.file_size > ratio * info.compress_size):
      raise CheckpointError(
          f"{self.path}: record {name} declares {info.file_size} bytes, more than the "
          f"{info.compress_size} bytes it has in the file can hold: the file is corrupt or truncated")

  def read(self, info: zipfile.ZipInfo, expected: int | None = None) -> bytes:
    self.check(info, expected)
    self.budget.spend(info.file_size, f"record {info.filename}")
    try:
      with self.zf.open(info) as member:
        raw = member.read(info.file_size)  # zipfile inflates at most file_size bytes, then checks the CRC
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, NotImplementedError,
            zlib.error) as e:
      raise CheckpointError(f"{self.path}: record {info.filename} is damaged ({type(e).__name__}: "
                            f"{_clip(e)}): the file is corrupt") from None
    if len(raw) != info.file_size:
      raise CheckpointError(f"{self.path}: record {info.filename} is truncated: the file is corrupt")
    return raw


def _read_byteorder(reader: _ZipReader, prefix: str) -> str:
  """The archive's `byteorder` record: exactly "little" or "big" (torch writes `sys.byteorder`);
  little when absent (archives written before torch 1.10 are little-endian)."""
  info = reader.info(prefix + "byteorder")
  if info is None:
    return "little"
  raw = reader.read(info)
  if raw not in (b"little", b"big"):
    raise CheckpointError(f"{reader.path}: its byteorder record is {_short(raw)}, not 'little' or "
                          "'big': the file is corrupt")
  return raw.decode("ascii")


def _load_zip(path: str, file_size: int, max_expansion: float) -> dict[str, np.ndarray]:
  with as_path(path).open("rb") as f:
    try:
      zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error,
            NotImplementedError) as e:
      raise CheckpointError(f"{path}: not a readable zip archive ({_clip(e)})") from None
    with zf:
      reader = _ZipReader(zf, path=path, file_size=file_size,
                          budget=_Budget(path, file_size, max_expansion))
      names = zf.namelist()
      pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
      if not pickles:
        raise CheckpointError(f"{path}: a zip file without a torch 'data.pkl' record: not a torch file")
      prefix = pickles[0][: -len("data.pkl")]
      torchscript = any(n.startswith(prefix + "code/") for n in names) or (
          prefix + "constants.pkl" in names)
      byteorder = _read_byteorder(reader, prefix)

      def storage_record(storage: _Storage) -> None:  # its record exists and holds its declared size
        info = reader.info(f"{prefix}data/{storage.key}")
        if info is None:
          raise _BadPickle(f"missing storage record data/{storage.key}: the file is corrupt")
        reader.check(info, storage.nbytes)

      unpickler = _RestrictedUnpickler(
          io.BytesIO(reader.read(zf.getinfo(pickles[0]))), storage_record, torchscript=torchscript)
      root = _unpickle(unpickler, path)

      def read_code(name: str) -> bytes | None:
        info = reader.info(f"{prefix}code/{name}")
        return None if info is None else reader.read(info)

      tensors = _tensors_of(root, path, lambda obj, out: _flatten_script_module(
          obj, "", out, read_code, {}, set()))
      return _materialize(
          tensors, lambda s: reader.read(zf.getinfo(f"{prefix}data/{s.key}"), s.nbytes),
          budget=_Budget(path, file_size, max_expansion), max_expansion=max_expansion, path=path,
          swap=byteorder != "little")


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


class _BoundedReader:
  """A file's `read`/`readline`/`readinto` that never ask for more than the bytes left.

  `BufferedReader.read(n)` allocates n bytes up front, so a pickle opcode declaring a length of 2**40
  would be a MemoryError before the short read is noticed.
  """

  def __init__(self, f, size: int):
    self._f = f
    self._left = size - f.tell()

  @property
  def left(self) -> int:
    return self._left

  def _take(self, data):
    self._left -= len(data)
    return data

  def read(self, n: int = -1) -> bytes:
    return self._take(self._f.read(self._left if n is None or n < 0 else min(n, self._left)))

  def readline(self, limit: int = -1) -> bytes:
    return self._take(self._f.readline(self._left if limit < 0 else min(limit, self._left)))

  def readinto(self, buffer) -> int:
    data = self.read(len(buffer))
    buffer[: len(data)] = data
    return len(data)


def _load_legacy(path: str, file_size: int, max_expansion: float) -> dict[str, np.ndarray]:
  """torch.save's pre-1.6 format: magic, protocol, sys_info and data pickles, then the raw storages
  (each an int64 element count and its bytes), as torch/serialization.py `_legacy_load` reads it."""
  with as_path(path).open("rb") as raw_file:
    f = _BoundedReader(raw_file, file_size)
    magic = _unpickle(_RestrictedUnpickler(f), path)
    if magic != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: a pickle file, not a torch checkpoint (no torch magic number)")
    if _unpickle(_RestrictedUnpickler(f), path) != _LEGACY_PROTOCOL:
      raise CheckpointError(f"{path}: unsupported legacy torch protocol version")
    sys_info = _unpickle(_RestrictedUnpickler(f), path)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not True:
      raise CheckpointError(f"{path}: big-endian legacy torch files are not supported")
    unpickler = _RestrictedUnpickler(f, legacy=True)
    root = _unpickle(unpickler, path)
    keys = _unpickle(_RestrictedUnpickler(f), path)
    storages = unpickler.storages
    if type(keys) is not list or not all(type(k) is str for k in keys):
      raise CheckpointError(f"{path}: a malformed storage key list: the file is corrupt")
    for key in keys:
      storage = storages.get(key)
      if storage is None or storage.root is not None or storage.data is not None:
        raise CheckpointError(f"{path}: storage {_short(key)} listed but not referenced once: the file "
                              "is corrupt")
      header = f.read(8)
      numel = struct.unpack("<q", header)[0] if len(header) == 8 else -1
      if numel != storage.numel or storage.nbytes > f.left:
        raise CheckpointError(f"{path}: storage {key} is truncated or corrupt (it declares {numel} "
                              f"elements, {f.left} bytes are left)")
      storage.data = f.read(storage.nbytes)
  for storage in storages.values():
    if storage.root is not None:
      begin = storage.offset * storage.root.dtype.itemsize
      storage.data = memoryview(storage.root.data or b"")[begin: begin + storage.nbytes]
      if storage.root.data is None or len(storage.data) != storage.nbytes:
        raise CheckpointError(f"{path}: a storage view lies outside its storage: the file is corrupt")
    elif storage.data is None:
      raise CheckpointError(f"{path}: storage data missing: the file is corrupt")
  return _materialize(_tensors_of(root, path), lambda s: s.data,
                      budget=_Budget(path, file_size, max_expansion), max_expansion=max_expansion,
                      path=path)


def _is_safetensors(path: str, head: bytes) -> bool:
  if len(head) < 9:
    return False
  (n,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and 0 < n <= as_path(path).stat().length - 8


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
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


def load_torch_weights(path: str | os.PathLike, *, max_expansion: float = 4.0) -> dict[str, np.ndarray]:
  """Reads the tensors of a PyTorch weight file (torch.save zip, TorchScript, or safetensors).

  Args:
    path: a local or gs:// file. `.pt/.pth/.bin/.ckpt` files written by `torch.save` (zip, or the legacy
      pre-1.6 format) or `torch.jit.save`, or a `.safetensors` file; the format is detected from the
      content.
    max_expansion: how much a torch file may make of its bytes: a tensor view may address at most this
      many times its storage's elements, and the tensors returned (and the bytes inflated from a zip)
      may total at most this many times the file's size. A file torch wrote makes about 1x (more only
      when several tensors view one storage); raise it only for a file you trust.

  Returns:
    `{name: array}` with the stored dtype (float32, float16, `ml_dtypes.bfloat16`, float8, int64, ...)
    and shape; views are materialised with their strides and storage offset. Nested dicts (and lists)
    are flattened with "." (`{"model": {"w": t}}` -> `"model.w"`); non-tensor leaves (epoch counters,
    strings) are dropped. A TorchScript module gives its `state_dict()` names, e.g.
    `"layers.conv.weight"`. A file holding one bare tensor gives `{"": tensor}`.

  Raises:
    DataNotFoundError: `path` does not exist.
    CheckpointError: unknown, damaged or truncated file, a tar-based (pre-0.4) torch file, sizes the
      file's bytes cannot justify, or a pickle that refers to anything but tensors and plain containers
      (named in the message; it is never executed): see the module docstring for what is accepted.
  """
  if not as_path(path).is_file():
    raise DataNotFoundError(f"weights file not found: {path}")
  if not max_expansion > 0:
    raise ValueError(f"max_expansion must be positive, got {max_expansion}")
  with as_path(path).open("rb") as f:
    head = f.read(64)
  file_size = as_path(path).stat().length
  if head.startswith(_ZIP_MAGIC):
    out = _load_zip(path, file_size, max_expansion)
  elif _is_safetensors(path, head):
    out = _load_safetensors(path)
  elif head[:1] == b"\x80":
    out = _load_legacy(path, file_size, max_expansion)
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
  try:
    with as_path(path).open("rb") as f:
      return tarfile.is_tarfile(f)
  except OSError:
    return False

