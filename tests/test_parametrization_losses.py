"""Closed-form tests of common/diffusion/parametrization.py, common/diffusion/losses.py and the recipes' losses."""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common.diffusion import recipes as diffusion
from common.diffusion import losses
from common.diffusion import parametrization as param
from common.diffusion import schedules
from common.errors import ConfigError

B, SHAPE = 6, (6, 4, 4, 3)


def _data(seed=0, lo=-6.0, hi=6.0):
  kx, ke, kl, kh = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.uniform(kx, SHAPE, minval=-1.0, maxval=1.0)
  eps = jax.random.normal(ke, SHAPE)
  lam = jax.random.uniform(kl, (B,), minval=lo, maxval=hi)
  x_hat = x + 0.3 * jax.random.normal(kh, SHAPE)  # an arbitrary imperfect prediction of x
  return x, eps, lam, x_hat


def _sum(a):
  return np.asarray(jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=-1), np.float64)


def test_alpha_sigma():
  lam = jnp.array([-15.0, -3.0, 0.0, 2.5, 15.0])
  a, s = param.alpha_sigma(lam)
  np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(np.log(a**2) - np.log(s**2), lam, atol=1e-3)
  a, s = param.alpha_sigma(jnp.array([jnp.inf, -jnp.inf]))
  np.testing.assert_array_equal(a, [1.0, 0.0])
  np.testing.assert_array_equal(s, [0.0, 1.0])


def test_diffuse_and_targets():
  x, eps, lam, _ = _data()
  a, s = param.alpha_sigma(lam)
  a, s = a[:, None, None, None], s[:, None, None, None]
  z = param.diffuse(x, eps, lam)
  np.testing.assert_allclose(z, a * x + s * eps, atol=1e-6)
  np.testing.assert_allclose(param.v_target(x, eps, lam), a * eps - s * x, atol=1e-6)
  np.testing.assert_allclose(param.target("eps", x, eps, lam), eps)
  np.testing.assert_allclose(param.target("x", x, eps, lam), x)
  with pytest.raises(ConfigError):
    param.target("score", x, eps, lam)


@pytest.mark.parametrize("source,dest", list(itertools.permutations(param.PREDICTIONS, 2)))
def test_conversions_exact_and_round_trip(source, dest):
  x, eps, lam, _ = _data(1)
  z = param.diffuse(x, eps, lam)
  truth = {p: param.target(p, x, eps, lam) for p in param.PREDICTIONS}
  # Exact: the true target of one kind converts to the true target of the other.
  np.testing.assert_allclose(param.convert(truth[source], z, lam, source, dest), truth[dest],
                             atol=2e-4)
  # Round trip of an arbitrary prediction.
  pred = jax.random.normal(jax.random.key(7), SHAPE)
  back = param.convert(param.convert(pred, z, lam, source, dest), z, lam, dest, source)
  np.testing.assert_allclose(back, pred, atol=2e-4)


def test_error_identities():
  """Spec A.2: ||eps - eps_hat||^2 = e^lambda ||x - x_hat||^2 = sigmoid(lambda) ||v - v_hat||^2."""
  x, eps, lam, x_hat = _data(2)
  z = param.diffuse(x, eps, lam)
  eps_hat = param.convert(x_hat, z, lam, "x", "eps")
  v_hat = param.convert(x_hat, z, lam, "x", "v")
  e_eps = _sum(eps - eps_hat)
  e_x = _sum(x - x_hat)
  e_v = _sum(param.v_target(x, eps, lam) - v_hat)
  lam64 = np.asarray(lam, np.float64)
  np.testing.assert_allclose(e_eps, np.exp(lam64) * e_x, rtol=2e-3)
  np.testing.assert_allclose(e_eps, e_v / (1 + np.exp(-lam64)), rtol=2e-3)
  np.testing.assert_allclose(e_v, (1 + np.exp(lam64)) * e_x, rtol=2e-3)


def test_sigmoid_weights_closed_form():
  lam = jnp.array([-8.0, -1.0, 0.0, 3.0, 12.0])
  b = -2.0
  sig = lambda u: 1 / (1 + np.exp(-u))
  lam64 = np.asarray(lam, np.float64)
  np.testing.assert_allclose(losses.sigmoid_weight(lam, b, "eps"), sig(b - lam64), rtol=1e-5)
  np.testing.assert_allclose(losses.sigmoid_weight(lam, b, "x"), np.exp(lam64) * sig(b - lam64),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.sigmoid_weight(lam, b, "v"), sig(b - lam64) * sig(lam64),
                             rtol=1e-5)
  dl = jnp.full_like(lam, 3.0)
  np.testing.assert_allclose(losses.vp_loss_weight(lam, dl, "eps", "sigmoid", b),
                             0.5 * 3.0 * sig(b - lam64), rtol=1e-5)
  np.testing.assert_array_equal(losses.vp_loss_weight(lam, dl, "v", "uniform", b), 1.0)
  with pytest.raises(ConfigError):
    losses.vp_loss_weight(lam, dl, "v", "p2", b)


