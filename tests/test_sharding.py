"""Mesh construction and logical-to-mesh axis mapping."""

import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from common.training import sharding
from common.errors import ConfigError


class FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("conv_out", "fsdp"), ("vocab", None))


def test_logical_to_mesh_maps_and_rejects_indivisible():
  mesh = FakeMesh(data=2, fsdp=4, tensor=1)
  assert sharding.logical_to_mesh_spec(P("embed", "mlp"), (8, 6), mesh, RULES) == P("fsdp", None)
  # 6 is not divisible by fsdp=4: an error naming the parameter, the dimension and the axis.
  with pytest.raises(ConfigError, match=r"blocks/0/w \(6, 8\): dimension 0 \('embed', size 6\).*"
                     r"\('fsdp',\) of size 4.*config.mesh.replicated"):
    sharding.logical_to_mesh_spec(P("embed", "mlp"), (6, 8), mesh, RULES, path="blocks/0/w")
  # ... unless the parameter is replicated on purpose
  assert sharding.logical_to_mesh_spec(P("embed", "mlp"), (6, 8), mesh, RULES,
                                       replicate=True) == P(None, None)
  assert sharding.logical_to_mesh_spec(P("vocab", "embed"), (11, 16), mesh, RULES) == P(None, "fsdp")
  # a mesh axis is used once per array
  assert sharding.logical_to_mesh_spec(P("embed", "conv_out"), (8, 8), mesh, RULES) == P("fsdp", None)
  # unknown names and missing trailing dims are replicated
  assert sharding.logical_to_mesh_spec(P("whatever"), (8, 3), mesh, RULES) == P(None, None)


def test_tensor_axis_used_when_larger_than_one():
  mesh = FakeMesh(data=1, fsdp=2, tensor=2)
  assert sharding.logical_to_mesh_spec(P("embed", "mlp"), (8, 8), mesh, RULES) == P("fsdp", "tensor")
  mesh = FakeMesh(data=4, fsdp=1, tensor=1)
  assert sharding.logical_to_mesh_spec(P("embed", "mlp"), (8, 8), mesh, RULES) == P(None, None)


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  cfg = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  mesh = sharding.make_mesh(cfg)
  assert mesh.shape["data"] == jax.device_count()
  with pytest.raises(ConfigError, match="needs"):
    sharding.make_mesh(ml_collections.ConfigDict({"data": 3, "fsdp": 2, "tensor": 1}))
  with pytest.raises(ConfigError, match="at most one"):
    sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": -1, "tensor": 1}))


def test_global_batch_on_one_device():
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
  batch = {"image": np.ones((4, 8, 8, 1), np.float32), "label": np.arange(4, dtype=np.int32)}
  g = sharding.global_batch(batch, mesh, RULES)
  np.testing.assert_array_equal(np.asarray(g["label"]), np.arange(4))
  assert g["image"].shape == (4, 8, 8, 1)
