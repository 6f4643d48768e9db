"""config.init_from (weights or whole state from another run or a weights file), and the EMA:
updated every step and the weights that grids, --mode=sample and evaluation draw from.

One short run (SiD2 runlocal on digits, 8x8), itself started by init_from from a made-up checkpoint
and with one parameter group frozen by optim.lr_multipliers, is trained once for the module; the
sampler is replaced by a spy that records which weights it gets (no sampler compilation)."""

import contextlib
import io
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from common.weights import init_from
from common.training import sharding
from common.training import trainer
from common.weights.checkpoint import Checkpointer
from common.errors import CheckpointError, ConfigError
from common.training.experiment import Experiment
from common.training.optim import param_path
from configs import sid2_digits

EMA_DECAY = 0.5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_config():
  c = sid2_digits.get_config("runlocal")
  # one transformer level (compiles faster than the conv levels)
  c.model.channels, c.model.level_types = (16,), ("transformer",)
  c.model.blocks_per_level, c.model.dropout, c.model.patch_size = (), (0.0,), 2
  c.train.steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 1
  c.train.keep_checkpoints = 5
  c.train.sample_every = 2
  c.train.num_grid_samples = 4
  c.train.tensorboard = False
  c.train.ema_decay = EMA_DECAY
  c.train.ema_warmup = False
  c.eval.every = 4
  c.optim.warmup_steps = 0
  return c


FROZEN = ((r"noise_embed/.*", 0.0),)  # optim.lr_multipliers of the trained run


class SpyEvaluate:
  """Stands in for `trainer.evaluate_params`: records the weights it would score."""

  def __init__(self):
    self.calls = []

  def __call__(self, exp, params, step, wd, **kw):
    self.calls.append((int(step), jax.tree.map(np.asarray, params)))
    return {"eval/fid": 1.0}


class SpyGenerate:
  """Stands in for `trainer.generate`: records (a host copy of) the weights it samples from."""

  def __init__(self):
    self.calls = []

  def __call__(self, exp, params, n, **kw):
    self.calls.append(jax.tree.map(np.asarray, params))
    h, w, c = exp.sample_shape
    return np.zeros((n, h, w, c), np.uint8), {"labels": np.arange(n) % 10}


def perturbed(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      (l + scale * jax.random.normal(k, l.shape)).astype(l.dtype)
      if jnp.issubdtype(l.dtype, jnp.floating) else l + 1 for l, k in zip(leaves, keys)])


@pytest.fixture(name="source", scope="module")
def fixture_source(tmp_path_factory):
  """A run trained for 4 steps from init_from = a made-up checkpoint ("seed", step 7, whose EMA and
  optimizer state differ from its params).

  Returns {"seed_dir", "seed": seed state, "wd": the run's workdir, "config", "states": {step:
  state of the run}, "grid_calls": weights the grids sampled from, "eval_calls": (step, weights)
  of the periodic evaluation, "log": the run's output}.
  """
  root = tmp_path_factory.mktemp("source")
  c = source_config()
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  seed = exp.init_state(1)
  seed = {"step": seed["step"] + 7, "params": seed["params"],
          "ema": perturbed(seed["params"], jax.random.key(2), 0.1),
          "opt_state": perturbed(seed["opt_state"], jax.random.key(3), 0.01)}
  ckpt = Checkpointer(str(root / "seed" / "checkpoints"))
  ckpt.save(7, seed)
  ckpt.close()
  wd = root / "run"
  c.init_from = init_cfg(root / "seed")
  c.optim.lr_multipliers = FROZEN
  spy, spy_eval = SpyGenerate(), SpyEvaluate()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "generate", spy)
    mp.setattr(trainer, "evaluate_params", spy_eval)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
      trainer.train(c, str(wd))
  ckpt = Checkpointer(str(wd / "checkpoints"))
  states = {s: jax.tree.map(np.asarray, ckpt.restore(s, exp.abstract_state))
            for s in ckpt.all_steps()}
  ckpt.close()
  return {"seed_dir": root / "seed", "seed": jax.tree.map(np.asarray, seed), "wd": wd,
          "config": c, "states": states, "grid_calls": spy.calls, "eval_calls": spy_eval.calls,
          "log": log.getvalue()}


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def init_cfg(path, **kw):
  c = ml_collections.ConfigDict(dict(path=str(path), load="params", converter="", keep_step=False))
  c.update(kw)
  return c


