"""The torch-free weight reader against files written by torch (tests/fixtures/torch_weights/).

make_torch_weights_fixture.py wrote the files with torch and recorded, for each, what
`state_dict()` / the saved tree holds (names, dtypes, shapes, exact values).
"""

import json
import os
import pickle
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

from common.weights import torch_weights
from common.errors import CheckpointError, DataNotFoundError
from common.weights.torch_weights import load_torch_weights
from tests.bad_inputs import torch_files as tf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torch_weights")
with open(os.path.join(FIXTURES, "expected.json"), encoding="utf-8") as _f:
  META = json.load(_f)
EXPECTED = np.load(os.path.join(FIXTURES, "expected.npz"))


@pytest.mark.parametrize("filename", sorted(META))
def test_reads_what_torch_wrote(filename):
  weights = load_torch_weights(os.path.join(FIXTURES, filename))
  assert sorted(weights) == sorted(META[filename])
  for name, array in weights.items():
    meta = META[filename][name]
    assert str(array.dtype) == meta["dtype"], name
    assert list(array.shape) == meta["shape"], name
    expected = EXPECTED[f"{filename}|{name}"]
    np.testing.assert_array_equal(array.astype(expected.dtype), expected, err_msg=name)


def test_nested_dicts_views_and_dtypes():
  w = load_torch_weights(os.path.join(FIXTURES, "state_dict.pt"))
  assert {"model.conv.weight", "ema.inner.w", "list.0", "list.1"} <= set(w)
  assert "step" not in w and "name" not in w  # non-tensor leaves are dropped
  np.testing.assert_array_equal(w["transposed"], w["base"].T)  # strided view of a shared storage
  np.testing.assert_array_equal(w["slice"], w["base"][1:, 2:])  # view with a storage offset
  assert w["model.norm.scale"].dtype.name == "bfloat16"
  assert w["model.fp8"].dtype.name == "float8_e4m3fn"
  assert w["model.emb.index"].dtype == np.int64 and w["model.emb.index"][2, 1] == 5 * 1000003
  w["base"][0, 0] = 123.0  # results are independent copies
  assert w["transposed"][0, 0] != 123.0


def test_torchscript_gives_state_dict_names():
  w = load_torch_weights(os.path.join(FIXTURES, "script.pt"))
  assert "body.0.running_var" in w and "body.0.num_batches_tracked" in w and "steps" in w
  assert "not_state" not in w  # a tensor attribute outside __parameters__/__buffers__


def test_content_not_extension_decides(tmp_path):
  st = tmp_path / "weights.bin"
  shutil.copy(os.path.join(FIXTURES, "weights.safetensors"), st)
  assert str(load_torch_weights(str(st))["b.bf16"].dtype) == "bfloat16"
  pt = tmp_path / "state.safetensors"
  shutil.copy(os.path.join(FIXTURES, "state_dict.pt"), pt)
  assert "model.conv.weight" in load_torch_weights(str(pt))


def test_committed_malicious_file_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # its payload runs `touch pwned_by_fixture` in the working directory
  with pytest.raises(CheckpointError, match=r"refusing to load.*'posix\.system'"):
    load_torch_weights(os.path.join(FIXTURES, "malicious.pt"))
  assert not (tmp_path / "pwned_by_fixture").exists()


class _Payload:

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return (self.func, self.args)


def _zip(path, data_pkl: bytes, *, torchscript: bool = False):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/version", "3\n")
    if torchscript:
      zf.writestr("archive/constants.pkl", pickle.dumps(()))
      zf.writestr("archive/code/__torch__/m.py", "class M(Module):\n  __parameters__ = []\n")


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.call"])
@pytest.mark.parametrize("torchscript", [False, True])
def test_crafted_payloads_are_refused_not_run(tmp_path, kind, torchscript):
  marker = tmp_path / "marker"
  payload = {
      "os.system": _Payload(os.system, f"touch {marker}"),
      "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
      "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
  }[kind]
  data = pickle.dumps({"w": payload}, protocol=2)
  path = tmp_path / "evil.pt"
  _zip(path, data, torchscript=torchscript)
  with pytest.raises(CheckpointError, match="refusing to load") as info:
    load_torch_weights(str(path))
  assert kind.split(".")[1] in str(info.value)
  assert not marker.exists()
  pickle.loads(data)  # the same bytes, unpickled naively, do run the payload: the test can fail
  assert marker.exists()


