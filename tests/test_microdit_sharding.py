"""MicroDiT on 8 simulated CPU devices (data 2 x fsdp 2 x expert 2): the same loss and gradient norm
as on one device, with the expert weights sharded over the `expert` mesh axis and the blocks'
activation constraints active (`jax.set_mesh`)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np, optax
from common.training import sharding
from common.training.experiment import Experiment
from configs import microdit

c = microdit.get_config("runlocal")
c.train.batch_size = 8

def loss_and_grad_norm(mesh):
  exp = Experiment(c, mesh)
  state = exp.init_state(0)
  rng = np.random.default_rng(0)
  x_spec, cond_spec = exp.example_inputs(8)
  batch = {{"x": rng.normal(size=x_spec.shape).astype(np.float32),
           "cond": {{"tokens": rng.normal(size=cond_spec["tokens"].shape).astype(np.float32)}}}}
  batch = sharding.global_batch(batch, mesh, exp.rules)
  def f(params, batch, key):
    (loss, _), grads = jax.value_and_grad(exp._loss, has_aux=True)(params, batch, key)
    return loss, optax.global_norm(grads)
  with jax.set_mesh(mesh):
    loss, gnorm = jax.jit(f)(state["params"], batch, jax.random.key(3))
  specs = {{jax.tree_util.keystr(p): s.spec for p, s in
           jax.tree_util.tree_flatten_with_path(exp.param_shardings)[0]}}
  return float(loss), float(gnorm), specs

one = loss_and_grad_norm(sharding.make_mesh(c.mesh, jax.devices()[:1]))
c.mesh.data, c.mesh.fsdp, c.mesh.expert = 2, 2, 2
eight = loss_and_grad_norm(sharding.make_mesh(c.mesh))
print("DEVICES", jax.device_count())
print("ONE", one[0], one[1])
print("EIGHT", eight[0], eight[1])
w1 = [s for k, s in eight[2].items() if "mlp" in k and k.endswith("['expert_w1']['kernel']")]
print("EXPERT_SHARDED", sum("expert" in str(s) for s in w1), "OF", len(w1))
print("FSDP_SHARDED", sum("fsdp" in str(s) for s in eight[2].values()))
"""


@pytest.mark.slow   # two compilations of a train step: about a minute on an idle CPU
def test_microdit_loss_on_8_devices_matches_one():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT)], capture_output=True,
                     text=True, env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
  assert out["DEVICES"] == "8"
  one = [float(v) for v in out["ONE"].split()]
  eight = [float(v) for v in out["EIGHT"].split()]
  assert abs(one[0] - eight[0]) <= 1e-4 * abs(one[0]) + 1e-5, (one, eight)
  assert abs(one[1] - eight[1]) <= 1e-3 * abs(one[1]) + 1e-5, (one, eight)
  sharded, _, total = out["EXPERT_SHARDED"].split()
  assert int(total) >= 2 and int(sharded) == int(total), out["EXPERT_SHARDED"]
  assert int(out["FSDP_SHARDED"]) >= 10
