"""COAT's FP8 AdamW at scale: group states laid out per device shard and sharded over fsdp.

The multi-device tests run in subprocesses on 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax is imported).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from coat import fp8
from coat.optim import fp8_adamw
from common.training import sharding
from common.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeMesh:
  def __init__(self, **shape):
    self.shape = shape
    self.size = int(np.prod(list(shape.values())))


@pytest.mark.parametrize("grid", [(2,), (1, 4), (2, 2), (2, 1, 3)])
def test_groups_never_straddle_shards_of_any_dimension(grid):
  """A parameter sharded on several dimensions: its groups equal quantizing each device's block on
  its own (blocks in the mesh's row-major order) and concatenating."""
  shape = (4, 8, 6)
  x = jax.random.normal(jax.random.key(0), shape) * jnp.exp(jax.random.normal(jax.random.key(1), shape))
  q = fp8.quantize_groups(x, num_shards=grid)
  full = tuple(grid) + (1,) * (3 - len(grid))
  blocks = []
  for idx in np.ndindex(*full):
    sl = tuple(slice(i * d // n, (i + 1) * d // n) for i, d, n in zip(idx, shape, full))
    blocks.append(fp8.quantize_groups(x[sl]))
  np.testing.assert_array_equal(np.asarray(q.codes.astype(jnp.float32)),
                                np.concatenate([np.asarray(b.codes.astype(jnp.float32)) for b in blocks]))
  np.testing.assert_array_equal(np.asarray(q.scale), np.concatenate([np.asarray(b.scale) for b in blocks]))
  np.testing.assert_array_equal(np.asarray(fp8.from_groups(fp8.to_groups(x, 128, grid), shape, grid)),
                                np.asarray(x))


def test_placement_decides_the_layout_and_the_declared_specs():
  mesh = FakeMesh(data=2, fsdp=4, tensor=1)
  placement = sharding.ParamPlacement(mesh, {"w": P("fsdp", None), "e": P(None, "fsdp"), "b": P()})
  params = {"w": jnp.ones((8, 32)), "e": jnp.ones((11, 8)), "b": jnp.ones((3,))}
  tx = fp8_adamw(1e-3, placement=placement)
  state = tx.init(params)
  assert fp8.shard_grid(params["e"].shape, state.mu["e"].num_shards) == (1, 4)
  assert state.mu["w"].codes.shape == (4, 128)  # 4 shards of 64 elements, one group each
  specs = sharding.state_partition(tx, jax.eval_shape(tx.init, params), params,
                                   {k: placement.spec(k) for k in params})
  assert specs.mu["w"].codes == P("fsdp", None) and specs.nu["e"].scale == P("fsdp")
  assert specs.mu["b"].codes == P(None, None) and specs.count == P()
  # AdamW's moments are copies of the parameters: they take the parameters' specs.
  adam = optax.adamw(1e-3)
  aspecs = sharding.state_partition(adam, jax.eval_shape(adam.init, params), params,
                                    {k: placement.spec(k) for k in params})
  assert aspecs[0].mu["e"] == P(None, "fsdp") and aspecs[0].count == P()


def test_layout_that_does_not_match_the_placement_is_an_error():
  params = {"w": jnp.ones((8, 32))}
  tx = fp8_adamw(1e-3)  # no placement: groups cut for one shard
  with pytest.raises(ConfigError, match="placement"):
    sharding.state_partition(tx, jax.eval_shape(tx.init, params), params, {"w": P("fsdp", None)})


def test_unknown_state_leaf_at_a_parameter_is_an_error():
  def init(params):
    return {"sketch": jax.tree.map(lambda p: jnp.zeros((p.size // 2,)), params)}
  tx = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
  params = {"w": jnp.ones((8, 4))}
  # optax finds the parameter places by structure; a leaf of another shape there has no known place
  with pytest.raises(ConfigError, match="w .*neither a copy"):
    sharding.state_partition(tx, jax.eval_shape(tx.init, params), params, {"w": P("fsdp", None)})


SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from common.training import sharding
from common.training.experiment import Experiment
from configs import sid2_digits
c = sid2_digits.get_config("runlocal")
c.model.channels, c.model.level_types, c.model.blocks_per_level = (32,), ("transformer",), ()
c.model.mid_blocks, c.model.num_heads, c.model.cond_dim, c.model.dropout = 1, 2, 32, (0.0,)
c.train.batch_size = 16
c.optim.name = "coat.optim.fp8_adamw"
c.optim.options = {{"impl": "jnp"}}
c.mesh.data, c.mesh.fsdp = {data}, {fsdp}
mesh = sharding.make_mesh(c.mesh)
exp = Experiment(c, mesh)
state = exp.init_state(0)
rng = np.random.default_rng(0)
losses = []
for step in range(3):
  batch = {{"x": rng.standard_normal((16, 8, 8, 1)).astype(np.float32),
           "cond": {{"label": rng.integers(0, 10, 16).astype(np.int32)}}}}
  state, metrics = exp.train_step(state, sharding.global_batch(batch, mesh, exp.rules),
                                  exp.step_key(step))
  losses.append(float(metrics["loss"]))
out = {{"devices": jax.device_count(), "losses": losses, "fsdp_groups": 0, "bad": []}}
specs = jax.tree.map(lambda s: s.spec, exp.param_shardings)
mu = state["opt_state"][1].mu
for path, q in jax.tree_util.tree_flatten_with_path(mu, is_leaf=lambda x: hasattr(x, "codes"))[0]:
  pspec = specs
  for k in path:
    pspec = pspec[k.key]
  if "fsdp" in str(pspec):
    out["fsdp_groups"] += 1
    if q.codes.sharding.spec[0] != "fsdp":
      out["bad"].append(sharding.path_str(path))
opt = state["opt_state"]
out["opt_total"] = sum(x.nbytes for x in jax.tree.leaves(opt))
out["opt_per_device"] = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(opt))
out["params_per_device"] = sum(x.addressable_shards[0].data.nbytes
                               for x in jax.tree.leaves(state["params"]))
out["params_total"] = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
print("RESULT", json.dumps(out))
"""


def _run(ndev, data, fsdp):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev}",
             JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, "-c", SCRIPT.format(root=ROOT, data=data, fsdp=fsdp)],
      capture_output=True, text=True, env=env, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.split("RESULT ")[1].splitlines()[0])


@pytest.mark.slow  # two train-step compilations in subprocesses
def test_fp8_adamw_states_sharded_over_fsdp_with_the_one_device_loss():
  one = _run(1, -1, 1)
  info = _run(8, 2, 4)
  assert info["devices"] == 8
  assert info["fsdp_groups"] >= 8 and not info["bad"], info
  # Per device: the FP8 state of the fsdp-sharded parameters is a quarter of the total (the
  # replicated biases and the output layer keep whole copies), as for the parameters.
  opt_ratio = info["opt_per_device"] / info["opt_total"]
  param_ratio = info["params_per_device"] / info["params_total"]
  assert opt_ratio < 0.4, info
  assert abs(opt_ratio - param_ratio) < 0.1, info
  # The first loss is before any update; then the 8-device groups (cut per shard) quantize the
  # moments slightly differently from the one-device layout.
  np.testing.assert_allclose(info["losses"][0], one["losses"][0], rtol=2e-4)
  np.testing.assert_allclose(info["losses"], one["losses"], rtol=2e-3)


KERNEL_SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from common.training import sharding
from common.training.optim import apply_gradients
from coat.optim import fp8_adamw
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
specs = {{"w": P("fsdp", None), "e": P(None, "fsdp"), "b": P()}}
shard = {{k: NamedSharding(mesh, s) for k, s in specs.items()}}
placement = sharding.ParamPlacement(mesh, specs)
k = jax.random.split(jax.random.key(0), 3)
params = {{"w": jax.random.normal(k[0], (8, 96)), "e": jax.random.normal(k[1], (3, 16)),
          "b": jax.random.normal(k[2], (5,))}}
params = jax.device_put(params, shard)
results = {{}}
for impl in ("jnp", "pallas"):
  tx = fp8_adamw(1e-2, weight_decay=0.1, impl=impl, interpret=True, placement=placement)
  st_specs = sharding.state_partition(tx, jax.eval_shape(tx.init, params), params, specs)
  st_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), st_specs,
                          is_leaf=lambda x: isinstance(x, P))
  state = jax.jit(tx.init, out_shardings=st_shard)(params)
  step = jax.jit(lambda p, s, g: apply_gradients(tx, g, s, p), donate_argnums=(0, 1),
                 out_shardings=(shard, st_shard))
  p = jax.tree.map(jnp.copy, params)
  for i in range(3):
    g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p)
    p, state = step(p, state, g)
  assert state.mu["w"].codes.sharding.spec == P("fsdp", None), state.mu["w"].codes.sharding
  if impl == "pallas":
    hlo = step.lower(p, state, g).compile().as_text()
    print("SHARDED_KERNEL", "fp8_adamw" in hlo or "pallas" in hlo.lower())
  results[impl] = jax.tree.map(np.asarray, p)
for key in params:
  np.testing.assert_allclose(results["pallas"][key], results["jnp"][key], rtol=1e-6, atol=1e-7)
print("OK")
"""


@pytest.mark.slow  # the kernel in interpret mode on 8 devices: about a minute
def test_pallas_kernel_runs_per_shard_on_a_mesh():
  """On 8 devices the fused kernel (interpret mode) runs inside a shard_map on each device's own
  groups and gives the jnp path's parameters."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT.format(root=ROOT)], capture_output=True,
                     text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "OK" in r.stdout and "SHARDED_KERNEL True" in r.stdout, r.stdout[-1000:]
