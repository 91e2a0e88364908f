r"""`--mode=tokenize`: encodes the prepared clips once and writes their codes as an array_record dataset.

  python -m nbp_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=tokenize

Reads WORKDIR/data (the clips of --mode=prepare_data) and the tokenizer of WORKDIR/tokenizer (or
config.tokenizer.checkpoint); writes every split to `tokens_location(config, workdir)`
(config.data.tokenized_dir or WORKDIR/tokens) with the features

  codes  uint16 [t, h, w]   (64,000 codes do not fit int16; uint16 holds up to 65,536)
  label  int32  []

readable with `pipeline.make_dataset(config, workdir, split, location=tokens_location(config, workdir))`.

Multi-host: each host encodes its shard of every split (every process_count-th clip) on its local devices.
Resumable: each encoded batch is saved at once under <tokens dir>/_work/; a rerun skips the batches already there.
When every host is done, process 0 writes the array_record shards (metadata: the tokenizer, relative to the workdir
when inside it, and its step) and removes the work files. An existing tokenized dataset is reused if it came from the
same tokenizer checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import grain
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from tqdm import tqdm

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import parallel
from nbp_jax.data import builder
from nbp_jax.data import pipeline
from nbp_jax.tokenizer import fsq
from nbp_jax.tokenizer import load
from nbp_jax.tokenizer import model as tokenizer_model

WORK_SUBDIR = '_work'


def tokens_location(config: ml_collections.ConfigDict, workdir: str) -> builder.Location:
  """Where the codes of `config.data`'s clips live: <data.tokenized_dir or WORKDIR/tokens>/clips/<name>_codes."""
  data_dir = config.data.tokenized_dir or os.path.join(workdir, 'tokens')
  return builder.Location(data_dir, builder.video_dataset_name(config) + '_codes')


def codes_dtype(levels) -> np.dtype:
  """The dtype tokenized codes are stored in: uint16 up to 65,536 codes (64,000 fits), else int32."""
  return np.dtype(np.uint16) if fsq.codebook_size(levels) <= 2 ** 16 else np.dtype(np.int32)


def _make_encoder(model: tokenizer_model.Tokenizer, params, batch_size: int):
  """A jitted encode data-parallel over this host's devices: (uint8 [B, T, H, W, 3]) -> numpy codes [B, t, h, w]."""
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise config_lib.ConfigError(f'tokenizer.tokenize_batch_size={batch_size} is not divisible by the '
                                 f'{len(devices)} local devices; use a multiple of {len(devices)}.')
  mesh = parallel.create_mesh((-1,), ('data',), devices=devices)
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  params = jax.device_put(params, replicated)
  fn = jax.jit(lambda p, v: tokenizer_model.encode(p, v, model), in_shardings=(replicated, batch),
               out_shardings=batch)
  return lambda video: fn(params, jax.device_put(video, batch))


def _host_dir(host: int) -> str:
  return f'host{host:05d}'


def _chunk_path(work: str, split: str, host: int, index: int) -> str:
  return os.path.join(work, split, _host_dir(host), f'batch{index:07d}.npz')


