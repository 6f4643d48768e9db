"""Autoencoders: diffusers AutoencoderKL parity, our small KL autoencoder and its recipe, export/load."""

import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from common import registry
from common.autoencoders import Autoencoder, load_autoencoder, save_autoencoder
from autoencoder import kl_vae
from autoencoder.recipe import KLAutoencoderRecipe
from autoencoder.small_kl import SmallKLAutoencoder
from common.errors import CheckpointError, ConfigError, DataNotFoundError, ShapeError

def _call(net, method, *args):
  """`net.method(*args)` compiled (eager NNX calls dispatch op by op: slow on a busy CPU)."""
  return nnx.jit(lambda m, *a: getattr(m, method)(*a))(net, *args)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "vae")


# ------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL parity (tests/fixtures/vae/make_vae_fixture.py).


@pytest.mark.parametrize("variant", ["sd", "d16"])
def test_diffusers_vae_parity(variant):
  directory = os.path.join(FIXTURES, variant)
  expected = np.load(os.path.join(directory, "expected.npz"))
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  ae = load_autoencoder(directory)
  mean, logvar = ae.moments(expected["images"])
  # Max errors measured: 3e-6 (mean), 4e-6 (logvar), 7e-6 (decoded), 3e-6 (decoded_latents).
  np.testing.assert_allclose(mean, expected["mean"], atol=5e-5, rtol=0)
  np.testing.assert_allclose(logvar, expected["logvar"], atol=5e-5, rtol=0)
  shift = cfg.get("shift_factor") or 0.0
  scaled = (expected["latents"] - shift) * cfg["scaling_factor"]
  np.testing.assert_allclose(ae.decode(scaled), expected["decoded_latents"], atol=5e-5, rtol=0)
  # Scaled latents: (z - shift_factor) * scaling_factor, and decode inverts the scaling.
  z = ae.encode(expected["images"])
  np.testing.assert_allclose(z, (expected["mean"] - shift) * cfg["scaling_factor"], atol=5e-5)
  np.testing.assert_allclose(ae.decode(z), expected["decoded"], atol=5e-5)
  assert ae.latent_shape((16, 16, 3)) == (8, 8, cfg["latent_channels"])
  # A posterior sample: mean + exp(logvar / 2) * eps, scaled.
  key = jax.random.key(3)
  eps = jax.random.normal(key, expected["mean"].shape)
  want = (expected["mean"] + np.exp(0.5 * expected["logvar"]) * eps - shift) * cfg["scaling_factor"]
  np.testing.assert_allclose(ae.encode(expected["images"], key), want, atol=5e-5)


def test_a_diffusers_folder_loads_while_names_come_from_a_file():
  """The loader (common/) reaches the family's AutoencoderKL only by its registered name, so a
  diffusers VAE still loads inside `registry.from_file` (sampling from an export)."""
  expected = np.load(os.path.join(FIXTURES, "sd", "expected.npz"))
  with registry.from_file("/x/config.json"):
    ae = load_autoencoder(os.path.join(FIXTURES, "sd"))
  assert type(ae.net) is kl_vae.AutoencoderKL
  np.testing.assert_allclose(ae.moments(expected["images"])[0], expected["mean"], atol=5e-5)


def test_diffusers_vae_legacy_attention_names(tmp_path):
  from safetensors import numpy as st_numpy
  src = os.path.join(FIXTURES, "sd")
  sd = st_numpy.load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for k, v in sd.items():
    for new, old in rename.items():
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        v = v[:, :, None, None] if v.ndim == 2 else v    # stored as 1x1 convs
    legacy[k] = v
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
  st_numpy.save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  expected = np.load(os.path.join(src, "expected.npz"))
  mean, _ = load_autoencoder(str(tmp_path)).moments(expected["images"])
  np.testing.assert_allclose(mean, expected["mean"], atol=5e-5)


def test_load_errors_are_one_line(tmp_path):
  with pytest.raises(DataNotFoundError, match="download") as e:
    load_autoencoder(str(tmp_path / "sdxl-vae"))
  assert "\n" not in str(e.value)
  shutil.copy(os.path.join(FIXTURES, "sd", "config.json"), tmp_path / "config.json")
  with pytest.raises(DataNotFoundError, match="diffusion_pytorch_model.safetensors"):
    load_autoencoder(str(tmp_path))
  # Weights that do not fit the config.
  cfg = json.load(open(os.path.join(FIXTURES, "sd", "config.json")))
  cfg["latent_channels"] = 8
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  shutil.copy(os.path.join(FIXTURES, "sd", "diffusion_pytorch_model.safetensors"), tmp_path)
  with pytest.raises(ShapeError):
    load_autoencoder(str(tmp_path))
  json.dump({"_class_name": "UNet2DModel"}, open(tmp_path / "config.json", "w"))
  with pytest.raises(CheckpointError, match="AutoencoderKL"):
    load_autoencoder(str(tmp_path))
  with pytest.raises(ConfigError):
    load_autoencoder("")
  ae = load_autoencoder(os.path.join(FIXTURES, "sd"))
  with pytest.raises(ShapeError, match="divisible"):
    ae.encode(np.zeros((1, 15, 15, 3), np.float32))
  with pytest.raises(ShapeError, match="channel"):
    ae.encode(np.zeros((1, 16, 16, 1), np.float32))


