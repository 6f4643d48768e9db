"""common.diffusion.adm.ADMDiffusion against openai/guided-diffusion and DiT (tests/fixtures/adm), and a short
training run through common.training.experiment.Experiment."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.diffusion import adm
from common.nn import layers
from common.training import sharding
from common.diffusion.recipes import make_diffusion
from common.errors import ConfigError, ShapeError

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adm",
                       "adm_reference.npz")
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


def tiny_model(ref, channels=None):
  """The fixed random map of make_adm_fixture.py (`TinyModel`), NHWC, as an apply_fn."""
  def apply_fn(x, noise_cond, cond):
    out = jnp.einsum("bhwc,oc->bhwo", x, ref["w"])
    per_ex = (ref["b"] + ref["amp"] * jnp.sin(noise_cond[:, None] * ref["freq"] + ref["phase"])
              + jnp.asarray(ref["emb"])[cond["label"]])
    out = out + per_ex[:, None, None, :] + ref["pos"][None]
    return out[..., :channels] if channels else out
  return apply_fn


def cond_of(ref):
  return {"label": jnp.asarray(ref["y"], jnp.int32)}


def assert_close(got, want, rtol=2e-5, atol=2e-6):
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)


# ---- the process ---------------------------------------------------------------------------------
def test_schedules_and_respacing_match_guided_diffusion(ref):
  np.testing.assert_array_equal(adm.named_betas("linear", 1000), ref["betas_linear"])
  np.testing.assert_allclose(adm.named_betas("cosine", 1000), ref["betas_cosine"], rtol=1e-12)
  np.testing.assert_array_equal(adm.named_betas("squaredcos_cap_v2", 1000), ref["betas_cosine"])
  for spec in ("10", "250", "ddim10", "2,3,5", "ddim50"):
    assert adm.space_timesteps(1000, spec) == ref[f"spacing_{spec}"].tolist(), spec
  assert adm.space_timesteps(1000, 10) == ref["spacing_10"].tolist()


def test_q_sample_posterior_and_p_mean_variance_match(ref):
  proc = adm.ADMDiffusion().process
  t = jnp.asarray(ref["t"], jnp.int32)

  @jax.jit
  def run(x0, noise):
    got = {"q_sample": proc.q_sample(x0, t, noise)}
    xt = got["q_sample"]
    got["post_mean"], got["post_var"], got["post_log_var"] = proc.q_posterior(x0, xt, t)
    out = tiny_model(ref)(xt, t.astype(jnp.float32), cond_of(ref))
    for clip in (0, 1):
      p = proc.p_mean_variance(out, xt, t, learn_sigma=True, clip_denoised=bool(clip))
      got.update({f"pmv_learned_clip{clip}_{k}": v for k, v in p.items()})
    for name in ("large", "small"):
      p = proc.p_mean_variance(out[..., :4], xt, t, learn_sigma=False,
                               sigma_small=name == "small")
      got.update({f"pmv_fixed_{name}_{k}": v for k, v in p.items()})
    got["denoise"] = adm.ADMDiffusion().denoise(tiny_model(ref), xt, t, cond_of(ref))
    return got

  got = run(ref["x0"], ref["noise"])
  keys = [k for k in ref if k.startswith(("q_sample", "post_", "pmv_"))]
  assert len(keys) == 20
  assert_close(got["denoise"], ref["pmv_learned_clip0_pred_xstart"], atol=1e-4)
  for k in keys:
    # x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) cancels at t = 999 (values up to ~260 before
    # clipping): its float32 error is ~1e-4 absolute, clipped or not.
    assert_close(got[k], ref[k], atol=1e-4 if "pred_xstart" in k else 2e-6)


# ---- training ------------------------------------------------------------------------------------
def test_training_terms_and_gradients_match_dit(ref):
  """mse, vb (bits per element; the t = 0 examples use the decoder NLL) and the loss of DiT's
  training_losses, and the gradients of its mean w.r.t. every weight of the map."""
  recipe = adm.ADMDiffusion()
  t = jnp.asarray(ref["t"], jnp.int32)
  terms = jax.jit(lambda x, n: recipe.training_losses(tiny_model(ref), x, t, n, cond_of(ref)))(
      ref["x0"], ref["noise"])
  for k in ("mse", "vb", "loss"):
    assert_close(terms[k], ref[f"train_{k}"], rtol=1e-5, atol=1e-6)
  assert ref["train_vb"][:2].min() > 0  # the NLL branch is live in the fixture

  names = ("w", "b", "amp", "emb", "pos")

  def mean_loss(params):
    return recipe.training_losses(tiny_model({**ref, **params}), ref["x0"], t, ref["noise"],
                                  cond_of(ref))["loss"].mean()

  grads = jax.jit(jax.grad(mean_loss))({k: jnp.asarray(ref[k]) for k in names})
  for k in names:
    assert_close(grads[k], ref[f"grad_{k}"], rtol=1e-4, atol=1e-6)

  fixed = adm.ADMDiffusion(learn_sigma=False).training_losses(
      tiny_model(ref, 4), ref["x0"], t, ref["noise"], cond_of(ref))
  assert_close(fixed["loss"], ref["train_fixed_loss"])


def test_vb_term_trains_only_the_variance_channels(ref):
  recipe = adm.ADMDiffusion()
  t = jnp.asarray(ref["t"], jnp.int32)
  out = tiny_model(ref)(ref["q_sample"], t.astype(jnp.float32), cond_of(ref))
  g = jax.jit(jax.grad(lambda o: recipe.training_losses(
      lambda *_: o, ref["x0"], t, ref["noise"], {})["vb"].sum()))(out)
  assert float(jnp.abs(g[..., :4]).max()) == 0.0
  assert float(jnp.abs(g[..., 4:]).max()) > 0.0


def test_vlb_weight_scales_the_vb_term(ref):
  t = jnp.asarray(ref["t"], jnp.int32)
  args = (tiny_model(ref), ref["x0"], t, ref["noise"], cond_of(ref))
  terms = adm.ADMDiffusion(vlb_weight=0.01, diffusion_steps=1000).training_losses(*args)
  assert_close(terms["loss"], ref["train_mse"] + 10.0 * ref["train_vb"], rtol=1e-5, atol=1e-6)


def test_loss_mask_restricts_both_terms(ref):
  recipe = adm.ADMDiffusion()
  t = jnp.asarray(ref["t"], jnp.int32)
  model = tiny_model(ref)
  mask = np.zeros((6, 4, 4), np.float32)
  mask[:, :2] = 1.0
  losses = jax.jit(recipe.training_losses, static_argnums=0)
  masked = losses(lambda *a: (model(*a), {"loss_mask": jnp.asarray(mask)}), ref["x0"], t,
                  ref["noise"], cond_of(ref))
  # The top half alone: the same per-pixel terms (the map acts per pixel).
  top_model = lambda x, n, c: model(jnp.concatenate([x, x], 1), n, c)[:, :2]
  top = losses(top_model, ref["x0"][:, :2], t, ref["noise"][:, :2], cond_of(ref))
  for k in ("mse", "vb", "loss"):
    assert_close(masked[k], top[k])
  ones = losses(lambda *a: (model(*a), {"loss_mask": jnp.ones((6, 4, 4))}), ref["x0"], t,
                ref["noise"], cond_of(ref))
  assert_close(ones["loss"], ref["train_loss"], rtol=1e-5, atol=1e-6)


# ---- sampling ------------------------------------------------------------------------------------
def _trajectory(ref, recipe, sampler="ddpm", guidance_scale=1.0, interval=None):
  uncond = {"label": jnp.full((6,), NUM_CLASSES, jnp.int32)}
  noise = jnp.asarray(ref["step_noise"])
  fn = jax.jit(lambda x: recipe.sample_loop(
      tiny_model(ref), x, cond_of(ref), uncond, noise_fn=lambda k: noise[k], sampler=sampler,
      num_steps=10, guidance_scale=guidance_scale, guidance_interval=interval,
      return_trajectory=True))
  x0, traj = fn(jnp.asarray(ref["x_T"]))
  np.testing.assert_array_equal(x0, traj[-1])
  return np.asarray(traj)


@pytest.mark.parametrize("name, kwargs, sampler, scale", [
    ("traj_ddpm", {}, "ddpm", 1.0),
    ("traj_ddpm_cfg_dit", {"guided_channels": 3}, "ddpm", 4.0),
    ("traj_ddpm_cfg_all", {}, "ddpm", 4.0),
    ("traj_ddim_clip", {"timestep_respacing": "ddim10", "clip_denoised": True}, "ddim", 1.0),
    ("traj_ddim_eta", {"timestep_respacing": "ddim10", "ddim_eta": 0.5}, "ddim", 1.0),
])
def test_respaced_sampling_trajectories_match(ref, name, kwargs, sampler, scale):
  """10 of 1000 steps with the reference's noise: every intermediate x_t matches."""
  traj = _trajectory(ref, adm.ADMDiffusion(**kwargs), sampler, scale)
  assert_close(traj, ref[name], rtol=1e-4, atol=2e-5)


