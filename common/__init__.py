"""frugal-diffusion's shared library.

Parameters carry *logical* axis names (see docs/DESIGN.md) that `common.training.sharding` maps onto the mesh
explicitly. Flax 0.12 otherwise shards annotated variables eagerly at creation and then requires a mesh
context even for a CPU model; we turn that off once, here, so models build anywhere.
"""

from flax import nnx as _nnx

_nnx.use_eager_sharding(False)
