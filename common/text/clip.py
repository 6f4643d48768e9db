"""OpenCLIP text towers in NNX (Radford et al. 2021, arXiv:2103.00020, Sec. 2.4; Cherti et al. 2023,
arXiv:2212.07143), loaded from a user's OpenCLIP folder.

The network matches open_clip's `TextTransformer` / the text half of `CLIP` (mlfoundations/open_clip
`src/open_clip/transformer.py`, `src/open_clip/model.py`): token + positional embedding, pre-LN
residual attention blocks (x += Attn(LN1(x)) with the causal mask; x += MLP(LN2(x)), GELU or
QuickGELU), `ln_final`; the CLIP text embedding is the `ln_final` state at the EOT token (the
largest token id, open_clip's `argmax` pooling) times `text_projection`.

As micro_diffusion precomputes captions (SonyResearch/micro_diffusion
`micro_diffusion/models/utils.py`, `openclip_text_encoder`), `tokens` are the `ln_final` outputs of
all `context_length` (77) positions, padding included; MicroDiT attends to all of them regardless of
the mask. `mask` is 1 for the real tokens, SOT and EOT included.

A folder holds `open_clip_config.json` (as on the model's Hugging Face hub page: `{"model_cfg":
{...}}`), `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, and `tokenizer.json`
(the Hugging Face CLIP tokenizer: byte-level BPE, `<|startoftext|>`, `<|endoftext|>`). Tested
configurations: ViT-H-14 (SD2's OpenCLIP-H, laion2b: GELU) and ViT-H-14-378-quickgelu (DFN5B, whose
hub config sets `quick_gelu: true`): width 1024, 24 layers, 16 heads, 77 tokens.
"""

import dataclasses
import html
import json
import os
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from common.weights import convert
from common.errors import ConfigError, DataNotFoundError
from common.paths import as_path
from common.text.encoder import LayerNorm, TextEncoder, dense, load_state, param_names
from common.text.encoder import self_attention
from common.text.encoder import warn_truncated
from common.text.weights import read_weights

Array = jax.Array

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")

