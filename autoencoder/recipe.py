"""Training recipe for KL autoencoders (reconstruction + KL), for the trainer's recipe contract.

The objective is the one of the latent-diffusion autoencoders (Rombach et al. 2022,
arXiv:2112.10752, App. G; CompVis/latent-diffusion, ldm/modules/losses/contperceptual.py,
`LPIPSWithDiscriminator` without its perceptual and adversarial terms):

    L(x) = sum_pixels |x - D(z)|  +  kl_weight * KL(q(z|x) || N(0, I)),   z ~ q(z|x) = N(mean, exp(logvar))
    KL   = 0.5 * sum_latent (mean^2 + exp(logvar) - 1 - logvar)          (Kingma & Welling 2013,
                                                                          arXiv:1312.6114, App. B)

divided by the number of pixel values H*W*C so the loss is O(1); `kl_weight` therefore means what it
means in LDM's configs (1e-6 for the SD VAE). The reconstruction term is L1 by default, as LDM uses
(L1 keeps edges sharper than L2 without a perceptual loss); `reconstruction="l2"` gives the squared
error (the Gaussian decoder likelihood up to constants).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from common.training import contracts
from common import registry
from common.errors import ConfigError


class KLAutoencoderNet(contracts.Network, Protocol):
  """The network `KLAutoencoderRecipe` trains (e.g. `autoencoder.small_kl.SmallKLAutoencoder`);
  `common.autoencoders.Autoencoder` wraps it once exported."""

  downsample_factor: int  # f: latents are f times smaller per side
  in_channels: int        # image channels C
  latent_channels: int    # latent channels c

  def encode_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, C] in [-1, 1] -> the posterior's (mean, logvar), float32 [B, H/f, W/f, c]."""

  def decode(self, z: jax.Array) -> jax.Array:
    """latents [B, h, w, c] -> images float32 [B, h*f, w*f, C]."""

  def __call__(self, x: jax.Array) -> jax.Array:
    """The reconstruction of x [B, H, W, C] (the forward pass --mode=summary counts)."""


@registry.register("diffusion")
class KLAutoencoderRecipe:
  """`loss(model, batch, key)` and `preview(model, batch, key, settings)` for a KL autoencoder.

  `model` is a `KLAutoencoderNet`; the batch is `{"x": float32 [B, H, W, C] in [-1, 1], "cond":
  ...}` (cond is ignored).

  Args:
    kl_weight: weight of the KL term relative to the per-pixel reconstruction sum (see module doc).
    reconstruction: "l1" or "l2".
    sample_posterior: decode a sample z ~ q(z|x) in training (True, the VAE objective) or the mean.
  """

  network = KLAutoencoderNet

  def __init__(self, kl_weight: float = 1e-6, reconstruction: str = "l1",
               sample_posterior: bool = True):
    if reconstruction not in ("l1", "l2"):
      raise ConfigError(f"diffusion.reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
    if kl_weight < 0:
      raise ConfigError(f"diffusion.kl_weight must be >= 0, got {kl_weight}")
    self.kl_weight = float(kl_weight)
    self.reconstruction = reconstruction
    self.sample_posterior = bool(sample_posterior)

  def loss(self, model, batch: dict, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example loss float32 [B] and scalar metrics (reconstruction, kl, mse, psnr in dB).

    `mse` and `psnr` compare the reconstruction of the posterior sample with x in [-1, 1] units
    (peak-to-peak 2, so PSNR = 10 log10(4 / mse)).
    """
    x = batch["x"].astype(jnp.float32)
    mean, logvar = model.encode_moments(x)
    z = mean
    if self.sample_posterior:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    rec = model.decode(z)
    err = rec - x
    per_pixel = jnp.abs(err) if self.reconstruction == "l1" else jnp.square(err)
    axes = tuple(range(1, x.ndim))
    rec_loss = jnp.mean(per_pixel, axis=axes)                                        # [B]
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar,
                       axis=tuple(range(1, mean.ndim)))                               # [B] nats
    num_values = x[0].size
    per_example = rec_loss + self.kl_weight * kl / num_values
    mse = jnp.mean(jnp.square(err))
    metrics = {"reconstruction": jnp.mean(rec_loss), "kl": jnp.mean(kl), "mse": mse,
               "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))}
    return per_example, metrics

  def preview(self, model, batch: dict, key: jax.Array, settings: dict) -> jax.Array:
    """Reconstructions of batch["x"] through the posterior mean, float32 [B, H, W, C] in [-1, 1]."""
    del key, settings
    mean, _ = model.encode_moments(batch["x"].astype(jnp.float32))
    return jnp.clip(model.decode(mean), -1.0, 1.0)