def test_dit_cfg_quirk_differs_from_all_channel_guidance(ref):
  """After the first step only the 4th channel differs (later steps mix channels)."""
  diff = np.abs(ref["traj_ddpm_cfg_dit"][0] - ref["traj_ddpm_cfg_all"][0])
  assert diff[..., :3].max() < 1e-6 < 1e-2 < diff[..., 3].max()


def test_guidance_interval_in_logsnr(ref):
  """An interval holding no step's logSNR gives the unguided trajectory; one holding all of them
  the guided one; one in between guides only the steps inside."""
  recipe = adm.ADMDiffusion()
  assert_close(_trajectory(ref, recipe, guidance_scale=4.0, interval=(50.0, 60.0)),
               ref["traj_ddpm"], rtol=1e-4, atol=2e-5)
  assert_close(_trajectory(ref, recipe, guidance_scale=4.0, interval=(-1e9, 1e9)),
               ref["traj_ddpm_cfg_all"], rtol=1e-4, atol=2e-5)
  logsnr = recipe.process.tables["logsnr"][ref["spacing_10"]]
  mid = _trajectory(ref, recipe, guidance_scale=4.0, interval=(float(logsnr[5]), 100.0))
  # Steps run noisiest first: the first 4 (logSNR below the interval) are unguided.
  assert_close(mid[:4], ref["traj_ddpm"][:4], rtol=1e-4, atol=2e-5)
  assert np.abs(mid[4:] - ref["traj_ddpm"][4:]).max() > 1e-3


