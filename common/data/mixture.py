"""Weighted mixtures of precomputed latent datasets (`data.name = "latents"` with `data.mixture`).

    config.data.mixture = (("data/sa1b_256", "count"), ("data/cc12m_256", "count"), ...)
    config.data.mixture = (("data/a", 0.5), ("data/b", 0.5))

Each entry is (dataset directory written by `launch/precompute.py`, weight): a positive number, or
"count", the dataset's number of examples from its meta.json. Weights are normalised. All-"count"
weights draw every source in proportion to its size, which is what micro_diffusion's training does:
its `StreamingDataset` over one `Stream` per dataset, with no proportions set, goes through all of
their samples once per epoch (SonyResearch/micro_diffusion, `datasets/latents_loader.py` and
`configs/res_*.yaml` `dataset.train.datadir`).

The pipeline (grain datasets): per source, this process's slice `[process_index::process_count]`,
a shuffle with its own seed, repeated forever with a fresh permutation per epoch; then
`grain.MapDataset.mix` interleaves the sources by weight (a deterministic pattern), a caption is
drawn per example (`latents.PickCaption`), examples are batched. The iterator's `get_state()` /
`set_state()` resume the stream exactly, as for one dataset. Every source must have the same
latent shape, caption token shape and encoders (a ConfigError names the first that differs).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain

from common.errors import ConfigError

COUNT = "count"


def parse(mixture) -> list[tuple[str, float | str]]:
  """`data.mixture` -> [(path, weight)], checking its shape (not the datasets)."""
  if not isinstance(mixture, Sequence) or isinstance(mixture, str) or not mixture:
    raise ConfigError(f"data.mixture must be a non-empty tuple of (path, weight) pairs, got "
                      f"{mixture!r}")
  out = []
  for entry in mixture:
    if (not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 2
        or not isinstance(entry[0], str) or not entry[0]):
      raise ConfigError(f"data.mixture entry {entry!r} is not a (path, weight) pair")
    path, weight = entry
    if weight != COUNT and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                            or not weight > 0):
      raise ConfigError(f"data.mixture weight of {path} must be a positive number or "
                        f"{COUNT!r}, got {weight!r}")
    out.append((path, weight))
  paths = [p for p, _ in out]
  if len(set(paths)) != len(paths):
    raise ConfigError(f"data.mixture names a dataset twice: {paths}")
  return out


def weights(entries: Sequence[tuple[str, float | str]], counts: Sequence[int]) -> list[float]:
  """Normalised weights: "count" entries take their dataset's number of examples."""
  raw = [float(n) if w == COUNT else float(w) for (_, w), n in zip(entries, counts)]
  total = sum(raw)
  return [w / total for w in raw]


def check_compatible(infos: Sequence) -> None:
  """ConfigError unless every `latents.LatentsInfo` has the first one's shapes and encoders."""
  first = infos[0]
  for info in infos[1:]:
    for what in ("latent_shape", "text_max_length", "text_width", "autoencoder", "text_encoder"):
      a, b = getattr(first, what), getattr(info, what)
      if a != b:
        raise ConfigError(
            f"data.mixture: {info.path} has {what} {b!r} but {first.path} has {a!r}; every "
            "source of a mixture must be precomputed at the same resolution with the same "
            "autoencoder and text encoder")


def mixed_dataset(sources: Sequence, weights_: Sequence[float], ops: Sequence, *, seed: int,
                  process_index: int, process_count: int, local_batch_size: int,
                  read_options: grain.ReadOptions, worker_count: int = 0,
                  worker_buffer_size: int = 1) -> grain.IterDataset:
  """The endless mixed, shuffled, batched stream of this process (see the module docstring).

  Args:
    sources: grain random-access sources (`latents.LatentsSource`).
    weights_: their normalised mixing weights.
    ops: grain random transforms applied per example (after mixing).
    seed: shuffle and transform seed.
    process_index, process_count: this process's slice of every source.
    local_batch_size: examples per batch of this process.
    read_options: threads and prefetch of the reading iterator.
    worker_count: grain worker processes (`IterDataset.mp_prefetch`; 0: read in this process).
      As for one dataset, the stream depends on it and a state restores only with the same count.
    worker_buffer_size: batches each worker prepares ahead.
  """
  parts = []
  for k, source in enumerate(sources):
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) < 1:
      raise ConfigError(f"data.mixture: {source!r} has fewer examples than processes "
                        f"({process_count})")
    parts.append(ds.shuffle(seed=(int(seed) * 1_000_003 + k) % 2**32).repeat(None))
  ds = grain.MapDataset.mix(parts, list(weights_))
  for op in ops:
    ds = ds.random_map(op, seed=int(seed) % 2**32)
  ds = ds.batch(local_batch_size, drop_remainder=True).to_iter_dataset(read_options)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(worker_count), per_worker_buffer_size=int(worker_buffer_size)))
  return ds
