"""Exports a trained autoencoder (the newest checkpoint's EMA weights) with its latent normalisation.

Latent normalisation follows Stable Diffusion 3 (Esser et al. 2024, arXiv:2403.03206; diffusers'
SD3/FLUX VAE configs carry `shift_factor` and `scaling_factor`): model latents are
`(z - shift_factor) * scaling_factor` with `shift_factor` = the mean and `scaling_factor` = 1 / the
standard deviation of the posterior means z over a sample of the training images (one number each,
over all latent elements, as Rombach et al. 2022, arXiv:2112.10752 Sec. 4.3.2, computed the SD
factor 0.18215), so the diffusion model sees latents of zero mean and unit variance.
"""

from __future__ import annotations

import os

from flax import nnx
import jax
import ml_collections
import numpy as np

from common.weights import tree_names
from common import autoencoders as ae_lib
from common.weights.checkpoint import Checkpointer
from common.data import dataset_info, load_arrays
from common.errors import CheckpointError, ShapeError
from common.nn.network import build_model
from common.paths import as_path


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, int]:
  """The EMA params of the newest checkpoint in WORKDIR/checkpoints, checked against config.model.

  Returns:
    (pure param dict of numpy arrays in the structure of `config.model`'s network, step).
  """
  directory = os.fspath(as_path(workdir) / "checkpoints")
  if not as_path(directory).is_dir():
    raise CheckpointError(f"no checkpoints in {directory}: train first with launch/main.py "
                          f"--config=... --workdir={workdir}")
  ckpt = Checkpointer(directory, keep=int(config.train.get("keep_checkpoints", 3)))
  try:
    # Restored as saved (host arrays); the network built from config.model checks it below.
    found = ckpt.restore_newest(None)
  finally:
    ckpt.close()
  if found is None:
    raise CheckpointError(f"no checkpoint in {directory}: train first with launch/main.py "
                          f"--config=... --workdir={workdir}")
  step, state = found
  if not isinstance(state, dict) or "ema" not in state:
    raise CheckpointError(f"the checkpoint at step {step} in {directory} holds no 'ema' params")
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: build_model(config.model, jax.random.key(0))), nnx.Param))
  want = tree_names.flatten(abstract)
  got = {k: np.asarray(v, np.float32) for k, v in tree_names.flatten(dict(state["ema"])).items()}
  if set(got) != set(want) or any(got[k].shape != tuple(want[k].shape) for k in want):
    raise CheckpointError(f"the checkpoint at step {step} in {directory} does not match "
                          f"config.model ({config.model.name}); use the config it was trained with")
  return tree_names.unflatten(got), int(step)


def latent_statistics(autoencoder: ae_lib.Autoencoder, images: np.ndarray,
                      batch_size: int = 500) -> tuple[float, float]:
  """(mean, std) of the unnormalised posterior means over `images` (uint8 [N, H, W, C])."""
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ShapeError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  total = total_sq = 0.0
  count = 0
  for i in range(0, images.shape[0], batch_size):
    x = images[i:i + batch_size].astype(np.float32) / 127.5 - 1.0
    z = np.asarray(autoencoder.encode(x), np.float64)  # identity normalisation: raw z
    total += z.sum()
    total_sq += np.square(z).sum()
    count += z.size
  mean = total / count
  return float(mean), float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def export_autoencoder(config: ml_collections.ConfigDict, workdir: str, out: str, *,
                       num_images: int = 5000) -> dict:
  """Writes OUT/config.json + OUT/params.safetensors from WORKDIR's newest checkpoint.

  Args:
    config: the autoencoder's training config (config.model, config.data).
    workdir: the training run's workdir.
    out: output folder (created).
    num_images: training images used for the latent statistics.

  Returns:
    {"step", "shift_factor", "scaling_factor", "latent_shape", "num_images"}.
  """
  params, step = restore_ema_params(config, workdir)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config.model, jax.random.key(0))),
                          nnx.Param)
  net = nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, params))
  raw = ae_lib.Autoencoder(net, shift=0.0, scale=1.0, name=workdir)
  images, _ = load_arrays(config.data, "train", limit=int(num_images))
  mean, std = latent_statistics(raw, images)
  if not std > 0:
    raise ShapeError(f"the latents of {workdir} have zero variance; the autoencoder is degenerate")
  info = dataset_info(config.data)
  image_shape = (info.image_size, info.image_size, info.channels)
  shift, scale = mean, 1.0 / std
  ae_lib.save_autoencoder(out, config.model, params, shift=shift, scale=scale,
                          image_shape=image_shape,
                          extra={"source": {"workdir": os.fspath(as_path(workdir)), "step": step,
                                            "num_images": int(images.shape[0])}})
  return {"step": step, "shift_factor": shift, "scaling_factor": scale,
          "latent_shape": raw.latent_shape(image_shape), "num_images": int(images.shape[0])}
