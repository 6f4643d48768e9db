"""Tests for the SiD2 Residual U-ViT (sid2/model.py), its blocks (sid2/blocks.py) and configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.nn import layers
from common.errors import ConfigError, ShapeError
from sid2 import blocks
from sid2.model import ResidualUViT

B, S, C, K = 2, 8, 3, 10


def tiny(**over) -> ResidualUViT:
  kw = dict(image_size=S, in_channels=C, patch_size=1, channels=(16, 32, 32),
            level_types=("conv", "conv", "transformer"), blocks_per_level=(1, 1), mid_blocks=1,
            head_dim=8, mlp_ratio=2.0, dropout=(0.0, 0.0, 0.0), num_classes=K, cond_dim=32,
            rngs=nnx.Rngs(params=0))
  kw.update(over)
  return ResidualUViT(**kw)


def inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (B, S, S, C))
  lam = jax.random.uniform(k2, (B,), minval=-15.0, maxval=15.0)
  y = {"label": jnp.array([3, K], jnp.int32)}        # one real class, one null class
  return x, lam, y


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, lam, y, key):
  return nnx.merge(graphdef, state)(x, lam, y, dropout_key=key)


def jit_apply(model):
  """model's forward, jitted once per architecture (the graphdef is the static cache key)."""
  graphdef, state = nnx.split(model)
  return lambda x, lam, y, key=None: _apply(graphdef, state, x, lam, y, key)


def randomize(model, pred=lambda path: True, scale=0.2, seed=1):
  """Replaces the parameters whose path satisfies `pred` by random normal values."""
  params = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(params)
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(flat):
    if pred("/".join(map(str, path))):
      var.set_value(scale * jax.random.normal(jax.random.fold_in(key, i), var.shape))
  nnx.update(model, nnx.from_flat_state(flat))


def test_output_shape_zero_init_and_axis_names():
  model = tiny()
  out = jit_apply(model)(*inputs())
  assert out.shape == (B, S, S, C) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)      # zero-init output layer
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert tuple(specs["mid"][0]["attn"]["qkv"]["kernel"].get_value()) == ("embed", "heads")
  assert tuple(specs["mid"][0]["mlp"]["fc1"]["kernel"].get_value()) == ("embed", "mlp")
  conv = specs["enc_blocks"][0][0]["conv1"]["kernel"].get_value()
  assert tuple(conv) == (None, None, "conv_in", "conv_out")
  assert tuple(specs["class_embed"]["table"].get_value()) == ("vocab", "embed")
  assert model.class_embed.table.shape == (K + 1, 32)


