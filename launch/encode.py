"""Encodes images with an autoencoder, or prompts with a text encoder, into an npz file.

    python launch/encode.py images --autoencoder=DIR --input=X.npz --output=Y.npz
        X.npz holds `images` (uint8 [N, H, W, C]); Y.npz gets `latents` (float32 [N, h, w, c], scaled
        as the diffusion model sees them) and `reconstructions` (uint8 [N, H, W, C], decoded from the
        posterior mean). Prints the reconstruction PSNR: a check that a VAE loads and works.
    python launch/encode.py text --text_encoder=minilm|PATH --prompts=FILE --output=Y.npz
        FILE holds one prompt a line; Y.npz gets `tokens` (float32 [N, T, D]), `mask` (int32 [N, T],
        1 = real token), `pooled` (float32 [N, D]) and `prompts`.

Errors a user can fix are printed on one line and exit with status 1.
"""

import os
import sys

from etils import epath

sys.path.insert(0, os.fspath(epath.Path(__file__).absolute().parent.parent))  # the repository root

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from common.autoencoders import load_autoencoder  # noqa: E402
from common.data.captions import read_prompts  # noqa: E402
from common.errors import DataNotFoundError, ShapeError, UserError  # noqa: E402
from common.images import to_uint8  # noqa: E402
from common.paths import as_path  # noqa: E402
from common.text import load_text_encoder  # noqa: E402


COMMANDS = ("images", "text")


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB between two uint8 arrays (peak 255); inf when they are equal."""
  mse = float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))
  return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def encode_images(autoencoder_spec: str, input_path: str, output_path: str, *, batch_size: int = 64,
                  sample: bool = False) -> dict:
  """Encodes and reconstructs X.npz's `images`; writes `latents` and `reconstructions`.

  Returns:
    {"num", "image_shape", "latent_shape", "psnr_db"}.
  """
  if not as_path(input_path).is_file():
    raise DataNotFoundError(f"--input={input_path} does not exist (an npz file with `images`, uint8 "
                            "[N, H, W, C])")
  try:
    with as_path(input_path).open("rb") as f, np.load(f) as data:
      if "images" not in data.files:
        raise ShapeError(f"{input_path} has no `images` array (it holds {data.files})")
      images = data["images"]
  except (OSError, ValueError) as e:
    raise DataNotFoundError(f"cannot read {input_path} as npz: {e}") from e
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
    raise ShapeError(f"{input_path}: `images` must be uint8 [N, H, W, C] with N > 0, got "
                     f"{images.dtype} {images.shape}")
  ae = load_autoencoder(autoencoder_spec)
  latent_shape = ae.latent_shape(images.shape[1:])
  latents, recons = [], []
  for i in range(0, images.shape[0], batch_size):
    x = images[i:i + batch_size].astype(np.float32) / 127.5 - 1.0
    key = jax.random.fold_in(jax.random.key(0), i) if sample else None
    z = ae.encode(x, key)
    mean = z if not sample else ae.encode(x)
    latents.append(np.asarray(z, np.float32))
    recons.append(to_uint8(np.asarray(ae.decode(mean))))
  latents, recons = np.concatenate(latents), np.concatenate(recons)
  as_path(output_path).parent.mkdir(parents=True, exist_ok=True)
  with as_path(output_path).open("wb") as f:
    np.savez(f, latents=latents, reconstructions=recons)
  return {"num": images.shape[0], "image_shape": images.shape[1:], "latent_shape": latent_shape,
          "psnr_db": psnr_uint8(images, recons)}


def encode_text(text_encoder_spec: str, prompts_path: str, output_path: str, *,
                batch_size: int = 64) -> dict:
  """Encodes the prompts of a file; writes `tokens`, `mask`, `pooled` and `prompts`.

  Returns:
    {"num", "tokens_shape", "max_length", "width"}.
  """
  prompts = read_prompts(prompts_path, f"--prompts={prompts_path}")
  enc = load_text_encoder(text_encoder_spec)
  parts = [enc.encode(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
  out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in ("tokens", "mask", "pooled")}
  n = len(prompts)
  if (out["tokens"].ndim != 3 or out["tokens"].shape[0] != n or out["mask"].shape != out["tokens"].shape[:2]
      or out["pooled"].shape != (n, out["tokens"].shape[2])):
    raise ShapeError(f"text encoder {text_encoder_spec!r} returned tokens {out['tokens'].shape}, "
                     f"mask {out['mask'].shape}, pooled {out['pooled'].shape} for {n} prompts")
  as_path(output_path).parent.mkdir(parents=True, exist_ok=True)
  with as_path(output_path).open("wb") as f:
    np.savez(f, tokens=out["tokens"].astype(np.float32), mask=out["mask"].astype(np.int32),
             pooled=out["pooled"].astype(np.float32), prompts=np.asarray(prompts))
  return {"num": n, "tokens_shape": out["tokens"].shape, "max_length": int(enc.max_length),
          "width": int(enc.width)}


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(1)


def _require(**values) -> None:
  missing = [f"--{k}" for k, v in values.items() if not v]
  if missing:
    _fail(f"{sys.argv[1] if len(sys.argv) > 1 else ''} needs {', '.join(missing)}")


def _run(argv) -> None:
  logging.set_verbosity(logging.WARNING)
  if len(argv) != 2 or argv[1] not in COMMANDS:
    _fail(f"usage: launch/encode.py {{{'|'.join(COMMANDS)}}} [flags]; got {argv[1:]}")
  try:
    if argv[1] == "images":
      _require(autoencoder=_AUTOENCODER.value, input=_INPUT.value, output=_OUTPUT.value)
      r = encode_images(_AUTOENCODER.value, _INPUT.value, _OUTPUT.value, batch_size=_BATCH.value,
                        sample=_SAMPLE.value)
      print(f"encoded {r['num']} images {'x'.join(map(str, r['image_shape']))} -> latents "
            f"{'x'.join(map(str, r['latent_shape']))}; reconstruction PSNR {r['psnr_db']:.2f} dB; "
            f"wrote {as_path(_OUTPUT.value)}", flush=True)
    else:
      _require(text_encoder=_TEXT_ENCODER.value, prompts=_PROMPTS.value, output=_OUTPUT.value)
      r = encode_text(_TEXT_ENCODER.value, _PROMPTS.value, _OUTPUT.value, batch_size=_BATCH.value)
      print(f"encoded {r['num']} prompts -> tokens {'x'.join(map(str, r['tokens_shape']))} "
            f"(max_length {r['max_length']}, width {r['width']}); wrote "
            f"{as_path(_OUTPUT.value)}", flush=True)
  except UserError as e:
    _fail(str(e))


if __name__ == "__main__":
  # Flags are defined only when this file runs as a program, so importing its functions (tests,
  # other tools) claims no flag names that other programs in the same process define.
  _AUTOENCODER = flags.DEFINE_string("autoencoder", None, "images: a diffusers AutoencoderKL folder or "
                                     "one written by launch/export_autoencoder.py.")
  _INPUT = flags.DEFINE_string("input", None, "images: an npz file with `images` (uint8 [N, H, W, C]).")
  _TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "text: 'minilm' or a local path.")
  _PROMPTS = flags.DEFINE_string("prompts", None, "text: a text file with one prompt a line.")
  _OUTPUT = flags.DEFINE_string("output", None, "The npz file to write.")
  _BATCH = flags.DEFINE_integer("batch_size", 64, "Images or prompts per batch.")
  _SAMPLE = flags.DEFINE_bool("sample", False, "images: encode a posterior sample (seed 0) instead of "
                              "the posterior mean.")
  app.run(_run)
