"""config.numerics.rules: linear layers swapped by module path (common/nn/numerics.py)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.nn import layers
from common.nn import numerics
from common.errors import ConfigError


class Scaled(nnx.Module):
  """A test implementation: the Dense's own kernel, output times `factor`."""

  def __init__(self, dense, factor):
    self.kernel, self.bias, self.factor = dense.kernel, dense.bias, factor

  @classmethod
  def from_dense(cls, dense, factor: float = 2.0):
    return cls(dense, factor)

  def __call__(self, x):
    return self.factor * (x @ self.kernel[...] + self.bias[...])


class Net(nnx.Module):

  def __init__(self, rngs):
    self.blocks = nnx.List([Block(rngs) for _ in range(2)])
    self.out = layers.Dense(4, 4, rngs=rngs)

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return self.out(x)


class Block(nnx.Module):

  def __init__(self, rngs):
    self.qkv = layers.Dense(4, 4, rngs=rngs)
    self.proj = layers.Dense(4, 4, rngs=rngs)

  def __call__(self, x):
    return self.proj(self.qkv(x))


def _net():
  return Net(nnx.Rngs(params=0))


def test_paths_of_every_dense():
  assert sorted(p for p, _ in numerics.linear_paths(_net())) == [
      "blocks/0/proj", "blocks/0/qkv", "blocks/1/proj", "blocks/1/qkv", "out"]


def test_first_matching_rule_wins_and_keeps_the_initialised_weights():
  ref, net = _net(), _net()
  x = jnp.ones((3, 4))
  chosen = numerics.apply_rules(net, [
      (r"out", "common.nn.numerics.FullPrecision", {}),
      (r".*qkv|out", f"{__name__}.Scaled", {"factor": 3.0}),
  ])
  assert chosen == {"blocks/0/qkv": f"{__name__}.Scaled", "blocks/1/qkv": f"{__name__}.Scaled",
                    "out": "common.nn.numerics.FullPrecision"}
  assert isinstance(net.blocks[0].qkv, Scaled) and isinstance(net.out, layers.Dense)
  # Same weights, qkv outputs tripled: the whole net is (3 * qkv) composed linearly.
  h = ref.blocks[0].proj(3 * ref.blocks[0].qkv(x))
  want = ref.out(ref.blocks[1].proj(3 * ref.blocks[1].qkv(h)))
  np.testing.assert_allclose(net(x), want, rtol=1e-5)
  assert set(nnx.to_pure_dict(nnx.state(net, nnx.Param))) == {"blocks", "out"}


@pytest.mark.parametrize("rule, message", [
    ((r"nothing", "common.nn.numerics.FullPrecision"), "match no layer"),
    ((r".*", "common.nn.layers.RMSNorm"), "from_dense"),
    ((r".*", f"{__name__}.Scaled", {"scale": 1.0}), "scale"),
    ((r"(", "common.nn.numerics.FullPrecision"), "bad regex"),
])
def test_bad_rules_are_config_errors(rule, message):
  with pytest.raises(ConfigError, match=message):
    numerics.apply_rules(_net(), [rule])


def test_experiment_builds_with_rules(tmp_path):
  from common.training.experiment import build_model
  from configs import sid2_digits
  cfg = sid2_digits.get_config("runlocal")
  model = build_model(cfg.model, jax.random.key(0),
                      [(r".*", f"{__name__}.Scaled", {"factor": 1.0})])
  assert not any(isinstance(d, layers.Dense) for _, d in numerics.linear_paths(model))


def test_ternary_rule_keeps_the_dense_initialisation():
  from terdit.ternary import TernaryDense, ternarize
  ref, net = _net(), _net()
  numerics.apply_rules(net, [(r"blocks/\d+/qkv", "terdit.ternary.TernaryDense", {})])
  layer = net.blocks[1].qkv
  assert isinstance(layer, TernaryDense) and isinstance(net.blocks[1].proj, layers.Dense)
  np.testing.assert_array_equal(layer.kernel[...], ref.blocks[1].qkv.kernel[...])
  np.testing.assert_array_equal(layer.bias[...], ref.blocks[1].qkv.bias[...])
  x = jnp.ones((2, 4))
  codes, _ = ternarize(ref.blocks[1].qkv.kernel[...])
  want = x @ (layer.alpha[...] * codes) + ref.blocks[1].qkv.bias[...]
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-6)
