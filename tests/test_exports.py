"""Export folders read from disk are checked before use (common/weights/deployment.py): the weights against
the SHA-256 recorded at export time, config.json's structure, its format version."""

import json
import os
import resource
import shutil
import struct
import time

from flax import nnx
import jax
import pytest

from common.weights import deployment
from common.errors import CheckpointError, ConfigError, DataNotFoundError, ShapeError
from common.training.experiment import build_model
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


# ---- autoencoder exports (common/autoencoders.py) ------------------------------------------------

AE_MODEL = dict(name="autoencoder.small_kl.SmallKLAutoencoder", image_size=8, in_channels=1,
                channels=(4, 8), blocks_per_level=1, mid_blocks=1, latent_channels=2, norm_groups=2)


@pytest.fixture(scope="module")
def ae_export(tmp_path_factory):
  from common.autoencoders import save_autoencoder  # pylint: disable=import-outside-toplevel
  from autoencoder.small_kl import SmallKLAutoencoder  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("ae") / "ae"
  kwargs = {k: v for k, v in AE_MODEL.items() if k != "name"}
  net = SmallKLAutoencoder(**kwargs, rngs=nnx.Rngs(params=jax.random.key(2)))
  save_autoencoder(str(folder), AE_MODEL, nnx.to_pure_dict(nnx.state(net, nnx.Param)), shift=0.5,
                   scale=2.0, image_shape=(8, 8, 1))
  return folder


def _load_ae(folder):
  from common.autoencoders import load_autoencoder  # pylint: disable=import-outside-toplevel
  return load_autoencoder(str(folder))


def test_an_intact_autoencoder_export_loads(ae_export):
  meta = json.loads((ae_export / "config.json").read_text())
  assert meta["sha256"]["params.safetensors"] == deployment.sha256_hex(
      (ae_export / "params.safetensors").read_bytes())
  assert _load_ae(ae_export).latent_channels == 2


def test_an_autoencoder_export_written_before_the_family_moved_still_loads(ae_export, tmp_path):
  """Exports written while the networks lived in common/autoencoders/ name the old module; it
  resolves to the autoencoder family (registry.MOVED_MODULES) and gives the same network."""
  old = _copy_ae(ae_export, tmp_path / "old")
  meta = json.loads((old / "config.json").read_text())
  meta["model"]["name"] = "common.autoencoders.small_kl.SmallKLAutoencoder"
  (old / "config.json").write_text(json.dumps(meta))
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1.0, maxval=1.0)
  then, now = _load_ae(old), _load_ae(ae_export)
  assert type(then.net) is type(now.net)
  assert type(then.net).__module__ == "autoencoder.small_kl"
  assert jax.numpy.array_equal(then.encode(x), now.encode(x))


def test_an_autoencoder_export_naming_code_runs_nothing(ae_export, tmp_path):
  marker = tmp_path / "MARKER"
  for name in ("subprocess.run", "os.system", "sid2.model.ResidualUViT", "common.diffusion.adm.ADMDiffusion"):
    bad = _copy_ae(ae_export, tmp_path / name)
    meta = json.loads((bad / "config.json").read_text())
    meta["model"] = {"name": name, "args": ["touch", str(marker)]}
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=rf"config.model.name='{name}' read from .*config.json "
                       r"is not .*registered autoencoder plug-in: one of .*SmallKLAutoencoder"):
      _load_ae(bad)
  assert not marker.exists()


def _copy_ae(src, dst):
  dst.mkdir()
  for name in ("config.json", "params.safetensors"):
    (dst / name).write_bytes((src / name).read_bytes())
  return dst