def _op_str(s: str) -> bytes:
  b = s.encode()
  return b"X" + len(b).to_bytes(4, "little") + b


def _op_int_tuple(values) -> bytes:
  return b"(" + b"".join(b"J" + int(v).to_bytes(4, "little", signed=True) for v in values) + b"t"


def _tensor_pickle(size, stride, offset, numel) -> bytes:
  """The pickle torch.save writes for {"w": tensor}, by hand (torch is not installed here)."""
  storage = (b"(" + _op_str("storage") + b"ctorch\nFloatStorage\n" + _op_str("0") + _op_str("cpu")
             + b"J" + numel.to_bytes(4, "little") + b"tQ")
  args = (storage + b"J" + offset.to_bytes(4, "little") + _op_int_tuple(size) + _op_int_tuple(stride)
          + b"\x89}")
  return (b"\x80\x02}" + _op_str("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tRs.")


def test_hand_written_tensor_pickle_and_bounds(tmp_path):
  storage = np.arange(6, dtype=np.float32)
  good = tmp_path / "good.pt"
  with zipfile.ZipFile(good, "w") as zf:
    zf.writestr("archive/data.pkl", _tensor_pickle((2, 2), (1, 2), 1, 6))
    zf.writestr("archive/data/0", storage.tobytes())
  np.testing.assert_array_equal(load_torch_weights(str(good))["w"], [[1, 3], [2, 4]])
  bad = tmp_path / "bad.pt"  # a view reaching past its storage must not read foreign memory
  with zipfile.ZipFile(bad, "w") as zf:
    zf.writestr("archive/data.pkl", _tensor_pickle((2, 2), (1, 1000), 0, 6))
    zf.writestr("archive/data/0", storage.tobytes())
  with pytest.raises(CheckpointError, match="reads past its storage"):
    load_torch_weights(str(bad))
  short = tmp_path / "short.pt"
  with zipfile.ZipFile(short, "w") as zf:
    zf.writestr("archive/data.pkl", _tensor_pickle((2,), (1,), 0, 6))
    zf.writestr("archive/data/0", storage[:3].tobytes())
  with pytest.raises(CheckpointError, match="corrupt"):
    load_torch_weights(str(short))


def test_bad_files_give_one_clear_error(tmp_path):
  with pytest.raises(DataNotFoundError, match="not found"):
    load_torch_weights(str(tmp_path / "missing.pt"))
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"hello, not weights" * 10)
  with pytest.raises(CheckpointError, match="not a torch zip archive"):
    load_torch_weights(str(junk))
  nozip = tmp_path / "other.zip"
  with zipfile.ZipFile(nozip, "w") as zf:
    zf.writestr("readme.txt", "hi")
  with pytest.raises(CheckpointError, match="data.pkl"):
    load_torch_weights(str(nozip))
  plain = tmp_path / "plain.pkl"  # a pickle without torch's legacy magic number
  plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  with pytest.raises(CheckpointError, match="not a torch checkpoint"):
    load_torch_weights(str(plain))
  truncated = tmp_path / "truncated.pt"
  data = open(os.path.join(FIXTURES, "legacy.pt"), "rb").read()
  truncated.write_bytes(data[:-40])
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_torch_weights(str(truncated))


def test_cyclic_pickle_terminates(tmp_path):
  cyclic = []
  cyclic.append(cyclic)
  path = tmp_path / "cyclic.pt"
  _zip(path, pickle.dumps({"a": cyclic}, protocol=2))
  with pytest.raises(CheckpointError, match="holds no tensors"):
    load_torch_weights(str(path))


# ---- hostile and damaged files, assembled opcode by opcode (tests/bad_inputs/torch_files.py) -----

NUMPY_F8_STATE = tf.tuple_(tf.integer(3), tf.string("<"), tf.NONE, tf.NONE, tf.NONE, tf.integer(-1),
                           tf.integer(-1), tf.integer(0))


def _object_array():
  """numpy's own pickle of np.array([1, 2], dtype=object): _reconstruct, then BUILD with a list."""
  state = tf.tuple_(tf.integer(3), tf.string("|"), tf.NONE, tf.NONE, tf.NONE, tf.integer(-1),
                    tf.integer(-1), tf.integer(63))
  return tf.build_on(
      tf.call(tf.global_("numpy.core.multiarray", "_reconstruct"), tf.global_("numpy", "ndarray"),
              tf.ints((0,)), tf.bytes_(b"b")),
      tf.tuple_(tf.integer(1), tf.ints((2,)), tf.numpy_dtype("O8", state), tf.FALSE,
                tf.list_(tf.integer(1), tf.integer(2))))


