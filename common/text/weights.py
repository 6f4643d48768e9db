"""Reading text-encoder weights from a user's file as float32 numpy arrays (no torch needed).

`.safetensors` files are read with the `safetensors` package (only the requested tensors, so the text
tower of a 4 GB CLIP checkpoint is read without its vision tower). PyTorch pickles (`.bin`, `.pt`,
`.pth`) go through the project's safe reader `common.weights.torch_weights.load_torch_weights`, which never
unpickles arbitrary objects.
"""

from collections.abc import Callable
import os

import numpy as np
from safetensors import numpy as st_numpy
from safetensors import safe_open

from common.errors import CheckpointError, DataNotFoundError
from common.paths import as_path, is_remote
from common.weights.torch_weights import load_torch_weights

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def read_weights(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
  """Reads the tensors of a weights file whose names pass `keep` (all when None).

  Args:
    path: a `.safetensors` file or a PyTorch state dict (`.bin`, `.pt`, `.pth`), local or gs://.
    keep: predicate on tensor names; only those tensors are returned (and, for safetensors, read).

  Returns:
    {name: float32 array} in the file's own layout (PyTorch Linear weights are [out, in]).
  """
  path = os.fspath(path)
  if not as_path(path).is_file():
    raise DataNotFoundError(f"Weights file {path} does not exist.")
  keep = keep or (lambda _: True)
  if path.endswith(".safetensors"):
    try:
      if is_remote(path):  # safe_open memory-maps a local file; an object is read whole
        tensors = st_numpy.load(as_path(path).read_bytes())
        return {k: np.asarray(v, np.float32) for k, v in tensors.items() if keep(k)}
      with safe_open(path, framework="numpy") as f:
        return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys() if keep(k)}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CheckpointError(f"Cannot read {path} as safetensors: {e}") from e
  if path.endswith(_TORCH_SUFFIXES):
    return {k: np.asarray(v, np.float32) for k, v in load_torch_weights(path).items() if keep(k)}
  raise CheckpointError(f"Unknown weights format {path}: expected .safetensors, .bin, .pt or .pth.")
