"""Judge of generated Fashion-MNIST images: do the samples show what their prompts ask for?

As a script, labels the samples in `WORKDIR/samples/samples.npz` (written by `--mode=sample` of a
text-to-image config such as configs/sid2_t2i_fashion.py, from held-out caption phrasings) with two
Fashion-MNIST classifiers trained on the real training images, and reports:
  * accuracy: the fraction of samples a classifier assigns to the class their prompt names
    (target >= 80%), for the judge (the small CNN below, about 91% on real test images) and for a
    weaker scikit-learn MLP on pixels (about 87%); each classifier's accuracy on real test images
    is printed beside it, with the judge's per-class figures and confusion matrix;
  * FID (the FID Inception network) of `--fid_n` samples against as many real test images, next to
    the FID of as many real training images against the same reference (the floor at this N).

The judge: two conv layers (3x3, 32 and 64 channels, each followed by ReLU and 2x2 max-pooling), a
128-unit hidden layer and 10 logits; AdamW, 4 epochs over the 60000 training images, batch 256.

Nothing real is computed twice: the two classifiers' parameters (with their real-test accuracy),
the real test images' Inception statistics and the floor's FID are kept in the user cache
(`common.paths.user_cache_dir`, `--cache_dir`) as `common.eval.cache` files keyed on what made them
(the digest of the images and labels, the training settings, the jax / scikit-learn version, the
Inception weights), so every later run of either text-to-image demo, in any workdir, runs the two
classifiers and the Inception over the samples only. `score_samples` is what every Fashion-MNIST
benchmark reports (the studies call it too).

`--report` ends with the one-screen summary of the demo (benchmarks/demo_report.py).

Usage: python benchmarks/judge_fashion.py [--workdir workdirs/sid2_t2i_fashion] [--fid_n 500]
  [--cache_dir DIR] [--report TITLE]
"""

import argparse
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import demo_report  # noqa: E402  (benchmarks/demo_report.py)
import judge_fid  # noqa: E402  (benchmarks/judge_fid.py)
from common.data import captions  # noqa: E402
from common.data import sources  # noqa: E402
from common.eval import cache  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.paths import CACHE_ENV, check_writable, user_cache_dir  # noqa: E402


def _init(key: jax.Array) -> dict[str, jax.Array]:
  k = jax.random.split(key, 4)
  he = lambda kk, shape, fan_in: jax.random.normal(kk, shape) * np.sqrt(2.0 / fan_in)
  return {"c1": he(k[0], (3, 3, 1, 32), 9), "b1": jnp.zeros(32),
          "c2": he(k[1], (3, 3, 32, 64), 9 * 32), "b2": jnp.zeros(64),
          "d1": he(k[2], (7 * 7 * 64, 128), 7 * 7 * 64), "b3": jnp.zeros(128),
          "d2": he(k[3], (128, 10), 128), "b4": jnp.zeros(10)}


def _pool(x: jax.Array) -> jax.Array:
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def logits(params: dict[str, jax.Array], images: jax.Array) -> jax.Array:
  """images: uint8 or float [N, 28, 28(, 1)] in [0, 255] -> logits float32 [N, 10]."""
  x = jnp.asarray(images, jnp.float32).reshape(-1, 28, 28, 1) / 127.5 - 1.0
  for w, b in (("c1", "b1"), ("c2", "b2")):
    x = jax.lax.conv_general_dilated(x, params[w], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = _pool(jax.nn.relu(x + params[b]))
  x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["d1"] + params["b3"])
  return x @ params["d2"] + params["b4"]


