"""Judge of generated digits: are the samples recognisable digits and not copies of training images?

Trains a classifier (an RBF SVM) on real scikit-learn digits, labels the class-conditional samples in
`WORKDIR/samples/samples.npz` (written by `make demo` / `--mode=sample`), and reports:
  * accuracy: the fraction of samples the classifier assigns to their conditioning class
    (target >= 90%); the classifier's own held-out accuracy on real digits is printed beside it;
  * memorisation: each sample's L2 distance to its nearest training image, against the same
    distance for held-out real digits; a sample closer than 10% of the real median counts as a copy.

  * FID (the FID Inception network, common.eval) of `--fid_n` samples against `--fid_n` real training
    digits, next to the FID of as many held-out real digits against the same reference: the floor a
    perfect model would reach at this sample size. The images are 8x8, upsampled to 299x299 by the
    Inception's own preprocessing, and the sample size is small (FID is biased upwards at small N and
    its 2048-d covariances are rank-deficient below N = 2048), so compare the two FIDs with each other,
    not with published ImageNet FIDs.

Usage: python benchmarks/judge_digits.py [--workdir workdirs/sid2_digits] [--fid_n 300]
"""

import argparse
import os
import sys

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


def fid_figures(images: np.ndarray, x_tr: np.ndarray, x_te: np.ndarray, n: int, workdir: str) -> dict:
  """FID of n samples and of n held-out real digits against n training digits (uint8 8x8)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from common.eval.features import evaluate_images  # pylint: disable=import-outside-toplevel
  from common.eval.features import make_reference  # pylint: disable=import-outside-toplevel

  def as_uint8(x):  # [N, 64] in [0, 1] -> uint8 [N, 8, 8, 1]
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).reshape(-1, 8, 8, 1)

  ref = os.path.join(workdir, "eval", f"digits_train_reference_n{n}.npz")
  if not os.path.exists(ref):
    make_reference(ref, as_uint8(x_tr[:n]), store_images=False, progress=False)
  samples = evaluate_images(images[:n], ref)
  floor = evaluate_images(as_uint8(x_te[:n]), ref)
  return {"fid_n": min(n, len(images), len(x_te)), "fid_samples": samples["fid"],
          "fid_heldout_real": floor["fid"]}


def evaluate(samples_path: str, fid_n: int = 0) -> dict:
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
  fid = fid_figures(images, x_tr, x_te, fid_n, os.path.dirname(os.path.dirname(samples_path))) if fid_n else {}
  return {**fid, "n": len(images), "accuracy": acc, "classifier_heldout_accuracy": real_acc,
          "per_class": per_class, "nn_dist_samples_median": float(np.median(d_sample)),
          "nn_dist_real_median": float(np.median(d_real)), "copy_fraction": copies}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdirs/sid2_digits")
  ap.add_argument("--fid_n", type=int, default=300, help="images per FID set (0: no FID)")
  args = ap.parse_args()
  path = os.path.join(args.workdir, "samples", "samples.npz")
  if not os.path.exists(path):
    raise SystemExit(f"no samples at {path}: run `make demo` (or --mode=sample) first.")
  r = evaluate(path, args.fid_n)
  print("| metric | value |\n|---|---|")
  print(f"| samples | {r['n']} |")
  print(f"| conditioning-class accuracy | {100 * r['accuracy']:.1f}% |")
  print(f"| classifier accuracy on held-out real digits | {100 * r['classifier_heldout_accuracy']:.1f}% |")
  print("| per-class accuracy | " + ", ".join(f"{c}: {100 * a:.0f}%" for c, a in r["per_class"].items()) + " |")
  print(f"| median NN distance to train, samples / real held-out | "
        f"{r['nn_dist_samples_median']:.3f} / {r['nn_dist_real_median']:.3f} |")
  print(f"| copies (NN distance < 10% of real median) | {100 * r['copy_fraction']:.1f}% |")
  if "fid_samples" in r:
    print(f"| FID vs {r['fid_n']} training digits: {r['fid_n']} samples / {r['fid_n']} held-out real "
          f"digits (floor) | {r['fid_samples']:.2f} / {r['fid_heldout_real']:.2f} |")


if __name__ == "__main__":
  main()
