"""Several JAX processes on one machine (jax.distributed over localhost, gloo collectives on CPU).

Two processes: per-process data shards assembled into one global batch, identical losses on both
processes, a shared orbax checkpoint, and a multi-process resume. Four processes with a data=2,
fsdp=2 mesh: the same losses as one process.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from common.weights import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
if {nproc} > 1:
  from launch import distributed
  distributed.initialize("127.0.0.1:{port}", {nproc}, int(sys.argv[1]))
import jax
import ml_collections
from common.training import trainer
from configs import sid2_digits
c = sid2_digits.get_config("runlocal")
c.train.steps = {steps}
c.train.log_every = 1
c.train.checkpoint_every = 3
c.train.tensorboard = False
{extra}
r = trainer.train(c, {workdir!r}, stop_after={stop_after})
print("RESULT", jax.process_index(), jax.device_count(), r["step"], repr(r["loss"]), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(workdir: str, steps: int, nproc: int = 2, extra: str = "",
                   stop_after: int | None = None) -> list[tuple]:
  """Trains the runlocal digits config in `nproc` processes (one CPU device each).

  `extra` is Python run after the config `c` is made; `stop_after` is passed to trainer.train
  (stopping early skips the final sample grid). Returns each process's (process index, device
  count, last step, last loss) as strings, in process order.
  """
  script = SCRIPT.format(root=ROOT, port=_free_port(), steps=steps, workdir=workdir,
                         nproc=nproc, extra=extra, stop_after=stop_after)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(nproc)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    m = re.search(r"RESULT (\d) (\d) (\d+) (\S+)", out)
    assert m, out[-2000:]
    results.append(m.groups())
  return results


def _losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [float(re.search(r'"loss": ([-\d.e]+)', line).group(1)) for line in f]


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  wd = str(tmp_path)
  r = _run_processes(wd, steps=3)
  assert sorted(x[0] for x in r) == ["0", "1"]
  assert all(x[1] == "2" and x[2] == "3" for x in r)      # 2 devices in all, 3 steps done
  assert r[0][3] == r[1][3]                               # both processes see the same global loss
  assert "3" in os.listdir(os.path.join(wd, "checkpoints"))
  # the primary's checksum manifest covers both processes' files
  assert checkpoint.verify_manifest(os.path.join(wd, "checkpoints"), 3)
  with open(os.path.join(wd, "checkpoints", "3", checkpoint.MANIFEST)) as f:
    names = json.load(f)["files"]
  assert any("process_0" in n for n in names) and any("process_1" in n for n in names), names
  r = _run_processes(wd, steps=5)                         # resumes from step 3 on both processes
  assert all(x[2] == "5" for x in r) and r[0][3] == r[1][3]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    steps = [int(re.search(r'"step": (\d+)', line).group(1)) for line in f]
  assert steps == [1, 2, 3, 4, 5]                          # process 0 alone writes metrics


def test_four_processes_data_fsdp_mesh_matches_one_process(tmp_path):
  # Every example is the same image, so the global batch is identical however the data is
  # sharded over processes; what differs is only the parallelism: parameters and optimizer states
  # split over fsdp=2, the batch over data=2 x fsdp=2, gradients reduced across 4 processes.
  image = np.zeros((8, 8), np.uint8)
  image[1:7, 2] = image[1, 2:6] = image[6, 2:6] = 255
  os.makedirs(tmp_path / "images" / "zero")
  for i in range(16):
    Image.fromarray(image).save(tmp_path / "images" / "zero" / f"{i:02d}.png")
  extra = (f"c.data = ml_collections.ConfigDict(dict(name='image_folder', "
           f"path={str(tmp_path / 'images')!r}, image_size=8, channels=1))\n"
           "c.mesh.data, c.mesh.fsdp = {data}, {fsdp}")
  # 3 of 4 steps, so that training stops with a checkpoint and no final sample grid to compile.
  one = _run_processes(str(tmp_path / "one"), 4, nproc=1, extra=extra.format(data=-1, fsdp=1),
                       stop_after=3)
  four = _run_processes(str(tmp_path / "four"), 4, nproc=4, extra=extra.format(data=2, fsdp=2),
                        stop_after=3)
  assert one[0][1] == "1" and all(x[1] == "4" and x[2] == "3" for x in four)
  assert len({x[3] for x in four}) == 1                   # all processes agree
  assert len(_losses(str(tmp_path / "one"))) == 3
  np.testing.assert_allclose(_losses(str(tmp_path / "four")), _losses(str(tmp_path / "one")),
                             rtol=2e-4, atol=1e-5)


def test_distributed_settings_from_flags_environment_and_vertex():
  from launch import distributed  # pylint: disable=import-outside-toplevel
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.resolve(env=env) == ("10.0.0.2:1234", 4, 3)
  assert distributed.resolve("h:1", 2, 0, env=env) == ("h:1", 2, 0)     # flags win
  spec = {"cluster": {"workerpool0": ["primary:2222"], "workerpool1": ["w0:2222", "w1:2222"]},
          "task": {"type": "workerpool1", "index": 1}}
  vertex = {"CLUSTER_SPEC": __import__("json").dumps(spec)}
  assert distributed.resolve(env=vertex) == ("primary:8476", 3, 2)
  assert distributed.resolve(env={}) == (None, None, None)               # left to jax's detection
  with pytest.raises(distributed.DistributedError, match="not in"):
    distributed.resolve("h:1", 2, 2, env={})
  with pytest.raises(distributed.DistributedError, match="integer"):
    distributed.resolve(env={"JAX_NUM_PROCESSES": "four"})
  with pytest.raises(distributed.DistributedError, match="CLUSTER_SPEC"):
    distributed.resolve(env={"CLUSTER_SPEC": "{}"})


def test_distributed_without_a_cluster_fails_with_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                              "OMPI_", "KUBERNETES_", "CLUSTER_SPEC"))}
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"), "--distributed",
                      "--config=configs/sid2_digits.py:runlocal", f"--workdir={tmp_path}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --distributed: cannot start"), r.stderr
  assert "--coordinator_address" in lines[0]
