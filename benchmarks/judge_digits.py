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
    not with published ImageNet FIDs. The Inception statistics of the two real sets never change:
    they are computed once and kept in the user cache (`common.paths.user_cache_dir`, `--cache_dir`),
    keyed on the images, the split and the Inception weights, so a later run (any workdir) passes
    only the samples through the Inception (benchmarks/judge_fid.py).

`--report` ends with the one-screen summary of `make demo` (benchmarks/demo_report.py).

Usage: python benchmarks/judge_digits.py [--workdir workdirs/sid2_digits] [--fid_n 300] [--report]
"""

import argparse
import os
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import demo_report  # noqa: E402  (benchmarks/demo_report.py)
import judge_fid  # noqa: E402  (benchmarks/judge_fid.py)
from common.errors import UserError  # noqa: E402
from common.paths import user_cache_dir  # noqa: E402

TEST_SIZE, SPLIT_SEED = 0.25, 0  # the real digits: 1347 to train the judges, 450 held out


def real_digits():
  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0).reshape(len(d.images), -1)
  return x, d.target.astype(np.int64)


def nearest_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """For each row of a [N, D], the L2 distance to its nearest row of b [M, D]."""
  d2 = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
  return np.sqrt(np.maximum(d2.min(1), 0.0))


def as_uint8(x: np.ndarray) -> np.ndarray:
  """Digits [N, 64] in [0, 1] -> uint8 [N, 8, 8, 1]."""
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).reshape(-1, 8, 8, 1)


def evaluate(samples_path: str, fid_n: int = 0, *, cache_dir: str | None = None,
             inception_path: str | None = None) -> dict:
  """The judge's figures for the samples at `samples_path` (module docstring); FID only when
  `fid_n` > 0, with the real digits' statistics kept in `cache_dir` (default:
  `common.paths.user_cache_dir()`)."""
  x, y = real_digits()
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED,
                                            stratify=y)
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
  fid = {}
  if fid_n:
    r = judge_fid.fid_with_floor(
        images, as_uint8(x_tr[:fid_n]), as_uint8(x_te[:fid_n]), dataset="digits",
        roles=("train", "heldout"), cache_dir=os.fspath(user_cache_dir(cache_dir)),
        inception_path=inception_path, split={"test_size": TEST_SIZE, "seed": SPLIT_SEED})
    fid = {"fid_n": r["fid_n"], "fid_samples": r["fid"], "fid_heldout_real": r["fid_floor"]}
  return {**fid, "n": len(images), "accuracy": acc, "classifier_heldout_accuracy": real_acc,
          "per_class": per_class, "nn_dist_samples_median": float(np.median(d_sample)),
          "nn_dist_real_median": float(np.median(d_real)), "copy_fraction": copies}


def print_table(r: dict) -> None:
  """The judge's figures as a markdown table."""
  print("| metric | value |\n|---|---|")
  print(f"| samples | {r['n']} |")
  print(f"| conditioning-class accuracy | {100 * r['accuracy']:.1f}% |")
  print(f"| classifier accuracy on held-out real digits | "
        f"{100 * r['classifier_heldout_accuracy']:.1f}% |")
  print("| per-class accuracy | "
        + ", ".join(f"{c}: {100 * a:.0f}%" for c, a in r["per_class"].items()) + " |")
  print(f"| median NN distance to train, samples / real held-out | "
        f"{r['nn_dist_samples_median']:.3f} / {r['nn_dist_real_median']:.3f} |")
  print(f"| copies (NN distance < 10% of real median) | {100 * r['copy_fraction']:.1f}% |")
  if "fid_samples" in r:
    n = r["fid_n"]
    print(f"| FID vs {n} training digits: {n} samples / {n} held-out real digits (floor) | "
          f"{r['fid_samples']:.2f} / {r['fid_heldout_real']:.2f} |")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdirs/sid2_digits")
  ap.add_argument("--fid_n", type=int, default=300, help="images per FID set (0: no FID)")
  judge_fid.add_arguments(ap, holds="the real digits' Inception statistics")
  ap.add_argument("--report", action="store_true",
                  help="end with the one-screen summary of `make demo` (demo_report.py)")
  args = ap.parse_args()
  path = os.path.join(args.workdir, "samples", "samples.npz")
  if not os.path.exists(path):
    raise SystemExit(f"no samples at {path}: run `make demo` (or --mode=sample) first.")
  try:
    r = evaluate(path, args.fid_n, cache_dir=args.cache_dir, inception_path=args.inception)
  except UserError as e:
    raise SystemExit(f"error: {e}") from None
  print_table(r)
  if args.report:
    print()
    print(demo_report.report(args.workdir, r))


if __name__ == "__main__":
  main()
