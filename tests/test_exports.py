"""Export folders read from disk are checked before use (common/deployment.py): the weights against
the SHA-256 recorded at export time, config.json's structure, its format version."""

import json

from flax import nnx
import jax
import pytest

from common import deployment
from common.errors import CheckpointError, DataNotFoundError
from common.experiment import build_model
from configs import sid2_digits


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """(folder, abstract deployed state) of an untrained sid2_digits:runlocal export."""
  c = sid2_digits.get_config("runlocal")
  folder = tmp_path_factory.mktemp("export") / "export"
  model = build_model(c.model, jax.random.key(0))
  deployment.save_export(folder, c, model, extra={"source": {"workdir": "w", "step": 7}})
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(c.model,
                                                                           jax.random.key(0)))))
  return folder, abstract


def _copy(src, dst):
  dst.mkdir()
  for name in (deployment.CONFIG_FILE, deployment.PARAMS_FILE):
    (dst / name).write_bytes((src / name).read_bytes())
  return dst


def test_an_intact_export_loads_and_records_its_checksum(export):
  folder, abstract = export
  meta = json.loads((folder / deployment.CONFIG_FILE).read_text())
  assert meta["format"] == deployment.EXPORT_FORMAT
  assert meta["sha256"] == {deployment.PARAMS_FILE: deployment.sha256_hex(
      (folder / deployment.PARAMS_FILE).read_bytes())}
  assert deployment.is_export(folder) and deployment.export_step(folder) == 7
  assert deployment.load_export_config(folder).model.name == "sid2.model.ResidualUViT"
  deployment.load_export_state(folder, abstract)


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_a_changed_weights_file_is_refused(export, tmp_path, damage):
  folder, abstract = export
  bad = _copy(folder, tmp_path / "bad")
  data = bytearray((bad / deployment.PARAMS_FILE).read_bytes())
  if damage == "flip":
    data[len(data) // 2] ^= 0x10  # inside the array data: safetensors itself would not notice
  elif damage == "truncate":
    data = data[:len(data) // 3]
  else:
    data += b"\0" * 8
  (bad / deployment.PARAMS_FILE).write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="does not match the checksum recorded in .*config.json "
                     "at export time: changed or damaged; export again"):
    deployment.load_export_state(bad, abstract)


def _edit_meta(src, dst, edit):
  bad = _copy(src, dst)
  meta = json.loads((bad / deployment.CONFIG_FILE).read_text())
  meta = edit(meta)
  (bad / deployment.CONFIG_FILE).write_text(json.dumps(meta))
  return bad


def _set(key, value):
  def edit(meta):
    meta[key] = value
    return meta
  return edit


def _drop(key):
  def edit(meta):
    del meta[key]
    return meta
  return edit


@pytest.mark.parametrize("edit,message", [
    (_set("format", "frugal-diffusion/deployed-v1"), r"older format .*deployed-v1.*export again"),
    (_drop("format"), r"not written by --mode=export \(format None"),
    (_set("format", ["x"]), r"not written by --mode=export"),
    (_set("config", [1, 2]), r'"config" is list, not an object'),
    (_set("config", "sid2"), r'"config" is str, not an object'),
    (_drop("sha256"), r'records no checksums'),
    (_set("sha256", {deployment.PARAMS_FILE: 5}), r"records no SHA-256 of params.safetensors"),
    (_set("sha256", {}), r"records no SHA-256 of params.safetensors"),
    (lambda meta: [meta], r"holds a JSON list, not an object"),
    (lambda meta: None, r"holds a JSON NoneType, not an object"),
])
def test_a_damaged_config_json_is_one_clear_line(export, tmp_path, edit, message):
  folder, abstract = export
  bad = _edit_meta(folder, tmp_path / "bad", edit)
  with pytest.raises(CheckpointError, match=message) as e:
    deployment.load_export_config(bad)
    deployment.load_export_state(bad, abstract)
  assert "\n" not in str(e.value)
  assert deployment.export_step(bad) in (7, None)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[" * 100_000, b""])
def test_config_json_that_is_not_json_is_one_clear_line(export, tmp_path, content):
  folder, abstract = export
  bad = _copy(folder, tmp_path / "bad")
  (bad / deployment.CONFIG_FILE).write_bytes(content)
  for load in (lambda: deployment.load_export_config(bad),
               lambda: deployment.load_export_state(bad, abstract)):
    with pytest.raises(CheckpointError, match="is not valid JSON") as e:
      load()
    assert "\n" not in str(e.value)
  assert not deployment.is_export(bad) and deployment.export_step(bad) is None


def test_a_missing_folder_or_weights_file_says_so(export, tmp_path):
  folder, abstract = export
  with pytest.raises(DataNotFoundError, match="not an export folder"):
    deployment.load_export_config(tmp_path)
  bad = _copy(folder, tmp_path / "bad")
  (bad / deployment.PARAMS_FILE).unlink()
  with pytest.raises(DataNotFoundError, match="params.safetensors is missing"):
    deployment.load_export_state(bad, abstract)


def test_odd_source_steps_are_unknown(export, tmp_path):
  folder, _ = export
  for i, step in enumerate(([1], "7", True, None, {"a": 1})):
    bad = _edit_meta(folder, tmp_path / f"bad{i}", _set("source", {"step": step}))
    assert deployment.export_step(bad) is None
