"""Our small KL autoencoder on Fashion-MNIST: 28x28x1 images <-> 7x7x4 latents (f4).

Trained by the same trainer as the diffusion models, through
`autoencoder.recipe.KLAutoencoderRecipe` (L1 reconstruction + KL, the latent-diffusion autoencoder
objective of arXiv:2112.10752 App. G without its perceptual and adversarial terms). After training,
`launch/export_autoencoder.py` writes the EMA weights with the latents' shift and scale, and
`common.autoencoders.load_autoencoder` reads them back for latent diffusion.

Choices (tuned on a 2-core CPU; figures in README.md "Autoencoders"):
  * kl_weight 1e-5 per pixel value (LDM's SD VAE uses 1e-6): a little more pull towards N(0, I)
    keeps the latents smooth for a diffusion model at a negligible reconstruction cost here.
  * widths (16, 32, 32) at 28, 14, 7 pixels, one ResnetBlock2D per level, none extra at the
    latent resolution, no attention: 0.12M parameters, 5.2 GFLOP per train step of 32 images.
  * AdamW lr 2e-3, batch 32, 600 steps, cosine decay, EMA 0.999 with warmup. Measured with
    benchmarks/study_autoencoder_fashion.py (then a plain loop of the same model, recipe,
    optimizer and steps; it now trains through the trainer): test-set PSNR 21.7 dB (MSE 0.0068 on
    [0, 1] pixels); a logistic-regression pixel classifier scores 82.1% on the reconstructions vs
    82.7% on the real test images. 0.5 steps/s on a 2-core CPU shared with
    other jobs (load ~12); about 0.13 s a step at the 40 GFLOP/s a free 2-core machine gives.

Args (comma-separated): "runlocal" for a few-second smoke run.
"""

from configs.base import base_config, parse_arg
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  c = base_config()
  # The output layer maps to the image/latent channels (1 to 16 features): replicated.
  c.mesh.replicated = ("dec_out/.*",)
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.image_size = 28
  c.data.random_flip = True            # clothes are (nearly) mirror-symmetric

  c.model = ml_collections.ConfigDict()
  c.model.name = "autoencoder.small_kl.SmallKLAutoencoder"
  c.model.image_size = 28
  c.model.in_channels = 1
  c.model.channels = (16, 32, 32)
  c.model.blocks_per_level = 1
  c.model.mid_blocks = 0
  c.model.latent_channels = 4
  c.model.norm_groups = 8
  c.model.dtype = "float32"

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.name = "autoencoder.recipe.KLAutoencoderRecipe"
  c.diffusion.kl_weight = 1e-5
  c.diffusion.reconstruction = "l1"
  c.diffusion.sample_posterior = True

  c.train.steps = 600
  c.train.batch_size = 32
  c.train.log_every = 100
  c.train.checkpoint_every = 200
  c.train.sample_every = 200
  c.train.num_grid_samples = 64
  c.train.ema_decay = 0.999
  c.train.ema_warmup = True

  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.05
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  if "runlocal" in args:
    c.model.channels = (8, 16, 16)
    c.model.mid_blocks = 0
    c.model.norm_groups = 4
    c.train.steps = 20
    c.train.batch_size = 16
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.train.sample_every = 0
    c.train.num_grid_samples = 16
    c.optim.warmup_steps = 2
  return c
