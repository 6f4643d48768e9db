"""Loss weightings: the sigmoid weighting of Kingma & Gao (VDM++, arXiv 2303.00848) and EDM's.

VDM++ weighted loss with t ~ U(0, 1) (arXiv 2303.00848):

  L = 1/2 E_t,eps [ w(lambda_t) (-d lambda/dt) ||eps - eps_hat||^2 ].

The sigmoid weighting w(lambda) = sigmoid(b - lambda) is defined on the *eps*-loss. For a network
that predicts x or v, the same objective is obtained with the per-target weights (using
the exact identities ||eps - eps_hat||^2 = e^lambda ||x - x_hat||^2
= sigmoid(lambda) ||v - v_hat||^2):

  eps-MSE: sigmoid(b - lambda)
  x-MSE:   e^lambda sigmoid(b - lambda) = e^b sigmoid(lambda - b)
  v-MSE:   sigmoid(b - lambda) sigmoid(lambda)

and the total per-example weight is 1/2 (-d lambda/dt) times that.

Units: all losses here are *means* over the non-batch dimensions (not the VDM++ sum), so the loss of
a [B, H, W, C] batch is comparable across resolutions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.errors import ConfigError

WEIGHTINGS = ("sigmoid", "uniform")


def sigmoid_weight(logsnr: jax.Array, bias: float, prediction: str = "eps") -> jax.Array:
  """Sigmoid weight w(lambda) = sigmoid(b - lambda) for the MSE of `prediction` (Kingma & Gao, arXiv 2303.00848).

  Args:
    logsnr: lambda, any shape.
    bias: b (nats).
    prediction: "eps", "x" or "v": the target whose MSE the weight multiplies.

  Returns:
    float32 weight, shape of logsnr.
  """
  lam = jnp.asarray(logsnr, jnp.float32)
  if prediction == "eps":
    return jax.nn.sigmoid(bias - lam)
  if prediction == "x":
    # e^lambda sigmoid(b - lambda) = e^b sigmoid(lambda - b); the right form never overflows.
    return jnp.exp(jnp.float32(bias)) * jax.nn.sigmoid(lam - bias)
  if prediction == "v":
    return jax.nn.sigmoid(bias - lam) * jax.nn.sigmoid(lam)
  raise ConfigError(f"Unknown prediction {prediction!r}; choose one of ('eps', 'v', 'x').")


def vp_loss_weight(logsnr: jax.Array, neg_dlogsnr_dt: jax.Array, prediction: str,
                   weighting: str = "sigmoid", bias: float = 0.0) -> jax.Array:
  """Total per-example weight of the `prediction`-MSE for t ~ U(0, 1).

  weighting="sigmoid": 1/2 (-d lambda/dt) w_target(lambda) (VDM++ L_w with the Jacobian kept,
  arXiv 2303.00848).
  weighting="uniform": 1, i.e. the plain unweighted MSE of the prediction target (the "simple" loss;
  SiD trains v-prediction this way). No Jacobian: the schedule's density p(lambda) is then part of
  the effective weighting, by design.

  Args:
    logsnr: [B] lambda_t.
    neg_dlogsnr_dt: [B] -d lambda/dt at the same t (> 0).
    prediction: "eps", "x" or "v".
    weighting: "sigmoid" or "uniform".
    bias: b of the sigmoid weighting.

  Returns:
    [B] float32.
  """
  if weighting == "sigmoid":
    return 0.5 * jnp.asarray(neg_dlogsnr_dt, jnp.float32) * sigmoid_weight(logsnr, bias, prediction)
  if weighting == "uniform":
    return jnp.ones_like(jnp.asarray(logsnr, jnp.float32))
  raise ConfigError(f"Unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}.")


def edm_loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
  """EDM weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (EDM Table 1).

  It makes the effective weight of the F-target MSE equal to 1 (c_out^2 lambda = 1).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  sd2 = float(sigma_data)**2
  return (sigma**2 + sd2) / (sigma**2 * sd2)


def mean_sq_error(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean over all non-batch dims of (pred - target)^2, in float32. [B, ...] -> [B]."""
  d = jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)
  return jnp.mean(jnp.square(d).reshape(d.shape[0], -1), axis=-1)


def masked_mean_sq_error(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-example mean of (pred - target)^2 over the pixels where `mask` is 1, in float32.

  The error is first averaged over channels, then over the masked pixels, as MicroDiT's loss on
  kept patches (micro_diffusion `models/model.py`, `edm_loss`: mean over channels, average-pooled
  per patch, averaged over kept patches; with a pixel mask constant on each patch that is the same
  number).

  Args:
    pred, target: [B, H, W, C].
    mask: [B, H, W] float, 1 where the loss counts; an example with an empty mask gives 0.
  Returns:
    [B] float32.
  """
  d = jnp.square(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)).mean(-1)
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum((d * m).reshape(d.shape[0], -1), -1) / jnp.maximum(
      jnp.sum(m.reshape(m.shape[0], -1), -1), 1.0)
