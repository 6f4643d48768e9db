"""launch/xm_launch.py: sweep expansion, executor settings, and a local XManager experiment end to end."""

import json
import os
import subprocess
import sys

import pytest

from common.errors import ConfigError
from launch import xm_launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expand_sweep_is_a_cartesian_product_with_fixed_overrides():
  points = xm_launch.expand_sweep(["train.steps=5"], ["seed=0,1", "optim.learning_rate=1e-3,3e-4"],
                                  [{"train.batch_size": 8}])
  assert points == [
      {"train.steps": 5, "train.batch_size": 8, "seed": 0, "optim.learning_rate": 1e-3},
      {"train.steps": 5, "train.batch_size": 8, "seed": 0, "optim.learning_rate": 3e-4},
      {"train.steps": 5, "train.batch_size": 8, "seed": 1, "optim.learning_rate": 1e-3},
      {"train.steps": 5, "train.batch_size": 8, "seed": 1, "optim.learning_rate": 3e-4}]
  assert xm_launch.expand_sweep([], []) == [{}]
  assert xm_launch.point_name(3, points[1], ["seed", "optim.learning_rate"]) == (
      "03_seed=0_learning_rate=0.0003")
  args = xm_launch.main_args("c.py:runlocal", "/w/03", points[1], distributed=True)
  assert args[:2] == ["--config=c.py:runlocal", "--workdir=/w/03"]
  assert "--config.optim.learning_rate=0.0003" in args and args[-1] == "--distributed"
  with pytest.raises(ConfigError):
    xm_launch.expand_sweep(["train.steps"], [])
  with pytest.raises(ConfigError):
    xm_launch.expand_sweep([], ["seed="])


def test_sweep_file_and_cloud_requirements():
  points = xm_launch.load_sweep_file(os.path.join(ROOT, "configs/sweeps/sid2_digits_lr.py:short"))
  assert [p["optim.learning_rate"] for p in points] == [3e-4, 1e-3, 3e-3]
  req = xm_launch.requirements_kwargs("vertex", "h100", 8, 2, cpu=None, ram_gib=None)
  assert req == {"h100": 8}
  assert xm_launch.requirements_kwargs("kubernetes", "a100", 4, 2, 8, 16) == {
      "a100": 4, "cpu": 8, "ram": 16 * 2**30}
  assert xm_launch.requirements_kwargs("vertex", "tpu_v3", 8, 1, None, None) == {"tpu_v3": 8}
  for executor in ("vertex", "kubernetes"):
    with pytest.raises(ConfigError, match="SCALING"):
      xm_launch.requirements_kwargs(executor, "tpu_v5p", 4, 1, None, None)
  with pytest.raises(ConfigError, match="gs://"):
    xm_launch.run(os.path.join(ROOT, "configs/sid2_digits.py"), "/tmp/local", [{}], executor="vertex")


def test_local_sweep_runs_each_point_in_its_own_workdir_and_reports_failures(tmp_path):
  pytest.importorskip("xmanager", reason="the `xm` extra (pip install -e '.[xm]')")
  sweep = tmp_path / "sweep.py"
  # Two real points, and one whose override names no config key: launch/main.py exits 1.
  sweep.write_text("def get_sweep(arg=None):\n"
                   "  return [{'seed': 0}, {'seed': 1}, {'train.no_such_key': 1}]\n")
  env = dict(os.environ, HOME=str(tmp_path / "home"), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),  # the 2nd point reuses the 1st's
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")          # compiled train step
  cmd = [sys.executable, os.path.join(ROOT, "launch", "xm_launch.py"),
         "--config=configs/sid2_digits.py:runlocal", f"--workdir_root={tmp_path / 'xm'}",
         f"--sweep_file={sweep}", "--experiment_name=digits", "--set=train.steps=2",
         "--set=train.log_every=1", "--set=train.tensorboard=false", "--set=sample.num_steps=2",
         "--set=train.num_grid_samples=4"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]                  # one unit failed
  assert "[completed] 00_seed=0" in out and "[completed] 01_seed=1" in out, out[-3000:]
  assert "[failed] 02_" in out, out[-3000:]
  status = json.loads((tmp_path / "xm" / "digits" / "xm_status.json").read_text())
  assert [s["status"] for s in status] == ["completed", "completed", "failed"]
  losses = []
  for unit in status[:2]:
    workdir = unit["workdir"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))
    losses.append(records[-1]["loss"])
  assert losses[0] != losses[1]                             # the seeds differ: the override took
  assert not os.path.exists(os.path.join(status[2]["workdir"], "checkpoints"))