# ---- configuration errors ------------------------------------------------------------------------
def test_make_diffusion_builds_it_from_config():
  r = make_diffusion({"name": "common.diffusion.adm.ADMDiffusion", "cond_drop_prob": 0.1,
                      "timestep_respacing": "ddim25"})
  assert isinstance(r, adm.ADMDiffusion) and r.cond_drop_prob == 0.1
  assert r.sampling_process(25).timesteps.tolist() == list(range(0, 1000, 40))
  with pytest.raises(ConfigError, match="does not take"):
    make_diffusion({"name": "common.diffusion.adm.ADMDiffusion", "learn_simga": True})


def test_noise_cond_is_the_timestep_or_its_logsnr():
  seen = []
  net = lambda x, n, c: (seen.append(n), jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],)))[1]
  t = np.array([0, 999])
  for name in ("timestep", "logsnr"):
    adm.ADMDiffusion(noise_cond=name).denoise(net, jnp.zeros((2, 2, 2, 1)), t, {})
  abar = np.cumprod(1 - adm.named_betas("linear", 1000))[t]
  np.testing.assert_array_equal(seen[0], [0.0, 999.0])
  np.testing.assert_allclose(seen[1], np.log(abar / (1 - abar)), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"noise_schedule": "quadratic"}, "noise_schedule"),
    ({"noise_cond": "sigma"}, "noise_cond"),
    ({"timestep_respacing": "ddim45"}, "no integer stride"),
    ({"timestep_respacing": "2000"}, "cannot take"),
    ({"timestep_respacing": "ten"}, "expected"),
    ({"diffusion_steps": 1}, "diffusion_steps"),
    ({"guided_channels": -1}, "guided_channels"),
])
def test_bad_settings_are_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    adm.ADMDiffusion(**kwargs)