def test_untrained_stand_in_decodes_latents_of_its_factor():
  ae = load_autoencoder("untrained:f8")
  assert (ae.downsample_factor, ae.latent_channels, ae.image_channels) == (8, 4, 3)
  assert "UNTRAINED" in ae.name
  z = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
  x = np.asarray(ae.decode(z))
  assert x.shape == (2, 32, 32, 3) and np.isfinite(x).all() and x.std() > 0
  np.testing.assert_array_equal(np.asarray(load_autoencoder("untrained:f8").decode(z)), x)
  assert ae.encode(x).shape == (2, 4, 4, 4)
  assert load_autoencoder("untrained:f4c16").latent_shape((28, 28, 3)) == (7, 7, 16)
  for bad in ("untrained:f6", "untrained:8", "untrained:f8c"):
    with pytest.raises(ConfigError, match="untrained:f<F>"):
      load_autoencoder(bad)


def test_latent_normalization_per_channel():
  shift, scale = kl_vae.latent_normalization(
      {"latent_channels": 2, "scaling_factor": 0.5, "latents_mean": [1.0, 2.0],
       "latents_std": [2.0, 4.0]})
  np.testing.assert_allclose(shift, [1.0, 2.0])
  np.testing.assert_allclose(scale, [0.25, 0.125])


# ------------------------------------------------------------------------------------------------
# Our small KL autoencoder and its recipe.

TINY = dict(image_size=8, in_channels=1, channels=(4, 8), blocks_per_level=1, mid_blocks=1,
            latent_channels=2, norm_groups=2)


def test_small_kl_shapes_and_state():
  net = SmallKLAutoencoder(**TINY, rngs=nnx.Rngs(params=jax.random.key(0)))
  x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1, maxval=1)
  mean, logvar = _call(net, "encode_moments", x)
  assert mean.shape == logvar.shape == (3, 4, 4, 2)
  assert _call(net, "decode", mean).shape == (3, 8, 8, 1)
  _, _, rest = nnx.split(net, nnx.Param, ...)
  assert not jax.tree.leaves(rest)                            # only nnx.Param state
  x_sds, cond = net.example_inputs(5)
  assert x_sds.shape == (5, 8, 8, 1) and cond == {}
  full = nnx.eval_shape(lambda: SmallKLAutoencoder(rngs=nnx.Rngs(0)))   # the Fashion-MNIST default
  graphdef, state = nnx.split(full)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode_moments(x), state,
                       jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
  assert out[0].shape == (1, 7, 7, 4)
  with pytest.raises(ConfigError):
    SmallKLAutoencoder(image_size=30, channels=(4, 8, 8), rngs=nnx.Rngs(0))


class _FixedMoments:
  """A stand-in network with known posterior moments and an identity-like decoder."""

  def __init__(self, mean, logvar):
    self.mean, self.logvar = mean, logvar

  def encode_moments(self, x):
    del x
    return self.mean, self.logvar

  def decode(self, z):
    return jnp.tile(z[..., :1], (1, 2, 2, 1))                  # [B, 2h, 2w, 1]


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_recipe_loss_formula(reconstruction):
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
  logvar = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
  x = rng.uniform(-1, 1, size=(2, 6, 6, 1)).astype(np.float32)
  recipe = KLAutoencoderRecipe(kl_weight=0.3, reconstruction=reconstruction, sample_posterior=False)
  per_example, metrics = recipe.loss(_FixedMoments(mean, logvar), {"x": x, "cond": {}},
                                     jax.random.key(0))
  rec = np.tile(mean[..., :1], (1, 2, 2, 1))
  err = np.abs(rec - x) if reconstruction == "l1" else (rec - x) ** 2
  kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(per_example, err.mean(axis=(1, 2, 3)) + 0.3 * kl / 36, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], kl.mean(), rtol=1e-5)
  mse = np.mean((rec - x) ** 2)
  np.testing.assert_allclose(metrics["psnr"], 10 * np.log10(4 / mse), rtol=1e-5)
  # KL of the prior itself is zero.
  _, m0 = recipe.loss(_FixedMoments(np.zeros_like(mean), np.zeros_like(logvar)), {"x": x},
                      jax.random.key(0))
  assert abs(float(m0["kl"])) < 1e-6
  with pytest.raises(ConfigError):
    KLAutoencoderRecipe(reconstruction="l3")