@pytest.mark.parametrize("edit,error,message", [
    (lambda m: m.update(format="frugal-diffusion-autoencoder"), CheckpointError, "older format"),
    (lambda m: m.pop("sha256"), CheckpointError, "records no SHA-256 of params.safetensors"),
    (lambda m: m.update(model=[1]), CheckpointError, r'"model" is list, not an object'),
    (lambda m: m.update(scaling_factor="x"), CheckpointError, "must be numbers"),
    (lambda m: m.update(scaling_factor=[1.0, 2.0, 3.0]), ShapeError, "shift/scale must be"),
    (lambda m: m["model"].update(channels=(4, 8, 16)), ShapeError, "parameter names do not match"),
    (lambda m: m["model"].update(depth=3), ConfigError, r"does not take: \['depth'\]"),
    (lambda m: m["model"].update(blocks_per_level=10**7), ShapeError,
     r"holds \d+ tensors, the config.json beside it implies at least 320000016"),
    (lambda m: m["model"].update(mid_blocks="x"), ConfigError, "wrong type"),
])
def test_a_damaged_autoencoder_config_is_one_clear_line(ae_export, tmp_path, edit, error, message):
  bad = _copy_ae(ae_export, tmp_path / "bad")
  meta = json.loads((bad / "config.json").read_text())
  edit(meta)
  (bad / "config.json").write_text(json.dumps(meta))
  with pytest.raises(error, match=message) as e:
    _load_ae(bad)
  assert "\n" not in str(e.value)


def test_a_changed_autoencoder_weights_file_is_refused(ae_export, tmp_path):
  bad = _copy_ae(ae_export, tmp_path / "bad")
  data = bytearray((bad / "params.safetensors").read_bytes())
  data[-5] ^= 0x01
  (bad / "params.safetensors").write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="does not match the checksum recorded"):
    _load_ae(bad)


# ---- diffusers AutoencoderKL folders: the config cannot outgrow its weights ----------------------

VAE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "vae", "d16")


@pytest.mark.parametrize("change,error,message", [
    ({"layers_per_block": 100_000}, ShapeError, r"holds 100 tensors, the config.json beside it "
     r"implies at least 3200048"),
    ({"block_out_channels": [2**20] * 2, "norm_num_groups": 8}, ShapeError, "implies"),
    ({"layers_per_block": "2"}, ConfigError, "layers_per_block='2' must be a positive integer"),
    ({"block_out_channels": 16}, ConfigError, "block_out_channels=16 must be a list"),
    ({"use_quant_conv": "yes"}, ConfigError, "must be true or false"),
    ({"scaling_factor": [1]}, ConfigError, "must be numbers"),
    ({"scaling_factor": 0}, ConfigError, "non-finite or zero"),
])
def test_a_diffusers_config_is_checked_before_the_network_is_built(tmp_path, change, error, message):
  """Checked on the config and the weights' tensor count and abstract shapes: nothing the size of
  the network the config describes is allocated (peak RSS stays far below it)."""
  for name in os.listdir(VAE):
    shutil.copy(os.path.join(VAE, name), tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.update(change)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.monotonic()
  with pytest.raises(error, match=message) as e:
    _load_ae(tmp_path)
  assert "\n" not in str(e.value)
  assert time.monotonic() - start < 60
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # KiB


def test_a_safetensors_header_larger_than_its_bytes_is_refused_without_allocating(tmp_path):
  from common.autoencoders import _read_safetensors  # pylint: disable=import-outside-toplevel
  header = json.dumps({"x": {"dtype": "F32", "shape": [2**20, 2**20],
                             "data_offsets": [0, 16]}}).encode()
  path = tmp_path / "w.safetensors"
  path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with pytest.raises(CheckpointError, match="invalid shape, data type, or offset"):
    _read_safetensors(path)
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


# ---- an export's config: keys and value kinds (deployment.check_structure) -----------------------

CONFIGS = [("sid2_digits", None), ("sid2_digits", "runlocal"), ("sid2_in512", None),
           ("sid2_in256", None), ("sid2_in128", None), ("sid2_t2i_fashion", None),
           ("autoencoder_fashion", None), ("microdit", None), ("microdit", "runlocal"),
           ("terdit", "digits"), ("terdit", "600M_256"), ("terdit", "runlocal")]


@pytest.mark.parametrize("module,arg", CONFIGS)
def test_every_config_as_exported_has_the_structure(module, arg):
  import importlib  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f"configs.{module}").get_config(arg)
  deployment.check_structure(json.loads(c.to_json_best_effort()), base.structure(), "x.json")