@pytest.mark.parametrize("entry,refused", [
    (_object_array(), r"'numpy\.core\.multiarray\._reconstruct'"),
    # uninitialised memory handed back as weights
    (tf.call(tf.global_("numpy", "ndarray"), tf.ints((64,)), tf.string("f8")), r"'numpy\.ndarray'"),
    # a void dtype of 1 byte whose field is an 8-byte float: the scalar reads past its buffer
    (tf.numpy_scalar(tf.numpy_dtype("V1", tf.tuple_(
        tf.integer(3), tf.string("|"), tf.NONE, tf.tuple_(tf.string("a")),
        tf.dict_({"a": tf.tuple_(tf.numpy_dtype("f8"), tf.integer(0))}), tf.integer(1), tf.integer(1),
        tf.integer(0))), b"\x00"), r"numpy dtype 'V1'"),
    # a plain descriptor whose state adds fields and flags
    (tf.numpy_dtype("f8", tf.tuple_(tf.integer(3), tf.string("<"), tf.NONE, tf.tuple_(tf.string("a")),
                                     tf.NONE, tf.integer(8), tf.integer(8), tf.integer(63))),
     r"numpy dtype with the state"),
], ids=["object-array", "ndarray", "field-past-itemsize", "dtype-state-with-fields"])
def test_numpy_arrays_and_non_numeric_dtypes_are_refused(tmp_path, entry, refused):
  path = tf.one_tensor_zip(tmp_path / "np.pt", {"meta": entry}, byteorder=None)
  with pytest.raises(CheckpointError, match=refused):
    load_torch_weights(path)