def test_recipe_trains_tiny_autoencoder():
  """The recipe's loss is differentiable end to end: a few Adam steps fit a fixed batch better."""
  model = SmallKLAutoencoder(**TINY, rngs=nnx.Rngs(params=jax.random.key(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  recipe = KLAutoencoderRecipe(kl_weight=1e-3)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)), jnp.float32)
  tx = optax.adam(1e-2)

  def loss_fn(p, key):
    per_example, metrics = recipe.loss(nnx.merge(graphdef, p), {"x": x, "cond": {}}, key)
    return per_example.mean(), metrics

  @jax.jit
  def step(p, o, key):
    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss, metrics, g

  opt = tx.init(params)
  losses = []
  for i in range(40):
    params, opt, loss, metrics, grads = step(params, opt, jax.random.key(i))
    losses.append(float(loss))
    if i == 0:   # every parameter receives a finite, non-zero gradient
      leaves = jax.tree.leaves(grads)
      assert all(np.isfinite(g).all() for g in leaves)
      assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  recon = jax.jit(lambda p: recipe.preview(nnx.merge(graphdef, p), {"x": x, "cond": {}},
                                           jax.random.key(0), {}))(params)
  assert recon.shape == x.shape and float(jnp.abs(recon).max()) <= 1.0


# ------------------------------------------------------------------------------------------------
# Export and load.


def _digits_ae_config():
  from configs import autoencoder_fashion
  c = autoencoder_fashion.get_config("runlocal")
  c.data = ml_collections.ConfigDict({"name": "digits", "image_size": 8})
  c.model.update(TINY)      # the shapes of the other tests: their compiled initialisers are reused
  return c


def test_save_load_round_trip(tmp_path):
  cfg = ml_collections.ConfigDict(dict(name="autoencoder.small_kl.SmallKLAutoencoder",
                                       **TINY))
  net = SmallKLAutoencoder(**TINY, rngs=nnx.Rngs(params=jax.random.key(2)))
  params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
  save_autoencoder(str(tmp_path), cfg, params, shift=0.5, scale=[2.0, 4.0], image_shape=(8, 8, 1))
  ae = load_autoencoder(str(tmp_path))
  assert isinstance(ae, Autoencoder)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  mean, _ = _call(net, "encode_moments", x)
  np.testing.assert_allclose(ae.encode(x), (mean - 0.5) * np.array([2.0, 4.0]), atol=1e-5)
  np.testing.assert_allclose(ae.decode(ae.encode(x)), _call(net, "decode", mean), atol=1e-5)
  assert ae.latent_shape((8, 8, 1)) == (4, 4, 2)


def test_export_from_checkpoint(tmp_path):
  from autoencoder.export import export_autoencoder
  from common.weights.checkpoint import Checkpointer
  from common.training.experiment import build_model
  config = _digits_ae_config()
  net = build_model(config.model, jax.random.key(0))
  params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
  ema = jax.tree.map(lambda p: p * 1.01, params)
  ckpt = Checkpointer(str(tmp_path / "w" / "checkpoints"), async_save=False)
  ckpt.save(7, {"step": jnp.int32(7), "params": params, "opt_state": optax.adam(1e-3).init(params),
                "ema": ema})
  ckpt.close()
  out = str(tmp_path / "export")
  r = export_autoencoder(config, str(tmp_path / "w"), out, num_images=300)
  assert r["step"] == 7 and r["latent_shape"] == (4, 4, 2)
  ae = load_autoencoder(out)
  nnx.update(net, ema)
  from common.data import load_arrays
  images, _ = load_arrays(config.data, "train", limit=300)
  x = images.astype(np.float32) / 127.5 - 1.0
  z = np.asarray(ae.encode(x))
  assert abs(z.mean()) < 1e-4 and abs(z.std() - 1.0) < 1e-3     # normalised latents
  want = _call(net, "decode", _call(net, "encode_moments", x[:4])[0])
  np.testing.assert_allclose(ae.decode(z[:4]), want, atol=1e-4)
  with pytest.raises(CheckpointError, match="no checkpoint"):
    export_autoencoder(config, str(tmp_path / "empty"), out)
  config.model.channels = (4, 16)
  with pytest.raises(CheckpointError, match="does not match"):
    export_autoencoder(config, str(tmp_path / "w"), out)
