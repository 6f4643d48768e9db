"""Bad-input cases of the torch weight reader (`common.weights.torch_weights`, issue item 2): hostile pickles
and damaged archives, assembled opcode by opcode without torch (tests/bad_inputs/torch_files.py).

Most run `load_torch_weights(FILE)` through `python -m tests.bad_inputs.call torch_weights FILE`; two
run through the entry points users reach it by: `launch/evaluate.py --inception=FILE` and a training
run with `config.init_from.path=FILE`.
"""

import pathlib
import zipfile

import numpy as np

from tests.bad_inputs import torch_files as tf
from tests.bad_inputs.harness import MARKER, Case

_CALL = ["-m", "tests.bad_inputs.call", "torch_weights"]
_SMALL_RSS = 500  # MiB: the reader alone (numpy, no jax), with room; a 1 GiB allocation breaks it


def _call(path: str) -> list[str]:
  return [*_CALL, path]


def _with(d: pathlib.Path, **entries: bytes) -> str:
  """A valid archive {"w": a 2 x 3 float32 tensor} with the pickled `entries` beside it."""
  return tf.one_tensor_zip(d / "weights.pt", entries)


def _os_system(d: pathlib.Path) -> bytes:
  return tf.call(tf.global_("os", "system"), tf.string(f"touch {d / MARKER}"))


# numpy's dtype state for `descr` with its flags forced to 0: numpy then believes it holds no object
# references, so raw bytes become object pointers (0x4141414141414141: SIGSEGV on first use).
def _hidden_object_dtype() -> bytes:
  return tf.numpy_dtype("O8", tf.tuple_(tf.integer(3), tf.string("|"), tf.NONE, tf.NONE, tf.NONE,
                                        tf.integer(-1), tf.integer(-1), tf.integer(0)))


def _object_array(n: int) -> bytes:
  """numpy's pickle of an ndarray (`_reconstruct`, then BUILD) of `n` attacker-chosen pointers."""
  return tf.build_on(
      tf.call(tf.global_("numpy.core.multiarray", "_reconstruct"), tf.global_("numpy", "ndarray"),
              tf.ints((0,)), tf.bytes_(b"b")),
      tf.tuple_(tf.integer(1), tf.ints((n,)), _hidden_object_dtype(), tf.FALSE, tf.bytes_(b"A" * 8 * n)))


def build_os_system(d, pristine):
  del pristine
  return _call(_with(d, evil=_os_system(d)))


def build_subprocess(d, pristine):
  del pristine
  argv = tf.list_(tf.string("touch"), tf.string(str(d / MARKER)))
  return _call(_with(d, evil=tf.call(tf.global_("subprocess", "check_call"), argv)))


def build_object_array(d, pristine):
  del pristine
  return _call(_with(d, evil=_object_array(4)))


def build_hidden_object_dtype(d, pristine):
  del pristine
  return _call(_with(d, evil=tf.numpy_scalar(_hidden_object_dtype(), b"A" * 8)))


def build_field_past_itemsize(d, pristine):
  del pristine
  # a 1-byte void dtype whose field is an 8-byte float at offset 0: its scalar reads 7 bytes of heap
  state = tf.tuple_(tf.integer(3), tf.string("|"), tf.NONE, tf.tuple_(tf.string("a")),
                    tf.dict_({"a": tf.tuple_(tf.numpy_dtype("f8"), tf.integer(0))}), tf.integer(1),
                    tf.integer(1), tf.integer(0))
  return _call(_with(d, evil=tf.numpy_scalar(tf.numpy_dtype("V1", state), b"\x00")))


def build_build_on_rebuild(d, pristine):
  del pristine
  # BUILD's slot state sets `_rebuild_tensor_v2.__defaults__` for the rest of the process
  state = tf.tuple_(tf.NONE, tf.dict_({"__defaults__": tf.tuple_(tf.TRUE, tf.NONE, tf.NONE)}))
  return _call(_with(d, evil=tf.build_on(tf.global_("torch._utils", "_rebuild_tensor_v2"), state)))