def test_bad_sampling_requests_are_clear(ref):
  x = jnp.asarray(ref["x_T"])
  model, cond = tiny_model(ref), cond_of(ref)
  with pytest.raises(ConfigError, match="num_steps=25"):
    adm.ADMDiffusion(timestep_respacing="ddim25").sample(model, jax.random.key(0), x.shape, cond,
                                                         num_steps=10)
  with pytest.raises(ConfigError, match="sampler"):
    adm.ADMDiffusion().sample(model, jax.random.key(0), x.shape, cond, sampler="heun")
  with pytest.raises(ConfigError, match="churn"):
    adm.ADMDiffusion().sample(model, jax.random.key(0), x.shape, cond, churn=1.0)
  with pytest.raises(ConfigError, match="guided_channels"):
    adm.ADMDiffusion(guided_channels=5).sample(model, jax.random.key(0), x.shape, cond, cond,
                                               num_steps=4, guidance_scale=2.0)
  with pytest.raises(ShapeError, match=r"\[B, H, W, 8\]"):
    adm.ADMDiffusion().training_losses(tiny_model(ref, 4), ref["x0"], ref["t"], ref["noise"],
                                       cond)


# ---- a short training run ------------------------------------------------------------------------
class TinyADMNet(nnx.Module):
  """A small class-conditional conv network with 2C outputs (eps and the variance interpolation),
  conditioned on the timestep: enough to train ADMDiffusion end to end in a test."""

  def __init__(self, *, image_size: int, in_channels: int, num_classes: int, width: int = 16,
               rngs: nnx.Rngs):
    self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
    self.noise_embed = layers.NoiseEmbedding(width, num_features=16, min_period=1.0,
                                             max_period=4000.0, rngs=rngs)
    self.class_embed = layers.ClassEmbedding(num_classes, width, rngs=rngs)
    self.stem = layers.Conv(in_channels, width, 3, rngs=rngs)
    self.head = layers.Conv(width, 2 * in_channels, 3, rngs=rngs)

  def __call__(self, x, noise_cond, cond, *, dropout_key=None):
    c = self.noise_embed(noise_cond) + self.class_embed(cond["label"])
    h = jax.nn.silu(self.stem(x) + c[:, None, None, :])
    return self.head(h).astype(jnp.float32)

  def null_cond(self, cond):
    return {"label": jnp.full_like(cond["label"], self.num_classes)}

  def example_inputs(self, batch_size):
    x = jax.ShapeDtypeStruct((batch_size, self.image_size, self.image_size, self.in_channels),
                             jnp.float32)
    return x, {"label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


def test_tiny_network_trains_with_the_recipe_through_experiment():
  from common.training.experiment import Experiment  # pylint: disable=import-outside-toplevel
  from configs import sid2_digits  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  c = sid2_digits.get_config("runlocal")
  c.model = ml_collections.ConfigDict({"name": f"{__name__}.TinyADMNet", "image_size": 8,
                                       "in_channels": 1, "num_classes": 10})
  c.mesh.replicated = ()               # sid2_digits' rule names its own output layer
  c.diffusion = ml_collections.ConfigDict({"name": "common.diffusion.adm.ADMDiffusion",
                                           "cond_drop_prob": 0.1, "clip_denoised": True})
  c.optim.learning_rate = 3e-3
  c.train.steps = 30
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  state = exp.init_state(0)
  rng = np.random.default_rng(0)
  batch = {"x": np.clip(rng.normal(0, 0.5, (16, 8, 8, 1)), -1, 1).astype(np.float32),
           "cond": {"label": rng.integers(0, 10, (16,)).astype(np.int32)}}
  batch["x"][:, :4] = -1.0  # structure to learn: the top half is always black
  losses = []
  for step in range(30):
    state, metrics = exp.train_step(state, batch, exp.step_key(step))
    losses.append(float(metrics["loss"]))
    assert {"loss", "mse", "vb", "grad_norm"} <= set(metrics)
    # loss = mean(mse + vlb_weight * T * vb), and vlb_weight * T = 1 by default
    np.testing.assert_allclose(metrics["loss"], metrics["mse"] + metrics["vb"], rtol=1e-5)
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  # config.sample through Experiment.generator -> recipe.preview: 4 respaced steps with CFG.
  gen = exp.generator(num_steps=4, guidance_scale=2.0)
  batch = {"x": np.zeros((4, 8, 8, 1), np.float32),
           "cond": {"label": np.arange(4, dtype=np.int32)}}
  samples = np.asarray(gen(state["ema"], jax.random.key(0), batch))
  assert samples.shape == (4, 8, 8, 1) and np.isfinite(samples).all()
  np.testing.assert_array_equal(samples, gen(state["ema"], jax.random.key(0), batch))
  assert np.abs(samples - np.asarray(gen(state["ema"], jax.random.key(1), batch))).max() > 0
