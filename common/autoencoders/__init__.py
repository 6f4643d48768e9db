"""Autoencoders for latent diffusion: the diffusers `AutoencoderKL` (SD, SDXL, SD3, FLUX VAEs) and our
small KL autoencoder, behind one interface.

    ae = load_autoencoder("/path/to/sdxl-vae")   # or a folder from launch/export_autoencoder.py
    z = ae.encode(images)                         # [B, H, W, C] in [-1, 1] -> scaled [B, h, w, c]
    x = ae.decode(z)                              # -> [B, H, W, C] (~[-1, 1])
"""

from common.autoencoders.autoencoder import Autoencoder
from common.autoencoders.autoencoder import load_autoencoder
from common.autoencoders.autoencoder import save_autoencoder

__all__ = ["Autoencoder", "load_autoencoder", "save_autoencoder"]