# open_clip `CLIPTextCfg` fields this network implements only at these (default) values.
_FIXED_TEXT_CFG = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "pool_type": "argmax",
    "proj_type": "linear", "proj_bias": False, "pad_id": 0, "final_ln_after_pool": False,
    "output_tokens": False, "text_arch": "clip", "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "hf_model_name": None, "hf_tokenizer_name": None,
    "act_kwargs": None, "variable_text": False,
}
# Fields that only concern tokenization or training and do not change the network.
_IGNORED_TEXT_CFG = ("tokenizer_kwargs", "tokenizer_mode", "tokenizer_type", "bos_id", "eos_id",
                     "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "tiktoken_name")


@dataclasses.dataclass(frozen=True)
class OpenClipTextConfig:
  """An OpenCLIP text tower (open_clip `CLIPTextCfg`, `embed_dim`, `quick_gelu`)."""
  embed_dim: int = 512
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which open_clip uses

  @classmethod
  def from_json(cls, path: str) -> "OpenClipTextConfig":
    """Reads an `open_clip_config.json` (hub format `{"model_cfg": ...}` or a bare model config)."""
    with as_path(path).open(encoding="utf-8") as f:
      cfg = json.load(f)
    cfg = cfg.get("model_cfg", cfg)
    if "text_cfg" not in cfg or "embed_dim" not in cfg:
      raise ConfigError(f"{path} has no text_cfg/embed_dim: not an OpenCLIP model config.")
    text = dict(cfg["text_cfg"])
    for key, default in _FIXED_TEXT_CFG.items():
      if text.pop(key, default) != default:
        raise ConfigError(f"{path}: text_cfg.{key} = {cfg['text_cfg'][key]!r} is not supported "
                          f"(only {default!r}).")
    for key in _IGNORED_TEXT_CFG:
      text.pop(key, None)
    eps = (text.pop("norm_kwargs", None) or {}).pop("eps", 1e-5)
    names = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
    unknown = sorted(set(text) - names)
    if unknown:
      raise ConfigError(f"{path}: text_cfg keys {unknown} are not supported.")
    return cls(embed_dim=cfg["embed_dim"], quick_gelu=bool(cfg.get("quick_gelu", False)),
               layer_norm_eps=eps, **text)


class ResidualAttentionBlock(nnx.Module):
  """open_clip's pre-LN block: x += Attn(LN1(x)) (causal); x += c_proj(act(c_fc(LN2(x))))."""

  def __init__(self, cfg: OpenClipTextConfig, *, rngs: nnx.Rngs):
    w, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    self.ln_1 = LayerNorm(w, cfg.layer_norm_eps, rngs=rngs)
    self.in_proj = dense(w, 3 * w, rngs)
    self.out_proj = dense(w, w, rngs)
    self.ln_2 = LayerNorm(w, cfg.layer_norm_eps, rngs=rngs)
    self.c_fc = dense(w, hidden, rngs)
    self.c_proj = dense(hidden, w, rngs)
    self.heads = cfg.heads
    self.quick_gelu = cfg.quick_gelu

  def __call__(self, x: Array) -> Array:
    """x: [B, T, W] -> [B, T, W]."""
    q, k, v = jnp.split(self.in_proj(self.ln_1(x)), 3, axis=-1)
    x = x + self.out_proj(self_attention(q, k, v, self.heads, causal=True))
    h = self.c_fc(self.ln_2(x))
    # QuickGELU x * sigmoid(1.702 x) (open_clip `QuickGELU`, OpenAI's CLIP), else exact GELU (nn.GELU).
    h = h * jax.nn.sigmoid(1.702 * h) if self.quick_gelu else jax.nn.gelu(h, approximate=False)
    return x + self.c_proj(h)


class OpenClipText(nnx.Module):
  """The OpenCLIP text tower: ids [B, T] -> (ln_final states [B, T, W], text embedding [B, E])."""

  def __init__(self, cfg: OpenClipTextConfig, *, rngs: nnx.Rngs):
    if cfg.width % cfg.heads:
      raise ConfigError(f"OpenCLIP text width {cfg.width} is not divisible by {cfg.heads} heads.")
    normal = lambda shape: nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, jnp.float32))
    self.token_embedding = normal((cfg.vocab_size, cfg.width))
    self.positional_embedding = normal((cfg.context_length, cfg.width))
    self.blocks = nnx.List([ResidualAttentionBlock(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.ln_final = LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
    self.text_projection = normal((cfg.width, cfg.embed_dim))

  def __call__(self, ids: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """ids: int [B, T], T <= context_length; mask is not used (the attention is causal only).

    Returns (ln_final outputs float32 [B, T, W] of every position, pooled [B, E]: the ln_final
    state at each row's largest token id (EOT) times text_projection).
    """
    del mask
    t = ids.shape[1]
    x = self.token_embedding[...][ids] + self.positional_embedding[...][:t][None]
    for block in self.blocks:
      x = block(x)
    x = self.ln_final(x)
    eot = jnp.argmax(ids, axis=-1)
    pooled = x[jnp.arange(x.shape[0]), eot] @ self.text_projection[...]
    return x, pooled


# The names of the text tower's tensors in an open_clip state dict (after a "text." prefix).
_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                  "text_projection")

# OpenClipText's layer -> open_clip's text tower module (Linear weights [out, in] become kernels;
# `attn.in_proj_weight` [3W, W], q, k, v stacked, a kernel [W, 3W]).
TABLE = convert.Table(
    rules=(
        convert.Rule(r"token_embedding", "token_embedding.weight", convert.tensor),
        convert.Rule(r"positional_embedding|text_projection", r"\g<0>", convert.tensor),
        convert.Rule(r"ln_final", "ln_final", convert.TORCH),
        convert.Rule(r"blocks\.(\d+)\.(ln_[12])", r"transformer.resblocks.\1.\2", convert.TORCH),
        convert.Rule(r"blocks\.(\d+)\.in_proj", r"transformer.resblocks.\1.attn",
                     convert.fields(kernel="in_proj_weight", bias="in_proj_bias")),
        convert.Rule(r"blocks\.(\d+)\.out_proj", r"transformer.resblocks.\1.attn.out_proj",
                     convert.TORCH),
        convert.Rule(r"blocks\.(\d+)\.(c_fc|c_proj)", r"transformer.resblocks.\1.mlp.\2",
                     convert.TORCH),
    ),
    # A whole `CustomTextCLIP` nests the text tower under "text."; the image tower is not ours.
    rename=lambda name: name.removeprefix("text."),
    ignore="(?!" + "|".join(map(re.escape, _TEXT_PREFIXES)) + ").*",
    hint="not an OpenCLIP model with a native text tower?")


def openclip_params(weights: dict[str, np.ndarray], num_layers: int,
                    source: str = "the OpenCLIP weights file") -> dict[str, Any]:
  """Maps an open_clip state dict (a whole `CLIP`, or a text tower under `text.`) to
  `OpenClipText`'s params (`TABLE`). Shapes are checked by `load_state`."""
  names = param_names(lambda: OpenClipText(OpenClipTextConfig(layers=num_layers),
                                           rngs=nnx.Rngs(params=0)))
  return convert.apply(TABLE, weights, names, source)


def _is_text_key(name: str) -> bool:
  return name.removeprefix("text.").startswith(_TEXT_PREFIXES)


class ClipTokenizer:
  """open_clip's tokenization through a Hugging Face CLIP `tokenizer.json` (`tokenizers`).

  As open_clip's `SimpleTokenizer` (clean 'lower'): HTML entities unescaped, whitespace collapsed,
  lower-cased, byte-level BPE, then [SOT] tokens [EOT]; a prompt longer than `max_length` tokens is
  cut and its last token set to EOT (with a warning); the rest is padded with 0. open_clip also runs
  `ftfy.fix_text` (repairs mis-decoded Unicode); we do not, so only such broken text tokenizes
  differently. The mask is 1 up to and including EOT.
  """

  def __init__(self, path: str, max_length: int):
    self.tok = Tokenizer.from_str(as_path(path).read_text(encoding="utf-8"))
    self.tok.no_truncation()
    self.tok.no_padding()
    ids = {}
    for role, names in (("sot", ("<|startoftext|>", "<start_of_text>")),
                        ("eot", ("<|endoftext|>", "<end_of_text>"))):
      ids[role] = next((i for i in map(self.tok.token_to_id, names) if i is not None), None)
      if ids[role] is None:
        raise ConfigError(f"{path} has no {names[0]} token: not a CLIP tokenizer.")
    self.sot, self.eot = ids["sot"], ids["eot"]
    self.vocab_size = self.tok.get_vocab_size()
    self.max_length = max_length

  def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    cleaned = [" ".join(html.unescape(html.unescape(p)).split()).lower() for p in prompts]
    enc = self.tok.encode_batch(cleaned, add_special_tokens=False) if prompts else []
    n, t = len(enc), self.max_length
    ids, mask = np.zeros((n, t), np.int32), np.zeros((n, t), np.int32)
    truncated = 0
    for i, e in enumerate(enc):
      row = [self.sot] + list(e.ids) + [self.eot]
      if len(row) > t:
        row = row[:t]
        row[-1] = self.eot
        truncated += 1
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    warn_truncated(truncated, n, t, "CLIP tokenizer")
    return ids, mask


def find_weights(folder: str) -> str | None:
  """The OpenCLIP weights file in `folder` (safetensors first, as open_clip), or None."""
  for name in WEIGHT_NAMES:
    if (as_path(folder) / name).is_file():
      return os.fspath(as_path(folder) / name)
  return None


def is_openclip_folder(folder: str) -> bool:
  return (as_path(folder) / CONFIG_NAME).is_file() or any(as_path(folder).glob("open_clip_*"))


def load_openclip_folder(folder: str, *, weights_path: str | None = None,
                         max_length: int | None = None, batch_size: int = 64,
                         name: str | None = None) -> TextEncoder:
  """A `TextEncoder` from an OpenCLIP folder (see the module docstring for its files).

  Args:
    folder: holds open_clip_config.json, the weights and tokenizer.json.
    weights_path: a weights file to use instead of the folder's `open_clip_*` one.
    max_length: T; the model's context_length (77) by default, as micro_diffusion. A smaller T
      gives the same states for the kept positions (the attention is causal).
    batch_size: prompts per jitted forward.

  Returns:
    A TextEncoder with `tokens` = ln_final outputs [N, T, width], `mask` [N, T] and `pooled` = the
    projected EOT feature [N, embed_dim] (the CLIP text embedding, not normalised).
  """
  cfg_path = as_path(folder) / CONFIG_NAME
  if not cfg_path.is_file():
    raise DataNotFoundError(
        f"OpenCLIP folder {folder} lacks {CONFIG_NAME}: put the model's {CONFIG_NAME} there (from "
        "its Hugging Face hub page, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K).")
  weights_path = weights_path or find_weights(folder)
  if weights_path is None:
    raise DataNotFoundError(f"OpenCLIP folder {folder} has no weights: put "
                            f"open_clip_model.safetensors or open_clip_pytorch_model.bin there.")
  tok_path = as_path(folder) / "tokenizer.json"
  if not tok_path.is_file():
    raise DataNotFoundError(
        f"OpenCLIP folder {folder} lacks tokenizer.json: put a Hugging Face CLIP tokenizer.json "
        "there (e.g. from laion/CLIP-ViT-H-14-laion2B-s32B-b79K; all OpenCLIP ViT models share it).")
  cfg = OpenClipTextConfig.from_json(cfg_path)
  max_length = max_length or cfg.context_length
  if not 2 <= max_length <= cfg.context_length:
    raise ConfigError(f"max_length {max_length} must be in [2, {cfg.context_length}].")
  tokenizer = ClipTokenizer(tok_path, max_length)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"{tok_path} has {tokenizer.vocab_size} tokens, the model only "
                      f"{cfg.vocab_size}: wrong tokenizer.json for this model.")
  weights = read_weights(weights_path, keep=_is_text_key)
  params = openclip_params(weights, cfg.layers, weights_path)
  abstract = nnx.eval_shape(lambda: OpenClipText(cfg, rngs=nnx.Rngs(params=0)))
  model = load_state(abstract, params, weights_path)
  return TextEncoder(model, tokenizer, width=cfg.width, pooled_width=cfg.embed_dim,
                     name=name or folder, batch_size=batch_size)
