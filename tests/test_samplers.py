"""Samplers and guidance on Gaussian toys with closed-form ideal denoisers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.diffusion import recipes as diffusion
from common.diffusion import parametrization as param
from common.diffusion import samplers
from common.diffusion import schedules
from common.errors import ConfigError

MU = jnp.array([0.5, -0.3])  # per-channel data mean
S = jnp.array([0.5, 0.2])    # per-channel data std
TOY_SHAPE = (4096, 1, 1, 2)


def _vp_gauss_xhat(z, lam, mu, s):
  """E[x | z] for x ~ N(mu, s^2): mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha mu)."""
  a, sg = param.alpha_sigma(lam)
  a, sg = param.broadcast_like(a, z), param.broadcast_like(sg, z)
  return mu + a * s**2 / (a**2 * s**2 + sg**2) * (z - a * mu)


def _vp_toy_apply(prediction):
  def apply_fn(z, lam, cond):
    return param.convert(_vp_gauss_xhat(z, lam, MU, S), z, lam, "x", prediction)
  return apply_fn


def _edm_from_d(d_fn, sigma_data):
  """Wraps a denoiser D(y, sigma [B,1,1,1], cond) into the raw network F the recipe expects."""
  def apply_fn(x_in, c_noise, cond):
    sig = jnp.exp(4.0 * c_noise)[:, None, None, None]
    c_skip, c_out, c_in, _ = param.edm_precond(sig, sigma_data)
    y = x_in / c_in
    return (d_fn(y, sig, cond) - c_skip * y) / c_out
  return apply_fn


def _edm_gauss_d(y, sig, mu, s):
  """E[x | x + n] for x ~ N(mu, s^2), n ~ N(0, sig^2): mu + s^2 / (s^2 + sig^2) (y - mu)."""
  return mu + s**2 / (s**2 + sig**2) * (y - mu)


def _check_moments(x, mean_atol=0.04, std_rtol=0.06):
  x = np.asarray(x).reshape(-1, 2)
  assert np.all(np.isfinite(x))
  np.testing.assert_allclose(x.mean(0), MU, atol=mean_atol)
  np.testing.assert_allclose(x.std(0), S, rtol=std_rtol)


@pytest.mark.parametrize("sampler,num_steps,prediction,sched", [
    ("ddpm", 256, "v", "cosine"),
    ("ddim", 64, "eps", "sid2"),
])
def test_vp_samplers_gaussian_toy(sampler, num_steps, prediction, sched):
  kwargs = {"image_d": 32} if sched == "sid2" else {}
  recipe = diffusion.VPDiffusion(schedules.get_logsnr_schedule(sched, **kwargs),
                                 prediction=prediction)
  fn = jax.jit(lambda k: recipe.sample(_vp_toy_apply(prediction), k, TOY_SHAPE, None,
                                       sampler=sampler, num_steps=num_steps))
  x = fn(jax.random.key(1))
  assert x.shape == TOY_SHAPE and x.dtype == jnp.float32
  _check_moments(x)


@pytest.mark.parametrize("churn,num_steps", [(0.0, 32), (10.0, 64)])
def test_edm_heun_gaussian_toy(churn, num_steps):
  recipe = diffusion.EDMDiffusion(sigma_data=0.5)
  apply_fn = _edm_from_d(lambda y, sig, c: _edm_gauss_d(y, sig, MU, S), 0.5)
  fn = jax.jit(lambda k: recipe.sample(apply_fn, k, TOY_SHAPE, None, sampler="heun",
                                       num_steps=num_steps, churn=churn))
  _check_moments(fn(jax.random.key(2)))


def test_edm_heun_deterministic_and_churn_differs():
  recipe = diffusion.EDMDiffusion(sigma_data=0.5)
  apply_fn = _edm_from_d(lambda y, sig, c: _edm_gauss_d(y, sig, MU, S), 0.5)
  shape = (16, 1, 1, 2)
  run = jax.jit(lambda k: recipe.sample(apply_fn, k, shape, None, num_steps=6))
  det = run(jax.random.key(0))
  np.testing.assert_array_equal(det, run(jax.random.key(0)))
  churned = jax.jit(lambda k, tmin: recipe.sample(apply_fn, k, shape, None, num_steps=6,
                                                  churn=5.0, s_tmin=tmin))
  assert not np.allclose(det, churned(jax.random.key(0), 0.0), atol=1e-3)
  # S_tmin > sigma_max: churn never applies, so the result is the deterministic one (up to
  # float32 rounding of a differently fused graph).
  np.testing.assert_allclose(churned(jax.random.key(0), 100.0), det, atol=1e-3)


def test_compiles_once_per_num_steps():
  """The network is traced a fixed number of times whatever num_steps (fori_loop)."""
  def count_traces(recipe, apply_fn, num_steps, **kw):
    calls = []

    def counting(*args):
      calls.append(args[0].shape)
      return apply_fn(*args)

    cond = jnp.zeros((4,), jnp.int32)
    jax.make_jaxpr(lambda k: recipe.sample(counting, k, (4, 1, 1, 2), cond, cond + 1,
                                           num_steps=num_steps, **kw))(jax.random.key(0))
    return calls

  vp = diffusion.VPDiffusion(schedules.CosineSchedule())
  edm = diffusion.EDMDiffusion()
  edm_apply = _edm_from_d(lambda y, sig, c: _edm_gauss_d(y, sig, MU, S), 0.5)
  for recipe, fn, kw in [(vp, _vp_toy_apply("v"), dict(sampler="ddpm")),
                         (vp, _vp_toy_apply("v"), dict(sampler="ddim")),
                         (edm, edm_apply, dict(sampler="heun", churn=1.0))]:
    few = count_traces(recipe, fn, 4, guidance_scale=2.0, **kw)
    many = count_traces(recipe, fn, 64, guidance_scale=2.0, **kw)
    assert len(few) == len(many) <= (3 if recipe is edm else 1)  # Heun: loop body x2 + last Euler
    assert all(shape[0] == 8 for shape in few)  # cond + uncond as one doubled batch
    with_interval = count_traces(recipe, fn, 64, guidance_scale=2.0,
                                 guidance_interval=(-1.0, 1.0), **kw)
    assert sorted({s[0] for s in with_interval}) == [4, 8]  # lax.cond: single or doubled batch


# ---------------------------------------------------------------- guidance

def _guided_toy_net(bias_per_class):
  """A conditional net whose output depends on the label; label 2 is the null class."""
  table = jnp.asarray(bias_per_class, jnp.float32)

  def apply_fn(x_in, noise_cond, cond):
    return 0.9 * x_in + table[cond][:, None, None, None] + 0.01 * noise_cond[:, None, None, None]
  return apply_fn


def test_guided_apply_scale_one_and_formula():
  apply_fn = _guided_toy_net([0.3, -0.7, 0.1])
  x = jax.random.normal(jax.random.key(0), (5, 2, 2, 1))
  n = jnp.linspace(-1.0, 1.0, 5)
  cond = jnp.array([0, 1, 0, 1, 1], jnp.int32)
  uncond = jnp.full((5,), 2, jnp.int32)
  out_c, out_u = apply_fn(x, n, cond), apply_fn(x, n, uncond)
  # Traced scale 1 through the doubled batch == conditional model.
  g1 = jax.jit(lambda w: samplers.guided_apply(apply_fn, x, n, cond, uncond, w, 0.0))(1.0)
  np.testing.assert_allclose(g1, out_c, atol=1e-6)
  g3 = samplers.guided_apply(apply_fn, x, n, cond, uncond, 3.0, 0.0)
  np.testing.assert_allclose(g3, out_u + 3.0 * (out_c - out_u), atol=1e-5)
  inside = samplers.guided_apply(apply_fn, x, n, cond, uncond, 3.0, 0.5, (0.0, 1.0))
  outside = samplers.guided_apply(apply_fn, x, n, cond, uncond, 3.0, 1.5, (0.0, 1.0))
  np.testing.assert_allclose(inside, g3, atol=1e-6)
  np.testing.assert_allclose(outside, out_c, atol=1e-6)
  # pytree conds are concatenated leaf by leaf.
  tree_fn = lambda x, n, c: apply_fn(x, n, c["label"]) * c["scale"][:, None, None, None]
  ct = {"label": cond, "scale": jnp.full((5,), 2.0)}
  ut = {"label": uncond, "scale": jnp.full((5,), 0.5)}
  gt = samplers.guided_apply(tree_fn, x, n, ct, ut, 3.0, 0.0)
  ref_c, ref_u = tree_fn(x, n, ct), tree_fn(x, n, ut)
  np.testing.assert_allclose(gt, ref_u + 3.0 * (ref_c - ref_u), atol=1e-5)


def _sample_pair(recipe, apply_fn, sampler, **kw):
  shape = (8, 2, 2, 1)
  cond = jnp.array([0, 1] * 4, jnp.int32)
  uncond = jnp.full((8,), 2, jnp.int32)
  return functools.partial(recipe.sample, apply_fn, jax.random.key(3), shape, cond, uncond,
                           sampler=sampler, num_steps=6, **kw)


@pytest.mark.parametrize("kind", ["vp", "edm"])
def test_guidance_scale_one_and_empty_interval(kind):
  if kind == "vp":
    recipe, sampler = diffusion.VPDiffusion(schedules.SiD2Schedule(image_d=16)), "ddpm"
  else:
    recipe, sampler = diffusion.EDMDiffusion(sigma_data=0.5), "heun"
  apply_fn = _guided_toy_net([0.3, -0.7, 0.1])
  cond_only = lambda x, n, c: apply_fn(x, n, jnp.array([0, 1] * 4, jnp.int32))
  base = jax.jit(lambda: _sample_pair(recipe, cond_only, sampler)(guidance_scale=1.0))()
  # Scale 1 (traced, so the doubled batch runs) equals the conditional model.
  run = _sample_pair(recipe, apply_fn, sampler)
  guided = jax.jit(lambda w: run(guidance_scale=w))
  np.testing.assert_allclose(guided(jnp.float32(1.0)), base, atol=1e-4)
  # An interval that contains no step equals no guidance; one that contains all equals full CFG.
  empty = jax.jit(lambda: run(guidance_scale=4.0, guidance_interval=(50.0, 60.0)))()
  np.testing.assert_allclose(empty, base, atol=1e-4)
  full = guided(jnp.float32(4.0))
  assert not np.allclose(full, base, atol=1e-3)
  everywhere = jax.jit(lambda: run(guidance_scale=4.0, guidance_interval=(-1e9, 1e9)))()
  np.testing.assert_allclose(everywhere, full,
                             atol=1e-4)


# Two class-conditional Gaussians: x | y=k ~ N(m_k, s^2), equal priors; null label 2.
M2 = jnp.array([-1.0, 1.0])
S2 = 0.3


def _mixture_weights(log_lik):
  return jax.nn.softmax(log_lik, axis=-1)


def _two_class_vp_apply(z, lam, cond):
  xk = jnp.stack([_vp_gauss_xhat(z, lam, m, S2) for m in M2], -1)  # [B,1,1,1,2]
  a, sg = param.alpha_sigma(lam)
  a, sg = param.broadcast_like(a, z)[..., None], param.broadcast_like(sg, z)[..., None]
  var = a**2 * S2**2 + sg**2
  w = _mixture_weights(-0.5 * (z[..., None] - a * M2)**2 / var)
  x_u = jnp.sum(w * xk, -1)
  x_c = jnp.take_along_axis(xk, jnp.minimum(cond, 1)[:, None, None, None, None], -1)[..., 0]
  x_hat = jnp.where((cond == 2)[:, None, None, None], x_u, x_c)
  return param.convert(x_hat, z, lam, "x", "v")


def _two_class_edm_d(y, sig, cond):
  dk = jnp.stack([_edm_gauss_d(y, sig, m, S2) for m in M2], -1)
  var = (S2**2 + sig**2)[..., None]
  w = _mixture_weights(-0.5 * (y[..., None] - M2)**2 / var)
  d_u = jnp.sum(w * dk, -1)
  d_c = jnp.take_along_axis(dk, jnp.minimum(cond, 1)[:, None, None, None, None], -1)[..., 0]
  return jnp.where((cond == 2)[:, None, None, None], d_u, d_c)


@pytest.mark.parametrize("kind", ["vp", "edm"])
def test_guidance_pushes_away_from_unconditional_mean(kind):
  n = 512
  shape = (n, 1, 1, 1)
  cond = jnp.ones((n,), jnp.int32)  # class 1, mean +1; the unconditional mean is 0
  uncond = jnp.full((n,), 2, jnp.int32)
  if kind == "vp":
    recipe = diffusion.VPDiffusion(schedules.CosineSchedule(), prediction="v")
    apply_fn, sampler, steps = _two_class_vp_apply, "ddim", 32
    interval = (-2.0, 2.0)
  else:
    recipe = diffusion.EDMDiffusion(sigma_data=0.5)
    apply_fn, sampler, steps = _edm_from_d(_two_class_edm_d, 0.5), "heun", 16
    interval = (-2.0, 2.0)  # lambda = log(sd^2 / sigma^2): sigma in [0.18, 1.36]
  def make(iv):
    return jax.jit(lambda w: recipe.sample(
        apply_fn, jax.random.key(4), shape, cond, uncond, sampler=sampler, num_steps=steps,
        guidance_scale=w, guidance_interval=iv).ravel())

  run = make(None)
  plain, guided = np.asarray(run(1.0)), np.asarray(run(3.0))
  partial_g = np.asarray(make(interval)(3.0))
  assert abs(plain.mean() - 1.0) < 0.05 and abs(plain.std() - S2) < 0.05
  assert guided.mean() > plain.mean() + 0.1
  assert plain.mean() < partial_g.mean() < guided.mean()


def test_clip_x_and_errors():
  sched = schedules.CosineSchedule()
  apply_fn = lambda z, lam, c: param.convert(_vp_gauss_xhat(z, lam, 0.9, 0.5), z, lam, "x", "v")
  shape = (64, 1, 1, 1)
  raw = diffusion.VPDiffusion(sched).sample(apply_fn, jax.random.key(0), shape, None,
                                            sampler="ddim", num_steps=8)
  clipped = diffusion.VPDiffusion(sched, clip_x=True).sample(apply_fn, jax.random.key(0), shape,
                                                             None, sampler="ddim", num_steps=8)
  assert np.max(raw) > 1.0
  np.testing.assert_allclose(clipped, np.clip(raw, -1, 1), atol=1e-6)
  vp = diffusion.VPDiffusion(sched)
  with pytest.raises(ConfigError, match="sampler"):
    vp.sample(apply_fn, jax.random.key(0), shape, None, sampler="heun", num_steps=4)
  with pytest.raises(ConfigError, match="churn"):
    vp.sample(apply_fn, jax.random.key(0), shape, None, sampler="ddpm", num_steps=4, churn=1.0)
  with pytest.raises(ConfigError, match="sampler"):
    diffusion.EDMDiffusion().sample(apply_fn, jax.random.key(0), shape, None, sampler="ddpm",
                                    num_steps=4)
  with pytest.raises(ConfigError, match="guidance_interval"):
    vp.sample(apply_fn, jax.random.key(0), shape, None, sampler="ddpm", num_steps=4,
              guidance_interval=(2.0, 1.0))
