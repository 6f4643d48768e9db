"""Deployment from packed 2-bit weights: --mode=export, sampling from the export (terdit/deploy.py,
common/weights/deployment.py, common/training/trainer.py).

A model made ternary by numerics rules is trained a few steps, exported and sampled: the packed
network gives the QAT network's samples (same seed) within float tolerance, holds no fp kernel of
a ternary layer, and its forward never builds a [K, N] float weight for those layers.

`CASES` names the configs under test; a TerDiT `:runlocal` config joins it by one entry.
"""

import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common.weights import deployment
from common.nn import numerics
from common.training import sharding
from common.training import trainer
from common.weights import tree_names
from common.errors import CheckpointError, ShapeError
from common.training.experiment import Experiment, build_model, numerics_rules
from configs import sid2_digits
from terdit.deploy import PackedCodes, PackedTernaryDense
from terdit.ternary import TernaryDense, TernaryKernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERNARY = "terdit.ternary.TernaryDense"


def sid2_ternary_config() -> ml_collections.ConfigDict:
  """sid2_digits:runlocal with ternary attention and MLP layers in its transformer level."""
  c = sid2_digits.get_config("runlocal")
  c.numerics.rules = ((r"mid/\d+/(attn/(qkv|out)|mlp/fc\d)", TERNARY, {}),)
  return c


CASES = {"sid2_digits_ternary": sid2_ternary_config}


