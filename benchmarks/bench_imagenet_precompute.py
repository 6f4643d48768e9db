"""Benchmark: what `launch/precompute.py --source=imagenet` costs, for docs/REPRODUCE_TERDIT.md.

Two parts, timed separately because they run on different hardware:

1. reading: `common.data.imagenet.ImageNetFolder` on ILSVRC-like JPEGs written here (500x375, the
   typical ImageNet size; smooth content plus noise, quality 90), both flips per file (the mirror
   image reuses the decoded file), at 256 and 512 px. One process, one thread: the figure is
   examples per CPU-second.
2. encoding: the SD VAE encoder (`autoencoder.kl_vae.AutoencoderKL` with sd-vae-ft-ema's
   config: block_out_channels 128, 256, 512, 512, two layers each) with random weights: FLOPs per
   image from XLA's cost analysis, and with `--time_encoder` images/s measured on the default
   backend (run it on the GPU that will precompute).

  python benchmarks/bench_imagenet_precompute.py [--images 120] [--time_encoder] [--batch 64]

Prints one line per figure and an estimate for ILSVRC-2012 train (1,281,167 images, 2,562,334
examples with flips).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from autoencoder import kl_vae  # pylint: disable=g-import-not-at-top
from common.data import imagenet  # pylint: disable=g-import-not-at-top

ILSVRC_TRAIN_IMAGES = 1_281_167
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
          "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4}


def write_folder(root: str, n: int, seed: int = 0) -> float:
  """n ILSVRC-like JPEGs in two synset folders under root; returns their mean size in KB."""
  rng = np.random.default_rng(seed)
  h, w = 375, 500
  yy, xx = np.mgrid[:h, :w]
  sizes = []
  for k in range(n):
    folder = os.path.join(root, f"n0000000{k % 2}")
    os.makedirs(folder, exist_ok=True)
    wave = np.sin(xx[..., None] / (7 + k % 5) + np.arange(3)) * np.cos(yy[..., None] / 11)
    base = 128 + 100 * wave
    image = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    path = os.path.join(folder, f"n0000000{k % 2}_{k}.JPEG")
    Image.fromarray(image).save(path, quality=90)
    sizes.append(os.path.getsize(path))
  return float(np.mean(sizes)) / 1024


def read_rate(root: str, size: int) -> float:
  """Examples (both flips) per CPU-second of ImageNetFolder at `size` px."""
  source = imagenet.ImageNetFolder(root, size, num_classes=2)
  cpu = time.process_time()
  for i in range(len(source)):
    source[i]
  return len(source) / (time.process_time() - cpu)


def encoder(size: int, batch: int, time_it: bool) -> tuple[float, float | None]:
  """(GFLOP per image, images/s or None) of the SD VAE encoder at size x size."""
  kwargs = kl_vae.model_kwargs(SD_VAE)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: kl_vae.AutoencoderKL(**kwargs,
                                                                            rngs=nnx.Rngs(0))))
  fn = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode_moments(x))
  cost = fn.lower(state, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  gflop = float(cost["flops"]) / 1e9
  if not time_it:
    return gflop, None
  net = kl_vae.AutoencoderKL(**kwargs, rngs=nnx.Rngs(0))
  _, state = nnx.split(net)
  x = jnp.zeros((batch, size, size, 3), jnp.float32)
  jax.block_until_ready(fn(state, x))
  t = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(fn(state, x))
  return gflop, 3 * batch / (time.perf_counter() - t)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=120, help="JPEG files to write and read")
  parser.add_argument("--time_encoder", action="store_true", help="time the encoder here")
  parser.add_argument("--batch", type=int, default=64, help="encoder batch when timed")
  args = parser.parse_args()
  examples = 2 * ILSVRC_TRAIN_IMAGES
  with tempfile.TemporaryDirectory() as root:
    kb = write_folder(root, args.images)
    print(f"reading: {args.images} JPEGs 500x375, mean {kb:.0f} KB")
    for size in (256, 512):
      rate = read_rate(root, size)
      print(f"reading {size}px: {rate:.1f} examples per CPU-second (both flips) -> "
            f"{examples / rate / 3600:.1f} CPU-hours for ILSVRC-2012 train")
  for size in (256, 512):
    gflop, rate = encoder(size, args.batch, args.time_encoder)
    line = (f"SD VAE encoder {size}px: {gflop:.0f} GFLOP/image, {examples * gflop / 1e9:.2f} "
            f"PFLOP for ILSVRC-2012 train with flips")
    if rate is not None:
      line += (f"; {rate:.1f} images/s on {jax.devices()[0].device_kind} -> "
               f"{examples / rate / 3600:.1f} h")
    print(line, flush=True)


if __name__ == "__main__":
  main()