def build_bytearray(d, pristine):
  del pristine
  return _call(_with(d, evil=tf.call(tf.global_("builtins", "bytearray"), tf.integer(2**40))))


def build_stride0(d, pristine):
  del pristine
  # one float32 viewed as 16384 x 16384 with stride 0: a 1 GiB tensor from a file of ~400 bytes
  body = tf.dict_({"w": tf.tensor("0", (2**14, 2**14), (0, 0), numel=1)})
  return _call(tf.torch_zip(d / "stride0.pt", tf.program(body), {"0": np.ones(1, np.float32).tobytes()}))


def build_deflate_bomb(d, pristine):
  del pristine
  # 1 MiB of DEFLATE inflating to a 1 GiB storage record, viewed whole: 2 GiB of memory, naively
  n = 2**30
  payload, crc = tf.deflated_zeros(n)
  pkl = tf.program(tf.dict_({"w": tf.tensor("0", (n // 4,))}))
  return _call(tf.raw_zip(d / "bomb.pt", [
      tf.stored("archive/data.pkl", pkl), tf.stored("archive/byteorder", b"little"),
      ("archive/data/0", zipfile.ZIP_DEFLATED, payload, n, crc), tf.stored("archive/version", b"3\n")]))


def build_record_size_lies(d, pristine):
  del pristine
  # a stored record whose central-directory size says 3 GiB: more than the whole file holds
  pkl = tf.program(tf.dict_({"w": tf.tensor("0", (3 * 2**28,))}))
  data = bytes(64)
  return _call(tf.raw_zip(d / "lies.pt", [
      tf.stored("archive/data.pkl", pkl),
      ("archive/data/0", zipfile.ZIP_STORED, data, 3 * 2**30, 0)]))


def build_legacy_numel(d, pristine):
  del pristine
  numel = 2**38  # declared by the pickle and the storage header; 16 bytes follow
  pkl = tf.program(tf.dict_({"w": tf.tensor("0", (numel,), legacy=True)}))
  return _call(tf.legacy_file(d / "legacy.pt", pkl, [("0", numel, bytes(16))]))


def build_legacy_length(d, pristine):
  del pristine
  # the pickle declares 4 elements, the storage header 2**40
  pkl = tf.program(tf.dict_({"w": tf.tensor("0", (4,), legacy=True)}))
  path = tf.legacy_file(d / "legacy.pt", pkl, [("0", 4, bytes(16))])
  raw = bytearray(pathlib.Path(path).read_bytes())
  raw[-24:-16] = (2**40).to_bytes(8, "little")
  pathlib.Path(path).write_bytes(bytes(raw))
  return _call(path)


def build_crc_flip(d, pristine):
  del pristine
  path = pathlib.Path(_with(d))
  raw = bytearray(path.read_bytes())
  raw[raw.index(np.arange(6, dtype=np.float32).tobytes()) + 5] ^= 0x40  # one bit of one weight
  path.write_bytes(bytes(raw))
  return _call(str(path))


def build_byteorder(value: bytes):
  def build(d, pristine):
    del pristine
    return _call(tf.one_tensor_zip(d / "weights.pt", byteorder=value))
  return build


def build_truncated(d, pristine):
  del pristine
  path = pathlib.Path(_with(d))
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) * 3 // 5])
  return _call(str(path))


def build_garbage(d, pristine):
  del pristine
  path = d / "weights.pt"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  return _call(str(path))


def build_evaluate_inception(d, pristine):
  del pristine
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  np.savez(d / "samples.npz", images=images)
  np.savez(d / "reference.npz", arr_0=images)
  weights = _with(d, evil=tf.numpy_scalar(_hidden_object_dtype(), b"A" * 8))
  return ["launch/evaluate.py", f"--samples={d / 'samples.npz'}", f"--reference={d / 'reference.npz'}",
          f"--inception={weights}", "--batch_size=4"]


def build_init_from_object_array(d, pristine):
  """The pristine run's own parameters as a torch file, one bias replaced by an object array of
  pointers: every name and shape matches, so a naive reader hands it to the float32 conversion."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  params = load_file(str(pristine.export / "params.safetensors"))
  target = min((k for k, v in params.items() if v.ndim == 1), key=lambda k: params[k].size)
  entries, records = {}, {}
  for i, (name, value) in enumerate(sorted(params.items())):
    if name == target:
      entries[name] = _object_array(len(value))
    else:
      entries[name] = tf.tensor(str(i), value.shape)
      records[str(i)] = np.ascontiguousarray(value, np.float32).tobytes()
  path = tf.torch_zip(d / "init.pt", tf.program(tf.dict_(entries)), records)
  return ["launch/main.py", f"--config={pristine.config}", f"--workdir={d / 'run'}", "--mode=train",
          f"--config.init_from.path={path}",
          "--config.init_from.converter=common.weights.init_from.from_param_paths"]


_REFUSED_GLOBAL = r"refusing to load: its pickle asks for the global '{}'"

CASES = [
    Case(name="torch/os-system", build=build_os_system, message=_REFUSED_GLOBAL.format(r"os\.system"),
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/subprocess", build=build_subprocess,
         message=_REFUSED_GLOBAL.format(r"subprocess\.check_call"), max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/object-array", build=build_object_array,
         message=_REFUSED_GLOBAL.format(r"numpy\.core\.multiarray\._reconstruct"),
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/dtype-hidden-object", build=build_hidden_object_dtype,
         message=r"refusing the numpy dtype 'O8': only plain numeric", max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/dtype-field-past-itemsize", build=build_field_past_itemsize,
         message=r"refusing the numpy dtype 'V1': only plain numeric", max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/build-on-rebuild-function", build=build_build_on_rebuild,
         message=r"applies BUILD \(set state\) to 'torch\._utils\._rebuild_tensor_v2'",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/bytearray-2**40", build=build_bytearray,
         message=r"refusing bytearray\(\) of anything but bytes", max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/stride0-view-1GiB", build=build_stride0,
         message=r"addresses 268435456 elements of a storage of 1, more than max_expansion=4",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/deflate-1MiB-to-1GiB", build=build_deflate_bomb,
         message=r"\(1073741824 bytes\) would bring .* more than max_expansion=4 times its size",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/record-size-lies", build=build_record_size_lies,
         message=r"record archive/data/0 declares 3221225472 bytes, more than the 64 bytes",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/legacy-numel-2**38", build=build_legacy_numel,
         message=r"storage 0 is truncated or corrupt \(it declares 274877906944 elements, 16 bytes",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/legacy-storage-length-2**40", build=build_legacy_length,
         message=r"storage 0 is truncated or corrupt \(it declares 1099511627776 elements",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/crc-flip", build=build_crc_flip,
         message=r"record archive/data/0 is damaged \(BadZipFile: Bad CRC-32",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/byteorder-LITTLE", build=build_byteorder(b"LITTLE"),
         message=r"byteorder record is b'LITTLE', not 'little' or 'big'", max_rss_mib=_SMALL_RSS,
         timeout_s=60),
    Case(name="torch/byteorder-non-ascii", build=build_byteorder("littl\u00e9".encode()),
         message=r"byteorder record is b'littl\\xc3\\xa9', not 'little' or 'big'",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/truncated-zip", build=build_truncated, message=r"not a readable zip archive",
         max_rss_mib=_SMALL_RSS, timeout_s=60),
    Case(name="torch/not-a-torch-file", build=build_garbage,
         message=r"not a torch zip archive, TorchScript or safetensors file", max_rss_mib=_SMALL_RSS,
         timeout_s=60),
    Case(name="torch/evaluate-inception-hidden-object", build=build_evaluate_inception,
         message=r"refusing the numpy dtype 'O8': only plain numeric", timeout_s=180),
    Case(name="torch/init-from-object-array", build=build_init_from_object_array,
         message=_REFUSED_GLOBAL.format(r"numpy\.core\.multiarray\._reconstruct"), needs=("export",),
         timeout_s=240),
]
