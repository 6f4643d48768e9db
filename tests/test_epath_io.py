"""Workdirs, checkpoints, metrics, samples and datasets may be gs:// paths.

Two proofs:

1. A static check over every module in common/ and launch/ (the trainer included): no file access
   except through `etils.epath` (no builtin `open`, `os.path`, `os.makedirs`/`listdir`/`walk`/...,
   `shutil`, `glob`, `gzip.open`, numpy's file readers and writers, PIL saving to a path). The few
   uses that are not workdir or dataset I/O are listed in ALLOWED with the reason.
2. A fake `gs://` object store (an fsspec in-memory filesystem registered for the gs protocol, which
   is what epath uses for gs:// when TensorFlow is absent): metrics, sample grids, image folders,
   Fashion-MNIST idx files, the tfds preparation check, reference batches and sample files (.npz,
   .npy) and weight files (safetensors, torch zip / legacy / TorchScript) all work on gs:// paths,
   and nothing lands on the local disk. Orbax checkpoints are not run against it: orbax writes array data through
   tensorstore's own GCS driver, which needs a real (or emulated HTTP) GCS endpoint.
"""

import ast
import gzip
import io
import json
import os
import pathlib
import struct

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import ml_collections
import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKED_DIRS = ("common", "launch")

# Calls that read, write or list files behind epath's back.
FORBIDDEN_CALLS = {
    "open", "io.open", "gzip.open", "bz2.open", "lzma.open", "tarfile.open",
    "os.makedirs", "os.mkdir", "os.listdir", "os.scandir", "os.walk", "os.remove", "os.unlink",
    "os.rename", "os.replace", "os.rmdir", "os.stat", "os.chdir",
    "glob.glob", "glob.iglob", "pathlib.Path", "Path",
    "np.fromfile", "np.genfromtxt",
    "tempfile.mkdtemp", "tempfile.NamedTemporaryFile", "tempfile.TemporaryDirectory",
}
# numpy readers and writers (and zipfile): fine on a file object from `with epath_path.open(...) as
# f`, not on a path (`np.savez_compressed(f, images=...)`, not `np.savez_compressed(path, ...)`).
NUMPY_IO = {f"{np}.{fn}" for np in ("np", "numpy")
            for fn in ("save", "savez", "savez_compressed", "load", "loadtxt", "savetxt")}
FILE_OBJECT_IO = NUMPY_IO | {"zipfile.ZipFile"}
FORBIDDEN_PREFIXES = ("os.path.", "shutil.")

# (file, call) -> why it is not workdir or dataset I/O. Keep this short and specific.
ALLOWED = {
    # The launcher scripts put the repository root on sys.path: the location of our own source.
    ("launch/main.py", "os.path.dirname"): "repository root for sys.path",
    ("launch/main.py", "os.path.abspath"): "repository root for sys.path",
    ("launch/xm_launch.py", "os.path.dirname"): "repository root for sys.path and launch/main.py",
    ("launch/xm_launch.py", "os.path.abspath"): "repository root; the config file's local path",
    ("launch/xm_launch.py", "os.path.join"): "launch/main.py inside this checkout",
    ("launch/xm_launch.py", "os.path.basename"): "checkout folder name for the docker COPY",
    ("launch/xm_launch.py", "os.path.splitext"): "experiment name from the config file name",
    ("launch/xm_launch.py", "os.path.relpath"): "the config's path inside the container checkout",
    # Config and sweep files are Python modules imported from this machine (ml_collections and
    # importlib need local files), like the code itself.
    ("launch/xm_launch.py", "os.path.isfile"): "the local config / sweep Python file exists",
    # An error message names the source file and line of our code where an exception was raised.
    ("launch/main.py", "os.path.relpath"): "our own source file in an error message",
    # --mode=compile reads XLA's GPU spec out of the installed CUDA plugin's shared library.
    ("common/training/targets.py", "glob.glob"): "the installed CUDA plugin's library in site-packages",
    ("common/training/targets.py", "os.path.join"): "the installed CUDA plugin's library in site-packages",
    ("common/training/targets.py", "open"): "mmap of the installed CUDA plugin's library",
}


def _dotted(node: ast.AST) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return f"{base}.{node.attr}" if base else None
  return None


def _writes_to_path(node: ast.Call, file_objects: set[str]) -> bool:
  """numpy I/O, `zipfile.ZipFile(target)`, `Image.fromarray(...).save(target)` or
  `Image.open(target)` with `target` not a file object."""
  func = node.func
  if not (isinstance(func, ast.Attribute) and node.args):
    return False
  target = node.args[0]
  is_file_object = isinstance(target, ast.Name) and target.id in file_objects
  if _dotted(func) in FILE_OBJECT_IO:
    return not is_file_object
  if func.attr == "save" and isinstance(func.value, ast.Call):
    return _dotted(func.value.func) in ("Image.fromarray", "PIL.Image.fromarray") and (
        not is_file_object)
  if _dotted(func) in ("Image.open", "PIL.Image.open"):
    return not is_file_object
  return False


