"""COAT's compressed activations (coat/activations.py) and the precision mode (coat/precision.py,
common/nn/numerics.py): FP8-saved inputs of non-linear layers, FP8 residuals of a whole MLP, the
COAT preset on a SiD2 network, and a few COAT-mode train steps."""

import os
import re

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from coat import activations, linear
from common.nn import layers
from common.nn import numerics
from common.nn import transformer
from common.errors import ConfigError
from common.training.memory import temporaries_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F8 = jnp.dtype(jnp.float8_e4m3fn)


def sim_groups(x: np.ndarray, g: int = 16) -> np.ndarray:
  """float64 simulation of 1xG E4M3 quantize-dequantize along the last axis (zero padding),
  group scales bf16((max|x| + 1e-10) / 448)."""
  x = np.asarray(x, np.float32)
  d = x.shape[-1]
  pad = (-d) % g
  xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, g)
  s = ((np.abs(xp).max(-1, keepdims=True) + np.float32(1e-10)) / np.float32(448)).astype(
      np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
  codes = np.clip(xp / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return (codes * s).reshape(*x.shape[:-1], -1)[..., :d]


def _rand(shape, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * scale * np.exp(rng.standard_normal(shape[:-1] + (1,)))
          ).astype(np.float32)


CASES = {
    # name: (layer factory, positional inputs, pure fn(inputs..., params...) for the reference)
    "rms_norm": (lambda r: layers.RMSNorm(24, rngs=r), lambda: (_rand((2, 5, 24), 0),)),
    "group_norm": (lambda r: layers.GroupNorm(32, 8, rngs=r), lambda: (_rand((2, 4, 4, 32), 1),)),
    "gelu": (lambda r: layers.Activation("gelu_tanh"), lambda: (_rand((3, 40), 2),)),
    "swiglu": (lambda r: layers.Activation("silu"), lambda: (_rand((3, 32), 3), _rand((3, 32), 4))),
    "film": (lambda r: layers.FiLM(6, 16, rngs=r), lambda: (_rand((2, 9, 16), 5), _rand((2, 6), 6))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_reads_the_dequantized_fp8_inputs(name):
  make, inputs = CASES[name]
  plain = make(nnx.Rngs(params=0))
  if name == "film":  # non-zero modulation, so d/dx depends on it
    plain.proj.kernel[...] = jax.random.normal(jax.random.key(1), plain.proj.kernel.shape) * 0.3
  if name == "rms_norm":
    plain.scale[...] = 1.0 + jax.random.normal(jax.random.key(2), (24,)) * 0.2
  fp8 = make(nnx.Rngs(params=0))
  nnx.update(fp8, nnx.state(plain))
  assert activations.FP8Residuals.from_module(fp8) is fp8 and fp8.residuals is not None
  args = tuple(jnp.asarray(a) for a in inputs())
  g = jnp.asarray(_rand(plain(*args).shape, 9))
  y_plain, vjp_plain = jax.vjp(lambda *a: plain(*a), *args)
  y_fp8, vjp_fp8 = jax.vjp(lambda *a: fp8(*a), *args)
  np.testing.assert_array_equal(y_fp8, y_plain)          # the forward uses the exact inputs
  # The reference: the plain layer's backward at the simulated quantize-dequantize of the
  # activation-shaped inputs (FiLM's conditioning vector is saved as it is).
  deq = tuple(jnp.asarray(sim_groups(a), jnp.float32) if a.shape == args[0].shape else a
              for a in args)
  want = jax.vjp(lambda *a: plain(*a), *deq)[1](g)
  got = vjp_fp8(g)
  exact = vjp_plain(g)
  for w, x, e in zip(want, got, exact):
    np.testing.assert_allclose(x, w, rtol=2e-5, atol=2e-6 * float(jnp.abs(w).max()))
  assert max(float(jnp.abs(x - e).max()) for x, e in zip(got, exact)) > 0  # not plain autodiff
  # Saved: FP8 codes and bf16 group scales of each activation-shaped input, nothing else that big.
  saved = [(a.shape, jnp.dtype(a.dtype)) for a in jax.tree.leaves(vjp_fp8)]
  n_act = sum(a.shape == args[0].shape for a in args)
  assert sum(dt == F8 for _, dt in saved) == n_act, saved
  big = [(s, dt) for s, dt in saved if np.prod(s) >= args[0].size]
  assert all(dt == F8 for _, dt in big), saved


def test_gradient_of_the_layer_parameters_flows():
  plain = layers.RMSNorm(24, rngs=nnx.Rngs(params=0))
  fp8 = activations.FP8Residuals.from_module(layers.RMSNorm(24, rngs=nnx.Rngs(params=0)))
  x = jnp.asarray(_rand((2, 5, 24), 0))
  gp = nnx.grad(lambda m: jnp.sum(m(x) ** 3))(plain)
  gf = nnx.grad(lambda m: jnp.sum(m(x) ** 3))(fp8)
  want = np.asarray(gp["scale"][...])
  np.testing.assert_allclose(gf["scale"][...], want, rtol=0, atol=0.02 * np.abs(want).max())
  assert np.abs(want).max() > 1


def _coat_mlp():
  mlp = transformer.MLP(32, 64, zero_init_out=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(params=0))
  numerics.apply_rules(mlp, [(r"fc\d", "coat.linear.FP8Dense", {}),
                             (r"act", "coat.activations.FP8Residuals", {})])
  return mlp


def test_everything_an_mlp_saves_for_backward_is_fp8():
  mlp = _coat_mlp()
  assert isinstance(mlp.fc1, linear.FP8Dense) and mlp.act.residuals is not None
  for m in (mlp.fc1, mlp.fc2):
    m.use_step_cache(m.step_cache())
  x = jnp.asarray(_rand((4, 8, 32), 0), jnp.bfloat16)
  _, vjp = jax.vjp(lambda x: mlp(x), x)
  saved = [(tuple(a.shape), jnp.dtype(a.dtype)) for a in jax.tree.leaves(vjp)]
  # fc1 input [32, 32] per-tensor, the GELU input [32, 64] 1x16 (+ bf16 scales [32, 4]), the fc2
  # input [32, 64] per-tensor, both FP8 weights; the rest are scalar scales.
  big = sorted((s, str(dt)) for s, dt in saved if np.prod(s) > 32 * 4)
  assert big == sorted([((32, 32), "float8_e4m3fn"), ((4, 8, 64), "float8_e4m3fn"),
                        ((32, 64), "float8_e4m3fn"), ((32, 64), "float8_e4m3fn"),
                        ((64, 32), "float8_e4m3fn")]), saved


def _grad_temporaries(wrap) -> float:
  """Compiled temporaries (MiB) of d/dx of 8 layers x <- gelu(x @ W_i) on a [1024, 1024] f32 x,
  each GELU called through `wrap(fn, x)`: what the backward keeps is each GELU's input."""
  w = jnp.eye(1024, dtype=jnp.float32)

  def loss(x):
    for i in range(8):
      x = wrap(jax.nn.gelu, x @ (w * (i + 1)))
    return jnp.sum(x)
  x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
  return temporaries_mib(jax.grad(loss), x)


def test_the_compiled_backward_keeps_fp8_copies_not_the_inputs():
  """XLA may fuse the forward's quantization into the backward's dequantization, which keeps the
  f32 inputs alive instead of their FP8 codes (0.60x of plain without the barrier in bwd)."""
  plain = _grad_temporaries(lambda fn, x: fn(x))
  fp8 = _grad_temporaries(activations.fp8_saved_call)
  # 8 saved inputs of 4 MiB in f32 against 1 MiB of E4M3 codes + 1/8 MiB of bf16 scales each
  # (0.33x compiled: the f32 x of the layer being differentiated remains)
  assert fp8 < 0.45 * plain, (fp8, plain)


# ---- the precision mode ------------------------------------------------------------------------


def _sid2(precision="coat", rules=()):
  from common.training.experiment import build_model, numerics_rules  # pylint: disable=import-outside-toplevel
  from configs import sid2_digits  # pylint: disable=import-outside-toplevel
  c = sid2_digits.get_config("runlocal")
  c.precision = precision
  c.numerics.rules = rules
  return c, nnx.eval_shape(lambda: build_model(c.model, jax.random.key(0), numerics_rules(c)))


def test_coat_preset_on_sid2_keeps_attention_embeddings_and_conditioning_high_precision():
  _, model = _sid2()
  kinds = {p: type(m).__name__ for p, m in numerics.module_paths(
      model, (layers.Dense, linear.FP8Dense))}
  fp8_paths = sorted(p for p, k in kinds.items() if k == "FP8Dense")
  assert fp8_paths and all(re.search(r"/(attn|mlp)/", p) for p in fp8_paths), fp8_paths
  for p in ("patch_embed/proj", "out_proj/proj", "cond_fc1", "noise_embed/proj"):
    assert kinds[p] == "Dense", p
  policies = {p: m.residuals for p, m in numerics.module_paths(model, layers.NONLINEAR_LAYERS)}
  attn_norms = [p for p in policies if "/attn/" in p]
  assert attn_norms and all(policies[p] is None for p in attn_norms)      # attention stays bf16
  others = [p for p in policies if "/attn/" not in p and p != "out_norm"]
  assert others and all(isinstance(policies[p], activations.FP8Residuals) for p in others)
  assert policies["out_norm"] is None          # the output layers stay bf16 (COAT's final norm)
  # The parameters (paths and count) are those of the bf16 network.
  _, plain = _sid2("bf16")
  assert (jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
          == jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(plain, nnx.Param))))


def test_config_rules_refine_the_preset_and_optimizer_resolution():
  c, model = _sid2(rules=((r"mid/0/mlp/fc2", "common.nn.numerics.FullPrecision", {}),
                          (r"mid/0/mlp/act", "common.nn.numerics.FullPrecision", {})))
  assert type(model.mid[0].mlp.fc2) is layers.Dense and model.mid[0].mlp.act.residuals is None
  assert isinstance(model.mid[0].mlp.fc1, linear.FP8Dense)
  assert numerics.optim_config(c).name == "coat.optim.fp8_adamw"
  c.optim.name = "optax.adamw"
  assert numerics.optim_config(c).name == "optax.adamw"
  c.precision = "bf16"
  c.optim.name = "adamw"
  assert numerics.optim_config(c).name == "adamw" and numerics.config_rules(c) == tuple(
      tuple(r) for r in c.numerics.rules)
  for bad in ("fp4", "common.nn.layers.Dense"):
    with pytest.raises(ConfigError, match="config.precision"):
      numerics.precision(ml_collections.ConfigDict({"precision": bad}))


def test_common_names_coat_only_by_dotted_strings():
  for dirpath, _, files in os.walk(os.path.join(ROOT, "common")):
    for f in files:
      if f.endswith(".py"):
        text = open(os.path.join(dirpath, f)).read()
        assert not re.search(r"^\s*(from|import)\s+coat\b", text, re.M), f


@pytest.mark.slow
def test_a_coat_mode_sid2_trains_a_few_steps():
  from common.training import sharding
  from common.training.experiment import Experiment  # pylint: disable=import-outside-toplevel
  c, _ = _sid2()
  c.optim.name = "optax.adamw"  # coat.optim.fp8_adamw has its own tests (and a long CPU compile)
  c.optim.warmup_steps = 0
  c.train.batch_size, c.train.grad_accum_steps = 8, 2
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  state = exp.init_state(0)
  before = jax.tree.map(np.asarray, state["params"])
  rng = np.random.default_rng(0)
  batch = {"x": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
           "cond": {"label": rng.integers(0, 10, (8,)).astype(np.int32)}}
  losses = []
  for step in range(3):
    state, metrics = exp.train_step(state, batch, exp.step_key(step))
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and int(state["step"]) == 3
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["params"], before)
  assert changed["mid"][0]["mlp"]["fc1"]["kernel"] and changed["mid"][0]["attn"]["qkv"]["kernel"]