def train(images: np.ndarray, labels: np.ndarray, *, epochs: int, batch: int,
          seed: int) -> dict[str, jax.Array]:
  """Trains the CNN on uint8 images [N, 28, 28(, 1)] with int labels [N]."""
  tx = optax.adamw(optax.cosine_decay_schedule(2e-3, epochs * (len(images) // batch)),
                   weight_decay=1e-4)
  params = _init(jax.random.key(seed))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for i in range(len(images) // batch):
      idx = order[i * batch:(i + 1) * batch]
      params, opt = step(params, opt, images[idx], labels[idx])
  return params


def predict(params: dict[str, jax.Array], images: np.ndarray, batch: int = 1000) -> np.ndarray:
  """Class indices int64 [N] of images [N, 28, 28(, 1)] in [0, 255]."""
  f = jax.jit(logits)
  out = [np.asarray(jnp.argmax(f(params, images[i:i + batch]), -1))
         for i in range(0, len(images), batch)]
  return np.concatenate(out).astype(np.int64)


def load_data(fmnist_dir: str = sources.FASHION_MNIST_DEFAULT_DIR) -> dict[str, np.ndarray]:
  """{"train_x", "train_y", "test_x", "test_y"}: uint8 images [N, 28, 28, 1], int32 labels [N]."""
  tr_x, tr_y = sources.load_fashion_mnist(fmnist_dir, "train")
  te_x, te_y = sources.load_fashion_mnist(fmnist_dir, "test")
  return {"train_x": tr_x, "train_y": tr_y, "test_x": te_x, "test_y": te_y}


def data_digests(data: dict) -> dict[str, str]:
  """The digests of `load_data`'s arrays: what the classifiers' caches are keyed on."""
  return {k: judge_fid.digest(v) for k, v in sorted(data.items())}


CNN_TRAINING = {"epochs": 4, "batch": 256, "seed": 0}


def cnn_judge(data: dict, digests: dict, cache_dir: str) -> tuple[dict[str, jax.Array], float]:
  """(the CNN judge's parameters, its accuracy on the real test images): from the cache in
  `cache_dir` when it was made from the same data (`digests`) and settings, else trained on
  `data` and kept there."""
  settings = {"cache": "Fashion-MNIST CNN judge", "net": "conv32-pool-conv64-pool-fc128-fc10",
              **CNN_TRAINING, "data": digests, "jax": jax.__version__}

  def make():
    params = train(data["train_x"], data["train_y"], **CNN_TRAINING)
    real = (predict(params, data["test_x"]) == data["test_y"]).mean()
    return {**params, "real_accuracy": real}

  keys = [*_init(jax.random.key(0)), "real_accuracy"]
  arrays = cache.load_or_make(os.path.join(cache_dir, "fashion_cnn_judge.npz"), settings, keys,
                              make, what="Fashion-MNIST CNN judge")
  real = float(arrays.pop("real_accuracy"))
  return {k: jnp.asarray(v) for k, v in arrays.items()}, real


MLP_TRAINING = {"hidden": 256, "max_iter": 30, "n": 20000, "random_state": 0}


def _flat(x: np.ndarray) -> np.ndarray:
  return x.reshape(len(x), -1).astype(np.float32) / 255.0


def mlp_predict(w: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
  """Class indices int64 [N] of uint8 images [N, 28, 28(, 1)] by the MLP's weights (its
  `predict`: ReLU hidden layer, argmax of the output layer)."""
  h = np.maximum(_flat(images) @ w["w0"] + w["b0"], 0.0)
  return np.argmax(h @ w["w1"] + w["b1"], -1).astype(np.int64)


def mlp_judge(data: dict, digests: dict, cache_dir: str) -> tuple[dict[str, np.ndarray], float]:
  """The weaker second opinion, a scikit-learn MLP on pixels (flattened [N, 784] in [0, 1]):
  (its weights, its accuracy on the real test images), cached like `cnn_judge`."""
  import sklearn  # pylint: disable=import-outside-toplevel
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=import-outside-toplevel
  from sklearn.neural_network import MLPClassifier  # pylint: disable=import-outside-toplevel
  settings = {"cache": "Fashion-MNIST MLP judge", **MLP_TRAINING, "data": digests,
              "sklearn": sklearn.__version__}

  def make():
    n = MLP_TRAINING["n"]
    clf = MLPClassifier(hidden_layer_sizes=(MLP_TRAINING["hidden"],),
                        max_iter=MLP_TRAINING["max_iter"],
                        random_state=MLP_TRAINING["random_state"])
    with warnings.catch_warnings():  # 30 epochs is the setting, not a failure to converge
      warnings.simplefilter("ignore", ConvergenceWarning)
      clf.fit(_flat(data["train_x"][:n]), data["train_y"][:n])
    w = {"w0": clf.coefs_[0], "b0": clf.intercepts_[0], "w1": clf.coefs_[1],
         "b1": clf.intercepts_[1]}
    return {**w, "real_accuracy": (mlp_predict(w, data["test_x"]) == data["test_y"]).mean()}

  arrays = cache.load_or_make(os.path.join(cache_dir, "fashion_mlp_judge.npz"), settings,
                              ["w0", "b0", "w1", "b1", "real_accuracy"], make,
                              what="Fashion-MNIST MLP judge")
  return arrays, float(arrays.pop("real_accuracy"))


def score_samples(images: np.ndarray, labels: np.ndarray, *, fid_n: int = 500,
                  cache_dir: str | None = None,
                  fmnist_dir: str = sources.FASHION_MNIST_DEFAULT_DIR,
                  inception_path: str | None = None) -> dict:
  """The judges' verdict on generated Fashion-MNIST images.

  Args:
    images: uint8 [N, 28, 28(, 1)] samples.
    labels: int [N], the class each sample was asked for (its prompt's or its class label).
    fid_n: images per FID set (0: no FID).
    cache_dir: where the judges and the real images' FID results are kept (default:
      `common.paths.user_cache_dir()`).
    fmnist_dir: the Fashion-MNIST idx files.
    inception_path: FID Inception weights (None: the default weights).

  Returns:
    {"n", "accuracy", "judge_real_accuracy", "per_class": [10] accuracies (nan where a class was
    not asked for), "confusion": int [10, 10] (rows: asked, columns: judged), "mlp_accuracy",
    "mlp_real_accuracy"} plus {"fid", "fid_floor", "fid_n"} when fid_n > 0.
  """
  cache_dir = os.fspath(user_cache_dir(cache_dir))
  check_writable(cache_dir, flag=f"--cache_dir (or ${CACHE_ENV})")
  labels = np.asarray(labels, np.int64)
  data = load_data(fmnist_dir)
  digests = data_digests(data)
  params, real = cnn_judge(data, digests, cache_dir)
  pred = predict(params, images)
  confusion = np.zeros((10, 10), np.int64)
  np.add.at(confusion, (labels, pred), 1)
  asked = confusion.sum(1)
  per_class = np.where(asked > 0, np.diag(confusion) / np.maximum(asked, 1), np.nan)
  mlp, mlp_real = mlp_judge(data, digests, cache_dir)
  out = {"n": int(len(images)), "accuracy": float((pred == labels).mean()),
         "judge_real_accuracy": real, "per_class": per_class.tolist(), "confusion": confusion,
         "mlp_accuracy": float((mlp_predict(mlp, images) == labels).mean()),
         "mlp_real_accuracy": mlp_real}
  if fid_n:
    n = min(fid_n, len(images))
    out.update(judge_fid.fid_with_floor(
        images, data["test_x"][:n], data["train_x"][:n], dataset="fashion",
        roles=("test", "train"), cache_dir=cache_dir, inception_path=inception_path))
  return out


def prompt_labels(prompts: np.ndarray) -> np.ndarray:
  """The class each prompt names (held-out or training phrasings); -1 if none."""
  table = {}
  for split in ("train", "eval"):
    for template in captions.fashion_caption_templates(split):
      for label in range(len(captions.FASHION_CLASS_NAMES)):
        table[captions.fashion_caption(label, template)] = label
  return np.array([table.get(str(p), -1) for p in prompts], np.int64)


def print_table(r: dict) -> None:
  """`score_samples`' figures as a markdown table and the confusion matrix."""
  print("| metric | value |\n|---|---|")
  print(f"| samples (held-out prompt phrasings) | {r['n']} |")
  print(f"| prompt-class accuracy, CNN judge | {100 * r['accuracy']:.1f}% |")
  print(f"| CNN judge's accuracy on real test images | {100 * r['judge_real_accuracy']:.1f}% |")
  print(f"| prompt-class accuracy, MLP | {100 * r['mlp_accuracy']:.1f}% (real test images: "
        f"{100 * r['mlp_real_accuracy']:.1f}%) |")
  print("| per-class accuracy (CNN) | " + ", ".join(
      f"{name}: {100 * a:.0f}%" for name, a in zip(captions.FASHION_CLASS_NAMES, r["per_class"])
      if a == a) + " |")
  print("confusion (rows: prompt class, columns: CNN label):\n" + str(r["confusion"]))
  if "fid" in r:
    print(f"| FID vs {r['fid_n']} real test images: {r['fid_n']} samples / {r['fid_n']} real "
          f"training images (floor) | {r['fid']:.2f} / {r['fid_floor']:.2f} |")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdirs/sid2_t2i_fashion")
  ap.add_argument("--fmnist", default=sources.FASHION_MNIST_DEFAULT_DIR)
  ap.add_argument("--fid_n", type=int, default=500, help="images per FID set (0: no FID)")
  judge_fid.add_arguments(ap, holds="the judges and the real images' FID results")
  ap.add_argument("--report", default=None, metavar="TITLE",
                  help="end with the demo's one-screen summary under this title (demo_report.py)")
  args = ap.parse_args()
  path = os.path.join(args.workdir, "samples", "samples.npz")
  if not os.path.exists(path):
    raise SystemExit(f"no samples at {path}: run `make t2i-demo` (or --mode=sample) first.")
  with np.load(path) as data:
    images, labels = data["images"], prompt_labels(data["prompts"])
  if (labels < 0).any():
    raise SystemExit(f"{int((labels < 0).sum())} prompts name no Fashion-MNIST class.")
  try:
    r = score_samples(images, labels, fid_n=args.fid_n, cache_dir=args.cache_dir,
                      fmnist_dir=args.fmnist, inception_path=args.inception)
  except UserError as e:
    raise SystemExit(f"error: {e}") from None
  print_table(r)
  if args.report:
    print()
    print(demo_report.fashion_report(args.report, args.workdir, r))


if __name__ == "__main__":
  main()
