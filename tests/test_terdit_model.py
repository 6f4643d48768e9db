"""TerDiT network, its numerics rules, summary counts and the official-checkpoint conversion."""

import os
import re

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common.nn import numerics
from common.errors import CheckpointError, ConfigError
from common.training.experiment import build_model, numerics_rules
from common.training.summary import count_params_by_kind
from common.weights.torch_weights import load_torch_weights
from configs import sid2_digits
from configs import terdit as terdit_config
from terdit import convert
from terdit.model import TerDiT, ffn_hidden_dim, rope_1d, timestep_embedding
from terdit.ternary import TernaryDense

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "terdit")
# The official model of make_terdit_fixture.py (DiT_Llama(input_size=8, patch_size=2,
# in_channels=4, dim=48, n_layers=2, n_heads=4, multiple_of=16, num_classes=10, qk_norm=True)).
FIXTURE_MODEL = dict(name="terdit.model.TerDiT", image_size=8, in_channels=4, patch_size=2, dim=48,
                     depth=2, num_heads=4, multiple_of=16, num_classes=10, qk_norm=True)


def _model_cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**FIXTURE_MODEL, **kw})


def _abstract(cfg, rules=()):
  model = nnx.eval_shape(lambda: build_model(cfg, jax.random.key(0), rules))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _apply(model, x, t, labels) -> np.ndarray:
  """The jitted forward (eager op-by-op execution is far slower on a loaded CPU)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, x, t, y: nnx.merge(graphdef, st)(x, t, {"label": y}))
  return np.asarray(fn(state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(labels)))


def _forward_converted(filename: str, rules=()) -> tuple[np.ndarray, nnx.Module]:
  cfg = _model_cfg()
  model = build_model(cfg, jax.random.key(1), rules)
  tree = load_torch_weights(os.path.join(FIXTURES, filename))
  params = convert.from_official(tree, _abstract(cfg, rules))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  e = np.load(os.path.join(FIXTURES, "expected.npz"))
  return _apply(model, e["x"], e["t"], e["y"]), model


@pytest.mark.parametrize("filename", ["consolidated.00-of-01.pth",
                                      "consolidated_ternary.00-of-01.pth"])
def test_official_parity_ternary(filename):
  """Both official checkpoint kinds, converted into TerDiT's ternary model, give the official
  forward (latent weights ternarised on the fly; packed codes unpacked)."""
  rules = terdit_config.ternary_rules()
  out, model = _forward_converted(filename, rules)
  expected = np.load(os.path.join(FIXTURES, "expected.npz"))["out"]
  assert out.shape == expected.shape == (3, 8, 8, 8)
  np.testing.assert_allclose(out, expected, atol=2e-4, rtol=2e-4)
  assert isinstance(model.blocks[0].attn.wq, TernaryDense)
  assert float(model.blocks[0].attn.wq.alpha[...]) < 0        # the fixture's negative alpha


def test_official_parity_full_precision_target():
  """Into a full-precision model (an `_fp` config) the effective weights alpha * ternary(W) are
  written: the same function as the official ternary model."""
  expected = np.load(os.path.join(FIXTURES, "expected.npz"))["out"]
  for filename in ("consolidated.00-of-01.pth", "consolidated_ternary.00-of-01.pth"):
    out, _ = _forward_converted(filename)
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=2e-4)


def test_packed_and_latent_files_give_the_same_ternary_weights():
  rules = terdit_config.ternary_rules()
  ap = _abstract(_model_cfg(), rules)
  a = convert.from_official(load_torch_weights(os.path.join(FIXTURES, "consolidated.00-of-01.pth")),
                            ap)
  b = convert.from_official(
      load_torch_weights(os.path.join(FIXTURES, "consolidated_ternary.00-of-01.pth")), ap)
  for path in (("blocks", 0, "attn", "wq"), ("blocks", 1, "mlp", "w2"), ("blocks", 1, "adaln")):
    la, lb = a, b
    for p in path:
      la, lb = la[p], lb[p]
    np.testing.assert_array_equal(convert.ternarize(la["kernel"]), lb["kernel"])
    assert set(np.unique(lb["kernel"])) <= {-1.0, 0.0, 1.0}
    assert la["alpha"] == lb["alpha"]


def test_hqq_unpack_layout_and_errors():
  # 4 output rows, 2 inputs: rows r, r + 1, r + 2, r + 3 of column k live in bits 7-6 .. 1-0.
  codes = np.array([[0, 1], [1, 2], [2, 0], [1, 1]], np.uint8)        # [out=4, in=2]
  packed = (codes[0] << 6) | (codes[1] << 4) | (codes[2] << 2) | codes[3]
  np.testing.assert_array_equal(convert.unpack_hqq_2bit(packed[None]), codes)
  np.testing.assert_array_equal(convert.ternary_from_hqq(packed[None]), codes.astype(np.int8) - 1)
  with pytest.raises(CheckpointError, match="code 3"):
    convert.ternary_from_hqq(np.array([[0b11000000]], np.uint8))
  with pytest.raises(CheckpointError, match="uint8"):
    convert.unpack_hqq_2bit(np.zeros((2, 2), np.float32))


def test_conversion_errors_name_the_problem():
  tree = load_torch_weights(os.path.join(FIXTURES, "consolidated.00-of-01.pth"))
  ap = _abstract(_model_cfg(depth=1))
  with pytest.raises(CheckpointError, match="no place"):
    convert.from_official(tree, ap)
  ap = _abstract(_model_cfg(depth=3))
  with pytest.raises(CheckpointError, match="layers.2"):
    convert.from_official(tree, ap)
  ap = _abstract(_model_cfg(dim=64))
  with pytest.raises(CheckpointError, match="shape"):
    convert.from_official(tree, ap)


def test_init_output_is_zero_and_cond_contract():
  model = build_model(_model_cfg(), jax.random.key(0))
  x_spec, cond_spec = model.example_inputs(2)
  assert x_spec.shape == (2, 8, 8, 4) and cond_spec["label"].shape == (2,)
  x = jax.random.normal(jax.random.key(1), x_spec.shape)
  out = _apply(model, x, jnp.array([10.0, 900.0]), jnp.array([1, 2]))
  assert out.shape == (2, 8, 8, 8)
  np.testing.assert_array_equal(np.asarray(out), 0.0)      # zero-init final linear (official)
  assert np.all(np.asarray(model.null_cond({"label": jnp.array([1, 2])})["label"]) == 10)
  # zero-init adaLN linears and final linear; N(0, 0.02) timestep MLP and label table
  assert float(jnp.abs(model.blocks[0].adaln.kernel[...]).max()) == 0.0
  assert abs(float(model.y_embedder.table[...].std()) - 0.02) < 0.004
  assert model.blocks[0].mlp.w1.kernel.shape == (48, ffn_hidden_dim(48, 16))


def test_ffn_width_and_timestep_embedding():
  assert ffn_hidden_dim(1536) == 4096 and ffn_hidden_dim(3072) == 8192
  emb = np.asarray(timestep_embedding(jnp.array([0.0, 7.0]), 256))
  freqs = np.exp(-np.log(1e4) * np.arange(128) / 128)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(7 * freqs), np.sin(7 * freqs)]),
                             rtol=1e-5, atol=1e-5)


def test_rope_is_interleaved_complex_rotation():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  y = np.asarray(rope_1d(x))
  xc = np.asarray(x)[..., 0::2] + 1j * np.asarray(x)[..., 1::2]
  freqs = 1.0 / 1e4 ** (np.arange(0, 8, 2) / 8)
  rot = np.exp(1j * np.arange(5)[:, None] * freqs[None])[None, :, None, :]
  want = xc * rot
  np.testing.assert_allclose(y[..., 0::2], want.real, atol=1e-5)
  np.testing.assert_allclose(y[..., 1::2], want.imag, atol=1e-5)


@pytest.mark.slow  # ~25 s of CPU (the compile of a backward pass); test_ternary.py covers the STE
def test_adaln_norm_flag_and_gradients_reach_ternary_weights():
  rules = terdit_config.ternary_rules()
  off = nnx.eval_shape(lambda: build_model(_model_cfg(adaln_norm=False), jax.random.key(0), rules))
  assert off.blocks[0].adaln_norm is None
  model = build_model(_model_cfg(dim=16, depth=1, num_heads=2), jax.random.key(0), rules)
  graphdef, params = nnx.split(model, nnx.Param)
  # randomise the zero-init final layer so that gradients reach the blocks
  params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(2), p.shape), params)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x, jnp.array([5.0, 500.0]),
                                           {"label": jnp.array([0, 10])}) ** 2)

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  assert float(jnp.abs(grads["blocks"][0]["attn"]["wq"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["blocks"][0]["adaln"]["alpha"])) > 0


def test_terdit_rules_choose_exactly_the_official_ternary_layers():
  model = build_model(_model_cfg(), jax.random.key(0))
  chosen = numerics.apply_rules(model, terdit_config.ternary_rules())
  expected = {f"blocks/{i}/{n}" for i in range(2)
              for n in ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w1", "mlp/w2", "mlp/w3",
                        "adaln")}
  assert set(chosen) == expected
  fp = {p for p, d in numerics.linear_paths(model)}
  assert fp == {"x_embedder", "t_embedder/0", "t_embedder/1", "final/adaln", "final/linear"}


def test_alpha_init_normal_differs_per_layer_and_is_reproducible():
  rules = terdit_config.ternary_rules("normal")
  a = build_model(_model_cfg(), jax.random.key(0), rules)
  b = build_model(_model_cfg(), jax.random.key(0), rules)
  alphas = [float(l.alpha[...]) for _, l in nnx.iter_graph(a) if isinstance(l, TernaryDense)]
  alphas_b = [float(l.alpha[...]) for _, l in nnx.iter_graph(b) if isinstance(l, TernaryDense)]
  assert alphas == alphas_b and len(set(alphas)) == len(alphas) == 16
  assert min(alphas) < 0 < max(alphas) or np.std(alphas) > 0.3     # N(0, 1) draws
  gamma = build_model(_model_cfg(), jax.random.key(0), terdit_config.ternary_rules("gamma"))
  assert float(gamma.blocks[0].attn.wq.alpha[...]) > 0
  with pytest.raises(ConfigError, match="alpha_init"):
    build_model(_model_cfg(), jax.random.key(0), terdit_config.ternary_rules("uniform"))


def test_rules_make_sid2_attention_and_mlp_ternary():
  """The same config rules make the SiD2 digits network ternary in its attention and MLP layers."""
  c = sid2_digits.get_config("runlocal")
  rules = ((r".*/(attn/(qkv|out)|mlp/(fc1|fc2))", "terdit.ternary.TernaryDense",
            {"alpha_init": "normal"}),)
  # Built abstractly (as the trainer does first): the rules run inside nnx.eval_shape.
  model = nnx.eval_shape(lambda: build_model(c.model, jax.random.key(0), rules))
  ternary = {"/".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, TernaryDense)}
  assert ternary and all(re.fullmatch(r".*/(attn/(qkv|out)|mlp/(fc1|fc2))", p) for p in ternary)
  assert {p.rsplit("/", 1)[-1] for p in ternary} == {"qkv", "out", "fc1", "fc2"}
  # everything else stayed full precision
  rest = {p for p, _ in numerics.linear_paths(model)}
  assert rest and not any(re.fullmatch(r".*/(attn/(qkv|out)|mlp/(fc1|fc2))", p) for p in rest)
  assert "TernaryKernel" in count_params_by_kind(model)


@pytest.mark.parametrize("variant,ternary", [("600M_256", 603_979_776),
                                             ("4.2B_512", 4_227_858_432)])
def test_summary_counts(variant, ternary):
  c = terdit_config.get_config(variant)
  model = nnx.eval_shape(lambda: build_model(c.model, jax.random.key(0), numerics_rules(c)))
  kinds = count_params_by_kind(model)
  assert kinds["TernaryKernel"] == ternary
  depth = c.model.depth
  assert kinds["TernaryScale"] == 8 * depth                 # 4 attention + 3 SwiGLU + adaLN
  assert model.example_inputs(1)[0].shape == (1, c.model.image_size, c.model.image_size, 4)
  fp = terdit_config.get_config(variant + "_fp")
  fp_model = nnx.eval_shape(lambda: build_model(fp.model, jax.random.key(0), numerics_rules(fp)))
  assert set(count_params_by_kind(fp_model)) == {"Param"}
  assert sum(count_params_by_kind(fp_model).values()) == sum(kinds.values()) - 8 * depth


def test_config_variants():
  c = terdit_config.get_config("4.2B_256")
  assert (c.model.dim, c.model.depth, c.model.num_heads, c.model.image_size) == (3072, 32, 32, 32)
  assert c.diffusion.name == "common.diffusion.adm.ADMDiffusion" and c.sample.num_steps == 250
  assert c.optim.schedule == "step" and c.optim.learning_rate == 5e-4
  assert c.optim.lr_after_switch == 1e-4 and c.optim.clip_norm == 2.0
  assert c.train.ema_decay == 0.9999 and c.optim.weight_decay == 0.0
  assert terdit_config.get_config("600M_512").model.image_size == 64
  # TerDiT's published schedule: (iterations, batch, step of the 5e-4 -> 1e-4 switch).
  for variant, schedule in (("600M_256", (1_750_000, 256, 1_550_000)),
                            ("4.2B_256", (1_180_000, 512, 550_000))):
    c = terdit_config.get_config(variant)
    assert (c.train.steps, c.train.batch_size, c.optim.lr_switch_step) == schedule
  assert terdit_config.get_config("digits,no_adaln_norm").model.adaln_norm is False
  assert terdit_config.get_config("digits,alpha_gamma").numerics.rules[0][2] == {
      "alpha_init": "gamma"}
  assert terdit_config.get_config("runlocal,fp").numerics.rules == ()
  for bad in ("", "600M", "600M_256,4.2B_256", "digits,bogus"):
    with pytest.raises(ConfigError):
      terdit_config.get_config(bad)