def test_numpy_scalars_in_metadata_are_read_as_numbers(tmp_path):
  meta = tf.dict_({"lr": tf.numpy_scalar(tf.numpy_dtype("f8"), np.float64(0.5).tobytes()),
                   "step": tf.numpy_scalar(tf.numpy_dtype("i8"), np.int64(7).tobytes())})
  w = load_torch_weights(tf.one_tensor_zip(tmp_path / "meta.pt", {"meta": meta}))
  assert sorted(w) == ["w"]  # non-tensor leaves are dropped, as for plain Python numbers
  np.testing.assert_array_equal(w["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


_DEFAULTS = torch_weights._rebuild_tensor_v2.__defaults__  # pylint: disable=protected-access


@pytest.mark.parametrize("target,named", [
    (tf.global_("torch._utils", "_rebuild_tensor_v2"), "'torch._utils._rebuild_tensor_v2'"),
    (tf.global_("argparse", "Namespace"), "'argparse.Namespace'"),
    (tf.call(tf.global_("collections", "OrderedDict")), "OrderedDict"),
], ids=["function", "class", "dict"])
def test_build_on_a_function_or_class_is_refused(tmp_path, target, named):
  # BUILD's (dict, slotstate) form sets attributes: on a function it would change the reader itself.
  state = tf.tuple_(tf.NONE, tf.dict_({"__defaults__": tf.tuple_(tf.integer(7), tf.FALSE, tf.NONE,
                                                                 tf.NONE)}))
  path = tf.one_tensor_zip(tmp_path / "build.pt", {"x": tf.build_on(target, state)})
  with pytest.raises(CheckpointError, match="BUILD") as info:
    load_torch_weights(path)
  assert named in str(info.value)
  assert torch_weights._rebuild_tensor_v2.__defaults__ == _DEFAULTS  # pylint: disable=protected-access


@pytest.mark.parametrize("entry,refused", [
    (pickle.MARK + pickle.INST + b"collections\nOrderedDict\n", "INST opcode"),
    (pickle.MARK + tf.global_("collections", "OrderedDict") + pickle.OBJ, "OBJ opcode"),
    (tf.global_("builtins", "set") + tf.tuple_() + pickle.NEWOBJ, "instantiates '.*set' with NEWOBJ"),
    (tf.call(tf.global_("builtins", "bytearray"), tf.integer(2**40)), "bytearray"),
    (tf.call(tf.global_("torch", "Size"), tf.string("x" * 100)), "torch.Size"),
], ids=["INST", "OBJ", "NEWOBJ-set", "bytearray-2**40", "Size-of-str"])
def test_opcodes_and_calls_a_weight_file_never_needs_are_refused(tmp_path, entry, refused):
  path = tf.one_tensor_zip(tmp_path / "op.pt", {"x": entry})
  with pytest.raises(CheckpointError, match=refused):
    load_torch_weights(path)


@pytest.mark.parametrize("pid", [
    tf.tuple_(tf.string("storage"), tf.global_("torch", "FloatStorage"), tf.integer(0), tf.string("cpu"),
              tf.integer(6)),  # an int key
    tf.tuple_(tf.string("storage"), tf.global_("torch", "FloatStorage"), tf.string("0"), tf.string("cpu"),
              tf.string("6")),  # a str numel
    tf.tuple_(tf.string("storage"), tf.global_("torch", "FloatStorage"), tf.string("0"), tf.string("cpu"),
              tf.integer(6), tf.NONE),  # a legacy view field in a zip archive
], ids=["int-key", "str-numel", "six-fields"])
def test_malformed_storage_references_are_refused(tmp_path, pid):
  w = tf.call(tf.global_("torch._utils", "_rebuild_tensor_v2"), pid + pickle.BINPERSID, tf.integer(0),
              tf.ints((6,)), tf.ints((1,)), tf.FALSE, tf.NONE)
  path = tf.torch_zip(tmp_path / "pid.pt", tf.program(tf.dict_({"w": w})),
                      {"0": np.zeros(6, np.float32).tobytes()})
  with pytest.raises(CheckpointError, match="malformed storage reference"):
    load_torch_weights(path)


def test_views_may_not_expand_their_storage(tmp_path):
  # one float viewed as 1024 x 1024 (stride 0): 4 MiB of tensor from a file of a few hundred bytes
  path = tf.torch_zip(tmp_path / "stride0.pt", tf.program(tf.dict_(
      {"w": tf.tensor("0", (1024, 1024), (0, 0), numel=1)})), {"0": np.ones(1, np.float32).tobytes()})
  with pytest.raises(CheckpointError, match=r"addresses 1048576 elements of a storage of 1, more than "
                                            r"max_expansion=4"):
    load_torch_weights(path)
  w = load_torch_weights(path, max_expansion=2**21)  # the caller trusts it
  assert w["w"].shape == (1024, 1024) and w["w"].min() == 1


def test_empty_views_with_impossible_dimensions(tmp_path):
  ok = tf.torch_zip(tmp_path / "empty.pt", tf.program(tf.dict_({"w": tf.tensor("0", (0, 5), numel=0)})),
                    {"0": b""})
  assert load_torch_weights(ok)["w"].shape == (0, 5)
  bad = tf.torch_zip(tmp_path / "huge_empty.pt", tf.program(tf.dict_(
      {"w": tf.tensor("0", (0, 2**62), (1, 1), numel=0)})), {"0": b""})
  with pytest.raises(CheckpointError, match="impossible dimensions"):
    load_torch_weights(bad)


def test_many_views_of_one_storage_are_bounded_by_the_file_size(tmp_path):
  views = {f"v{i}": tf.tensor("0", (1024,)) for i in range(64)}  # 64 x 4 KiB from a ~9 KiB file
  path = tf.torch_zip(tmp_path / "views.pt", tf.program(tf.dict_(views)),
                      {"0": np.ones(1024, np.float32).tobytes()})
  with pytest.raises(CheckpointError, match=r"its tensors \(262144 bytes\) would bring .* more than max_expansion=4"):
    load_torch_weights(path)
  assert len(load_torch_weights(path, max_expansion=64)) == 64


def test_compressed_records(tmp_path):
  data = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
  good = tf.torch_zip(tmp_path / "rezipped.pt", tf.program(tf.dict_({"w": tf.tensor("0", (1000,))})),
                      {"0": data.tobytes()}, compression=zipfile.ZIP_DEFLATED)
  np.testing.assert_array_equal(load_torch_weights(good)["w"], data)  # e.g. unzipped and zipped again
  n = 16 * 2**20  # 64 MiB of zeros deflate to ~64 KiB: refused before inflating
  bomb = tf.torch_zip(tmp_path / "bomb.pt", tf.program(tf.dict_({"w": tf.tensor("0", (1,), numel=n)})),
                      {"0": bytes(4 * n)}, compression=zipfile.ZIP_DEFLATED)
  with pytest.raises(CheckpointError, match=r"record archive/data/0 \(67108864 bytes\) would bring"):
    load_torch_weights(bomb)
  bz2 = tf.torch_zip(tmp_path / "bz2.pt", tf.program(tf.dict_({"w": tf.tensor("0", (1000,))})),
                     {"0": data.tobytes()}, compression=zipfile.ZIP_BZIP2)
  with pytest.raises(CheckpointError, match="compression method 12"):
    load_torch_weights(bz2)


def test_declared_sizes_are_checked_before_reading(tmp_path):
  numel = 2**38  # 1 TiB of float32 declared, 16 bytes present
  zipped = tf.torch_zip(tmp_path / "huge.pt", tf.program(tf.dict_({"w": tf.tensor("0", (numel,))})),
                        {"0": bytes(16)})
  with pytest.raises(CheckpointError, match=rf"holds 16 bytes, its pickle declares {4 * numel}"):
    load_torch_weights(zipped)
  legacy = tf.legacy_file(tmp_path / "huge_legacy.pt", tf.program(tf.dict_(
      {"w": tf.tensor("0", (numel,), legacy=True)})), [("0", numel, bytes(16))])
  with pytest.raises(CheckpointError, match=rf"declares {numel} elements, 16 bytes are left"):
    load_torch_weights(legacy)


def test_legacy_file_written_by_hand(tmp_path):
  data = np.arange(6, dtype=np.float32)
  path = tf.legacy_file(tmp_path / "legacy.pt", tf.program(tf.dict_(
      {"w": tf.tensor("0", (3, 2), (1, 3), legacy=True)})), [("0", 6, data.tobytes())])
  np.testing.assert_array_equal(load_torch_weights(path)["w"], data.reshape(2, 3).T)


def test_flipped_crc_and_byteorder(tmp_path):
  path = tf.one_tensor_zip(tmp_path / "crc.pt")
  raw = bytearray(open(path, "rb").read())
  at = raw.index(np.arange(6, dtype=np.float32).tobytes())
  raw[at + 5] ^= 0x40
  open(path, "wb").write(bytes(raw))
  with pytest.raises(CheckpointError, match=r"record archive/data/0 is damaged \(BadZipFile: Bad CRC"):
    load_torch_weights(path)
  for byteorder in (b"LITTLE", b"little\n", "littl\u00e9".encode(), b"\xff\xfe"):
    path = tf.one_tensor_zip(tmp_path / "order.pt", byteorder=byteorder)
    with pytest.raises(CheckpointError, match="byteorder record is .*, not 'little' or 'big'"):
      load_torch_weights(path)
  big = tf.torch_zip(tmp_path / "big.pt", tf.program(tf.dict_({"w": tf.tensor("0", (6,))})),
                     {"0": np.arange(6, dtype=">f4").tobytes()}, byteorder=b"big")
  np.testing.assert_array_equal(load_torch_weights(big)["w"], np.arange(6, dtype=np.float32))


def _mutate(rng: np.random.Generator, raw: bytes) -> bytes:
  """1-4 random byte changes, deletions or insertions."""
  b = bytearray(raw)
  for _ in range(rng.integers(1, 5)):
    i, op = int(rng.integers(len(b))), rng.random()
    if op < 0.6:
      b[i] = int(rng.integers(256))
    elif op < 0.8:
      del b[i]
    else:
      b.insert(i, int(rng.integers(256)))
  return bytes(b)


@pytest.mark.parametrize("filename", ["state_dict.pt", "legacy.pt", "script.pt"])
def test_damaged_pickles_give_a_result_or_one_clear_error(tmp_path, filename):
  # seeded damage to the pickle (the whole legacy file; data.pkl of a zip, re-zipped with valid CRCs)
  rng = np.random.default_rng(1)
  source = os.path.join(FIXTURES, filename)
  path = tmp_path / filename
  for _ in range(200):
    if filename == "legacy.pt":
      path.write_bytes(_mutate(rng, open(source, "rb").read()))
    else:
      with zipfile.ZipFile(source) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
          raw = zin.read(info)
          zout.writestr(info.filename, _mutate(rng, raw) if raw and info.filename.endswith(
              "/data.pkl") else raw)
    try:
      load_torch_weights(str(path))
    except CheckpointError:
      pass