@pytest.mark.parametrize("bias", [-3.0, 0.0, 2.0])
def test_sigmoid_weight_equivalent_across_targets(bias):
  """Same x_hat -> same weighted loss whichever target the MSE is taken on (arXiv 2303.00848)."""
  x, eps, lam, x_hat = _data(3, lo=-10.0, hi=10.0)
  z = param.diffuse(x, eps, lam)
  vals = []
  for p in param.PREDICTIONS:
    pred = param.convert(x_hat, z, lam, "x", p)
    w = losses.sigmoid_weight(lam, bias, p)
    vals.append(np.asarray(w) * _sum(pred - param.target(p, x, eps, lam)))
  np.testing.assert_allclose(vals[0], vals[1], rtol=3e-3)
  np.testing.assert_allclose(vals[0], vals[2], rtol=3e-3)


def _xhat_fn(z, lam):
  """A fixed, imperfect denoiser used to build equivalent networks for every target."""
  return jnp.tanh(0.7 * z) + 0.05 * lam[:, None, None, None]


@pytest.mark.parametrize("sched_name", ["cosine", "sid2"])
def test_vp_recipe_loss_same_for_every_target(sched_name):
  kwargs = {"image_d": 32} if sched_name == "sid2" else {}
  sched = schedules.get_logsnr_schedule(sched_name, **kwargs)
  x, _, _, _ = _data(4)
  key = jax.random.key(11)
  out = []
  for p in param.PREDICTIONS:
    recipe = diffusion.VPDiffusion(sched, prediction=p, sigmoid_bias=-1.0, weighting="sigmoid")

    def apply_fn(z, lam, cond, p=p):
      return param.convert(_xhat_fn(z, lam), z, lam, "x", p)

    loss = recipe.per_example_loss(apply_fn, x, None, key)
    assert loss.shape == (B,) and loss.dtype == jnp.float32
    out.append(np.asarray(loss))
  np.testing.assert_allclose(out[0], out[1], rtol=3e-3)
  np.testing.assert_allclose(out[0], out[2], rtol=3e-3)
  if sched_name == "sid2":  # jit-compatible, same value
    jitted = jax.jit(lambda x, k: recipe.per_example_loss(apply_fn, x, None, k))(x, key)
    np.testing.assert_allclose(jitted, out[2], rtol=1e-4)


def test_vp_recipe_loss_value_keeps_jacobian():
  """Rebuild the loss from what the network saw: 1/2 (-dlambda/dt) sigmoid(b - lambda) MSE."""
  sched = schedules.CosineSchedule(-15.0, 15.0)
  bias = 1.5
  recipe = diffusion.VPDiffusion(sched, prediction="eps", sigmoid_bias=bias)
  seen = {}

  def apply_fn(z, lam, cond):
    seen["z"], seen["lam"] = z, lam
    return 0.1 * z

  x, _, _, _ = _data(5)
  loss = np.asarray(recipe.per_example_loss(apply_fn, x, None, jax.random.key(3)), np.float64)
  z = np.asarray(seen["z"], np.float64)
  lam = np.asarray(seen["lam"], np.float64)
  t0, t1 = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
  t = (np.arctan(np.exp(-lam / 2)) - t0) / (t1 - t0)  # invert lambda = -2 log tan(t0 + t (t1 - t0))
  neg_dl = 4 * (t1 - t0) / np.sin(2 * ((t1 - t0) * t + t0))
  a, s = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  eps = (z - a[:, None, None, None] * np.asarray(x, np.float64)) / s[:, None, None, None]
  mse = np.mean(((0.1 * z - eps)**2).reshape(B, -1), axis=1)
  expected = 0.5 * neg_dl / (1 + np.exp(lam - bias)) * mse
  np.testing.assert_allclose(loss, expected, rtol=2e-3)
  # uniform weighting: the plain MSE of the target.
  uni = diffusion.VPDiffusion(sched, prediction="eps", weighting="uniform")
  np.testing.assert_allclose(uni.per_example_loss(apply_fn, x, None, jax.random.key(3)), mse, rtol=2e-3)


