"""Bad inputs of evaluation and data preparation: FID reference statistics (`launch/evaluate.py`),
the evaluation caches of `--mode=eval`, prompt files (`launch/encode.py text`, `launch/main.py
--prompts`) and images (`launch/precompute.py`).

`--mode=eval` cases run `common.training.trainer.evaluate` (what `launch/main.py --mode=eval` calls) through
`tests.bad_inputs.call evaluate_small_fid`, with a small random feature network in place of the FID
Inception (11 GFLOP per image and a 2048 x 2048 matrix root on CPU would take minutes per case);
the caches, the sampling and the metrics are the real ones.
"""

import io
import json
import pathlib
import shutil

import numpy as np

from tests.bad_inputs.harness import Case
from tests.bad_inputs.images import bad_images, png, truncated_jpeg

STEP = 20  # the newest checkpoint of the pristine workdir
NUM_SAMPLES = 4


# ----------------------------------------------------------------------------------------------
# FID reference statistics through launch/evaluate.py (refused while the files are read, before
# the Inception is loaded)


def _statistics(d: int = 64) -> tuple[np.ndarray, np.ndarray]:
  x = np.random.default_rng(0).normal(size=(4 * d, d))
  return x.mean(0), np.cov(x, rowvar=False)


def _evaluate_reference(**arrays):
  def build(d: pathlib.Path, pristine) -> list[str]:
    images = np.random.default_rng(1).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.savez(d / "samples.npz", images=images)
    np.savez(d / "ref.npz", **{k: v() if callable(v) else v for k, v in arrays.items()})
    return ["launch/evaluate.py", f"--samples={d / 'samples.npz'}", f"--reference={d / 'ref.npz'}",
            "--noprogress"]
  return build


def _nan_mu():
  mu, sigma = _statistics()
  mu[7] = np.nan
  return {"mu": mu, "sigma": sigma}


def _inf_sigma():
  mu, sigma = _statistics()
  sigma[3, 3] = np.inf
  return {"mu": mu, "sigma": sigma}


def _not_psd():
  mu, sigma = _statistics()
  w, v = np.linalg.eigh(sigma)
  w[0] = -w.max()
  return {"mu": mu, "sigma": (v * w) @ v.T}


def _huge_header(d: pathlib.Path, pristine) -> list[str]:
  """mu's .npy header claims 2**40 float64 (8 TiB) over 32 bytes."""
  import zipfile  # pylint: disable=import-outside-toplevel
  argv = _evaluate_reference(mu=np.zeros(4), sigma=np.eye(4))(d, pristine)
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                "shape": (2**40,)})
  with zipfile.ZipFile(d / "ref.npz", "w") as z:
    z.writestr("mu.npy", header.getvalue() + bytes(32))
    z.writestr("sigma.npy", header.getvalue() + bytes(32))
  return argv


def _arrays(make):
  return lambda d, pristine: _evaluate_reference(**make())(d, pristine)


REFERENCE_CASES = [
    Case(name="eval/reference-nan-mu", build=_arrays(_nan_mu),
         message=r"reference '.*ref\.npz' \(mu, sigma\): the mean holds 1 NaN or inf value"),
    Case(name="eval/reference-inf-sigma", build=_arrays(_inf_sigma),
         message=r"reference '.*ref\.npz' \(mu, sigma\): the covariance holds 1 NaN or inf value"),
    Case(name="eval/reference-not-psd-sigma", build=_arrays(_not_psd),
         message=r"reference '.*ref\.npz' \(mu, sigma\): the covariance is not positive "
                 r"semi-definite"),
    Case(name="eval/reference-mismatched-shapes",
         build=_evaluate_reference(mu=np.zeros(8), sigma=np.eye(4)),
         message=r"reference '.*ref\.npz': mu must be float \[D\] and sigma float \[D, D\], got "
                 r"float64 \[8\] and float64 \[4, 4\]"),
    Case(name="eval/reference-huge-header", build=_huge_header,
         message=r"'mu' declares float64 \[1099511627776\] \(8796093022208 bytes\) but holds 32 "
                 r"bytes", max_rss_mib=1000),
]


# ----------------------------------------------------------------------------------------------
# --mode=eval caches


def evaluate_with_a_small_network(config: str, workdir: str, num_samples: str) -> str:
  """`common.training.trainer.evaluate(config, workdir, num_samples)`, what `launch/main.py --mode=eval`
  runs, with `tests.test_evaluate_cli.TinyFeatureNet` as the FID network (`tests.bad_inputs.call
  evaluate_small_fid CONFIG WORKDIR N`)."""
  # pylint: disable=import-outside-toplevel
  from flax import nnx
  from common.training import trainer
  from common.eval import features
  from configs.base import load_config
  from tests.test_evaluate_cli import TinyFeatureNet
  net = TinyFeatureNet(rngs=nnx.Rngs(0))
  features.load_network = lambda path=None: net
  scores = trainer.evaluate(load_config(config), workdir, num_samples=int(num_samples))
  return f"fid {scores['eval/fid']:.6g} from {scores['eval/num_samples']} samples"


def _samples_path(wd: pathlib.Path) -> pathlib.Path:
  return wd / "eval" / f"samples_step_{STEP:07d}_n{NUM_SAMPLES}.npz"


def _eval_workdir(damage):
  """A copy of the pristine run whose samples cache `damage(path, config)` writes."""
  def build(d: pathlib.Path, pristine) -> list[str]:
    wd = d / "workdir"
    shutil.copytree(pristine.workdir, wd, ignore=shutil.ignore_patterns("export", "eval"))
    _samples_path(wd).parent.mkdir(parents=True)
    damage(_samples_path(wd), pristine.config)
    return ["-m", "tests.bad_inputs.call", "evaluate_small_fid", pristine.config, str(wd),
            str(NUM_SAMPLES)]
  return build


