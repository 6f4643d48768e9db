"""The one-screen summary that ends each demo: what was trained, how good it is, where to look.

`report(workdir, figures)` (`make demo`) and `fashion_report(title, workdir, figures)` (`make
t2i-demo`, `make microdit-demo`) read what the run left in WORKDIR (config.json, metrics.jsonl, the
samples) and the judge's figures (`judge_digits.evaluate`, `judge_fashion.score_samples`) and
return a short text for someone who has never seen the project. The figures keep the judge's
meaning; the verdict only restates them against the judge's target (digits: >= 90% of samples
recognised as the digit asked for, no copies, and the FID floor that real held-out digits reach;
Fashion-MNIST: >= 80% recognised as the garment the prompt names).
"""

import json
import os
import textwrap

from common.data import captions

ACCURACY_TARGET = 0.90   # the judge's target (benchmarks/judge_digits.py)
FASHION_ACCURACY_TARGET = 0.80  # the text-to-image demos' target (benchmarks/judge_fashion.py)
COPY_LIMIT = 0.01        # at most 1% of samples closer to a training image than 10% of real spacing
WIDTH = 100              # columns of the summary
FID_CLOSE = 1.25         # a samples' FID within 25% above the real-digit floor: "close to real"


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _last_record(path: str) -> dict:
  """The last line of metrics.jsonl that has a loss ({} when there is none)."""
  last = {}
  try:
    with open(path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if isinstance(rec, dict) and "loss" in rec:
          last = rec
  except OSError:
    pass
  return last


def _duration(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m}m{s:02d}s" if m else f"{s}s"


def verdict(figures: dict) -> str:
  """One line: does the model draw the digits asked for, new ones, and how close to real ones."""
  acc, copies = figures["accuracy"], figures["copy_fraction"]
  if acc >= ACCURACY_TARGET and copies <= COPY_LIMIT:
    line = (f"GOOD: {100 * acc:.0f}% of the samples are the digit asked for (target >= "
            f"{100 * ACCURACY_TARGET:.0f}%) and they are new digits, not copies")
  elif copies > COPY_LIMIT:
    line = f"POOR: {100 * copies:.1f}% of the samples copy a training image"
  else:
    line = (f"POOR: only {100 * acc:.0f}% of the samples are the digit asked for (target >= "
            f"{100 * ACCURACY_TARGET:.0f}%); train longer")
  if "fid_samples" in figures:
    close = figures["fid_samples"] <= FID_CLOSE * figures["fid_heldout_real"]
    line += ("; FID close to real digits" if close else "; FID clearly above real digits")
  return line + "."


def fashion_verdict(figures: dict) -> str:
  """One line: do the samples show the garment their prompt names (`judge_fashion.score_samples`'s
  figures), and which classes are weakest."""
  acc = figures["accuracy"]
  weak = sorted((a, name) for name, a in zip(captions.FASHION_CLASS_NAMES, figures["per_class"]) if a == a)[:2]
  weakest = ", ".join(f"{name} {100 * a:.0f}%" for a, name in weak)
  if acc >= FASHION_ACCURACY_TARGET:
    return (f"GOOD: {100 * acc:.0f}% of the samples show the garment their prompt names (target "
            f">= {100 * FASHION_ACCURACY_TARGET:.0f}%); weakest: {weakest}.")
  return (f"POOR: only {100 * acc:.0f}% of the samples show the garment their prompt names "
          f"(target >= {100 * FASHION_ACCURACY_TARGET:.0f}%); weakest: {weakest}; train longer.")


def _run_lines(title: str, workdir: str, trained_on: str) -> tuple[list[str], dict]:
  """The title and "Trained: ..." lines of the run in `workdir`, and its config's `sample` dict."""
  cfg = _read_json(os.path.join(workdir, "config.json"))
  train, sample, model = cfg.get("train", {}), cfg.get("sample", {}), cfg.get("model", {})
  last = _last_record(os.path.join(workdir, "metrics.jsonl"))
  rule = "=" * WIDTH
  lines = [rule, title, rule]
  what = (f"Trained: {trained_on}, network {model.get('name', '?')}, {last.get('step', '?')} of "
          f"{train.get('steps', '?')} steps at batch {train.get('batch_size', '?')}")
  if "wall_s" in last:
    what += (f" in {_duration(last['wall_s'])} (wall time up to the last logged step, "
             f"compilation included)")
  lines.append(what + ".")
  if "loss" in last:
    lines.append(f"  last logged training loss {last['loss']:.4f}; a record every "
                 f"{train.get('log_every', '?')} steps in {workdir}/metrics.jsonl.")
  return lines, sample


def _fid_line(fid: float, floor: float, n: int, reference: str, floor_images: str, *,
              digits: int) -> str:
  return (f"  FID {fid:.{digits}f} for {n} samples vs {n} {reference}; {n} {floor_images} score "
          f"{floor:.{digits}f} (the best a model can reach at this N; lower is better, not "
          f"comparable with published FIDs).")


def _closed(lines: list[str], verdict_line: str, workdir: str, layout: str) -> str:
  """The summary's `lines`, then its verdict and where the pictures are, wrapped to WIDTH."""
  lines = [*lines, f"Verdict: {verdict_line}",
           f"Pictures: {workdir}/samples/samples.png (the samples, {layout});",
           "  step_*.png beside it: grids drawn during training; samples.npz: the arrays.",
           "=" * WIDTH]
  return "\n".join(_wrapped(line) for line in lines)


def report(workdir: str, figures: dict) -> str:
  """The summary text (about 15 lines) of `make demo`'s run in `workdir` judged as `figures`
  (`judge_digits.evaluate`)."""
  lines, sample = _run_lines(
      "make demo: summary", workdir,
      "configs/sid2_digits.py, SiD2 diffusion on the 8x8 scikit-learn digits")
  lines.append(f"Sampled: {figures['n']} digits, {sample.get('num_steps', '?')} "
               f"{sample.get('sampler', '?')} steps, guidance scale "
               f"{sample.get('guidance_scale', '?')}, each asked for a given class 0-9.")
  lines.append("How good:")
  lines.append(f"  {100 * figures['accuracy']:.1f}% of the samples are recognised as their class "
               f"by a classifier that gets {100 * figures['classifier_heldout_accuracy']:.1f}% on "
               f"real held-out digits.")
  lines.append(f"  {100 * figures['copy_fraction']:.1f}% look copied from the training set "
               f"(median distance to the nearest training digit "
               f"{figures['nn_dist_samples_median']:.2f}, real digits "
               f"{figures['nn_dist_real_median']:.2f}).")
  if "fid_samples" in figures:
    lines.append(_fid_line(figures["fid_samples"], figures["fid_heldout_real"], figures["fid_n"],
                           "training digits", "real held-out digits", digits=2))
  return _closed(lines, verdict(figures), workdir, "one column per class")


def fashion_report(title: str, workdir: str, figures: dict) -> str:
  """The summary text of a text-to-image demo's run on captioned Fashion-MNIST latents (`make
  t2i-demo`, `make microdit-demo`) judged as `figures` (`judge_fashion.score_samples`, with
  "mlp_accuracy" and "mlp_real_accuracy" added)."""
  lines, sample = _run_lines(
      title, workdir, "text-to-image diffusion on captioned Fashion-MNIST latents (our "
      "autoencoder, MiniLM caption embeddings)")
  n_prompts = len(sample.get("prompts", ())) or "?"
  lines.append(f"Sampled: {figures['n']} images from {n_prompts} prompts in caption phrasings "
               f"never seen in training, {sample.get('num_steps', '?')} "
               f"{sample.get('sampler', '?')} steps, guidance scale "
               f"{sample.get('guidance_scale', '?')}.")
  lines.append("How good:")
  lines.append(f"  {100 * figures['accuracy']:.1f}% of the samples are recognised as the garment "
               f"their prompt names by a CNN that gets {100 * figures['judge_real_accuracy']:.1f}% "
               f"on real test images (an MLP on pixels: {100 * figures['mlp_accuracy']:.1f}%, "
               f"{100 * figures['mlp_real_accuracy']:.1f}% on real ones).")
  lines.append("  per class: " + ", ".join(
      f"{name} {100 * a:.0f}%"
      for name, a in zip(captions.FASHION_CLASS_NAMES, figures["per_class"]) if a == a))
  if "fid" in figures:
    lines.append(_fid_line(figures["fid"], figures["fid_floor"], figures["fid_n"],
                           "real test images", "real training images", digits=1))
  return _closed(lines, fashion_verdict(figures), workdir, "the first ones, in prompt order")


def _wrapped(line: str, width: int = WIDTH) -> str:
  """`line` wrapped to `width` columns, continuation lines indented under its text."""
  indent = " " * (len(line) - len(line.lstrip()) + 2)
  return textwrap.fill(line, width, subsequent_indent=indent, break_on_hyphens=False,
                       break_long_words=False)