@pytest.mark.parametrize("key,value,message", [
    ("sample", 7, r"config.sample is an int \(7\), expected an object"),
    ("model", "sid2", r"config.model is a string \('sid2'\), expected an object"),
    ("seed", "0", r"config.seed is a string \('0'\), expected an int"),
    ("train.steps", 2.5, r"config.train.steps is a number \(2.5\), expected an int"),
    ("train.ema_warmup", 1, r"config.train.ema_warmup is an int \(1\), expected a bool"),
    ("optim.learning_rate", None, r"config.optim.learning_rate is null \(None\), expected a number"),
    ("precision", ["coat"], r"config.precision is a list"),
    ("mesh", None, r"config.mesh is null"),
    ("data", None, r"config.data is null"),
])
def test_a_config_of_the_wrong_structure_is_one_clear_line(export, tmp_path, key, value, message):
  from configs import base  # pylint: disable=import-outside-toplevel
  folder, _ = export

  def edit(meta):
    node, parts = meta["config"], key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
    return meta
  bad = _edit_meta(folder, tmp_path / "bad", edit)
  with pytest.raises(CheckpointError, match=message) as e:
    deployment.load_export_config(bad, like=base.structure())
  assert "\n" not in str(e.value) and "export again" in str(e.value)


def test_a_missing_section_is_one_clear_line(export, tmp_path):
  from configs import base  # pylint: disable=import-outside-toplevel
  folder, _ = export
  bad = _edit_meta(folder, tmp_path / "bad", lambda m: (m["config"].pop("sample"), m)[1])
  with pytest.raises(CheckpointError, match=r"config.sample is missing"):
    deployment.load_export_config(bad, like=base.structure())


@pytest.mark.parametrize("module,arg", [("sid2_digits", "runlocal"), ("sid2_in512", None),
                                        ("microdit", None), ("microdit", "runlocal"),
                                        ("terdit", "digits"), ("terdit", "600M_256"),
                                        ("autoencoder_fashion", None)])
def test_the_tensor_bound_of_every_config_holds(module, arg):
  """min_param_tensors is a lower bound: an intact export never trips check_tensor_count."""
  import importlib  # pylint: disable=import-outside-toplevel
  from common import registry  # pylint: disable=import-outside-toplevel
  from common.training.experiment import model_class, numerics_rules  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f"configs.{module}").get_config(arg)
  cls = model_class(c.model)
  assert hasattr(cls, "min_param_tensors")
  for deployed in (False, True):
    model = nnx.eval_shape(lambda: build_model(c.model, jax.random.key(0), numerics_rules(c),
                                               deployed=deployed))
    n = len(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))))
    deployment.check_tensor_count(cls, registry.config_kwargs(c.model), n, "w.safetensors")
    with pytest.raises(ShapeError, match="holds 1 tensors"):
      deployment.check_tensor_count(cls, registry.config_kwargs(c.model), 1, "w.safetensors")


def test_an_export_config_implying_a_huge_network_is_refused_before_it_is_traced(export, tmp_path):
  from common.training import trainer
  folder, _ = export
  bad = _edit_meta(folder, tmp_path / "bad", lambda m: (m["config"]["model"].update(
      mid_blocks=10**7), m)[1])
  start = time.monotonic()
  with pytest.raises(ShapeError, match=r"holds \d+ tensors, the config.json beside it implies at "
                     r"least 20000004"):
    trainer.sample(deployment.load_export_config(bad), None, checkpoint=str(bad))
  assert time.monotonic() - start < 30
