"""The grain loader every training pipeline uses: endless, shuffled, sharded per process,
checkpointable (`get_state()` / `set_state()`)."""

from __future__ import annotations

from absl import flags
import grain
import jax

from common.errors import ConfigError


def _get(cfg, key, default):
  value = cfg.get(key, default)
  return default if value is None else value


def local_batch(global_batch_size: int, process_index: int | None,
                process_count: int | None) -> tuple[int, int, int]:
  """Checks the process layout; returns (process_index, process_count, local batch size).

  process_index / process_count default to jax.process_index() / jax.process_count().
  """
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} not in [0, process_count={process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f"global batch size {global_batch_size} must be a positive multiple of the "
                      f"process count {process_count}")
  return process_index, process_count, global_batch_size // process_count


def make_loader(source, ops: list, cfg, *, local_batch_size: int, seed: int, process_index: int,
                process_count: int, read_threads: int,
                read_buffer_size: int) -> grain.DataLoaderIterator:
  """An iterator over batches of `source` mapped by `ops`.

  Each epoch is a fresh permutation of this process's shard (grain IndexSampler with shuffle=True,
  num_epochs=None and ShardOptions(process_index, process_count, drop_remainder=True): shards are
  disjoint, equal-sized, and together cover the data but for fewer than process_count examples);
  examples are batched last. `cfg` gives worker_count and worker_buffer_size (the data config).
  """
  ops = [*ops, grain.transforms.Batch(batch_size=local_batch_size, drop_remainder=True)]
  worker_count = int(_get(cfg, "worker_count", 0))
  if worker_count > 0:
    # grain's worker processes read absl flags; outside an absl app (scripts, notebooks, tests)
    # they are unparsed and grain fails. Parsing nothing keeps every flag at its default.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard_options, shuffle=True, num_epochs=None,
      seed=int(seed) % 2**32)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, operations=ops, shard_options=shard_options,
      worker_count=worker_count, worker_buffer_size=int(_get(cfg, "worker_buffer_size", 1)),
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=read_buffer_size))
  return iter(loader)
