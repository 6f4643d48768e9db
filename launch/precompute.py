"""Encodes a captioned image dataset into latents + caption embeddings (array_record shards).

    python launch/precompute.py --source=fashion_mnist --autoencoder=SPEC --text_encoder=minilm \
        --output=data/fashion_latents
    python launch/precompute.py --source=image_folder --path=DIR --image_size=256 ...
    python launch/precompute.py --source=coco --path=annotations/captions_train2014.json \
        --image_dir=train2014 --image_size=256 ...
    python launch/precompute.py --source=imagenet --path=ILSVRC/train --image_size=256 \
        --autoencoder=weights/sd-vae-ft-ema --latent=moments --output=workdirs/imagenet256_latents

ImageNet (`--source=imagenet`: the ILSVRC train folder of synset folders; `imagenet_tfds`: tfds
imagenet2012 prepared under --path) is labelled and needs no text encoder; see
common/data/imagenet.py and docs/REPRODUCE_TERDIT.md.
    python launch/precompute.py --source=webdataset --path='cc12m/cc12m-train-{0000..2175}.tar' \
        --image_size=256 --min_side=256 ...
    python launch/precompute.py --source=parquet --path=metadata-large.parquet --image_dir=images \
        --image_column=image_name --caption_column=prompt --image_size=256 --min_side=256 ...

docs/MICRODIT_DATA.md gives the command of each MicroDiT training source.

The output directory is what `config.data = {"name": "latents", "path": DIR}` trains on; its format
is described in common/data/latents.py. Interrupted runs continue from the last complete shard when
the same command is run again. Errors a user can fix are printed on one line and exit with status 1.
"""

import os
import sys

from etils import epath

sys.path.insert(0, os.fspath(epath.Path(__file__).absolute().parent.parent))  # the repository root

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from common.data import latents  # noqa: E402
from common.errors import UserError  # noqa: E402

_SOURCE = flags.DEFINE_enum("source", None, ["fashion_mnist", "image_folder", "coco",
                                              "webdataset", "parquet", "imagenet",
                                              "imagenet_tfds"],
                            "Captioned (or, imagenet*, labelled) image source.")
_PATH = flags.DEFINE_string(
    "path", None, "fashion_mnist: idx directory (default /usr/share/datasets/fashion-mnist); "
    "image_folder: the folder of images with .txt captions; coco: the caption JSON; "
    "webdataset: the tar shards ('dir/{00000..00099}.tar', globs, commas); parquet: the tables; "
    "imagenet: the ILSVRC train folder of synset folders; imagenet_tfds: the tfds data_dir.")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "coco: the directory of the JSON's images; "
                                 "parquet: the folder the image column's paths are relative to.")
_MIN_SIDE = flags.DEFINE_integer("min_side", 0, "webdataset/parquet: skip (and count) images whose "
                                 "shorter side is below this many pixels.")
_IMAGE_COLUMN = flags.DEFINE_string("image_column", None,
                                    "parquet: the column of image paths relative to --image_dir.")
_CAPTION_COLUMN = flags.DEFINE_string("caption_column", None, "parquet: the caption column.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", "caption",
                                   "webdataset: the caption field of <key>.json files.")
_SPLIT = flags.DEFINE_string("split", "train", "fashion_mnist: train | test; imagenet_tfds: a "
                             "tfds split (train, validation, train[:1000]).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "imagenet: the number of synset folders "
                                    "required (1000: ILSVRC-2012; fewer for a subset folder).")
_FLIPS = flags.DEFINE_bool("flips", True, "imagenet*: store every image and its mirror image "
                           "(Large-DiT's random horizontal flip).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "image_folder/coco: side to center-crop and resize to (required); "
    "fashion_mnist: 28 only.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "image_folder/coco: 3 (RGB) or 1 (grayscale).")
_AUTOENCODER = flags.DEFINE_string("autoencoder", None,
                                   "Autoencoder spec for common.autoencoders.load_autoencoder.")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None,
                                    "Text encoder spec for common.text.load_text_encoder "
                                    "(minilm or a local path); not needed for imagenet*.")
_OUTPUT = flags.DEFINE_string("output", None, "Dataset directory to write (resumed if present).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 4096, "Examples per array_record shard.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images (and captions) per encoder call.")
_LIMIT = flags.DEFINE_integer("limit", None, "Encode only the first N examples.")
_LATENT = flags.DEFINE_enum("latent", "mean", ["mean", "sample", "moments"],
                            "Store the posterior mean, one posterior sample per image, or the "
                            "posterior's mean and log-variance (a new sample every step).")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"],
                           "Storage dtype of latents and embeddings.")
_TRIM = flags.DEFINE_bool(
    "trim_padding", False, "Store token embeddings only up to the last real token (less disk; "
    "padding positions read back as zeros).")
_SEED = flags.DEFINE_integer("seed", 0, "Fashion-MNIST caption templates; posterior samples.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0,
                                      "This writer's index when several share --output.")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Number of writers sharing --output.")


def _run(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SOURCE.value is None:
    print("error: --source is required (fashion_mnist, image_folder, coco, webdataset, parquet, "
          "imagenet or imagenet_tfds)", file=sys.stderr,
          flush=True)
    sys.exit(1)
  try:
    latents.precompute(source=_SOURCE.value, output=_OUTPUT.value, autoencoder=_AUTOENCODER.value,
                       text_encoder=_TEXT_ENCODER.value, path=_PATH.value,
                       image_dir=_IMAGE_DIR.value, split=_SPLIT.value,
                       image_size=_IMAGE_SIZE.value, channels=_CHANNELS.value,
                       shard_size=_SHARD_SIZE.value, batch_size=_BATCH_SIZE.value,
                       limit=_LIMIT.value, latent=_LATENT.value, dtype=_DTYPE.value,
                       trim_padding=_TRIM.value,
                       seed=_SEED.value, min_side=_MIN_SIDE.value,
                       image_column=_IMAGE_COLUMN.value, caption_column=_CAPTION_COLUMN.value,
                       caption_key=_CAPTION_KEY.value, process_index=_PROCESS_INDEX.value,
                       process_count=_PROCESS_COUNT.value, num_classes=_NUM_CLASSES.value,
                       flips=_FLIPS.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except KeyboardInterrupt:
    print("precompute: interrupted; run the same command again to continue from the last "
          "complete shard", file=sys.stderr, flush=True)
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag reported on one line (exit 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def main() -> None:
  app.run(_run, flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