def _stale_cache(path: pathlib.Path, config_arg: str) -> None:
  """The samples an earlier run with 3 sampler steps wrote (here: noise), with its settings."""
  # pylint: disable=import-outside-toplevel
  from common.training import trainer
  from common.eval.reference import write_arrays
  from configs.base import load_config
  config = load_config(config_arg)
  config.sample.num_steps = 3
  noise = np.random.default_rng(2).integers(0, 256, (NUM_SAMPLES, 8, 8, 1), dtype=np.uint8)
  write_arrays(str(path), {"images": noise},
               settings=trainer._samples_settings(config, STEP, NUM_SAMPLES))  # pylint: disable=protected-access


def _truncated_cache(path: pathlib.Path, config_arg: str) -> None:
  """Half a samples file, as a run killed while writing it left it (before writes were atomic)."""
  buf = io.BytesIO()
  np.savez(buf, images=np.zeros((NUM_SAMPLES, 8, 8, 1), np.uint8))
  path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])


def _recomputed(d: pathlib.Path) -> None:
  """The cache now holds this run's samples and settings, and step_N.json its scores."""
  wd = d / "workdir"
  with np.load(_samples_path(wd)) as z:
    images, settings = z["images"], json.loads(str(z["cache_settings"]))
  assert images.shape[0] == NUM_SAMPLES and settings["sample"]["num_steps"] == 8, settings
  assert images.any(axis=(1, 2, 3)).all()  # sampled digits, not the stale noise or zeros
  scores = json.loads((wd / "eval" / f"step_{STEP:07d}.json").read_text())
  assert scores["num_samples"] == NUM_SAMPLES and np.isfinite(scores["fid"]), scores


CACHE_CASES = [
    Case(name="eval/stale-samples-cache", build=_eval_workdir(_stale_cache),
         message=r"warning: the cached evaluation samples .* were made with other settings "
                 r"\(sample\.num_steps: 3 -> 8\); recomputing them",
         exit_code=0, kind="handled", needs=("workdir",), check=_recomputed, max_rss_mib=2500),
    Case(name="eval/truncated-samples-cache", build=_eval_workdir(_truncated_cache),
         message=r"warning: the cached evaluation samples .* cannot be read .*; recomputing them",
         exit_code=0, kind="handled", needs=("workdir",), check=_recomputed, max_rss_mib=2500),
]


# ----------------------------------------------------------------------------------------------
# Prompt files


def _latin1_prompts(d: pathlib.Path) -> pathlib.Path:
  path = d / "prompts.txt"
  path.write_bytes("a caf\u00e9\nune cr\u00e8me\n".encode("latin-1"))
  return path


def _encode_text(d: pathlib.Path, pristine) -> list[str]:
  return ["launch/encode.py", "text", "--text_encoder=minilm", f"--prompts={_latin1_prompts(d)}",
          f"--output={d / 'out.npz'}"]


def _sample_prompts(d: pathlib.Path, pristine) -> list[str]:
  wd = d / "workdir"
  shutil.copytree(pristine.workdir, wd, ignore=shutil.ignore_patterns("export"))
  return ["launch/main.py", f"--config={pristine.config}", f"--workdir={wd}", "--mode=sample",
          f"--prompts={_latin1_prompts(d)}"]


_NOT_UTF8 = r"--prompts=.*prompts\.txt is not UTF-8 text: byte 0xe9 at offset 5 \(line 1\)"

PROMPT_CASES = [
    Case(name="eval/prompts-not-utf8-encode", build=_encode_text, message=_NOT_UTF8),
    Case(name="eval/prompts-not-utf8-sample", build=_sample_prompts, message=_NOT_UTF8,
         needs=("workdir",)),
]


# ----------------------------------------------------------------------------------------------
# Images through launch/precompute.py


def _precompute(name: str, data: bytes):
  def build(d: pathlib.Path, pristine) -> list[str]:
    root = d / "images"
    root.mkdir()
    (root / "a.png").write_bytes(png())  # an intact 16 x 16 PNG first
    (root / name).write_bytes(data)
    for stem in ("a", pathlib.Path(name).stem):
      (root / f"{stem}.txt").write_text("a caption\n")
    return ["launch/precompute.py", "--source=image_folder", f"--path={root}", "--image_size=16",
            "--autoencoder=tests/fixtures/vae/sd", "--text_encoder=minilm",
            f"--output={d / 'out'}"]
  return build


_DAMAGED = r"cannot read image .*/b\.{}: the file is damaged or not a valid image"
IMAGE_CASES = [
    Case(name="eval/png-decompression-bomb", build=_precompute("b.png", bad_images()["bomb"]),
         message=r"image .*/b\.png is too large to decode \(.*10000000000 pixels.*\); at most "
                 r"67108864 pixels are decoded"),
    Case(name="eval/png-truncated", build=_precompute("b.png", bad_images()["truncated"]),
         message=_DAMAGED.format("png")),
    Case(name="eval/png-not-an-image", build=_precompute("b.png", bad_images()["not-an-image"]),
         message=r"cannot read image .*/b\.png: not an image file PIL can identify"),
    Case(name="eval/png-bad-crc", build=_precompute("b.png", bad_images()["bad-crc"]),
         message=_DAMAGED.format("png") + r" \(SyntaxError: broken PNG file"),
    Case(name="eval/jpeg-truncated", build=_precompute("b.jpg", truncated_jpeg()),
         message=_DAMAGED.format("jpg")),
]

CASES = REFERENCE_CASES + CACHE_CASES + PROMPT_CASES + IMAGE_CASES