def encode_split(config: ml_collections.ConfigDict, workdir: str, split: str, encoder, batch_size: int, work: str,
                 dtype: np.dtype) -> int:
  """Encodes this host's shard of `split` into work files, skipping those already written; returns clips encoded."""
  host, hosts = jax.process_index(), jax.process_count()
  ds = pipeline.make_dataset(config, workdir, split, seed=0, shard_index=host, shard_count=hosts,
                             batch_size=batch_size * hosts, shuffle=False, num_epochs=1, drop_remainder=False)
  n = len(ds)
  done = [os.path.exists(_chunk_path(work, split, host, j)) for j in range(n)]
  first = done.index(False) if False in done else n
  os.makedirs(os.path.dirname(_chunk_path(work, split, host, 0)), exist_ok=True)
  bar = tqdm(total=n, initial=sum(done), desc=f'tokenize {split}', unit='batch', disable=host != 0,
             dynamic_ncols=True)
  pending = None  # (index, device codes, labels, count): written after the next batch is dispatched
  encoded = 0

  def flush(item):
    j, codes, labels, count = item
    codes = np.asarray(codes)[:count].astype(dtype)
    # The clips' places in the split: this host's clip k is the split's k * hosts + host.
    index = (j * batch_size + np.arange(count)) * hosts + host
    path = _chunk_path(work, split, host, j)
    tmp = path + '.tmp.npz'
    np.savez(tmp, codes=codes, label=labels[:count], index=index)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written batch behind
    bar.update(1)

  if first < n:
    reader = ds[first:].to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
    for j, batch in enumerate(reader, start=first):
      if done[j]:
        continue
      video = np.asarray(batch['video'])
      count = video.shape[0]
      if count < batch_size:  # last batch: pad to the compiled shape
        video = np.concatenate([video, np.repeat(video[-1:], batch_size - count, axis=0)])
      labels = np.asarray(batch.get('label', np.full((count,), -1)), np.int32)
      item = (j, encoder(video), labels, count)
      if pending is not None:
        flush(pending)
      pending = item
      encoded += count
    if pending is not None:
      flush(pending)
  bar.close()
  return encoded


def _read_split(work: str, split: str, batch_size: int):
  """Yields (key, record) from every host's work files of `split`, keyed by the clip's place in the split named as a
  single host names its own (host 0, its batch of `batch_size`, the place in the batch): the written dataset, whose
  record order follows the keys, is the same whatever the number of hosts, and a single host's is what it was."""
  root = os.path.join(work, split)
  for host_dir in sorted(os.listdir(root)):
    for name in sorted(f for f in os.listdir(os.path.join(root, host_dir)) if f.endswith('.npz')
                       and '.tmp' not in f):
      with np.load(os.path.join(root, host_dir, name)) as chunk:
        for index, codes, label in zip(chunk['index'], chunk['codes'], chunk['label']):
          batch, place = divmod(int(index), batch_size)
          yield f'{_host_dir(0)}/{os.path.basename(_chunk_path(work, split, 0, batch))}/{place}', {
              'codes': codes, 'label': label}


def tokenizer_reference(tokenizer_dir: str, workdir: str) -> str:
  """How the codes' metadata names their tokenizer: relative to the workdir when it lies inside it (so a moved or
  copied workdir still recognises its own codes), else its absolute path."""
  tokenizer_dir, workdir = os.path.abspath(tokenizer_dir), os.path.abspath(workdir)
  if os.path.commonpath([tokenizer_dir, workdir]) == workdir:
    return os.path.relpath(tokenizer_dir, workdir)
  return tokenizer_dir


