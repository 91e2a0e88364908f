"""Array_record datasets through a TFDS `GeneratorBasedBuilder`, without TensorFlow.

One builder class serves every dataset of the project: synthetic clips, prepared UCF-101/K600 clips, and the
pre-tokenized codes written by the tokenizer stage. A dataset is identified by a `Location`:

  <data_dir>/clips/<name>/1.0.0/{clips-<split>.array_record-000NN-of-000MM, dataset_info.json, features.json,
                                 metadata.json, prepare_report.txt}

and read back with `tfds.data_source('clips/<name>', data_dir=<data_dir>)`, which needs only those files (the
builder class is not registered, so reading never depends on the code that wrote the data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import contextlib
import dataclasses
import os
import tempfile
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from nbp_jax import errors

BUILDER_NAME = 'clips'
VERSION = '1.0.0'

# feature name -> (shape, numpy dtype). A record is a dict with exactly these keys.
FeatureSpec = Mapping[str, tuple[tuple[int, ...], Any]]
# split name -> a zero-argument callable yielding (unique key, record) pairs.
SplitGenerators = Mapping[str, Callable[[], Iterable[tuple[str, dict[str, Any]]]]]


@dataclasses.dataclass(frozen=True)
class Location:
  """Where one dataset lives: `data_dir` (TFDS data_dir) and `name` (its BuilderConfig name)."""
  data_dir: str
  name: str

  @property
  def tfds_name(self) -> str:
    """What `tfds.data_source` and `tfds.builder` take."""
    return f'{BUILDER_NAME}/{self.name}'

  @property
  def path(self) -> str:
    """The folder holding the array_record shards and metadata."""
    return os.path.join(self.data_dir, BUILDER_NAME, self.name, VERSION)

  def exists(self) -> bool:
    return os.path.isfile(os.path.join(self.path, 'dataset_info.json'))


def video_features(num_frames: int, resolution: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Features of a video-clip dataset: video uint8 [T, H, W, 3], label int32 [] (-1 = unknown)."""
  return {'video': ((num_frames, resolution, resolution, 3), np.uint8), 'label': ((), np.int32)}


def default_data_dir(config, workdir: str) -> str:
  """config.data.dir, or WORKDIR/data when empty."""
  return config.data.dir or os.path.join(workdir, 'data')


def video_dataset_name(config) -> str:
  """BuilderConfig name of the clips `config.data` describes, e.g. 'ucf101_17x128px_8fps'.

  Every setting that changes the stored clips is in the name, so changing one prepares a new dataset beside
  the old instead of silently reusing it.
  """
  d = config.data
  if d.source == 'synthetic':
    s = d.synthetic
    return (f'synthetic_{d.num_frames}x{d.resolution}px_c{s.num_classes}_n{s.num_train}-{s.num_val}'
            f'_seed{s.seed}')
  name = f'{d.source}_{d.num_frames}x{d.resolution}px_{d.fps:g}fps'.replace('.', 'p')
  if d.clips_per_video != 1:
    name += f'_{d.clips_per_video}clips' if d.clips_per_video > 0 else '_allclips'
  return name


def video_location(config, workdir: str) -> Location:
  """The prepared video-clip dataset for this config (written by --mode=prepare_data)."""
  return Location(default_data_dir(config, workdir), video_dataset_name(config))


class _ClipsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the splits given at construction as array_record shards (TFDS shuffles records by key hash)."""

  name = BUILDER_NAME
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, location: Location, features: FeatureSpec, splits: SplitGenerators, description: str,
               metadata: dict[str, Any] | None):
    self._features = dict(features)
    self._splits = dict(splits)
    self._description = description
    self._metadata = tfds.core.MetadataDict(metadata or {})
    self._config = tfds.core.BuilderConfig(name=location.name, description=description)
    super().__init__(data_dir=location.data_dir, config=self._config, file_format='array_record')

  def _log_download_bytes(self) -> None:
    # TFDS's message speaks of downloading; nothing is downloaded here.
    print(f'Writing array_record shards to {self.data_dir} ...')

  def _log_download_done(self) -> None:
    pass  # the caller prints a summary

  def get_builder_config(self, name, version=None):  # pylint: disable=arguments-differ
    # Our only config is the one given at construction (TFDS would otherwise warn about a "custom" config).
    del version
    return self._config if name == self._config.name else None

  def _info(self) -> tfds.core.DatasetInfo:
    features = {}
    for key, (shape, dtype) in self._features.items():
      # BYTES stores the raw buffer: ~10x faster to decode than the default int64 lists, and smaller.
      encoding = tfds.features.Encoding.BYTES if len(shape) else tfds.features.Encoding.NONE
      features[key] = tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype), encoding=encoding)
    return tfds.core.DatasetInfo(builder=self, description=self._description,
                                 features=tfds.features.FeaturesDict(features), metadata=self._metadata)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(make) for split, make in self._splits.items()}

  def _generate_examples(self, make):
    for key, record in make():
      yield key, {k: np.asarray(v, dtype=self._features[k][1]) for k, v in record.items()}


def build(location: Location, features: FeatureSpec, splits: SplitGenerators, *, description: str = '',
          metadata: dict[str, Any] | None = None) -> None:
  """Writes a dataset of `features` records at `location`, one array_record shard set per split.

  `metadata` (JSON-serialisable; it may be filled in while the generators run, e.g. with counts) is stored
  in metadata.json and comes back as `info.metadata`. TFDS's own progress bars are switched off: the
  generators show their own.
  """
  builder = _ClipsBuilder(location=location, features=features, splits=splits, description=description,
                          metadata=metadata)
  # TFDS makes a downloads/ folder even when nothing is downloaded; keep it out of the data folder.
  with _tfds_progress_bars(False), tempfile.TemporaryDirectory() as download_dir:
    builder.download_and_prepare(download_dir=download_dir,
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@contextlib.contextmanager
def _tfds_progress_bars(enabled: bool):
  tfds.display_progress_bar(enabled)
  try:
    yield
  finally:
    tfds.display_progress_bar(True)


def load_info(location: Location) -> tfds.core.DatasetInfo:
  """The stored DatasetInfo (splits and their sizes, features, metadata) of an existing dataset."""
  require_prepared(location)
  return tfds.builder_from_directory(location.path).info


def dataset_id(location: Location) -> str | None:
  """The id prepare_data gives each preparation of a dataset (a new one every time it is prepared: what is computed
  from its clips, codes, statistics, a classifier, records it); None for one prepared before ids were written."""
  return load_info(location).metadata.get('dataset_id')


def data_source(location: Location, split: str):
  """Random-access source over one split (`tfds.data_source`): len() and [i] -> dict of numpy features."""
  require_prepared(location)
  return tfds.data_source(location.tfds_name, split=split, data_dir=location.data_dir, download=False,
                          try_gcs=False)


def require_prepared(location: Location) -> None:
  """Raises MissingError (naming --mode=prepare_data) unless the dataset at `location` is written."""
  if not location.exists():
    raise errors.MissingError(
        f'No prepared dataset at {location.path}; run `python -m nbp_jax.main --mode=prepare_data` with the same '
        '--config and --workdir first (or point --config.data.dir at the folder holding it).')