def test_skip_structure_identity_with_zero_branches():
  """With all block branches at their zero init, random Down/Up/embedding weights cancel exactly:
  h - skip_neg = 0 and Up(0) = 0, so F = Out(PatchEmbed(x))."""
  model = tiny()
  randomize(model, lambda p: p.startswith(("downs", "out_proj", "patch_embed"))
            or (p.startswith("ups") and p.endswith("kernel")))   # Up's bias stays 0: Up(0) = 0
  x, lam, y = inputs()
  out = jit_apply(model)(x, lam, y)
  ref = model.out_proj(jax.nn.silu(model.out_norm(model.patch_embed(x))))
  assert float(jnp.abs(out).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
  # Activating only the mid blocks changes the output through the residual skip.
  randomize(model, lambda p: p.startswith("mid"), seed=2)
  assert float(jnp.abs(jit_apply(model)(x, lam, y) - ref).max()) > 1e-3


def test_skip_structure_hand_check():
  """Full forward with every parameter random equals the Residual U-ViT recursion written by hand."""
  model = tiny()
  randomize(model)
  x, lam, y = inputs()
  out = jit_apply(model)(x, lam, y)
  c = model._conditioning(lam, y)
  h = model.patch_embed(x)
  pos, neg = [], []
  for l in range(2):
    h = model.enc_blocks[l][0](h, c)
    pos.append(h)
    h = model.downs[l](h)
    neg.append(h)
  h = model.mid[0](h, c)
  for l in (1, 0):
    h = model.ups[l](h - neg[l]) + pos[l]
    h = model.dec_blocks[l][0](h, c)
  ref = model.out_proj(jax.nn.silu(model.out_norm(h)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_dropout_only_with_key_and_deterministic():
  model = tiny(dropout=(0.0, 0.3, 0.5))
  randomize(model)
  f = jit_apply(model)
  x, lam, y = inputs()
  k1, k2 = jax.random.key(1), jax.random.key(2)
  base = np.asarray(f(x, lam, y))
  np.testing.assert_array_equal(base, np.asarray(f(x, lam, y)))
  a, a2, b = (np.asarray(f(x, lam, y, k)) for k in (k1, k1, k2))
  np.testing.assert_array_equal(a, a2)
  assert np.abs(a - base).max() > 1e-4 and np.abs(a - b).max() > 1e-4


@pytest.mark.parametrize("over", [
    dict(dropout=(0.1, 0.0, 0.0)),                      # dropout at the highest resolution
    dict(dropout=(0.0, 0.1)),                           # wrong length
    dict(level_types=("conv", "conv", "mlp")),
    dict(blocks_per_level=(1, 1, 1)),
    dict(image_size=10),                                # not divisible by p * 2^(L-1)
])
def test_bad_config_raises(over):
  with pytest.raises(ConfigError):
    tiny(**over)


def test_bad_inputs_raise():
  model = tiny()
  x, lam, y = inputs()
  with pytest.raises(ShapeError, match=r"\[B, 8, 8, 3\]"):
    model(x[:, :4], lam, y)
  with pytest.raises(ShapeError):
    model(x[..., :1], lam, y)
  with pytest.raises(ShapeError):
    model(x, lam[:1], y)
  with pytest.raises(ShapeError):
    model(x, lam, {"label": y["label"][:1]})
  with pytest.raises(ShapeError):
    model(x, lam, {"label": y["label"].astype(jnp.float32)})


def test_null_cond_and_unconditional():
  model = tiny()
  np.testing.assert_array_equal(model.null_cond({"label": jnp.array([1, 2, 3])})["label"], [K, K, K])
  uncond = tiny(num_classes=0)
  assert uncond.class_embed is None and uncond.null_cond({}) == {}
  x, lam, _ = inputs()
  assert uncond(x, lam, {}).shape == (B, S, S, C)
  xs, cs = uncond.example_inputs(3)
  assert xs.shape == (3, S, S, C) and cs == {}
  xs, cs = model.example_inputs(3)
  assert cs["label"].shape == (3,) and cs["label"].dtype == jnp.int32


def test_gradients_reach_all_params_and_remat_matches():
  model = tiny(remat=True, dropout=(0.0, 0.1, 0.1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, lam, y = inputs()
  target = jax.random.normal(jax.random.key(9), x.shape)

  @jax.jit
  def step(params, key):
    def loss(p):
      out = nnx.merge(graphdef, p, rest)(x, lam, y, dropout_key=key)
      return jnp.mean((out - target) ** 2)
    value, g = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda p, d: p - 0.5 * d, params, g), g, value

  ever = jax.tree.map(lambda p: jnp.zeros((), bool), params)
  losses = []
  for i in range(6):
    params, g, value = step(params, jax.random.key(i))
    losses.append(float(value))
    if i == 0:   # at init only the zero-init output projection receives a gradient
      assert float(jnp.abs(g["out_proj"]["proj"]["kernel"][...]).max()) > 0
    ever = jax.tree.map(lambda e, d: e | jnp.any(d != 0), ever, g)
  dead = [p for p, v in nnx.to_flat_state(ever) if not bool(v[...])]
  assert not dead, f"parameters without gradient after 6 steps: {dead}"
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]

  # remat changes memory, not values.
  trained = nnx.merge(graphdef, params, rest)
  _, state = nnx.split(trained)
  plain = tiny(remat=False, dropout=(0.0, 0.1, 0.1))
  nnx.update(plain, state)
  np.testing.assert_allclose(np.asarray(jit_apply(trained)(x, lam, y)),
                             np.asarray(jit_apply(plain)(x, lam, y)), atol=1e-5)


def test_bfloat16_compute_float32_params():
  model = tiny(dtype="bfloat16")
  randomize(model)
  out = jit_apply(model)(*inputs())
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  # The blocks compute in bfloat16: close to, but not identical with, the float32 network.
  ref = tiny()
  nnx.update(ref, nnx.state(model))
  want = jit_apply(ref)(*inputs())
  err = float(jnp.abs(out - want).max() / jnp.abs(want).max())
  assert 0 < err < 0.1, err
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_layers_roundtrip_and_features():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  np.testing.assert_array_equal(layers.unpatchify(layers.patchify(x, 2), 2, 3), x)
  f = layers.fourier_features(jnp.array([-20.0, 0.0, 20.0]), 64, 0.5, 200.0)
  assert f.shape == (3, 64) and f.dtype == jnp.float32
  assert float(jnp.abs(f[0] - f[2]).max()) > 0.1      # no wrap-around over [-20, 20]
  # RoPE: relative positions only -> q.k invariant to a shift of both positions on the grid.
  q = jax.random.normal(jax.random.key(1), (1, 16, 1, 8))
  r = blocks.rope_2d(q, (4, 4))
  np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("name", ["sid2_in128", "sid2_in256", "sid2_in512"])
def test_runlocal_config_builds_and_runs(name):
  import importlib  # pylint: disable=import-outside-toplevel
  mod = importlib.import_module(f"configs.{name}")
  cfg = mod.get_config("runlocal")
  assert cfg.data.name == "digits" and cfg.train.batch_size == 8
  kw = {k: v for k, v in cfg.model.to_dict().items() if k != "name"}
  model = ResidualUViT(**kw, rngs=nnx.Rngs(params=0))
  s, c = cfg.model.image_size, cfg.model.in_channels
  out = model(jnp.zeros((2, s, s, c)), jnp.zeros((2,)), {"label": jnp.array([0, 10], jnp.int32)})
  assert out.shape == (2, s, s, c)
  with pytest.raises(ConfigError):
    mod.get_config("p3")


@pytest.mark.slow
def test_in512_macs():
  """UViT/4 and UViT/2 @512 (same network) hit the published 137 / 653 G MACs (paper 'GFLOPs')."""
  from common.training import summary
  from configs import sid2_in512  # pylint: disable=import-outside-toplevel
  params = set()
  for arg, want in (("p4", 137.0), ("p2", 653.0)):
    cfg = sid2_in512.get_config(arg).model
    kw = {k: v for k, v in cfg.to_dict().items() if k != "name"}
    model = nnx.eval_shape(lambda: ResidualUViT(**kw, rngs=nnx.Rngs(params=0)))  # pylint: disable=cell-var-from-loop
    x, cond = model.example_inputs(1)
    inp = (x, jax.ShapeDtypeStruct((1,), jnp.float32), cond)
    macs = summary.forward_macs(model, inp) / 1e9
    assert abs(macs / want - 1) < 0.10, (arg, macs)
    counts = summary.count_params_per_module(model)
    params.add(round(counts["total"] / 1e6))
  assert len(params) == 1 or max(params) - min(params) <= 1      # only the patch layers differ


def test_guidance_interval_follows_the_resolution():
  """The guidance interval moves with the image side like the schedule, so it covers the same
  stretch of t at 128, 256 and 512."""
  from common.diffusion import schedules
  from configs import sid2_in512
  t = jnp.linspace(0.0, 1.0, 20001)
  spans = []
  for d in (128, 256, 512):
    lo, hi = sid2_in512.guidance_interval(d)
    lam = schedules.get_logsnr_schedule("sid2", image_d=d).logsnr(t)
    inside = np.asarray(t[(lam >= lo) & (lam <= hi)])
    spans.append((inside.min(), inside.max()))
    cfg_d = {512: sid2_in512}.get(d)
    if cfg_d is not None:
      assert tuple(cfg_d.get_config("p4").sample.guidance_interval) == (lo, hi)
  np.testing.assert_allclose(spans, [spans[0]] * 3, atol=2e-3)
  assert 0.35 < spans[0][0] < 0.45 and 0.6 < spans[0][1] < 0.75, spans


def test_text_conditioning_uses_tokens_pooled_and_mask():
  model = tiny(num_classes=0, text_dim=8, text_len=4)
  randomize(model)  # zero-init branches would hide the cross-attention
  x, lam, _ = inputs()
  k1, k2 = jax.random.split(jax.random.key(5))
  cond = {"tokens": jax.random.normal(k1, (B, 4, 8)), "mask": jnp.array([[1, 1, 0, 0]] * B, jnp.int32),
          "pooled": jax.random.normal(k2, (B, 8))}
  xs, spec = model.example_inputs(B)
  assert jax.tree.map(lambda s: s.shape, spec) == jax.tree.map(jnp.shape, cond)
  f = jit_apply(model)
  base = np.asarray(f(x, lam, cond))
  # masked-out tokens change nothing; real tokens and the pooled vector do
  pad_changed = {**cond, "tokens": cond["tokens"].at[:, 2:].set(7.0)}
  np.testing.assert_allclose(np.asarray(f(x, lam, pad_changed)), base, atol=1e-5)
  tok_changed = {**cond, "tokens": cond["tokens"].at[:, 0].set(7.0)}
  assert np.abs(np.asarray(f(x, lam, tok_changed)) - base).max() > 1e-3
  pooled_changed = {**cond, "pooled": cond["pooled"] + 1.0}
  assert np.abs(np.asarray(f(x, lam, pooled_changed)) - base).max() > 1e-3
  null = model.null_cond(cond)
  assert float(jnp.abs(null["tokens"]).max()) == 0 and float(jnp.abs(null["pooled"]).max()) == 0
  np.testing.assert_array_equal(null["mask"], cond["mask"])
  with pytest.raises(ShapeError):
    model(x, lam, {**cond, "tokens": cond["tokens"][:, :3]})
