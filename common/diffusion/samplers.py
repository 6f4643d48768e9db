"""Samplers (ancestral DDPM in logSNR, DDIM, EDM Heun with churn) and classifier-free guidance.

Every sampler runs its steps in `jax.lax.fori_loop`, so for a fixed (static) `num_steps` it traces
the network once and compiles once. The samplers take a *denoiser* closure that returns the data
prediction; the recipes in `common.diffusion.recipes` build it from the network, the parametrization and
guidance.

Conventions:
* VP samplers walk a logSNR grid lambda_0 < lambda_1 < ... < lambda_{N-1} (noisy -> clean) at
  which the network is evaluated; the target of the last step is lambda_N = +inf (clean data),
  where both the ancestral posterior and DDIM reduce to z_N = x_hat. So N steps cost N network
  evaluations and the output is the last denoised prediction.
* EDM samplers walk sigma_0 > ... > sigma_{N-1} > sigma_N = 0 (Karras et al. 2022, Alg. 2); the
  last step is an Euler step (NFE = 2N - 1).
* Guidance intervals are given in logSNR (lo, hi), inclusive. For EDM the logSNR of a noise level is
  log(sigma_data^2 / sigma^2) (normalized by the data scale), evaluated at the
  noise level of each network evaluation (both evaluations of a Heun step are checked separately).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from common.diffusion import parametrization as param

ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _is_static_one(w: Any) -> bool:
  return isinstance(w, (int, float)) and float(w) == 1.0


def guided_apply(apply_fn: ApplyFn, x_in: jax.Array, noise_cond: jax.Array, cond: Any,
                 uncond: Any, guidance_scale: float | jax.Array, logsnr: jax.Array,
                 guidance_interval: Sequence[float] | None = None) -> jax.Array:
  """Network output with classifier-free guidance (Ho & Salimans 2022; guidance interval of
  Kynkaeaenniemi et al. 2024, arXiv 2404.07724).

  out = out_u + w (out_c - out_u) when lo <= logsnr <= hi (or no interval), else out = out_c
  (w = 1).
  Guiding the raw output F is the same as guiding x_hat, eps_hat or D, because each is affine in F
  with coefficients that do not depend on the condition (micro_diffusion `models/model.py`).

  The conditional and unconditional branches run as one doubled batch [2B, ...] (cond first; the
  cond pytrees are concatenated leaf by leaf along axis 0). With an interval, steps outside it
  evaluate only the conditional branch (`lax.cond` on the scalar logsnr).

  Args:
    apply_fn: apply_fn(x_in [B, ...], noise_cond [B] float32, cond) -> F [B, ...].
    x_in: [B, ...] network input.
    noise_cond: [B] float32 network noise conditioning.
    cond, uncond: pytrees of [B, ...] arrays with the same structure; uncond may be None when the
      guidance scale is the Python number 1.
    guidance_scale: w (a Python number or a traced scalar).
    logsnr: scalar logSNR of this evaluation, tested against the interval.
    guidance_interval: (lo, hi) in logSNR, or None for "everywhere".

  Returns:
    [B, ...] float32 guided output.
  """
  if _is_static_one(guidance_scale) or uncond is None:
    if uncond is None and not _is_static_one(guidance_scale):
      raise ValueError("guidance_scale != 1 needs an unconditional `uncond` pytree.")
    return jnp.asarray(apply_fn(x_in, noise_cond, cond), jnp.float32)

  w = jnp.asarray(guidance_scale, jnp.float32)
  b = x_in.shape[0]

  def doubled(_):
    x2 = jnp.concatenate([x_in, x_in], axis=0)
    n2 = jnp.concatenate([noise_cond, noise_cond], axis=0)
    c2 = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    out = jnp.asarray(apply_fn(x2, n2, c2), jnp.float32)
    out_c, out_u = out[:b], out[b:]
    return out_u + w * (out_c - out_u)

  if guidance_interval is None:
    return doubled(None)

  lo, hi = guidance_interval
  logsnr = jnp.asarray(logsnr, jnp.float32)
  inside = jnp.logical_and(logsnr >= lo, logsnr <= hi)

  def cond_only(_):
    return jnp.asarray(apply_fn(x_in, noise_cond, cond), jnp.float32)

  return jax.lax.cond(inside, doubled, cond_only, None)


def _vp_coeffs(lam_cur: jax.Array, lam_next: jax.Array):
  """alpha/sigma of both levels and c = 1 - e^(lam_cur - lam_next) = 1 - SNR_cur / SNR_next."""
  a_cur, s_cur = param.alpha_sigma(lam_cur)
  a_next, s_next = param.alpha_sigma(lam_next)
  c = -jnp.expm1(lam_cur - lam_next)  # in (0, 1]; = 1 at lam_next = +inf
  return a_cur, s_cur, a_next, s_next, c


def vp_sample(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array,
              shape: Sequence[int], logsnrs: jax.Array, *, sampler: str = "ddpm") -> jax.Array:
  """Ancestral DDPM or DDIM sampling of a VP model on a logSNR grid.

  DDPM (VDM, Kingma et al. 2021 eq. 32-33, written in logSNR; SiD): with lambda_cur < lambda_next,
  c = -expm1(lambda_cur - lambda_next) = 1 - SNR_cur/SNR_next,
    z_next ~ q(z_next | z_cur, x = x_hat) = N(mu, c sigma_next^2 I),
    mu = (alpha_next / alpha_cur)(1 - c) z_cur + alpha_next c x_hat.
  DDIM (Song et al. 2021 eq. 12, eta = 0): eps_hat = (z_cur - alpha_cur x_hat) / sigma_cur,
    z_next = alpha_next x_hat + sigma_next eps_hat.

  Args:
    denoise_fn: denoise_fn(z [B, ...], lambda scalar) -> x_hat [B, ...] float32.
    key: PRNG key (initial noise, and the ancestral noise).
    shape: output shape [B, ...] (static).
    logsnrs: [N] increasing logSNRs at which the network is evaluated; z_0 ~ N(0, I) is taken to
      be at lambda_0 (the schedule's t = 1). The last step goes to lambda = +inf and returns x_hat.
    sampler: "ddpm" (ancestral) or "ddim" (deterministic).

  Returns:
    [B, ...] float32 samples.
  """
  if sampler not in ("ddpm", "ddim"):
    raise ValueError(f"Unknown VP sampler {sampler!r}; choose 'ddpm' or 'ddim'.")
  logsnrs = jnp.asarray(logsnrs, jnp.float32)
  num_steps = logsnrs.shape[0]
  lam_ext = jnp.concatenate([logsnrs, jnp.full((1,), jnp.inf, jnp.float32)])
  key_init, key_loop = jax.random.split(key)
  z = jax.random.normal(key_init, tuple(shape), jnp.float32)

  def body(i, z):
    lam_cur, lam_next = lam_ext[i], lam_ext[i + 1]
    x_hat = jnp.asarray(denoise_fn(z, lam_cur), jnp.float32)
    a_cur, s_cur, a_next, s_next, c = _vp_coeffs(lam_cur, lam_next)
    if sampler == "ddim":
      eps_hat = (z - a_cur * x_hat) / s_cur
      return a_next * x_hat + s_next * eps_hat
    mean = (a_next / a_cur) * (1.0 - c) * z + a_next * c * x_hat
    std = jnp.sqrt(c) * s_next  # 0 on the final step
    noise = jax.random.normal(jax.random.fold_in(key_loop, i), z.shape, jnp.float32)
    return mean + std * noise

  return jax.lax.fori_loop(0, num_steps, body, z)


def edm_heun_sample(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array,
                    shape: Sequence[int], sigmas: jax.Array, *, churn: float = 0.0,
                    s_tmin: float = 0.0, s_tmax: float = math.inf,
                    s_noise: float = 1.0) -> jax.Array:
  """EDM stochastic / deterministic Heun sampler (Karras et al. 2022, Alg. 2).

  Per step i: gamma = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0,
  sigma_hat = (1 + gamma) sigma_i, x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise eps,
  d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat, x' = x_hat + (sigma_{i+1} - sigma_hat) d, and if
  sigma_{i+1} > 0 the Heun correction x' = x_hat + (sigma_{i+1} - sigma_hat)(d + d') / 2 with
  d' = (x' - D(x'; sigma_{i+1})) / sigma_{i+1}. churn = 0 gives the deterministic sampler (Alg. 1).
  State is float32 (MicroDiT keeps float64; jax runs without x64 by default).

  Args:
    denoise_fn: denoise_fn(x [B, ...], sigma scalar) -> D [B, ...] float32.
    key: PRNG key (initial noise and churn noise).
    shape: output shape (static).
    sigmas: [N + 1] decreasing noise levels with sigmas[N] = 0 (see schedules.edm_sigmas).
    churn, s_tmin, s_tmax, s_noise: S_churn, S_tmin, S_tmax, S_noise of Alg. 2.

  Returns:
    [B, ...] float32 samples.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  num_steps = sigmas.shape[0] - 1
  key_init, key_loop = jax.random.split(key)
  x = sigmas[0] * jax.random.normal(key_init, tuple(shape), jnp.float32)
  use_churn = not (isinstance(churn, (int, float)) and float(churn) == 0.0)
  gamma_max = math.sqrt(2.0) - 1.0

  def step(i, x, heun: bool):
    s_cur, s_next = sigmas[i], sigmas[i + 1]
    if use_churn:
      in_range = jnp.logical_and(s_cur >= s_tmin, s_cur <= s_tmax)
      gamma = jnp.where(in_range, jnp.minimum(churn / num_steps, gamma_max), 0.0)
      s_hat = s_cur * (1.0 + gamma)
      eps = jax.random.normal(jax.random.fold_in(key_loop, i), x.shape, jnp.float32)
      x = x + jnp.sqrt(jnp.maximum(s_hat**2 - s_cur**2, 0.0)) * s_noise * eps
    else:
      s_hat = s_cur
    d = (x - denoise_fn(x, s_hat)) / s_hat
    x_next = x + (s_next - s_hat) * d
    if heun:
      d2 = (x_next - denoise_fn(x_next, s_next)) / s_next
      x_next = x + (s_next - s_hat) * 0.5 * (d + d2)
    return x_next

  # Steps 0..N-2 end at sigma > 0 (Heun); the last one ends at 0 (Euler).
  x = jax.lax.fori_loop(0, num_steps - 1, lambda i, x: step(i, x, True), x)
  return step(num_steps - 1, x, False)


def vp_logsnr_grid(schedule, num_steps: int) -> jax.Array:
  """logSNRs lambda(t_i), t_i = 1 - i / N, i = 0..N-1 (uniform in t, noisy first). [N] float32."""
  t = 1.0 - jnp.arange(num_steps, dtype=jnp.float32) / num_steps
  return schedule.logsnr(t)
