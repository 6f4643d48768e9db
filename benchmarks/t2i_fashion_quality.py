"""Do the text-to-image samples show what their prompts ask for?

Labels the samples in `WORKDIR/samples/samples.npz` (written by `--mode=sample` of a text-to-image
config such as configs/sid2_t2i_fashion.py, from held-out caption phrasings) with two Fashion-MNIST
classifiers trained on the real training images, and reports:
  * accuracy: the fraction of samples a classifier assigns to the class their prompt names
    (target >= 80%), for the judge (benchmarks/fashion_classifier.py, a small CNN, about 91% on real
    test images; cached in WORKDIR/eval/fashion_cnn.npz) and for a weaker scikit-learn MLP on pixels
    (about 87%); each classifier's accuracy on real test images is printed beside it, with the
    judge's per-class figures and confusion matrix;
  * FID (common.eval, the FID Inception network) of `--fid_n` samples against real test images, next
    to the FID of as many real training images against the same reference (the floor at this N).

Usage: python benchmarks/t2i_fashion_quality.py [--workdir workdirs/sid2_t2i_fashion] [--fid_n 500]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common.data import captions  # noqa: E402
from common.data import sources  # noqa: E402
import fashion_classifier  # noqa: E402  (benchmarks/fashion_classifier.py)


def prompt_labels(prompts: np.ndarray) -> np.ndarray:
  """The class each prompt names (held-out or training phrasings); -1 if none."""
  table = {}
  for split in ("train", "eval"):
    for template in captions.fashion_caption_templates(split):
      for label in range(len(captions.FASHION_CLASS_NAMES)):
        table[captions.fashion_caption(label, template)] = label
  return np.array([table.get(str(p), -1) for p in prompts], np.int64)


def classifier(train_x: np.ndarray, train_y: np.ndarray, n: int = 20000):
  from sklearn.neural_network import MLPClassifier  # pylint: disable=import-outside-toplevel
  clf = MLPClassifier(hidden_layer_sizes=(256,), max_iter=30, random_state=0)
  return clf.fit(train_x[:n], train_y[:n])


def main():
  ap = argparse.ArgumentParser()
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
  r = fashion_classifier.score_samples(images, labels, os.path.join(args.workdir, "eval"),
                                       fid_n=args.fid_n, fmnist_dir=args.fmnist)
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