# ---- EMA ----------------------------------------------------------------------------------------


def ema_step(ema, previous, params):
  jax.tree.map(lambda e, e0, p: np.testing.assert_allclose(
      e, EMA_DECAY * e0 + (1 - EMA_DECAY) * p, rtol=1e-6, atol=1e-7), ema, previous, params)


def test_ema_updates_every_step_and_grids_sampling_and_eval_use_it(source, monkeypatch):
  states, grid_calls = source["states"], source["grid_calls"]
  assert sorted(states) == [1, 2, 3, 4]
  ema_step(states[1]["ema"], source["seed"]["ema"], states[1]["params"])  # from init_from's EMA
  for s in (2, 3, 4):  # ema_s = d ema_{s-1} + (1 - d) params_s at every step
    ema_step(states[s]["ema"], states[s - 1]["ema"], states[s]["params"])
  diff = max(float(np.abs(e - p).max()) for e, p in
             zip(jax.tree.leaves(states[4]["ema"]), jax.tree.leaves(states[4]["params"])))
  assert diff > 1e-3
  # grids at step 2 (sample_every) and at the end draw from the EMA weights
  assert len(grid_calls) == 2
  assert_trees_equal(grid_calls[0], states[2]["ema"])
  assert_trees_equal(grid_calls[1], states[4]["ema"])
  spy = SpyGenerate()
  monkeypatch.setattr(trainer, "generate", spy)
  trainer.sample(source["config"], str(source["wd"]), num_samples=4)
  assert len(spy.calls) == 1
  assert_trees_equal(spy.calls[0], states[4]["ema"])
  # periodic evaluation (eval.every = 4) and --mode=eval score the EMA weights
  spy_eval = SpyEvaluate()
  monkeypatch.setattr(trainer, "evaluate_params", spy_eval)
  trainer.evaluate(source["config"], str(source["wd"]))
  for step, params in source["eval_calls"] + spy_eval.calls:
    assert step == 4
    assert_trees_equal(params, states[4]["ema"])
  assert len(source["eval_calls"]) == len(spy_eval.calls) == 1


def test_lr_multiplier_zero_freezes_its_parameters_in_training(source):
  """The run trains with optim.lr_multipliers = FROZEN: noise_embed keeps the seed's values."""
  seed, last = source["seed"]["params"], source["states"][4]["params"]
  assert_trees_equal(last["noise_embed"], seed["noise_embed"])
  for name in ("patch_embed", "out_proj", "mid"):
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(last[name]), jax.tree.leaves(seed[name]))]
    assert all(moved), name


# ---- init_from: checkpoints ----------------------------------------------------------------------


def test_trainer_starts_from_init_from_and_resumes_from_its_own_checkpoints(source, capsys,
                                                                           monkeypatch):
  seed_ckpts = source["seed_dir"] / "checkpoints"
  assert (f"initialised params and EMA from the step-7 checkpoint in {seed_ckpts}; fresh "
          "optimizer state, step 0") in source["log"]
  assert "resumed" not in source["log"]
  assert sorted(source["states"]) == [1, 2, 3, 4]  # counted from step 0
  # Once the run has checkpoints of its own it resumes from them and leaves init_from alone.
  monkeypatch.setattr(trainer, "generate", SpyGenerate())
  capsys.readouterr()
  assert trainer.train(source["config"], str(source["wd"]))["step"] == 4
  out = capsys.readouterr().out
  assert "resumed from the checkpoint at step 4" in out and "initialised" not in out


