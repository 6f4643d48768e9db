"""BERT encoders in NNX (Devlin et al. 2018, arXiv:1810.04805, Sec. 3) loaded from Hugging Face folders.

The network matches transformers' `BertModel` (transformers `models/bert/modeling_bert.py`): word +
absolute position + token-type embeddings, LayerNorm; post-LN encoder layers (self-attention with the
padding mask on the keys, residual, LayerNorm; GELU MLP, residual, LayerNorm); the output is the last
hidden state. `BertSentenceEncoder` adds the sentence-transformers pooling (Reimers & Gurevych 2019,
arXiv:1908.10084, Sec. 3: mean over real tokens) and the optional L2 normalisation, as listed in a
sentence-transformers folder's `modules.json`.

A folder holds `config.json` (`model_type: bert`), `model.safetensors` (or `pytorch_model.bin`) and
`tokenizer.json` (the `tokenizers` format, with its normaliser, e.g. lower-casing, as shipped).
"""

import dataclasses
import json
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

# transformers' ACT2FN names -> functions. "gelu" is the exact (erf) GELU, as BERT uses.
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT `config.json` that the network uses."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    """Reads `config.json`; raises ConfigError for a model this network does not implement."""
    with as_path(path).open(encoding="utf-8") as f:
      cfg = json.load(f)
    if cfg.get("model_type") != "bert":
      raise ConfigError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'bert'.")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
      raise ConfigError(f"{path}: position_embedding_type {cfg['position_embedding_type']!r} is not "
                        "supported (only 'absolute').")
    if cfg.get("hidden_act", "gelu") not in _ACTIVATIONS:
      raise ConfigError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported "
                        f"({sorted(_ACTIVATIONS)}).")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


class BertLayer(nnx.Module):
  """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + W2 act(W1 x))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    h, eps = cfg.hidden_size, cfg.layer_norm_eps
    self.query, self.key, self.value = (dense(h, h, rngs) for _ in range(3))
    self.attn_out = dense(h, h, rngs)
    self.attn_norm = LayerNorm(h, eps, rngs=rngs)
    self.mlp_in = dense(h, cfg.intermediate_size, rngs)
    self.mlp_out = dense(cfg.intermediate_size, h, rngs)
    self.out_norm = LayerNorm(h, eps, rngs=rngs)
    self.num_heads = cfg.num_attention_heads
    self.act = cfg.hidden_act

  def __call__(self, x: Array, mask: Array) -> Array:
    """x: [B, T, H]; mask: [B, T] (1 = real token, attended as a key) -> [B, T, H]."""
    a = self_attention(self.query(x), self.key(x), self.value(x), self.num_heads, key_mask=mask)
    x = self.attn_norm(x + self.attn_out(a))
    return self.out_norm(x + self.mlp_out(_ACTIVATIONS[self.act](self.mlp_in(x))))


