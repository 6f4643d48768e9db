"""Exports a trained autoencoder for latent diffusion.

    python launch/export_autoencoder.py --config=configs/autoencoder_fashion.py --workdir=W --out=DIR

Restores the newest checkpoint's EMA weights from W, measures the latents' mean and standard deviation
over training images (`--num_images`), and writes DIR/config.json (network config, shift_factor =
mean, scaling_factor = 1 / std) and DIR/params.safetensors, which `common.autoencoders.
load_autoencoder(DIR)` and `launch/encode.py images --autoencoder=DIR` read. Errors a user can fix
are printed on one line and exit with status 1.
"""

import os
import sys

from etils import epath

sys.path.insert(0, os.fspath(epath.Path(__file__).absolute().parent.parent))  # the repository root

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from autoencoder.export import export_autoencoder  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.paths import as_path  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The autoencoder's training config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (holds checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output folder for config.json and params.safetensors.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 5000, "Training images for the latent statistics.")


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(1)


def _run(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None or not _WORKDIR.value or not _OUT.value:
    _fail("--config, --workdir and --out are required, e.g. --config=configs/autoencoder_fashion.py "
          "--workdir=runs/ae --out=runs/ae/export")
  try:
    config.get("seed")  # config_flags defers a config file's load error to the first access
  except OSError as e:
    _fail(f"{str(e).splitlines()[-1].strip()} (--config={flags.FLAGS['config'].config_filename})")
  try:
    r = export_autoencoder(config, _WORKDIR.value, _OUT.value, num_images=_NUM_IMAGES.value)
  except UserError as e:
    _fail(str(e))
  print(f"exported step {r['step']} to {as_path(_OUT.value)}: latents "
        f"{'x'.join(map(str, r['latent_shape']))}, shift_factor {r['shift_factor']:.5f}, "
        f"scaling_factor {r['scaling_factor']:.5f} (from {r['num_images']} training images)",
        flush=True)


if __name__ == "__main__":
  app.run(_run)