def config_at_16():
  """The source's network at 16x16 on synthetic data: SiD2's parameters do not depend on the
  image size (RoPE, no stored position embedding), so the weights carry over."""
  c = source_config()
  c.model.image_size = 16
  c.data = ml_collections.ConfigDict(dict(name="synthetic", image_size=16, channels=1,
                                          num_classes=10, num_examples=64))
  return c


def test_params_from_a_run_at_another_image_size(source):
  states = source["states"]
  c = config_at_16()
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  state, what = init_from.initial_state(exp, init_cfg(source["wd"]))
  assert "params and EMA" in what and "step-4" in what
  assert int(state["step"]) == 0
  got = jax.tree.map(np.asarray, state)
  assert_trees_equal(got["params"], states[4]["params"])
  assert_trees_equal(got["ema"], states[4]["ema"])
  assert_trees_equal(got["opt_state"], jax.tree.map(np.asarray, exp.tx.init(state["params"])))
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(exp.state_shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)


def test_whole_state_with_and_without_keep_step(source):
  c = source["config"]
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  for keep, want_step in ((False, 0), (True, 7)):
    state, what = init_from.initial_state(
        exp, init_cfg(source["seed_dir"] / "checkpoints" / "7", load="state", keep_step=keep))
    assert "optimizer state" in what
    got = jax.tree.map(np.asarray, state)
    assert int(got["step"]) == want_step
    for part in ("params", "ema", "opt_state"):
      assert_trees_equal(got[part], source["seed"][part])
  with pytest.raises(ConfigError, match="keep_step"):
    init_from.initial_state(exp, init_cfg(source["wd"], keep_step=True))


