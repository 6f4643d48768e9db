"""Plug-in names read from files resolve only through the registry (common/registry.py).

A name from the user's own config imports whatever it names; inside `registry.from_file` (an
export's config.json, an autoencoder export) it must be a registered plug-in of the key's kind.
"""

import ast
import json
import os
import subprocess
import sys

import jax
import ml_collections
import optax
import pytest

from common import registry
from common.weights import deployment
from common.nn import numerics
from common.diffusion.recipes import make_diffusion
from common.errors import ConfigError
from common.training.experiment import build_model, model_class
from common.training.optim import optimizer_factory
from configs import sid2_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTILE = ("os.system", "builtins.eval", "subprocess.run", "common.registry.import_object",
           "common.diffusion.adm.ADMDiffusion.__init__", "common..registry", "sid2.model.ResidualUViT")

GOOD = {"model": "sid2.model.ResidualUViT",
        "autoencoder": "autoencoder.small_kl.SmallKLAutoencoder",
        "diffusion": "common.diffusion.adm.ADMDiffusion", "optimizer": "coat.optim.fp8_adamw",
        "precision": "coat.precision.COAT", "numerics": "common.nn.numerics.FullPrecision",
        "converter": "common.weights.init_from.from_param_paths"}


def _resolve(kind: str, name: str):
  """Resolves `name` through the config key of `kind` as the trainer does."""
  c = sid2_digits.get_config("runlocal")
  if kind == "model":
    return model_class(ml_collections.ConfigDict({"name": name}))
  if kind == "autoencoder":
    return model_class(ml_collections.ConfigDict({"name": name}), "autoencoder")
  if kind == "diffusion":
    return make_diffusion(ml_collections.ConfigDict({"name": name}))
  if kind == "optimizer":
    return optimizer_factory(name)
  if kind == "precision":
    c.precision = name
    return numerics.precision(c)
  if kind == "numerics":
    return numerics.apply_rules(build_model(c.model, jax.random.key(0)), ((r".*", name, {}, False),))
  return registry.import_object(name, "init_from.converter", "converter")




@pytest.mark.parametrize("kind,name", [(k, n) for k in registry.KINDS for n in HOSTILE
                                       if n != GOOD[k]])
def test_an_unregistered_name_from_a_file_is_refused(kind, name):
  with registry.from_file("/x/config.json"), pytest.raises(ConfigError) as e:
    _resolve(kind, name)
  msg = str(e.value)
  assert "\n" not in msg and "/x/config.json" in msg and repr(name) in msg, msg
  assert GOOD[kind] in msg  # the allowed names are listed


@pytest.mark.parametrize("kind", registry.KINDS)
def test_a_registered_name_from_a_file_resolves(kind):
  with registry.from_file("/x/config.json"):
    assert _resolve(kind, GOOD[kind]) is not None


def test_registered_short_names_are_listed_and_still_work_from_a_file():
  with registry.from_file("/x/config.json"):
    assert make_diffusion(ml_collections.ConfigDict({"name": "vp", "schedule": {"name": "cosine"}}))
    assert optimizer_factory("adamw") is optax.adamw
    c = sid2_digits.get_config("runlocal")
    c.precision = "coat"
    assert numerics.precision(c).optimizer == "coat.optim.fp8_adamw"
    with pytest.raises(ConfigError, match=r"'vp', 'edm'.*common\.diffusion\.adm\.ADMDiffusion"):
      make_diffusion(ml_collections.ConfigDict({"name": "os.system"}))


def test_the_users_own_config_still_imports_any_dotted_name():
  assert registry.import_object("os.path.join", "config.model.name", "model") is os.path.join
  assert optimizer_factory("optax.adamw") is optax.adamw
  assert registry.file_source() is None


def test_every_registering_module_is_listed():
  """registry.PLUGIN_MODULES (used to list the allowed names) names every module that registers."""
  found = set()
  for package in registry.OUR_PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if not f.endswith(".py") or f == "registry.py":
          continue
        path = os.path.join(dirpath, f)
        with open(path, encoding="utf-8") as fh:
          tree = ast.parse(fh.read())
        if any(isinstance(n, ast.Attribute) and n.attr in ("register", "add")
               and isinstance(n.value, ast.Name) and n.value.id == "registry"
               for n in ast.walk(tree)):
          found.add(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
  assert found and found == set(registry.PLUGIN_MODULES)


def test_a_hostile_export_runs_nothing(tmp_path):
  """An export whose config names subprocess.run as its recipe: refused on one line, nothing runs."""
  c = sid2_digits.get_config("runlocal")
  export = tmp_path / "export"
  deployment.save_export(export, c, build_model(c.model, jax.random.key(0)))
  marker = tmp_path / "MARKER"
  meta = json.loads((export / "config.json").read_text())
  meta["config"]["diffusion"] = {"name": "subprocess.run", "args": ["touch", str(marker)]}
  (export / "config.json").write_text(json.dumps(meta))
  r = subprocess.run([sys.executable, "launch/main.py", "--mode=sample", f"--checkpoint={export}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert not marker.exists()
  assert r.returncode == 1, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert "Traceback" not in r.stderr and last.startswith("error: config.diffusion.name="), r.stderr
  assert "'subprocess.run'" in last and "config.json" in last


@pytest.mark.parametrize("key,value", [
    ("model.name", "os.system"), ("diffusion", {"name": "subprocess.run"}),
    ("optim.name", "builtins.eval"), ("precision", "common.registry.import_object"),
    ("numerics.rules", ((".*", "os.system", {}),)), ("init_from.converter", "os.system")])
def test_resolve_plugins_refuses_every_unregistered_name_of_a_file_config(key, value):
  """Even keys the mode at hand does not use (sampling builds no optimizer)."""
  from common.training.experiment import resolve_plugins  # pylint: disable=import-outside-toplevel
  c = sid2_digits.get_config("runlocal")
  resolve_plugins(c)
  with registry.from_file("/x/config.json"):
    resolve_plugins(c)
    node, parts = c, key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
    with pytest.raises(ConfigError, match="read from /x/config.json"):
      resolve_plugins(c)


@pytest.mark.parametrize("old,new,kind", [
    ("common.adm.ADMDiffusion", "common.diffusion.adm.ADMDiffusion", "diffusion"),
    ("common.numerics.BF16", "common.nn.numerics.BF16", "precision"),
    ("common.autoencoders.small_kl.SmallKLAutoencoder", "autoencoder.small_kl.SmallKLAutoencoder",
     "autoencoder"),
    ("common.autoencoders.kl_vae.AutoencoderKL", "autoencoder.kl_vae.AutoencoderKL", "model"),
    ("common.autoencoders.recipe.KLAutoencoderRecipe", "autoencoder.recipe.KLAutoencoderRecipe",
     "diffusion")])
def test_names_of_moved_modules_in_older_files_resolve_to_the_new_place(old, new, kind):
  with registry.from_file("/x/config.json"):
    assert registry.import_object(old, "config.key", kind) is registry.import_object(new, "k", kind)


def test_the_autoencoder_loader_kept_its_name_and_is_no_moved_plug_in():
  """common.autoencoders is still the loader's module; only the family's modules moved out."""
  assert registry.moved_name("common.autoencoders.load_autoencoder") == (
      "common.autoencoders.load_autoencoder")
  with registry.from_file("/x/config.json"), pytest.raises(ConfigError, match="not a registered"):
    registry.import_object("common.autoencoders.load_autoencoder", "config.model.name",
                           "autoencoder")
