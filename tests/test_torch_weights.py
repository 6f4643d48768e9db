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

from common.errors import CheckpointError, DataNotFoundError
from common.torch_weights import load_torch_weights

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
