"""Are the demo's samples recognisable digits, and not copies of the training set?

Trains a classifier (an RBF SVM) on real scikit-learn digits, labels the class-conditional samples in
`WORKDIR/samples/samples.npz` (written by `make demo` / `--mode=sample`), and reports:
  * accuracy: the fraction of samples the classifier assigns to their conditioning class
    (target >= 90%); the classifier's own held-out accuracy on real digits is printed beside it;
  * memorisation: each sample's L2 distance to its nearest training image, against the same
    distance for held-out real digits; a sample closer than 10% of the real median counts as a copy.

Usage: python benchmarks/digits_sample_quality.py [--workdir workdirs/sid2_digits]
"""

import argparse
import os

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC


def real_digits():
  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0).reshape(len(d.images), -1)
  return x, d.target.astype(np.int64)


def nearest_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """For each row of a [N, D], the L2 distance to its nearest row of b [M, D]."""
  d2 = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
  return np.sqrt(np.maximum(d2.min(1), 0.0))


def evaluate(samples_path: str) -> dict:
  x, y = real_digits()
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
  clf = SVC(gamma="scale", C=10.0).fit(x_tr, y_tr)
  real_acc = float((clf.predict(x_te) == y_te).mean())
  data = np.load(samples_path)
  images, labels = data["images"], data["labels"].astype(np.int64)
  xs = (images.astype(np.float32) / 255.0).reshape(len(images), -1)
  pred = clf.predict(xs)
  acc = float((pred == labels).mean())
  per_class = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
  d_sample = nearest_distance(xs, x_tr)
  d_real = nearest_distance(x_te, x_tr)
  copies = float((d_sample < 0.1 * np.median(d_real)).mean())
  return {"n": len(images), "accuracy": acc, "classifier_heldout_accuracy": real_acc,
          "per_class": per_class, "nn_dist_samples_median": float(np.median(d_sample)),
          "nn_dist_real_median": float(np.median(d_real)), "copy_fraction": copies}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="workdirs/sid2_digits")
  args = ap.parse_args()
  path = os.path.join(args.workdir, "samples", "samples.npz")
  if not os.path.exists(path):
    raise SystemExit(f"no samples at {path}: run `make demo` (or --mode=sample) first.")
  r = evaluate(path)
  print(f"| metric | value |\n|---|---|")
  print(f"| samples | {r['n']} |")
  print(f"| conditioning-class accuracy | {100 * r['accuracy']:.1f}% |")
  print(f"| classifier accuracy on held-out real digits | {100 * r['classifier_heldout_accuracy']:.1f}% |")
  print(f"| per-class accuracy | " + ", ".join(f"{c}: {100 * a:.0f}%" for c, a in r["per_class"].items()) + " |")
  print(f"| median NN distance to train, samples / real held-out | "
        f"{r['nn_dist_samples_median']:.3f} / {r['nn_dist_real_median']:.3f} |")
  print(f"| copies (NN distance < 10% of real median) | {100 * r['copy_fraction']:.1f}% |")


if __name__ == "__main__":
  main()
