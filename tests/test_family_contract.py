"""The extension contract (docs/DESIGN.md, "Add a family"; common/training/contracts.py): a family defined
only in this test trains and samples through the real trainer, and a network that lacks a piece of
the contract is refused when it is built, with one ConfigError naming what is missing.
"""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common.training import trainer
from common.errors import ConfigError
from configs.base import base_config


class _Body(nnx.Module):
  """A per-pixel MLP of x conditioned on (noise_cond, class label): the layers of the toy networks.

  Args:
    image_size, channels: x is [B, image_size, image_size, channels].
    num_classes: labels 0..num_classes-1; label num_classes is the null class (CFG).
    width: hidden features.
  """

  def __init__(self, *, image_size: int = 8, channels: int = 1, num_classes: int = 3,
               width: int = 16, rngs: nnx.Rngs):
    self.image_size, self.channels, self.null_label = image_size, channels, num_classes
    self.x_in = nnx.Linear(channels, width, rngs=rngs)
    self.t_in = nnx.Linear(1, width, rngs=rngs)
    self.label = nnx.Embed(num_classes + 1, width, rngs=rngs)
    self.out = nnx.Linear(width, channels, rngs=rngs)

  def example_inputs(self, batch_size: int):
    """(x [B, S, S, C] float32, {"label": int32 [B]}) ShapeDtypeStructs."""
    s, c = self.image_size, self.channels
    return (jax.ShapeDtypeStruct((batch_size, s, s, c), jnp.float32),
            {"label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)})

  def forward(self, x, noise_cond, cond):
    """x [B, S, S, C], noise_cond [B], cond {"label": [B]} -> F [B, S, S, C] float32."""
    c = self.t_in(noise_cond[:, None] / 10.0) + self.label(cond["label"])
    return self.out(jax.nn.silu(self.x_in(x) + c[:, None, None, :]))


class ToyDenoiser(_Body):
  """A complete `common.training.contracts.Denoiser` (and `ClassConditional`)."""

  def __init__(self, *, num_classes: int = 3, **kwargs):
    super().__init__(num_classes=num_classes, **kwargs)
    self.num_classes = num_classes

  def __call__(self, x, noise_cond, cond, *, dropout_key=None):
    del dropout_key  # no dropout
    return self.forward(x, noise_cond, cond)

  def null_cond(self, cond):
    return {"label": jnp.full_like(cond["label"], self.null_label)}


class WithoutNullCondOrDropoutKey(_Body):
  """Lacks `null_cond`, and its forward takes no `dropout_key`."""

  def __call__(self, x, noise_cond, cond):
    return self.forward(x, noise_cond, cond)


class WithoutNumClasses(_Body):
  """A denoiser declaring cond["label"] without saying how many classes there are."""

  def __call__(self, x, noise_cond, cond, *, dropout_key=None):
    return self.forward(x, noise_cond, cond)

  def null_cond(self, cond):
    return {"label": jnp.full_like(cond["label"], self.null_label)}


def toy_config(network: type) -> ml_collections.ConfigDict:
  """What a family's config file holds (configs/<family>_<variant>.py), at toy size."""
  c = base_config()
  c.model = ml_collections.ConfigDict({"name": f"{network.__module__}.{network.__qualname__}",
                                       "image_size": 8, "channels": 1, "num_classes": 3})
  c.diffusion = ml_collections.ConfigDict({"name": "vp", "schedule": {"name": "cosine"},
                                           "prediction": "eps", "cond_drop_prob": 0.1})
  c.data = ml_collections.ConfigDict({"name": "synthetic", "image_size": 8, "channels": 1,
                                      "num_classes": 3, "num_examples": 64})
  c.train.update({"steps": 3, "batch_size": 8, "log_every": 1, "checkpoint_every": 3,
                  "num_grid_samples": 4, "tensorboard": False})
  c.sample.update({"num_samples": 6, "batch_size": 6, "num_steps": 4})
  return c


def test_a_family_defined_here_trains_and_samples(tmp_path):
  c = toy_config(ToyDenoiser)
  result = trainer.train(c, str(tmp_path))
  assert result["step"] == 3 and np.isfinite(result["loss"])
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
  assert os.path.exists(tmp_path / "samples" / "step_0000003.png")
  with np.load(trainer.sample(c, str(tmp_path))) as out:
    assert out["images"].shape == (6, 8, 8, 1) and out["images"].dtype == np.uint8
    np.testing.assert_array_equal(out["labels"], [0, 1, 2, 0, 1, 2])  # its num_classes
  assert "ToyDenoiser (8x8x1)" in trainer.summary(c)  # its forward, called as the contract says


@pytest.mark.parametrize("network, missing", [
    (WithoutNullCondOrDropoutKey,
     "__call__ cannot be called as __call__(x, noise_cond, cond, *, dropout_key); no null_cond"),
    (WithoutNumClasses, "no num_classes"),
])
def test_a_missing_piece_is_one_error_naming_it_before_training(tmp_path, network, missing):
  with pytest.raises(ConfigError) as e:
    trainer.train(toy_config(network), str(tmp_path))
  message = str(e.value)
  assert missing in message and f"{network.__qualname__}" in message, message
  assert "\n" not in message
  assert not list(tmp_path.glob("checkpoints/*"))
