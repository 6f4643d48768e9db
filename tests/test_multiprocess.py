"""Two JAX processes on one machine (jax.distributed over localhost, gloo collectives): per-process
data shards assembled into one global batch, identical losses on both processes, a shared orbax
checkpoint, and a multi-process resume."""

import os
import re
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
import jax
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from common import trainer
from configs import sid2_digits
c = sid2_digits.get_config("runlocal")
c.train.steps = {steps}
c.train.log_every = 1
c.train.checkpoint_every = 3
c.train.tensorboard = False
r = trainer.train(c, {workdir!r})
print("RESULT", jax.process_index(), jax.device_count(), r["step"], repr(r["loss"]), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(workdir: str, steps: int) -> list[tuple]:
  script = SCRIPT.format(root=ROOT, port=_free_port(), steps=steps, workdir=workdir)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    m = re.search(r"RESULT (\d) (\d) (\d+) (\S+)", out)
    assert m, out[-2000:]
    results.append(m.groups())
  return results


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  wd = str(tmp_path)
  r = _run_pair(wd, steps=3)
  assert sorted(x[0] for x in r) == ["0", "1"]
  assert all(x[1] == "2" and x[2] == "3" for x in r)      # 2 devices in all, 3 steps done
  assert r[0][3] == r[1][3]                               # both processes see the same global loss
  assert "3" in os.listdir(os.path.join(wd, "checkpoints"))
  r = _run_pair(wd, steps=5)                              # resumes from step 3 on both processes
  assert all(x[2] == "5" for x in r) and r[0][3] == r[1][3]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    steps = [int(re.search(r'"step": (\d+)', line).group(1)) for line in f]
  assert steps == [1, 2, 3, 4, 5]                          # process 0 alone writes metrics
