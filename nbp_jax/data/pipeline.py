"""Grain input pipelines over the array_record datasets of builder.py.

  ds = pipeline.make_dataset(config, workdir, 'train', seed=config.seed)    # grain.MapDataset of batches
  it = pipeline.make_iterator(ds, worker_count=config.data.worker_count)    # grain DatasetIterator
  batch = next(it)  # {'video': uint8 [B, T, H, W, 3], 'label': int32 [B]}, B = data.batch_size // hosts
  state = it.get_state(); ...; it.set_state(state)  # checkpointable position
  held_out = next(pipeline.first_clips(config, workdir, 8))  # the first 8 held-out clips, the same on every host

Order of operations: records -> global shuffle (seeded, a new permutation every epoch) -> repeat -> this host's
shard (every shard_count-th element) -> batches. All hosts compute the same permutation, so the hosts' shards
are disjoint within an epoch and together cover it. The pipeline is generic over the record's features: the
pre-tokenized dataset ('codes' uint16 [t, h, w], 'label') goes through the same function with its `location`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import sys
from typing import Any

import grain
import numpy as np

from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax.data import builder
from nbp_jax.data import prepare

# Prefetch counts batches, not examples: a 256 x 17 x 128 x 128 x 3 batch is 214 MB.
_READ_THREADS = 4
_PREFETCH_BATCHES = 4


def eval_split(config, workdir: str, location: builder.Location | None = None) -> str:
  """config.data.eval_split, or the first of 'validation', 'test' the dataset has."""
  if config.data.get('eval_split', ''):
    return config.data.eval_split
  location = location or builder.video_location(config, workdir)
  splits = builder.load_info(location).splits
  for name in ('validation', 'test'):
    if name in splits:
      return name
  raise errors.MissingError(
      f'The dataset at {location.path} has no validation or test split (it has {sorted(splits)}), so nothing is held '
      'out to evaluate on: prepare it from a folder with split lists (README, Data), or evaluate on training clips '
      'with --config.data.eval_split=train.')


def num_examples(config, workdir: str, split: str, location: builder.Location | None = None) -> int:
  """Records in one split of the dataset (all hosts together)."""
  location = location or builder.video_location(config, workdir)
  info = builder.load_info(location)
  if split not in info.splits:
    raise config_lib.ConfigError(f'Split {split!r} is not in the dataset at {location.path}; it has '
                                 f'{sorted(info.splits)}.')
  return info.splits[split].num_examples


class _CastToStoredDtypes(grain.transforms.Map):
  """Records come back with scalars as Python ints; cast every feature to the dtype it was written with."""

  def __init__(self, dtypes: dict[str, np.dtype]):
    self._dtypes = dtypes

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=self._dtypes[k]) for k, v in element.items() if k in self._dtypes}


def make_dataset(config, workdir: str, split: str, *, seed: int, shard_index: int | None = None,
                 shard_count: int | None = None, batch_size: int | None = None, shuffle: bool | None = None,
                 num_epochs: int | None | str = 'auto', drop_remainder: bool = True,
                 location: builder.Location | None = None, batch_field: str = 'data.batch_size') -> grain.MapDataset:
  """Batches of one split as a grain.MapDataset.

  Args:
    config: the run config (reads config.data).
    workdir: the run's workdir (the dataset is WORKDIR/data unless config.data.dir is set).
    split: 'train', 'validation', 'test', ... as prepared; 'eval' = eval_split(config, ...).
    seed: shuffle seed; the same seed gives the same batches, byte for byte.
    shard_index, shard_count: this host's shard; default the part of the batch its devices hold on the config's
      mesh (parallel.process_data_shard: process_index / process_count when the batch axes span the hosts).
    batch_size: global batch over all hosts (default config.data.batch_size); each host gets
      batch_size // shard_count examples per batch.
    shuffle: default True for 'train', False otherwise ('eval' too, whichever split it names).
    num_epochs: None repeats forever; 'auto' = None for 'train', 1 otherwise ('eval': one pass, even over the
      training clips with data.eval_split='train').
    drop_remainder: drop a last partial batch (keeps shapes static for jit).
    location: the dataset to read; default builder.video_location(config, workdir). Pass another location
      (e.g. the pre-tokenized codes) to read its records with the same pipeline.
    batch_field: the config field the batch size comes from, as errors name it (the tokenizer's is its own).

  Returns:
    grain.MapDataset whose elements are dicts of numpy arrays with a leading batch axis, e.g.
    {'video': uint8 [B, T, H, W, 3], 'label': int32 [B]}.
  """
  location = location or builder.video_location(config, workdir)
  training = split == 'train'  # the defaults follow the split asked for: 'eval' is one pass, in order
  if split == 'eval':
    split = eval_split(config, workdir, location)
  if shard_index is None or shard_count is None:
    from nbp_jax import parallel  # pylint: disable=g-import-not-at-top
    mesh_shard = parallel.process_data_shard(
        parallel.batch_sharding(parallel.mesh_from_config(config), config.mesh.axis_rules))
    shard_index = mesh_shard[0] if shard_index is None else shard_index
    shard_count = mesh_shard[1] if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in [0, shard_count={shard_count}).')
  batch_size = config.data.batch_size if batch_size is None else batch_size
  if batch_size % shard_count:
    raise config_lib.ConfigError(f'{batch_field}={batch_size} is not divisible by the {shard_count} hosts; use a '
                                 f'multiple of {shard_count}.')
  per_host = batch_size // shard_count
  shuffle = training if shuffle is None else shuffle
  if num_epochs == 'auto':
    num_epochs = None if training else 1

  info = builder.load_info(location)
  if split not in info.splits:
    raise config_lib.ConfigError(f'Split {split!r} is not in the dataset at {location.path}; it has '
                                 f'{sorted(info.splits)}.')
  dtypes = {k: np.dtype(f.np_dtype) for k, f in info.features.items()}
  source = builder.data_source(location, split)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise errors.MissingError(f'Split {split!r} of {location.path} is empty: prepare the dataset again from a folder '
                              'with clips in that split.')

  ds = grain.MapDataset.source(source)
  if shuffle:
    # Before repeat: grain then draws a fresh permutation (seed + epoch) for every epoch.
    ds = ds.shuffle(seed=seed % 2**32)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if num_epochs is not None and drop_remainder and shard_count > 1:
    # Finite passes over whole global batches: every host gets as many (a collective per batch waits for all).
    ds = ds[:len(ds) // batch_size * batch_size]
  ds = ds[shard_index::shard_count]
  if len(ds) < sys.maxsize and len(ds) < per_host and drop_remainder:
    raise config_lib.ConfigError(f'Split {split!r} has {len(ds)} examples on this host, fewer than one batch of '
                                 f'{per_host}; lower {batch_field} or prepare more clips.')
  ds = ds.map(_CastToStoredDtypes(dtypes))
  return ds.batch(per_host, drop_remainder=drop_remainder)


def make_iterator(dataset: grain.MapDataset, *, worker_count: int = 0) -> grain.DatasetIterator:
  """An iterator over `dataset` with get_state()/set_state() (a small dict) for checkpoints.

  worker_count > 0 reads and decodes in that many worker processes (grain mp_prefetch); its state (per worker)
  restores the same position into an iterator of the same worker_count only (the trainer restarts the data under
  another data.worker_count: checkpoint.DATA_LAYOUT_FIELDS).
  """
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


def first_clips(config, workdir: str, count: int, *, split: str = 'eval', batch_size: int | None = None,
                shuffle: bool = False, seed: int = 0, batches: Iterable[int] | None = None
                ) -> Iterator[dict[str, np.ndarray]]:
  """The first `count` clips of `split` (with their labels), in a fixed order, the same on every host.

  Order: the split's record order; with `shuffle`, a permutation seeded by `seed` that repeats (a new permutation
  every epoch) so `count` may exceed the split. Unshuffled, one epoch at most: fewer clips when the split is smaller.
  `batches`: only these batches (ascending indices; e.g. a process's `parallel.share`), the others not read.

  Yields:
    batches of `batch_size` clips (default: all `count` in one), the last one smaller:
    {'video': uint8 [b, T, H, W, 3], 'label': int32 [b]}.
  """
  if count < 1:
    raise ValueError(f'first_clips needs count >= 1, got {count}.')
  batch_size = batch_size or count
  ds = make_dataset(config, workdir, split, seed=seed, shard_index=0, shard_count=1, batch_size=batch_size,
                    shuffle=shuffle, drop_remainder=False, num_epochs=None if shuffle else 1)
  num_batches = min(-(-count // batch_size), len(ds))
  # All batches: one pass (grain reads ahead); some: each read where it stands.
  chosen = enumerate(ds) if batches is None else ((i, ds[i]) for i in batches if i < num_batches)
  for i, batch in chosen:
    if i >= num_batches:
      return
    take = min(count - i * batch_size, len(batch['video']))
    yield {k: np.asarray(v)[:take] for k, v in batch.items()}


def example_clips(config, workdir: str, count: int, *, num_frames: int | None = None, resolution=None
                  ) -> tuple[dict[str, np.ndarray], str | None]:
  """`count` clips to condition a model on, anywhere: the held-out split of the run's dataset (repeated to fill
  `count`), or, where there is none (an imported or exported model), the held-out clips of the config's synthetic
  dataset (prepare.synthetic_clips) at `num_frames` x `resolution` (default the config's; those a model of synthetic
  data was evaluated on, out of a real dataset's distribution, but they run everywhere).

  Returns:
    ({'video': uint8 [count, T, H, W, 3], 'label': int32 [count]}, None), or (synthetic clips, why the dataset
    could not be read) so that callers can say so.
  """
  try:
    clips = next(first_clips(config, workdir, count))
  except (FileNotFoundError, ValueError) as e:  # no prepared dataset here
    clips = prepare.synthetic_clips(config, count, num_frames=num_frames, resolution=resolution)
    # Motion classes: in the model's label range (they name its classes only for a model of synthetic data).
    clips['label'] %= max(int(config.data.num_classes), 1)
    return clips, str(e)
  index = np.arange(count) % len(clips['video'])
  return {k: v[index] for k, v in clips.items()}, None
