"""Prediction parametrizations of the VP process and EDM preconditioning.

VP process (Kingma et al. VDM, arXiv 2107.00630; SiD, arXiv 2301.11093): z = alpha x + sigma eps with alpha^2 + sigma^2 = 1
and logSNR lambda = log(alpha^2 / sigma^2), so alpha^2 = sigmoid(lambda) and
sigma^2 = sigmoid(-lambda).
Predictions of x, eps or v = alpha eps - sigma x are interchangeable given (z, lambda):

  x = alpha z - sigma v        eps = sigma z + alpha v
  x = (z - sigma eps) / alpha  eps = (z - alpha x) / sigma
  v = (alpha z - x) / sigma    v = (eps - sigma z) / alpha

The conversions are exact; those that divide by alpha (from eps) or sigma (from x) amplify errors at
very low / very high logSNR, which is a property of the parametrization, not of the code.

Shapes: `logsnr` is a scalar or [B]; it is broadcast against [B, ...] arrays by appending trailing
axes. All outputs are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.errors import ConfigError

PREDICTIONS = ("eps", "v", "x")


def broadcast_like(a: jax.Array, ref: jax.Array) -> jax.Array:
  """Reshapes a scalar or [B] array to broadcast against ref [B, ...]."""
  a = jnp.asarray(a, jnp.float32)
  return a.reshape(a.shape + (1,) * (jnp.ndim(ref) - a.ndim))


def alpha_sigma(logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
  """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)).

  Returns float32 arrays with the shape of logsnr.

  Exact at lambda = +-inf (alpha, sigma in {0, 1}).
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def diffuse(x: jax.Array, noise: jax.Array, logsnr: jax.Array) -> jax.Array:
  """z = alpha x + sigma eps. x, noise: [B, ...]; logsnr: [B] or scalar -> [B, ...]."""
  alpha, sigma = alpha_sigma(logsnr)
  x = jnp.asarray(x, jnp.float32)
  return broadcast_like(alpha, x) * x + broadcast_like(sigma, x) * jnp.asarray(noise, jnp.float32)


def v_target(x: jax.Array, noise: jax.Array, logsnr: jax.Array) -> jax.Array:
  """v = alpha eps - sigma x (Salimans & Ho 2022, arXiv 2202.00512). [B, ...] float32."""
  alpha, sigma = alpha_sigma(logsnr)
  x = jnp.asarray(x, jnp.float32)
  return broadcast_like(alpha, x) * jnp.asarray(noise, jnp.float32) - broadcast_like(sigma, x) * x


def target(prediction: str, x: jax.Array, noise: jax.Array, logsnr: jax.Array) -> jax.Array:
  """The regression target of a `prediction` in {"eps", "v", "x"}. [B, ...] float32."""
  if prediction == "eps":
    return jnp.asarray(noise, jnp.float32)
  if prediction == "x":
    return jnp.asarray(x, jnp.float32)
  if prediction == "v":
    return v_target(x, noise, logsnr)
  raise ConfigError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")


def x_from_v(z, v, logsnr):
  """x = alpha z - sigma v."""
  alpha, sigma = alpha_sigma(logsnr)
  return broadcast_like(alpha, z) * z - broadcast_like(sigma, z) * v


def eps_from_v(z, v, logsnr):
  """eps = sigma z + alpha v."""
  alpha, sigma = alpha_sigma(logsnr)
  return broadcast_like(sigma, z) * z + broadcast_like(alpha, z) * v


def x_from_eps(z, eps, logsnr):
  """x = (z - sigma eps) / alpha (from z = alpha x + sigma eps)."""
  alpha, sigma = alpha_sigma(logsnr)
  return (z - broadcast_like(sigma, z) * eps) / broadcast_like(alpha, z)


def eps_from_x(z, x, logsnr):
  """eps = (z - alpha x) / sigma (from z = alpha x + sigma eps)."""
  alpha, sigma = alpha_sigma(logsnr)
  return (z - broadcast_like(alpha, z) * x) / broadcast_like(sigma, z)


def v_from_x(z, x, logsnr):
  """v = (alpha z - x) / sigma (inverts x = alpha z - sigma v)."""
  alpha, sigma = alpha_sigma(logsnr)
  return (broadcast_like(alpha, z) * z - x) / broadcast_like(sigma, z)


def v_from_eps(z, eps, logsnr):
  """v = (eps - sigma z) / alpha (inverts eps = sigma z + alpha v)."""
  alpha, sigma = alpha_sigma(logsnr)
  return (eps - broadcast_like(sigma, z) * z) / broadcast_like(alpha, z)


def convert(pred: jax.Array, z: jax.Array, logsnr: jax.Array, source: str, dest: str) -> jax.Array:
  """Converts a prediction between parametrizations given z [B, ...] and lambda [B].

  Args:
    pred: [B, ...] prediction of kind `source`.
    z: [B, ...] noisy input it was made from.
    logsnr: [B] or scalar lambda of z.
    source, dest: each one of "eps", "v", "x".

  Returns:
    [B, ...] float32 prediction of kind `dest` (exact algebra, see module docstring).
  """
  for p in (source, dest):
    if p not in PREDICTIONS:
      raise ConfigError(f"Unknown prediction {p!r}; choose one of {PREDICTIONS}.")
  pred = jnp.asarray(pred, jnp.float32)
  z = jnp.asarray(z, jnp.float32)
  if source == dest:
    return pred
  # Go through x (from v there is a direct route that never divides).
  if source == "v":
    if dest == "x":
      return x_from_v(z, pred, logsnr)
    return eps_from_v(z, pred, logsnr)
  if source == "eps":
    if dest == "x":
      return x_from_eps(z, pred, logsnr)
    return v_from_eps(z, pred, logsnr)
  # source == "x"
  if dest == "eps":
    return eps_from_x(z, pred, logsnr)
  return v_from_x(z, pred, logsnr)


def edm_precond(sigma: jax.Array, sigma_data: float
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """EDM preconditioning (Karras et al. 2022, Table 1).

  c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4;
  D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).

  Args:
    sigma: noise std (data units), any shape, > 0.
    sigma_data: data std (e.g. 0.5 for EDM pixels, 0.9 for MicroDiT latents).

  Returns:
    (c_skip, c_out, c_in, c_noise), each float32 with the shape of sigma.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  sd2 = float(sigma_data)**2
  denom = sigma**2 + sd2
  c_skip = sd2 / denom
  c_out = sigma * sigma_data * jax.lax.rsqrt(denom)
  c_in = jax.lax.rsqrt(denom)
  c_noise = jnp.log(sigma) / 4.0
  return c_skip, c_out, c_in, c_noise


def edm_logsnr(sigma: jax.Array, sigma_data: float) -> jax.Array:
  """logSNR of an EDM noise level, normalized by the data scale: lambda = log(sd^2 / sigma^2).

  With data variance sd^2 this is the SNR of x + n; used for guidance intervals.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  return 2.0 * (jnp.log(jnp.float32(sigma_data)) - jnp.log(sigma))