@pytest.mark.parametrize("sigma_data", [0.5, 0.9])
def test_edm_precond_values(sigma_data):
  sigma = jnp.array([0.002, 0.1, sigma_data, 1.0, 80.0])
  c_skip, c_out, c_in, c_noise = param.edm_precond(sigma, sigma_data)
  s = np.asarray(sigma, np.float64)
  sd = sigma_data
  np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-5, atol=1e-7)
  # At sigma = sigma_data: c_skip = 1/2, c_out = sd / sqrt 2, c_in = 1 / (sd sqrt 2).
  np.testing.assert_allclose([c_skip[2], c_out[2], c_in[2]],
                             [0.5, sd / math.sqrt(2), 1 / (sd * math.sqrt(2))], rtol=1e-5)
  # The EDM weight makes the F-space loss unit-weighted: lambda(sigma) c_out^2 = 1.
  np.testing.assert_allclose(losses.edm_loss_weight(sigma, sd) * c_out**2, 1.0, rtol=1e-5)
  np.testing.assert_allclose(losses.edm_loss_weight(sigma, sd), (s**2 + sd**2) / (s * sd)**2,
                             rtol=1e-5)


def test_edm_recipe_loss_value():
  recipe = diffusion.EDMDiffusion(sigma_data=0.9, p_mean=0.0, p_std=0.6)
  seen = {}

  def apply_fn(x_in, c_noise, cond):
    seen["x_in"], seen["c_noise"] = x_in, c_noise
    return 0.5 * x_in

  x, _, _, _ = _data(6)
  loss = np.asarray(recipe.per_example_loss(apply_fn, x, None, jax.random.key(2)))
  x_in = np.asarray(seen["x_in"], np.float64)
  sigma = np.exp(4 * np.asarray(seen["c_noise"], np.float64))
  sd = 0.9
  c_in = 1 / np.sqrt(sigma**2 + sd**2)
  y_n = x_in / c_in[:, None, None, None]  # x + n
  d = (sd**2 / (sigma**2 + sd**2))[:, None, None, None] * y_n + (
      sigma * sd / np.sqrt(sigma**2 + sd**2))[:, None, None, None] * 0.5 * x_in
  w = (sigma**2 + sd**2) / (sigma * sd)**2
  expected = w * np.mean(((d - np.asarray(x, np.float64))**2).reshape(B, -1), axis=1)
  np.testing.assert_allclose(loss, expected, rtol=2e-3)


def test_edm_denoise_ideal_network_returns_x():
  """With F = (x - c_skip y) / c_out the denoiser returns x exactly."""
  recipe = diffusion.EDMDiffusion(sigma_data=0.5)
  x, eps, _, _ = _data(8)
  sigma = jnp.linspace(0.01, 10.0, B)
  y = x + sigma[:, None, None, None] * eps

  def apply_fn(x_in, c_noise, cond):
    s = jnp.exp(4 * c_noise)[:, None, None, None]
    c_skip, c_out, c_in, _ = param.edm_precond(s, 0.5)
    return (x - c_skip * (x_in / c_in)) / c_out

  np.testing.assert_allclose(recipe.denoise(apply_fn, y, sigma, None), x, atol=1e-4)


def test_make_diffusion():
  cfg = ml_collections.ConfigDict()
  cfg.name = "vp"
  cfg.schedule = ml_collections.ConfigDict({"name": "sid2", "image_d": 64})
  cfg.prediction = "v"
  cfg.sigmoid_bias = -3.0
  cfg.weighting = "sigmoid"
  r = diffusion.make_diffusion(cfg)
  assert isinstance(r, diffusion.VPDiffusion)
  assert r.schedule == schedules.SiD2Schedule(image_d=64.0)
  assert (r.prediction, r.sigmoid_bias, r.weighting) == ("v", -3.0, "sigmoid")

  e = ml_collections.ConfigDict(dict(name="edm", sigma_data=0.9, p_mean=-0.6, p_std=1.2,
                                     sigma_min=0.002, sigma_max=80.0, rho=7.0))
  r = diffusion.make_diffusion(e)
  assert r == diffusion.EDMDiffusion(0.9, -0.6, 1.2, 0.002, 80.0, 7.0)

  for bad, msg in [
      (dict(name="flow"), "diffusion.name"),
      (dict(name="vp", schedule=dict(name="linear")), "Unknown logSNR schedule"),
      (dict(name="vp", schedule=dict(name="cosine"), prediction="score"), "prediction"),
      (dict(name="vp", schedule=dict(name="cosine"), weighting="p2"), "weighting"),
      (dict(name="vp", schedule=dict(name="cosine"), bias=1.0), "Unknown key"),
      (dict(name="edm", sigma_dat=0.5), "Unknown key"),
  ]:
    with pytest.raises(ConfigError, match=msg):
      diffusion.make_diffusion(ml_collections.ConfigDict(bad))