def file_io_violations(path: pathlib.Path) -> list[str]:
  """'file:line: call' for each file access in `path` that does not go through epath."""
  rel = path.relative_to(ROOT).as_posix()
  tree = ast.parse(path.read_text(), filename=rel)
  # io.BytesIO buffers in memory, and by convention a parameter named `f`: an open file object
  # (e.g. image_folder.decode_image(f, ...), which its callers open through epath).
  file_objects = {"buffer", "f"}
  for node in ast.walk(tree):
    if isinstance(node, (ast.With, ast.AsyncWith)):
      for item in node.items:
        call = item.context_expr
        # `with <epath>.open(...) as f` (and what wraps it, e.g. gzip.GzipFile(fileobj=f))
        if isinstance(call, ast.Call) and isinstance(item.optional_vars, ast.Name):
          name = _dotted(call.func)
          is_open = (isinstance(call.func, ast.Attribute) and call.func.attr == "open"
                     and name not in FORBIDDEN_CALLS)
          if is_open or name == "gzip.GzipFile":
            file_objects.add(item.optional_vars.id)
  found = []
  for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
    if not isinstance(node, ast.Call):
      continue
    name = _dotted(node.func)
    bad = name is not None and (name in FORBIDDEN_CALLS or name.startswith(FORBIDDEN_PREFIXES))
    if bad and (rel, name) in ALLOWED:
      continue
    if bad or _writes_to_path(node, file_objects):
      found.append(f"{rel}:{node.lineno}: {name or ast.unparse(node.func)}")
  return found


