"""Shared test fixtures."""

import os
import sys

import numpy as np
import pytest

# The suite runs on the CPU. With the `compile` extra installed (libtpu, the CUDA plugin) jax would
# otherwise try those platforms first on a machine that has neither; compile tests name their
# target devices explicitly (tests/test_compile_targets.py). Set JAX_PLATFORMS to run the
# accelerator-marked tests on a GPU or TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _fake_inception(x):
  """A stand-in for the FID Inception (whose 299x299 forward takes minutes here): uint8
  [B, H, W, C] -> a fixed random projection of the pixels as `pool` [B, 12] and `spatial` [B, 6]."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  flat = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
  w = np.random.default_rng(flat.shape[1]).standard_normal((flat.shape[1], 12))
  f = flat @ jnp.asarray(w, jnp.float32)
  return {"pool": f, "spatial": f[:, :6] * 2.0}


@pytest.fixture
def inception_calls(monkeypatch):
  """Replaces the FID Inception by `_fake_inception`; returns the list of (images, batch_size) of
  every feature extraction."""
  from common.eval import features  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(features, "_NETWORKS", {})
  monkeypatch.setattr(features, "_REFERENCES", {})
  monkeypatch.setattr(features, "load_network", lambda path=None: _fake_inception)
  original = features.extract_features

  def counted(net_fn, images, *, batch_size, **kw):
    calls.append((len(images), batch_size))
    return original(net_fn, images, batch_size=batch_size, **kw)

  monkeypatch.setattr(features, "extract_features", counted)
  return calls
