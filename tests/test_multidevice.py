"""The same loss on 8 simulated devices with data + fsdp sharding as on one device."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax
from common.training import trainer
from configs import sid2_digits
c = sid2_digits.get_config("runlocal")
c.train.steps = 4
c.train.log_every = 1
c.train.tensorboard = False
c.mesh.data = {data}
c.mesh.fsdp = {fsdp}
trainer.train(c, {workdir!r})
print("DEVICES", jax.device_count())
from common.training import sharding
from common.training.experiment import Experiment
exp = Experiment(c, sharding.make_mesh(c.mesh))
specs = [s.spec for s in jax.tree.leaves(exp.param_shardings)]
print("FSDP_SHARDED", sum("fsdp" in str(p) for p in specs), "OF", len(specs))
"""


def _run(workdir, ndev, data, fsdp):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT, data=data, fsdp=fsdp, workdir=workdir)],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"DEVICES {ndev}" in r.stdout
  if fsdp > 1:  # the 8-device run really shards parameters, not only the batch
    sharded = int(r.stdout.split("FSDP_SHARDED ")[1].split()[0])
    assert sharded >= 10, r.stdout[-500:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l)["loss"] for l in f]


def test_data_fsdp_sharding_matches_single_device(tmp_path):
  one = _run(str(tmp_path / "one"), 1, -1, 1)
  eight = _run(str(tmp_path / "eight"), 8, 4, 2)
  assert len(one) == len(eight) == 4
  np.testing.assert_allclose(eight, one, rtol=2e-4, atol=1e-5)