def test_a_damaged_source_step_falls_back_and_a_named_one_is_refused(source, tmp_path, capsys):
  src = tmp_path / "src"
  shutil.copytree(source["wd"], src)
  data = [p for p in (src / "checkpoints" / "4" / "state").rglob("*") if p.parent.name == "d"]
  victim = max(data, key=lambda p: p.stat().st_size)
  raw = bytearray(victim.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  victim.write_bytes(bytes(raw))
  c = source["config"]
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  capsys.readouterr()
  state, what = init_from.initial_state(exp, init_cfg(src))
  assert "step-3 checkpoint" in what
  assert_trees_equal(jax.tree.map(np.asarray, state["params"]), source["states"][3]["params"])
  err = capsys.readouterr().err
  assert (f"checkpoint at step 4 in {src}/checkpoints is damaged (state/" in err and
          "initialising from step 3, the newest intact one; step 4 is left in place" in err), err
  assert sorted(os.listdir(src / "checkpoints")) == ["1", "2", "3", "4"]  # the source is untouched
  with pytest.raises(CheckpointError, match=r"step 4 .* is damaged \(state/\S+ does not match"):
    init_from.initial_state(exp, init_cfg(src / "checkpoints" / "4"))


def test_mismatches_name_the_parameters(source):
  wd = source["wd"]
  c = source_config()
  c.model.channels = (24,)
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  with pytest.raises(CheckpointError,
                     match=r"shape differs params/.*"
                     r"params/mid/0/attn/out/bias \(16,\) \(ours \(24,\)\)"):
    init_from.initial_state(exp, init_cfg(wd))
  c = source_config()
  c.model.mid_blocks = 2
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  with pytest.raises(CheckpointError, match=r"missing params/mid/1/attn"):
    init_from.initial_state(exp, init_cfg(wd))
  c = source_config()
  c.optim.clip_norm = 0.0  # another optimizer-state structure
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  with pytest.raises(CheckpointError, match=r"optimizer state.*opt_state/"):
    init_from.initial_state(exp, init_cfg(wd, load="state"))
  init_from.initial_state(exp, init_cfg(wd))  # weights only: the optimizer may differ
  with pytest.raises(CheckpointError, match="no such"):
    init_from.initial_state(exp, init_cfg(wd / "nope"))
  with pytest.raises(CheckpointError, match="no finished checkpoint"):
    init_from.initial_state(exp, init_cfg(wd / "samples"))
  with pytest.raises(ConfigError, match="init_from.load"):
    init_from.initial_state(exp, init_cfg(wd, load="everything"))
  assert init_from.initial_state(exp, init_cfg("")) is None


# ---- init_from: weights files -------------------------------------------------------------------


def test_weights_file_through_a_converter(source, tmp_path):
  states = source["states"]
  flat = {param_path(k).replace("/", "."): np.ascontiguousarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(states[4]["ema"])[0]}
  path = str(tmp_path / "weights.safetensors")
  save_file(flat, path)
  c = config_at_16()
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  cfg = init_cfg(path, converter="common.weights.init_from.from_param_paths")
  state, what = init_from.initial_state(exp, cfg)
  assert "weights file" in what
  got = jax.tree.map(np.asarray, state)
  assert_trees_equal(got["params"], states[4]["ema"])
  assert_trees_equal(got["ema"], states[4]["ema"])
  assert int(got["step"]) == 0
  with pytest.raises(ConfigError, match="converter"):
    init_from.initial_state(exp, init_cfg(path))
  with pytest.raises(ConfigError, match="optimizer state"):
    init_from.initial_state(exp, init_cfg(path, load="state", converter=cfg.converter))
  with pytest.raises(ConfigError, match="init_from.converter"):
    init_from.initial_state(exp, init_cfg(path, converter="common.weights.init_from.nope"))
  bad = dict(flat)
  bad["out_proj.proj.kernel"] = np.zeros((16, 2), np.float32)
  del bad["patch_embed.proj.bias"]
  bad["extra.w"] = np.zeros(3, np.float32)
  save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(CheckpointError) as e:
    init_from.initial_state(exp, init_cfg(tmp_path / "bad.safetensors", converter=cfg.converter))
  msg = str(e.value)
  assert "missing patch_embed/proj/bias" in msg and "unexpected extra/w" in msg
  assert "out_proj/proj/kernel (16, 2) (ours (16, 4))" in msg


# ---- placement on a multi-device mesh ------------------------------------------------------------

MULTI_DEVICE_SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from safetensors.numpy import save_file
from common.weights import init_from
from common.training import sharding
from common.weights.checkpoint import Checkpointer
from common.training.experiment import Experiment
from common.training.optim import param_path
from tests.test_init_from import init_cfg, source_config
c = source_config()
c.mesh.data, c.mesh.fsdp = 2, 2
exp = Experiment(c, sharding.make_mesh(c.mesh))
src = exp.init_state(5)
ckpt = Checkpointer({workdir!r} + "/checkpoints")
ckpt.save(3, src)
ckpt.close()
want = jax.tree.map(np.asarray, src["params"])
flat = {{param_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}}
save_file(flat, {workdir!r} + "/w.safetensors")
c.mesh.data, c.mesh.fsdp = 1, 4   # restore onto another mesh
exp = Experiment(c, sharding.make_mesh(c.mesh))
for cfg in (init_cfg({workdir!r}), init_cfg({workdir!r}, load="state"),
            init_cfg({workdir!r} + "/w.safetensors",
                     converter="common.weights.init_from.from_param_paths")):
  state, _ = init_from.initial_state(exp, cfg)
  for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(exp.state_shardings)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (cfg.path, leaf.sharding, sh)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["params"]), want)
specs = [str(s.spec) for s in jax.tree.leaves(exp.param_shardings)]
print("FSDP_SHARDED", sum("fsdp" in s for s in specs), "DEVICES", jax.device_count())
"""


@pytest.mark.slow
def test_restores_onto_the_shardings_of_another_mesh(tmp_path):
  """Saved on a data 2 x fsdp 2 mesh, read onto fsdp 4 (4 simulated devices): every leaf of the
  state has the new experiment's sharding, from a checkpoint (params or whole state) or a file."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT.format(root=ROOT,
                                                                      workdir=str(tmp_path))],
                     capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  sharded = int(r.stdout.split("FSDP_SHARDED ")[1].split()[0])
  assert sharded >= 5 and "DEVICES 4" in r.stdout, r.stdout[-500:]