def _checked_files() -> list[pathlib.Path]:
  return sorted(p for d in CHECKED_DIRS for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", _checked_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_file_io_goes_through_epath(path):
  violations = file_io_violations(path)
  assert not violations, (
      "file access outside etils.epath (use common.paths.as_path(p) and its .open/.mkdir/"
      ".iterdir/.read_bytes/.write_bytes...; add a reasoned ALLOWED entry only for code that is "
      "not workdir or dataset I/O):\n" + "\n".join(violations))


def test_the_check_catches_what_it_should(tmp_path, monkeypatch):
  bad = ROOT / "common" / "_epath_check_probe.py"
  source = ("import os\nimport numpy as np\nfrom PIL import Image\n"
            "def f(d, x):\n"
            "  os.makedirs(d)\n  p = os.path.join(d, 'a')\n  open(p, 'w').write('x')\n"
            "  np.savez_compressed(p, x=x)\n  Image.fromarray(x).save(p)\n"
            "  zipfile.ZipFile(p)\n"
            "  with epath.Path(p).open('wb') as f:\n    Image.fromarray(x).save(f)\n"
            "    np.savez_compressed(f, x=x)\n    zipfile.ZipFile(f)\n")
  try:
    bad.write_text(source)
    found = [v.split(": ", 1)[1] for v in file_io_violations(bad)]
  finally:
    bad.unlink()
  assert found.count("Image.fromarray(x).save") == 1  # the file-object saves are fine
  assert found.count("np.savez_compressed") == 1
  assert found.count("zipfile.ZipFile") == 1
  assert {"os.makedirs", "os.path.join", "open"} <= set(found)


# ---- a fake gs:// store --------------------------------------------------------------------------


class FakeGCS(MemoryFileSystem):
  """An in-memory filesystem answering for gs:// paths (no network)."""
  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  def __init__(self, *args, **kwargs):
    kwargs.pop("finalize_on_close", None)
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = path.removeprefix("gs://").removeprefix("gcs://")
    return "/" + path.strip("/")


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  from etils.epath import backend, gpath  # pylint: disable=import-outside-toplevel
  fsspec.register_implementation("gs", FakeGCS, clobber=True)
  fsspec.register_implementation("gcs", FakeGCS, clobber=True)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # use fsspec even if TF is there
  backend.fsspec_backend._get_filesystem.cache_clear()
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  monkeypatch.chdir(tmp_path)
  yield FakeGCS()
  assert not any(tmp_path.iterdir()), "something was written to the local disk"
  backend.fsspec_backend._get_filesystem.cache_clear()


def test_metrics_and_sample_grids_on_gs(fake_gcs):
  from common.images import save_grid  # pylint: disable=import-outside-toplevel
  from common.training.metrics import MetricWriter  # pylint: disable=import-outside-toplevel
  writer = MetricWriter("gs://bucket/run", tensorboard=False)
  writer.write(1, {"loss": np.float32(0.5)})
  writer.write(2, {"loss": 0.25})
  writer.close()
  writer = MetricWriter("gs://bucket/run", tensorboard=False)  # a resumed run appends
  writer.write(3, {"loss": 0.125})
  writer.close()
  lines = fake_gcs.cat("gs://bucket/run/metrics.jsonl").decode().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  out = save_grid(images, "gs://bucket/run/samples/step_0000003.png", ncols=3)
  assert out == "gs://bucket/run/samples/step_0000003.png"
  grid = np.asarray(Image.open(io.BytesIO(fake_gcs.cat(out))))
  assert grid.shape[2] == 3 and grid.shape[0] < grid.shape[1]


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def test_datasets_on_gs(fake_gcs):
  import common.data as data  # pylint: disable=import-outside-toplevel
  from common.data import tfds_source  # pylint: disable=import-outside-toplevel
  from common.errors import DataNotFoundError  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  pixels = {}
  for c in ("cat", "dog"):
    for i in range(2):
      pixels[c, i] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      fake_gcs.pipe(f"gs://bucket/images/{c}/{i}.png", _png(pixels[c, i]))
  cfg = ml_collections.ConfigDict({"name": "image_folder", "path": "gs://bucket/images",
                                   "image_size": 8})
  assert data.dataset_info(cfg) == data.DatasetInfo(8, 3, 2, 4)
  images, labels = data.load_arrays(cfg)
  np.testing.assert_array_equal(images[2], pixels["dog", 0])
  assert labels.tolist() == [0, 0, 1, 1]

  for prefix, n in (("train", 5), ("t10k", 3)):
    imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    fake_gcs.pipe(f"gs://bucket/fmnist/{prefix}-images-idx3-ubyte.gz", gzip.compress(
        struct.pack(">4i", 0x803, n, 28, 28) + imgs.tobytes()))
    fake_gcs.pipe(f"gs://bucket/fmnist/{prefix}-labels-idx1-ubyte",
                  struct.pack(">2i", 0x801, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())
  fm = ml_collections.ConfigDict({"name": "fashion_mnist", "path": "gs://bucket/fmnist"})
  assert data.dataset_info(fm).num_examples == 5
  test_images, test_labels = data.load_arrays(fm, split="test")
  np.testing.assert_array_equal(test_images[..., 0], imgs)
  assert test_labels.tolist() == [0, 1, 2]

  with pytest.raises(DataNotFoundError, match="array_record"):
    fake_gcs.pipe("gs://bucket/tfds/tiny/1.0.0/tiny-train.tfrecord-00000-of-00001", b"")
    tfds_source.check_prepared("tiny", "gs://bucket/tfds", "train")
  fake_gcs.pipe("gs://bucket/tfds/tiny/1.0.0/tiny-train.array_record-00000-of-00001", b"")
  tfds_source.check_prepared("tiny", "gs://bucket/tfds", "train")
  assert not os.path.exists("gs:")


def test_eval_files_and_weights_on_gs(fake_gcs):
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  from common.eval import reference  # pylint: disable=import-outside-toplevel
  from common.text.weights import read_weights  # pylint: disable=import-outside-toplevel
  from common.weights.torch_weights import load_torch_weights  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  mu, sigma = rng.normal(size=3), np.eye(3)
  assert reference.write_arrays("gs://bucket/ref/ref.npz", {"arr_0": images, "mu": mu,
                                                            "sigma": sigma}) == "gs://bucket/ref/ref.npz"
  assert not fake_gcs.exists("gs://bucket/ref/ref.npz.tmp")
  np.testing.assert_array_equal(reference.load_images("gs://bucket/ref/ref.npz",
                                                      batch_size=2).read_all(), images)
  ref = reference.load_reference("gs://bucket/ref/ref.npz")
  np.testing.assert_allclose(ref["mu"], mu)
  buffer = io.BytesIO()
  np.save(buffer, images)
  fake_gcs.pipe("gs://bucket/samples.npy", buffer.getvalue())
  np.testing.assert_array_equal(reference.load_images("gs://bucket/samples.npy",
                                                      batch_size=3).read_all(), images)

  w = rng.normal(size=(2, 3)).astype(np.float32)
  fake_gcs.pipe("gs://bucket/w.safetensors", st_numpy.save({"a.weight": w, "b": w[0]}))
  np.testing.assert_array_equal(load_torch_weights("gs://bucket/w.safetensors")["a.weight"], w)
  assert list(read_weights("gs://bucket/w.safetensors", keep=lambda k: k != "b")) == ["a.weight"]
  for name in ("state_dict.pt", "legacy.pt", "script.pt"):  # zip, pre-1.6 and TorchScript formats
    local = ROOT / "tests" / "fixtures" / "torch_weights" / name
    fake_gcs.pipe(f"gs://bucket/{name}", local.read_bytes())
    want, got = load_torch_weights(str(local)), load_torch_weights(f"gs://bucket/{name}")
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)

  from common.data import latents  # pylint: disable=import-outside-toplevel
  from common.errors import ConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match="local directory"):  # array_record writes local files only
    latents.precompute(source="fashion_mnist", output="gs://bucket/latents", autoencoder="a",
                       text_encoder="minilm")