def _prepare(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.train.steps = 20
  c.train.tensorboard = False
  c.train.log_every = 1
  c.sample.num_steps = 4
  c.sample.batch_size = 6
  return c


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
  """(config, workdir, export result) of a case trained 3 steps and exported."""
  c = _prepare(CASES[request.param]())
  wd = str(tmp_path_factory.mktemp(request.param))
  trainer.train(c, wd, stop_after=3)
  result = trainer.export(c, wd)
  return c, wd, result


def _float_samples(exp, params, seed, n):
  batch, _ = exp.preview_batch(n)
  return np.asarray(exp.generator()(params, jax.random.fold_in(jax.random.key(seed), 0), batch))


@pytest.mark.slow  # trains, exports and compiles samplers: minutes on 2 shared cores
def test_packed_samples_equal_the_qat_samples(trained):
  c, wd, result = trained
  mesh = sharding.make_mesh(c.mesh)
  qat = Experiment(c, mesh)
  _, state = trainer.restore_newest(qat, wd)
  want = _float_samples(qat, state["ema"], seed=7, n=6)

  export_dir = result["path"]
  cfg = deployment.load_export_config(export_dir)  # the config as the export stores it
  # In float: the deployed generator on the exported state, same key and batch.
  dep = Experiment(cfg, mesh, deployed=True)
  params = deployment.load_export_state(export_dir, dep.abstract_params)
  got = _float_samples(dep, params, seed=7, n=6)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


@pytest.mark.slow  # trains, exports and compiles samplers: minutes on 2 shared cores
def test_export_holds_packed_codes_and_its_size_is_the_formula(trained):
  c, wd, result = trained
  export_dir = result["path"]
  ternary_paths = sorted(p for p, impl in numerics.apply_rules(
      build_model(c.model, jax.random.key(0)), numerics_rules(c)).items() if impl == TERNARY)
  assert ternary_paths and sorted(result["deployed"]) == ternary_paths
  assert set(result["deployed"].values()) == {"PackedTernaryDense"}

  dep = nnx.eval_shape(lambda: build_model(c.model, jax.random.key(0), numerics_rules(c),
                                           deployed=True))
  flat = tree_names.flatten(nnx.to_pure_dict(nnx.state(dep)))
  qat = tree_names.flatten(nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: build_model(c.model, jax.random.key(0), numerics_rules(c))))))
  for path in ternary_paths:
    p = path.replace("/", ".")
    k, n = qat[p + ".kernel"].shape
    layer = {name[len(p) + 1:]: v for name, v in flat.items() if name.startswith(p + ".")}
    assert set(layer) == {"codes", "alpha", "bias"}, layer
    assert layer["codes"].dtype == jnp.uint8 and layer["codes"].shape == (-(-k // 4), n)
    assert layer["alpha"].shape == () and layer["bias"].shape == (n,)
  assert not any(isinstance(v, TernaryKernel)
                 for _, v in nnx.to_flat_state(nnx.state(dep)))
  kinds = {type(v).__name__ for _, v in nnx.to_flat_state(nnx.state(dep))}
  assert kinds == {"Param", "PackedCodes", "PackedScale", "PackedBias"}

  file_bytes = os.path.getsize(os.path.join(export_dir, deployment.PARAMS_FILE))
  assert file_bytes == result["bytes"]["export"] == deployment.safetensors_nbytes(flat)
  meta = json.load(open(os.path.join(export_dir, deployment.CONFIG_FILE)))
  assert meta["source"]["step"] == 3 and meta["bytes"]["fp32"] == result["bytes"]["fp32"]
  assert result["bytes"]["fp32"] > result["bytes"]["bf16"]
  assert result["bytes"]["fp32"] > result["bytes"]["export"]


def test_safetensors_formula_matches_the_library():
  from safetensors import numpy as st_numpy
  rng = np.random.default_rng(0)
  tensors = {"b.codes": rng.integers(0, 255, (3, 5), np.uint8), "a": rng.normal(size=(2, 7)).astype(np.float32),
             "z.alpha": np.array(1.5, np.float32), "c.0.w": np.zeros((11,), jnp.bfloat16),
             "n": np.arange(3, dtype=np.int32)}
  assert deployment.safetensors_nbytes(tensors) == len(st_numpy.save(tensors))
  for dt in (np.float32, jnp.bfloat16):
    cast = {k: np.asarray(v, dt) for k, v in tensors.items()}
    assert deployment.safetensors_nbytes(cast) == len(st_numpy.save(cast))


def _avals(jaxpr):
  """Every abstract value of a jaxpr and of the jaxprs inside it (loops, jit, remat), except
  the bodies of Pallas kernels: a kernel's values are tiles in VMEM / shared memory, and a
  small layer's whole [K, N] can be one tile (interpret mode on CPU uses one tile over N)."""
  for v in list(jaxpr.invars) + list(jaxpr.constvars):
    yield v.aval
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    if eqn.primitive.name == "pallas_call":
      continue
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _avals(inner)


def _float_shapes(fn, *args) -> set:
  out = set()
  for a in _avals(jax.make_jaxpr(fn)(*args).jaxpr):
    a = getattr(a, "inner_aval", a)
    if hasattr(a, "shape") and jnp.issubdtype(getattr(a, "dtype", jnp.int32), jnp.floating):
      out.add(tuple(a.shape))
  return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_deployed_forward_never_builds_the_weights(case):
  c = _prepare(CASES[case]())
  model = build_model(c.model, jax.random.key(0), numerics_rules(c))
  ternary = {p: (d.in_features, d.out_features) for p, d in nnx.iter_graph(model)
             if isinstance(d, TernaryDense)}
  others = {tuple(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if not isinstance(v, TernaryKernel)}
  # [K, N] shapes no full-precision parameter shares: their presence would mean a built weight.
  watched = {s for s in ternary.values() if s not in others and s[::-1] not in others}
  assert watched, ternary
  x, cond = model.example_inputs(1)
  args = (jnp.zeros(x.shape, x.dtype), jnp.zeros((1,), jnp.float32),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cond))

  def forward(graphdef, state, *a):
    out = nnx.merge(graphdef, state)(*a)
    return out[0] if isinstance(out, tuple) else out

  g, s = nnx.split(model)
  qat_shapes = _float_shapes(lambda st, *a: forward(g, st, *a), s, *args)
  assert watched <= qat_shapes  # the check can fail: the QAT forward does build them

  y_qat = jax.jit(lambda st, *a: forward(g, st, *a))(s, *args)
  assert deployment.deploy(model)
  assert not any(isinstance(v, TernaryKernel) for _, v in nnx.to_flat_state(nnx.state(model)))
  assert any(isinstance(v, PackedCodes) for _, v in nnx.to_flat_state(nnx.state(model)))
  g, s = nnx.split(model)
  dep_shapes = _float_shapes(lambda st, *a: forward(g, st, *a), s, *args)
  built = {sh for sh in watched if sh in dep_shapes or sh[::-1] in dep_shapes}
  assert not built, built
  np.testing.assert_allclose(jax.jit(lambda st, *a: forward(g, st, *a))(s, *args), y_qat,
                             rtol=0, atol=1e-5)
  for _, d in nnx.iter_graph(model):  # the check can fail: the reference matmul builds them
    if isinstance(d, PackedTernaryDense):
      d.impl = "reference"
  g_ref, _ = nnx.split(model)
  ref_shapes = _float_shapes(lambda st, *a: forward(g_ref, st, *a), s, *args)
  assert watched <= ref_shapes | {sh[::-1] for sh in ref_shapes}


def test_packed_layer_matches_the_qat_layer_and_checks_inputs():
  layer = TernaryDense(37, 19, use_bias=True, rngs=nnx.Rngs(params=1))
  layer.bias[...] = jnp.linspace(-1, 1, 19)
  x = jax.random.normal(jax.random.key(2), (3, 5, 37))
  packed = layer.deployed()
  assert isinstance(packed, PackedTernaryDense)
  assert packed.codes[...].shape == (10, 19) and packed.codes[...].dtype == jnp.uint8
  for impl in ("pallas", "reference"):
    packed.impl = impl
    np.testing.assert_allclose(packed(x), layer(x), rtol=0, atol=1e-5)
  with pytest.raises(ShapeError, match="37"):
    packed(jnp.zeros((2, 36)))


def test_bad_export_folders_are_clear_errors(tmp_path):
  c = _prepare(sid2_ternary_config())
  model = build_model(c.model, jax.random.key(0), numerics_rules(c), deployed=True)
  good = tmp_path / "good"
  deployment.save_export(str(good), c, model, extra={"source": {"step": 5}})
  assert deployment.is_export(str(good)) and deployment.export_step(str(good)) == 5
  cfg = deployment.load_export_config(str(good))
  assert tuple(cfg.numerics.rules[0][:2]) == tuple(c.numerics.rules[0][:2])
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: build_model(cfg.model, jax.random.key(0), numerics_rules(cfg), deployed=True))))
  state = deployment.load_export_state(str(good), abstract)
  np.testing.assert_array_equal(state["mid"][0]["attn"]["qkv"]["codes"],
                                model.mid[0].attn.qkv.codes[...])
  with pytest.raises(CheckpointError, match="not an export"):
    trainer.sample(c, None, checkpoint=str(tmp_path))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / deployment.CONFIG_FILE).write_text((good / deployment.CONFIG_FILE).read_text())
  from safetensors import numpy as st_numpy
  renamed = deployment.read_export_weights(str(good))
  renamed["x"] = renamed.pop(sorted(renamed)[0])
  other = st_numpy.save(renamed)
  (bad / deployment.PARAMS_FILE).write_bytes(other)
  with pytest.raises(CheckpointError, match="does not match the checksum recorded"):
    trainer.sample(c, None, checkpoint=str(bad))
  meta = json.loads((good / deployment.CONFIG_FILE).read_text())
  meta["sha256"][deployment.PARAMS_FILE] = deployment.sha256_hex(other)
  (bad / deployment.CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="names differ"):
    trainer.sample(c, None, checkpoint=str(bad))


@pytest.mark.slow
def test_cli_samples_from_an_export_without_a_config(trained, tmp_path):
  """--mode=sample --checkpoint=EXPORT needs neither --config nor --workdir; errors are one line."""
  _, _, result = trained
  run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"), *a],
                                  capture_output=True, text=True, cwd=ROOT, timeout=600)
  out = tmp_path / "out"
  r = run(f"--checkpoint={result['path']}", f"--workdir={out}", "--mode=sample", "--num_samples=2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "deployed network" in r.stdout, r.stdout
  assert np.load(out / "samples" / "samples.npz")["images"].shape[0] == 2
  r = run(f"--checkpoint={tmp_path}", "--mode=sample")
  assert r.returncode == 1 and "not an export" in r.stderr and "Traceback" not in r.stderr
  assert "x the export" in deployment.format_sizes(result["bytes"])