def codes_metadata(config: ml_collections.ConfigDict, workdir: str, step: int, spec) -> dict:
  """What codes made now by the tokenizer at `step` (its TokenizerSpec `spec`) would record: the tokenizer (as
  tokenizer_reference names it) and step, the clips' dataset and preparation, the latent grid, the FSQ levels."""
  ft, fs = spec.temporal_factor, spec.spatial_factor
  grid = (1 + (config.data.num_frames - 1) // ft, config.data.resolution // fs, config.data.resolution // fs)
  video_location = builder.video_location(config, workdir)
  # Which preparation of the clips: a dataset deleted and prepared again (from another folder) is another one.
  clips_id = builder.dataset_id(video_location) if video_location.exists() else None
  return {'tokenizer': tokenizer_reference(load.tokenizer_workdir(config, workdir), workdir),
          'tokenizer_step': int(step), 'source': builder.video_dataset_name(config), 'source_id': clips_id,
          'latent_shape': list(grid), 'fsq_levels': list(spec.fsq_levels),
          'codes_dtype': codes_dtype(spec.fsq_levels).name}


def check_codes(location: builder.Location, expected: dict, clips_path: str, *, same_workdir: bool = True) -> None:
  """Refuses the codes at `location` where they are not what `expected` (codes_metadata) describes: another
  tokenizer, step, grid or FSQ levels, or clips prepared since; --mode=tokenize and --mode=train alike.
  `same_workdir`: `expected` was made for the workdir the codes were written from, so that the tokenizer's
  reference (relative to it, tokenizer_reference) compares too; a run elsewhere (a pipeline's nbp/) compares the
  rest."""
  old = dict(builder.load_info(location).metadata)
  keys = ('tokenizer',) * same_workdir + ('tokenizer_step', 'latent_shape', 'fsq_levels')
  if any(k in old and old[k] != expected[k] for k in keys):
    raise errors.UserError(
        f'The codes at {location.path} were written by the tokenizer {old.get("tokenizer")} at step '
        f'{old.get("tokenizer_step")} (grid {old.get("latent_shape")}, FSQ levels {old.get("fsq_levels")}), not '
        f'{expected["tokenizer"]} at step {expected["tokenizer_step"]} (grid {expected["latent_shape"]}, levels '
        f'{expected["fsq_levels"]}); delete that folder to re-tokenize.')
  if expected['source_id'] and old.get('source_id') and old['source_id'] != expected['source_id']:
    raise errors.UserError(
        f'The codes at {location.path} are of clips prepared before the ones now at {clips_path} (that dataset was '
        'prepared again); delete the codes folder to re-tokenize.')


def run(config: ml_collections.ConfigDict, workdir: str) -> builder.Location:
  location = tokens_location(config, workdir)
  if not location.exists():  # the clips first: with neither them nor a tokenizer, prepare_data is the step to name
    builder.require_prepared(builder.video_location(config, workdir))
  model, params, step = load.load_tokenizer(config, workdir)
  metadata = codes_metadata(config, workdir, step, model.spec)
  tdir, grid, dtype = metadata['tokenizer'], tuple(metadata['latent_shape']), np.dtype(metadata['codes_dtype'])
  video_location = builder.video_location(config, workdir)
  if location.exists():
    check_codes(location, metadata, video_location.path)
    if parallel.is_primary():
      print(f'Reusing the tokenized dataset at {location.path} (delete that folder to re-tokenize).')
    return location

  splits = sorted(builder.load_info(video_location).splits)
  batch_size = int(config.tokenizer.tokenize_batch_size)
  work = os.path.join(location.data_dir, WORK_SUBDIR, location.name)
  stamp = os.path.join(work, 'tokenizer.json')
  # 2: work files hold the clips' places (earlier ones start over). A batch file's name counts batches of this
  # size on this many hosts: another size or host count starts over (a resume skipped or repeated clips).
  work_metadata = {**metadata, 'work_format': 2, 'batch_size': batch_size, 'process_count': jax.process_count()}

  def start():
    os.makedirs(work, exist_ok=True)
    if os.path.exists(stamp):
      with open(stamp) as f:
        if json.load(f) != work_metadata:  # work files of another tokenizer or clip shape: start over
          shutil.rmtree(work)
          os.makedirs(work)
    checkpoint_lib.write_json(stamp, work_metadata, indent=None)

  def write():
    features = {'codes': (grid, dtype), 'label': ((), np.int32)}
    builder.build(location, features, {split: (lambda s=split: _read_split(work, s, batch_size)) for split in splits},
                  description=f'FSQ codes of {metadata["source"]} by the tokenizer {tdir} (step {step}).',
                  metadata=metadata)
    shutil.rmtree(work)
    info = builder.load_info(location)
    counts = ', '.join(f'{s}: {info.splits[s].num_examples}' for s in splits)
    print(f'Wrote codes {grid} ({dtype.name}) of {counts} clips to {location.path}', flush=True)

  parallel.on_primary(start, 'tokenize (starting its work folder)')
  encoder = _make_encoder(model, params, batch_size)
  for split in splits:
    encode_split(config, workdir, split, encoder, batch_size, work, dtype)
  parallel.sync('tokenize_encoded')
  parallel.on_primary(write, 'tokenize (writing the codes)')
  return location