class BertModel(nnx.Module):
  """transformers' `BertModel` without its pooler: token ids -> last hidden state."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    if h % cfg.num_attention_heads:
      raise ConfigError(f"BERT hidden_size {h} is not divisible by {cfg.num_attention_heads} heads.")
    normal = lambda shape: nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, jnp.float32))
    self.word_embeddings = normal((cfg.vocab_size, h))
    self.position_embeddings = normal((cfg.max_position_embeddings, h))
    self.token_type_embeddings = normal((cfg.type_vocab_size, h))
    self.embed_norm = LayerNorm(h, cfg.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, ids: Array, mask: Array, token_type_ids: Array | None = None) -> Array:
    """ids, mask: int [B, T] (T <= max_position_embeddings); token types default to 0.

    Returns the last hidden state, float32 [B, T, H] (padded positions included, as transformers).
    """
    t = ids.shape[1]
    types = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
    x = (self.word_embeddings[...][ids] + self.position_embeddings[...][:t][None]
         + self.token_type_embeddings[...][types])
    x = self.embed_norm(x)
    for layer in self.layers:
      x = layer(x, mask)
    return x


class BertSentenceEncoder(nnx.Module):
  """BERT + sentence-transformers pooling: ids, mask -> (tokens [B, T, H], pooled [B, H]).

  Args:
    pooling: "mean" (mean of the real tokens' states, sentence-transformers `Pooling` with
      `pooling_mode_mean_tokens`) or "cls" (the first token's state).
    normalize: divide the pooled vector by its L2 norm (sentence-transformers `Normalize`).
  """

  def __init__(self, cfg: BertConfig, *, pooling: str = "mean", normalize: bool = False,
               rngs: nnx.Rngs):
    if pooling not in ("mean", "cls"):
      raise ConfigError(f"Unsupported pooling {pooling!r}: expected 'mean' or 'cls'.")
    self.bert = BertModel(cfg, rngs=rngs)
    self.pooling = pooling
    self.normalize = normalize

  def __call__(self, ids: Array, mask: Array) -> tuple[Array, Array]:
    tokens = self.bert(ids, mask)
    if self.pooling == "mean":
      m = mask.astype(jnp.float32)[..., None]
      pooled = (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    else:
      pooled = tokens[:, 0]
    if self.normalize:  # torch.nn.functional.normalize(p=2, eps=1e-12)
      pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return tokens, pooled


# BertModel's layer -> transformers' BertModel module (Linear weights [out, in] become kernels).
TABLE = convert.Table(
    rules=(
        convert.Rule(r"(word|position|token_type)_embeddings", r"embeddings.\1_embeddings.weight",
                     convert.tensor),
        convert.Rule(r"embed_norm", "embeddings.LayerNorm", convert.TORCH),
        convert.Rule(r"layers\.(\d+)\.(query|key|value)", r"encoder.layer.\1.attention.self.\2",
                     convert.TORCH),
        convert.Rule(r"layers\.(\d+)\.attn_out", r"encoder.layer.\1.attention.output.dense",
                     convert.TORCH),
        convert.Rule(r"layers\.(\d+)\.attn_norm", r"encoder.layer.\1.attention.output.LayerNorm",
                     convert.TORCH),
        convert.Rule(r"layers\.(\d+)\.mlp_in", r"encoder.layer.\1.intermediate.dense",
                     convert.TORCH),
        convert.Rule(r"layers\.(\d+)\.mlp_out", r"encoder.layer.\1.output.dense", convert.TORCH),
        convert.Rule(r"layers\.(\d+)\.out_norm", r"encoder.layer.\1.output.LayerNorm",
                     convert.TORCH),
    ),
    # A `BertFor...` checkpoint nests the encoder under "bert."; old ones name LayerNorm's
    # weight and bias gamma and beta.
    rename=lambda name: re.sub(r"\.gamma$", ".weight",
                               re.sub(r"\.beta$", ".bias", name.removeprefix("bert."))),
    hint="not a BERT checkpoint?")


def bert_params(weights: dict[str, np.ndarray], num_layers: int,
                source: str = "the BERT weights file") -> dict[str, Any]:
  """Maps a transformers BERT state dict (optionally prefixed `bert.`) onto `BertModel`'s params
  (`TABLE`); the caller drops the pooler and heads. Shapes are checked by `load_state`."""
  names = param_names(lambda: BertModel(
      BertConfig(vocab_size=1, hidden_size=1, num_hidden_layers=num_layers, num_attention_heads=1,
                 intermediate_size=1), rngs=nnx.Rngs(params=0)))
  return convert.apply(TABLE, weights, names, source)


class WordPieceTokenizer:
  """A BERT `tokenizer.json` (through `tokenizers`), padded and truncated to `max_length`.

  Prompts longer than `max_length` tokens (counting [CLS] and [SEP]) are truncated: the tail is cut,
  [SEP] stays last, and a warning says how many prompts were cut.
  """

  def __init__(self, path: str, max_length: int, pad_id: int):
    self.tok = Tokenizer.from_str(as_path(path).read_text(encoding="utf-8"))
    self.max_length = max_length
    pad_token = self.tok.id_to_token(pad_id) or "[PAD]"
    self.tok.enable_truncation(max_length)
    self.tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

  def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = self.tok.encode_batch(prompts) if prompts else []
    ids = np.array([e.ids for e in enc], np.int32).reshape(len(enc), self.max_length)
    mask = np.array([e.attention_mask for e in enc], np.int32).reshape(len(enc), self.max_length)
    warn_truncated(sum(bool(e.overflowing) for e in enc), len(enc), self.max_length, "BERT tokenizer")
    return ids, mask


def _sentence_pooling(folder: str) -> tuple[str, bool]:
  """(pooling, normalize) from a sentence-transformers folder's modules.json; ("mean", False) without."""
  modules_path = as_path(folder) / "modules.json"
  if not modules_path.is_file():
    return "mean", False
  with modules_path.open(encoding="utf-8") as f:
    modules = json.load(f)
  pooling, normalize = "mean", False
  for m in modules:
    kind = m.get("type", "").rsplit(".", 1)[-1]
    if kind == "Pooling":
      with (as_path(folder) / m["path"] / "config.json").open(encoding="utf-8") as f:
        pcfg = json.load(f)
      modes = [k for k, v in pcfg.items() if k.startswith("pooling_mode_") and v]
      if modes == ["pooling_mode_mean_tokens"]:
        pooling = "mean"
      elif modes == ["pooling_mode_cls_token"]:
        pooling = "cls"
      else:
        raise ConfigError(f"{folder}: pooling {modes} is not supported (mean or cls token).")
    elif kind == "Normalize":
      normalize = True
    elif kind not in ("Transformer", ""):
      raise ConfigError(f"{folder}: sentence-transformers module {m.get('type')} is not supported.")
  return pooling, normalize


def load_bert_folder(folder: str, *, max_length: int = 32, batch_size: int = 64,
                     name: str | None = None) -> TextEncoder:
  """A `TextEncoder` from a Hugging Face BERT (or sentence-transformers BERT) folder.

  Args:
    folder: holds config.json, model.safetensors (or pytorch_model.bin), tokenizer.json and,
      optionally, modules.json with its pooling folder.
    max_length: T, tokens per prompt incl. [CLS] and [SEP]; longer prompts are truncated (with a
      warning), shorter ones padded. Our captions are short: 32 by default (sentence-transformers
      uses 256 for all-MiniLM-L6-v2; outputs of the kept tokens do not depend on the padding).
    batch_size: prompts per jitted forward.

  Returns:
    A TextEncoder whose `tokens` are BERT's last hidden states [N, T, H], `mask` the attention
    mask and `pooled` the sentence embedding (mean pooling, then L2 normalisation if modules.json
    lists a Normalize module).
  """
  cfg_path = as_path(folder) / "config.json"
  tok_path = as_path(folder) / "tokenizer.json"
  weights_path = next((as_path(folder) / f for f in ("model.safetensors", "pytorch_model.bin")
                       if (as_path(folder) / f).is_file()), None)
  for path, what in ((cfg_path, "config.json"), (weights_path, "model.safetensors"),
                     (tok_path, "tokenizer.json")):
    if path is None or not path.is_file():
      raise DataNotFoundError(f"BERT folder {folder} lacks {what}: put the model's {what} there.")
  cfg = BertConfig.from_json(cfg_path)
  if not 2 <= max_length <= cfg.max_position_embeddings:
    raise ConfigError(f"max_length {max_length} must be in [2, {cfg.max_position_embeddings}].")
  pooling, normalize = _sentence_pooling(folder)
  abstract = nnx.eval_shape(lambda: BertSentenceEncoder(cfg, pooling=pooling, normalize=normalize,
                                                        rngs=nnx.Rngs(params=0)))
  weights = read_weights(weights_path, keep=lambda k: ".pooler." not in k and "position_ids" not in k
                         and not k.startswith(("cls.", "pooler.")))
  params = {"bert": bert_params(weights, cfg.num_hidden_layers, weights_path)}
  model = load_state(abstract, params, weights_path)
  tokenizer = WordPieceTokenizer(tok_path, max_length, cfg.pad_token_id)
  return TextEncoder(model, tokenizer, width=cfg.hidden_size, pooled_width=cfg.hidden_size,
                     name=name or folder, batch_size=batch_size)
