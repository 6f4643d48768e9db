"""Judge of generated Fashion-MNIST images: do the samples show what their prompts ask for?

As a script, labels the samples in `WORKDIR/samples/samples.npz` (written by `--mode=sample` of a
text-to-image config such as configs/sid2_t2i_fashion.py, from held-out caption phrasings) with two
Fashion-MNIST classifiers trained on the real training images, and reports:
  * accuracy: the fraction of samples a classifier assigns to the class their prompt names
    (target >= 80%), for the judge (the small CNN below, about 91% on real test images; cached in
    WORKDIR/eval/fashion_cnn.npz) and for a weaker scikit-learn MLP on pixels (about 87%); each
    classifier's accuracy on real test images is printed beside it, with the judge's per-class
    figures and confusion matrix;
  * FID (common.eval, the FID Inception network) of `--fid_n` samples against real test images, next
    to the FID of as many real training images against the same reference (the floor at this N).

The judge: two conv layers (3x3, 32 and 64 channels, each followed by ReLU and 2x2 max-pooling), a
128-unit hidden layer and 10 logits; AdamW, 4 epochs over the 60000 training images, batch 256.
Its trained parameters are cached in an .npz (one per workdir), so scoring a second set of samples
does not train again. `score_samples` is what every Fashion-MNIST benchmark reports (the studies
call it too): the judge's class accuracy of a set of samples, per class, the confusion matrix, and
FID against real test images.

Usage: python benchmarks/judge_fashion.py [--workdir workdirs/sid2_t2i_fashion] [--fid_n 500]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.data import captions  # noqa: E402
from common.data import sources  # noqa: E402


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


def train(images: np.ndarray, labels: np.ndarray, *, epochs: int = 4, batch: int = 256,
          seed: int = 0) -> dict[str, jax.Array]:
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


def load_or_train(cache: str, fmnist_dir: str = sources.FASHION_MNIST_DEFAULT_DIR):
  """(params, accuracy on the real test images): from `cache` if it exists, else trained on the
  training split and saved there."""
  te_x, te_y = sources.load_fashion_mnist(fmnist_dir, "test")
  if os.path.exists(cache):
    with np.load(cache) as f:
      params = {k: jnp.asarray(f[k]) for k in f.files}
  else:
    tr_x, tr_y = sources.load_fashion_mnist(fmnist_dir, "train")
    params = train(tr_x, tr_y)
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    np.savez(cache, **{k: np.asarray(v) for k, v in params.items()})
  return params, float((predict(params, te_x) == te_y).mean())


def fid_vs_test(images: np.ndarray, eval_dir: str, n: int,
                fmnist_dir: str = sources.FASHION_MNIST_DEFAULT_DIR) -> dict[str, float]:
  """FID (common.eval, the FID Inception network) of the first `n` of `images` (uint8
  [N, 28, 28(, 1)]) against `n` real test images, beside the FID of `n` real training images
  against the same reference (the floor at this N). The reference statistics are cached in
  `eval_dir`. Returns {"fid", "fid_floor", "fid_n"}."""
  from common.eval.features import evaluate_images  # pylint: disable=import-outside-toplevel
  from common.eval.features import make_reference  # pylint: disable=import-outside-toplevel
  n = min(n, len(images))
  te_x, _ = sources.load_fashion_mnist(fmnist_dir, "test")
  ref = os.path.join(eval_dir, f"fashion_test_reference_n{n}.npz")
  if not os.path.exists(ref):
    os.makedirs(eval_dir, exist_ok=True)
    make_reference(ref, te_x[:n], store_images=False, progress=False)
  floor = os.path.join(eval_dir, f"fashion_train_fid_n{n}.npy")
  if os.path.exists(floor):
    fid_floor = float(np.load(floor))
  else:
    tr_x, _ = sources.load_fashion_mnist(fmnist_dir, "train")
    fid_floor = float(evaluate_images(tr_x[:n], ref)["fid"])
    np.save(floor, fid_floor)
  return {"fid": float(evaluate_images(images[:n], ref)["fid"]), "fid_floor": fid_floor,
          "fid_n": n}


def score_samples(images: np.ndarray, labels: np.ndarray, eval_dir: str, *, fid_n: int = 500,
                  fmnist_dir: str = sources.FASHION_MNIST_DEFAULT_DIR) -> dict:
  """The judge's verdict on generated Fashion-MNIST images.

  Args:
    images: uint8 [N, 28, 28(, 1)] samples.
    labels: int [N], the class each sample was asked for (its prompt's or its class label).
    eval_dir: where the judge's parameters and the FID reference are cached.
    fid_n: images per FID set (0: no FID).

  Returns:
    {"n", "accuracy", "judge_real_accuracy", "per_class": [10] accuracies (nan where a class was
    not asked for), "confusion": int [10, 10] (rows: asked, columns: judged)} plus `fid_vs_test`'s
    keys when fid_n > 0.
  """
  labels = np.asarray(labels, np.int64)
  params, real = load_or_train(os.path.join(eval_dir, "fashion_cnn.npz"), fmnist_dir)
  pred = predict(params, images)
  confusion = np.zeros((10, 10), np.int64)
  np.add.at(confusion, (labels, pred), 1)
  asked = confusion.sum(1)
  per_class = np.where(asked > 0, np.diag(confusion) / np.maximum(asked, 1), np.nan)
  out = {"n": int(len(images)), "accuracy": float((pred == labels).mean()),
         "judge_real_accuracy": real, "per_class": per_class.tolist(), "confusion": confusion}
  if fid_n:
    out.update(fid_vs_test(images, eval_dir, fid_n, fmnist_dir))
  return out


def prompt_labels(prompts: np.ndarray) -> np.ndarray:
  """The class each prompt names (held-out or training phrasings); -1 if none."""
  table = {}
  for split in ("train", "eval"):
    for template in captions.fashion_caption_templates(split):
      for label in range(len(captions.FASHION_CLASS_NAMES)):
        table[captions.fashion_caption(label, template)] = label
  return np.array([table.get(str(p), -1) for p in prompts], np.int64)


def classifier(train_x: np.ndarray, train_y: np.ndarray, n: int = 20000):
  """The weaker second opinion: a scikit-learn MLP on pixels (flattened [N, 784] in [0, 1])."""
  from sklearn.neural_network import MLPClassifier  # pylint: disable=import-outside-toplevel
  clf = MLPClassifier(hidden_layer_sizes=(256,), max_iter=30, random_state=0)
  return clf.fit(train_x[:n], train_y[:n])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdirs/sid2_t2i_fashion")
  ap.add_argument("--fmnist", default=sources.FASHION_MNIST_DEFAULT_DIR)
  ap.add_argument("--fid_n", type=int, default=500, help="images per FID set (0: no FID)")
  args = ap.parse_args()
  path = os.path.join(args.workdir, "samples", "samples.npz")
  if not os.path.exists(path):
    raise SystemExit(f"no samples at {path}: run `make t2i-demo` (or --mode=sample) first.")
  data = np.load(path)
  images, labels = data["images"], prompt_labels(data["prompts"])
  if (labels < 0).any():
    raise SystemExit(f"{int((labels < 0).sum())} prompts name no Fashion-MNIST class.")
  tr_x, tr_y = sources.load_fashion_mnist(args.fmnist, "train")
  te_x, te_y = sources.load_fashion_mnist(args.fmnist, "test")
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
  mlp = classifier(flat(tr_x), tr_y)
  r = score_samples(images, labels, os.path.join(args.workdir, "eval"), fid_n=args.fid_n,
                    fmnist_dir=args.fmnist)
  print("| metric | value |\n|---|---|")
  print(f"| samples (held-out prompt phrasings) | {len(images)} |")
  print(f"| prompt-class accuracy, CNN judge | {100 * r['accuracy']:.1f}% |")
  print(f"| CNN judge's accuracy on real test images | {100 * r['judge_real_accuracy']:.1f}% |")
  mlp_acc = float((mlp.predict(flat(images)) == labels).mean())
  mlp_real = float((mlp.predict(flat(te_x)) == te_y).mean())
  print(f"| prompt-class accuracy, MLP | {100 * mlp_acc:.1f}% (real test images: "
        f"{100 * mlp_real:.1f}%) |")
  print("| per-class accuracy (CNN) | " + ", ".join(
      f"{name}: {100 * a:.0f}%" for name, a in zip(captions.FASHION_CLASS_NAMES, r["per_class"])
      if a == a) + " |")
  print("confusion (rows: prompt class, columns: CNN label):\n" + str(r["confusion"]))
  if args.fid_n:
    print(f"| FID vs {r['fid_n']} real test images: {r['fid_n']} samples / {r['fid_n']} real "
          f"training images (floor) | {r['fid']:.2f} / {r['fid_floor']:.2f} |")


if __name__ == "__main__":
  main()
