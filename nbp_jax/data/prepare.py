r"""`--mode=prepare_data`: writes the clips of `config.data` as an array_record dataset (see builder.py).

  python -m nbp_jax.main --config=configs/ucf101_3b.py --workdir=W --mode=prepare_data \
      --config.data.raw_dir=/data/UCF-101

Sources (config.data.source):
  synthetic  generated videos (synthetic.py); splits train and validation.
  ucf101     raw_dir holds the class folders of .avi files and the official lists classInd.txt,
             trainlist01.txt, testlist01.txt (anywhere below raw_dir, e.g. in ucfTrainTestlist/); splits
             train and test. Without the lists every video goes to train, classes from the folder names.
  k600       raw_dir holds the clips (any sub-folders) plus either the official Kinetics CSVs
             (label,youtube_id,time_start,time_end,split; clips named <youtube_id>_<start:06d>_<end:06d>.mp4
             or <youtube_id>.mp4) or list files of `relative/path.mp4 label` lines (label optional; split
             from the list's file name: train*, val*, test*); splits train, validation, test as present.

Each video is decoded by ffmpeg at config.data.fps, squashed to resolution x resolution, and cut into
config.data.clips_per_video clips of num_frames frames (evenly spaced, the first at frame 0; <= 0: every
non-overlapping clip). Videos that cannot be decoded, are truncated or are too short are skipped and listed
with the reason in prepare_report.txt beside the shards; no partial clip is ever written.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import csv
import dataclasses
import itertools
import os
import re
from typing import Any
import uuid

import jax
import numpy as np
from tqdm import tqdm

from nbp_jax import errors
from nbp_jax import parallel
from nbp_jax.data import builder
from nbp_jax.data import synthetic
from nbp_jax.data import video_io

REPORT_NAME = 'prepare_report.txt'
UNKNOWN_LABEL = -1
_SPLIT_ALIASES = {'train': 'train', 'training': 'train', 'val': 'validation', 'valid': 'validation',
                  'validate': 'validation', 'validation': 'validation', 'test': 'test', 'testing': 'test'}


class PrepareError(errors.UserError, RuntimeError):
  """The raw folder cannot be prepared at all; the message says what is missing and how to fix it."""


class _EmptySplit(Exception):

  def __init__(self, split: str):
    super().__init__(split)
    self.split = split


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  """One listed video. `name` is how the report and the record keys call it (relative to raw_dir)."""
  name: str
  path: str | None  # None: listed but not found on disk
  label: int


@dataclasses.dataclass
class Listing:
  """What a raw folder holds: videos per split, class names, and problems found while listing."""
  splits: dict[str, list[VideoEntry]]
  class_names: list[str]
  problems: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (split, name, reason)
  notes: list[str] = dataclasses.field(default_factory=list)


def run(config, workdir: str) -> None:
  """Prepares (or reuses) the dataset `config.data` describes and prints a summary."""
  location = builder.video_location(config, workdir)
  if location.exists():
    _require_the_same_raw_dir(config, location)
    if parallel.is_primary():
      print(f'Reusing the prepared dataset at {location.path} (delete that folder to rebuild it).')
  else:
    # One writer in a multi-host run; a PrepareError says what the folder lacks (nbp_jax.main: one line, exit 2).
    prepare = prepare_synthetic if config.data.source == 'synthetic' else prepare_videos
    parallel.on_primary(lambda: prepare(config, location), 'prepare_data')
    if not location.exists():
      raise PrepareError(f'process {jax.process_index()} does not see the dataset process 0 wrote at '
                         f'{location.path}: every process of a run needs the same workdir (and data.dir), on '
                         'storage they all share.')
  if parallel.is_primary():
    print(summary(location, config))


def _require_the_same_raw_dir(config, location: builder.Location) -> None:
  """Refuses to reuse a dataset prepared from another folder than data.raw_dir (the dataset's name holds the
  settings that shape its clips, not the folder they come from); a folder since moved away is taken as this one."""
  raw_dir = config.data.raw_dir
  if config.data.source == 'synthetic' or not raw_dir:
    return
  stored = builder.load_info(location).metadata.get('raw_dir')
  if not stored or os.path.realpath(stored) == os.path.realpath(raw_dir):
    return
  if not os.path.exists(stored):
    if parallel.is_primary():
      print(f'Note: {location.path} was prepared from {stored}, which is no longer there; reusing it for '
            f'data.raw_dir={raw_dir} (delete that folder to prepare again).')
    return
  raise PrepareError(f'the dataset at {location.path} was prepared from {stored}, not data.raw_dir={raw_dir!r}: '
                     'prepare this folder into another data folder (--config.data.dir=... or another --workdir), or '
                     'delete that dataset to replace it.')


def class_names(config, workdir: str | None = None) -> list[str]:
  """A name for each of the data.num_classes labels: the prepared dataset's (WORKDIR's or data.dir's: what its
  labels mean), else the synthetic motions' (data.source='synthetic'), else those of import_.class_names or of
  data.raw_dir's classInd.txt, else 'class <i>'. A source with another number of names is passed over."""
  n = config.data.num_classes

  def candidates():
    location = builder.video_location(config, workdir) if workdir is not None else None
    if location is not None and location.exists():
      yield builder.load_info(location).metadata.get('class_names')
    if config.data.source == 'synthetic':
      yield [synthetic.motion_name(label) for label in range(n)]
    path = (config.import_.class_names if 'import_' in config else '') or (
        find_class_index(config.data.raw_dir) if config.data.raw_dir else None)
    if path and os.path.isfile(path):
      yield read_class_index(path)

  for names in candidates():
    if names and len(names) == n:
      return list(names)
  return [f'class {label}' for label in range(n)]


# --------------------------------------------------------------------------------------------------------------
# Synthetic videos.


SYNTHETIC_SPLITS = ('train', 'validation')


def synthetic_clip(config, split: str, index: int, num_frames: int | None = None,
                   resolution: int | tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
  """(uint8 video [T, H, W, 3], label) of clip `index` of a synthetic split, as prepare_data writes it; with
  `num_frames` the same clip longer (or shorter): its first data.num_frames frames are the prepared clip's; with
  `resolution` the same motion drawn at another size."""
  d, s = config.data, config.data.synthetic
  # One independent seed per (dataset seed, split, index): splits never share a video.
  seed = int(np.random.SeedSequence([s.seed, SYNTHETIC_SPLITS.index(split), index]).generate_state(1)[0])
  label = index % s.num_classes
  return synthetic.generate_video(seed, label, num_frames or d.num_frames, resolution or d.resolution), label


def synthetic_clips(config, count: int, *, num_frames: int | None = None,
                    resolution: int | tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """The first `count` held-out clips of config.data.synthetic's dataset, as prepare_data writes them (the same
  clips at `num_frames` / `resolution` where given): {'video': uint8 [count, T, H, W, 3], 'label': int32 [count]}
  (motion classes)."""
  clips = [synthetic_clip(config, 'validation', i, num_frames, resolution) for i in range(count)]
  return {'video': np.stack([video for video, _ in clips]), 'label': np.asarray([l for _, l in clips], np.int32)}


def prepare_synthetic(config, location: builder.Location) -> None:
  """Writes config.data.synthetic.num_train / num_val generated clips (labels cycle through the classes)."""
  d, s = config.data, config.data.synthetic
  if s.num_classes < 1:
    raise ValueError(f'data.synthetic.num_classes={s.num_classes} must be >= 1.')

  def split_generator(split: str, count: int):
    def generate():
      for i in tqdm(range(count), desc=f'synthetic {split}', unit='clip', leave=False):
        video, label = synthetic_clip(config, split, i)
        yield f'{i:08d}', {'video': video, 'label': label}
    return generate

  sizes = dict(zip(SYNTHETIC_SPLITS, (s.num_train, s.num_val)))
  splits = {split: split_generator(split, n) for split, n in sizes.items() if n > 0}
  metadata = dict(source='synthetic', num_frames=d.num_frames, resolution=d.resolution, fps=d.fps,
                  seed=s.seed, class_names=[synthetic.motion_name(c) for c in range(s.num_classes)],
                  dataset_id=uuid.uuid4().hex)
  builder.build(location, builder.video_features(d.num_frames, d.resolution), splits,
                description=f'Synthetic moving-shape videos, {s.num_classes} motion classes.', metadata=metadata)
  _write_report(location.path, [], dict(source='synthetic'))


# --------------------------------------------------------------------------------------------------------------
# Real videos from a local folder.


def prepare_videos(config, location: builder.Location) -> None:
  """Decodes, resamples, resizes and cuts the videos of config.data.raw_dir into clips (see module doc)."""
  d = config.data
  raw_dir = d.raw_dir
  if not raw_dir or not os.path.isdir(raw_dir):
    raise PrepareError(f'data.raw_dir={raw_dir!r} is not a folder; pass --config.data.raw_dir=/path/to/{d.source}.')
  listing = {'ucf101': list_ucf101, 'k600': list_k600}[d.source](raw_dir)
  for note in listing.notes:
    print(f'Note: {note}')
  splits = {k: v for k, v in listing.splits.items() if any(e.path for e in v)}
  for split in sorted(set(listing.splits) - set(splits)):
    print(f'Note: split {split!r} lists no video that exists on disk; it is left out.')
  if not splits:
    skipped = ''
    if listing.problems:  # no file for an empty folder: a refused command leaves nothing behind
      report = _write_report(os.path.dirname(location.path), listing.problems, dict(source=d.source, raw_dir=raw_dir))
      skipped = f' (the files it skipped, and why: {report})'
    raise PrepareError(f'no video found in data.raw_dir={raw_dir!r} for source {d.source!r}{skipped}; check the '
                       "folder layout (the README's Data section).")

  workers = d.get('prepare_workers', 0) or os.cpu_count() or 1
  # Per split, rebuilt each time the split is decoded (a retry decodes the remaining splits again).
  counts: dict[str, collections.Counter] = {}
  decode_problems: dict[str, list[tuple[str, str, str]]] = {}
  metadata: dict[str, Any] = dict(source=d.source, raw_dir=os.path.abspath(raw_dir), num_frames=d.num_frames,
                                  resolution=d.resolution, fps=d.fps, clips_per_video=d.clips_per_video,
                                  class_names=listing.class_names, num_videos={}, unlabeled_videos={},
                                  dataset_id=uuid.uuid4().hex)

  def decode(path):
    return video_io.read_video(path, fps=d.fps, resolution=d.resolution, threads=1 if workers > 1 else 0)

  def split_generator(split: str, entries: list[VideoEntry]):
    def generate():
      count = counts[split] = collections.Counter()
      problems = decode_problems[split] = []
      usable = [e for e in entries if e.path]
      bar = tqdm(total=len(usable), desc=f'{d.source} {split}', unit='video')
      for entry, result in _map_in_threads(decode, usable, workers, key=lambda e: e.path):
        bar.update()
        if isinstance(result, Exception):
          reason = result.reason if isinstance(result, video_io.VideoReadError) else f'unexpected error: {result!r}'
          problems.append((split, entry.name, reason))
        else:
          video, _ = result
          starts = clip_starts(len(video), d.num_frames, d.clips_per_video)
          if not starts:
            problems.append((split, entry.name, f'too short: {len(video)} frames at {d.fps:g} fps, a clip needs '
                                                f'{d.num_frames}'))
          for i, start in enumerate(starts):
            yield f'{entry.name}#{i}', {'video': video[start:start + d.num_frames], 'label': entry.label}
          count['clips'] += len(starts)
          count['videos'] += bool(starts)
          count['unlabeled'] += bool(starts) and entry.label == UNKNOWN_LABEL
        bar.set_postfix(clips=count['clips'], skipped=len(problems), refresh=False)
      bar.close()
      if not count['clips']:
        raise _EmptySplit(split)  # TFDS cannot write an empty split
      metadata['num_videos'][split] = count['videos']
      metadata['unlabeled_videos'][split] = count['unlabeled']
    return generate

  def all_problems():
    return list(listing.problems) + [p for split in sorted(decode_problems) for p in decode_problems[split]]

  while True:
    # Smallest splits first: a split that yields no clip at all shows up before the long ones are decoded.
    order = sorted(splits, key=lambda k: len(splits[k]))
    try:
      builder.build(location, builder.video_features(d.num_frames, d.resolution),
                    {split: split_generator(split, splits[split]) for split in order},
                    description=f'{d.source} clips from {raw_dir}', metadata=metadata)
      break
    except _EmptySplit as e:
      del splits[e.split]
      metadata['num_videos'], metadata['unlabeled_videos'] = {}, {}
      if not splits:
        folder = os.path.dirname(location.path)
        _write_report(folder, all_problems(), dict(source=d.source, raw_dir=raw_dir))
        raise PrepareError(f'no clip could be cut from any video (see {os.path.join(folder, REPORT_NAME)}).') from e
      print(f'Note: no clip could be cut from any video of split {e.split!r}; writing the dataset without it.')
  _write_report(location.path, all_problems(), dict(source=d.source, raw_dir=raw_dir))


def clip_starts(num_video_frames: int, num_frames: int, clips_per_video: int) -> list[int]:
  """First frame of each clip: `clips_per_video` evenly spaced windows (the first at 0), or every
  non-overlapping window when clips_per_video <= 0; [] when the video is shorter than one clip."""
  room = num_video_frames - num_frames
  if room < 0:
    return []
  if clips_per_video <= 0:
    return list(range(0, room + 1, num_frames))
  return sorted({int(round(x)) for x in np.linspace(0, room, clips_per_video)})


def _map_in_threads(fn: Callable, items: list, workers: int, key: Callable) -> Iterator[tuple[Any, Any]]:
  """Yields (item, fn(key(item)) or the exception it raised) in input order, with at most 2 * workers in flight
  (ffmpeg runs as a subprocess, so threads decode in parallel and memory stays bounded)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    it = iter(items)
    pending = collections.deque((item, pool.submit(fn, key(item))) for item in itertools.islice(it, 2 * workers))
    while pending:
      item, future = pending.popleft()
      try:
        result = future.result()
      except Exception as e:  # pylint: disable=broad-except
        result = e  # one bad video never stops the run
      nxt = next(it, None)
      if nxt is not None:
        pending.append((nxt, pool.submit(fn, key(nxt))))
      yield item, result


# --------------------------------------------------------------------------------------------------------------
# Listing the raw folders.


class _VideoIndex:
  """Every video file below a folder, looked up by file name (exact, then case-insensitive) or by stem."""

  def __init__(self, root: str):
    self.root = root
    self.paths: list[str] = []  # every video, in walk order
    self.by_name: dict[str, str] = {}  # the first of each file name (a list may name a video by its name alone)
    self.by_lower: dict[str, str] = {}
    self.by_stem: dict[str, str] = {}
    for dirpath, filenames in _walk(root):
      for f in filenames:
        if f.lower().endswith(video_io.VIDEO_EXTENSIONS):
          path = os.path.join(dirpath, f)
          self.paths.append(path)
          self.by_name.setdefault(f, path)
          self.by_lower.setdefault(f.lower(), path)
          self.by_stem.setdefault(os.path.splitext(f)[0], path)

  def find(self, relative: str) -> str | None:
    direct = os.path.join(self.root, relative)
    if os.path.isfile(direct):
      return direct
    base = os.path.basename(relative)
    return self.by_name.get(base) or self.by_lower.get(base.lower())

  def relative(self, path: str) -> str:
    return os.path.relpath(path, self.root)

  def note_unlisted(self, listing: Listing) -> None:
    """Adds a note to `listing` naming how many videos below the root no split list or CSV names (those named and
    refused are in listing.problems)."""
    used = {os.path.realpath(e.path) for entries in listing.splits.values() for e in entries}
    used |= {os.path.realpath(p) for p in (self.find(name) for _, name, _ in listing.problems) if p}
    unused = [p for p in self.paths if os.path.realpath(p) not in used]
    if unused:
      listing.notes.append(f'{len(unused)} video(s) below data.raw_dir are in no split list or CSV, so not used '
                           f'(e.g. {self.relative(unused[0])}); list them to use them.')


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
  """(folder, its file names sorted) below `root`, sorted, following links but each real folder once (a link to a
  folder above it would otherwise list the same videos again and again)."""
  visited = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in visited:
      dirnames[:] = []
      continue
    visited.add(real)
    dirnames.sort()
    yield dirpath, sorted(filenames)


def _find_files(root: str, predicate: Callable[[str], bool]) -> list[str]:
  """Every file below `root` (at any depth) whose name satisfies `predicate`, shallowest folders first."""
  found = []
  for dirpath, filenames in _walk(root):
    found += [os.path.join(dirpath, f) for f in filenames if predicate(f)]
  return sorted(found, key=lambda path: path.count(os.sep))


def _read_lines(path: str) -> list[str]:
  """The file's non-blank lines, stripped, without '#' comment lines (utf-8, a byte-order mark dropped)."""
  with open(path, encoding='utf-8-sig', errors='replace') as f:
    return [line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')]


def _split_list_line(line: str) -> tuple[str, str]:
  """'Folder/v_clip name.avi 12' -> ('Folder/v_clip name.avi', '12'): the path runs to its video extension (it may
  hold spaces), the rest (a label, possibly of several words, or nothing) follows; without an extension, the first
  word is the path."""
  match = _LISTED_VIDEO.match(line)
  path, rest = (match.group(1), match.group(2) or '') if match else (line.split(maxsplit=1) + [''])[:2]
  return path.replace('\\', '/'), rest.strip()


_EXTENSIONS = '|'.join(re.escape(extension) for extension in video_io.VIDEO_EXTENSIONS)
_LISTED_VIDEO = re.compile(rf'(.+?(?:{_EXTENSIONS}))(?:\s+(.*))?$', re.IGNORECASE)


def find_class_index(raw_dir: str) -> str | None:
  """UCF-101's classInd.txt (any case), the shallowest below `raw_dir`; None when there is none."""
  found = _find_files(raw_dir, lambda f: f.lower() == 'classind.txt')
  return found[0] if found else None


def read_class_index(path: str) -> list[str]:
  """Class names in label order: classInd.txt's '1 ApplyEyeMakeup' lines ordered by their numbers, or a file of
  one class name per line, in order ('#' comment lines skipped). A file that mixes the two forms is refused."""
  lines = _read_lines(path)
  numbered = [line.split(maxsplit=1) for line in lines]
  is_numbered = [len(parts) == 2 and parts[0].isdigit() for parts in numbered]
  if not any(is_numbered):
    return lines
  if not all(is_numbered):
    line = lines[is_numbered.index(False)]
    raise PrepareError(f'{path}: line {line!r} is not "<number> <class name>" like the others (classInd.txt lines '
                       'read "1 ApplyEyeMakeup"); fix or remove it.')
  return [name.strip() for _, name in sorted(numbered, key=lambda parts: int(parts[0]))]


def list_ucf101(raw_dir: str) -> Listing:
  """UCF-101: class folders of .avi plus classInd.txt / trainlist01.txt / testlist01.txt (official split 1)."""
  index = _VideoIndex(raw_dir)
  class_ind = find_class_index(raw_dir)
  if not class_ind:
    lists = _find_files(raw_dir, lambda f: f.lower() in ('trainlist01.txt', 'testlist01.txt'))
    return _list_class_folders(index, 'no classInd.txt below data.raw_dir: every video goes to split "train", with '
                               'classes from the folder names' + (
                                   f' ({lists[0]} is read only with the classInd.txt of its folder: put it there '
                                   'to use the official splits).' if lists else '.'))
  class_names = read_class_index(class_ind)
  class_id = {name: i for i, name in enumerate(class_names)}
  lower = collections.Counter(name.lower() for name in class_names)
  # A folder whose case differs from classInd.txt's still finds its class, unless two classes differ only in case.
  class_id_any_case = {name.lower(): i for i, name in enumerate(class_names) if lower[name.lower()] == 1}
  lists_dir = os.path.dirname(class_ind)
  listing = Listing(splits={}, class_names=class_names)
  for split, list_name in (('train', 'trainlist01.txt'), ('test', 'testlist01.txt')):
    path = os.path.join(lists_dir, list_name)
    if not os.path.isfile(path):
      listing.notes.append(f'{list_name} not found beside {class_ind}: no {split!r} split.')
      continue
    entries, seen = [], set()
    for line in _read_lines(path):  # 'ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1' (test lists: no label)
      relative, number = _split_list_line(line)
      folder = relative.split('/')[0] if '/' in relative else ''
      label = class_id.get(folder, class_id_any_case.get(folder.lower()))
      if label is None and number.isdigit() and 1 <= int(number) <= len(class_names):
        label = int(number) - 1  # the lists count classes from 1
      if label is None:
        listing.problems.append((split, relative, f'class of {relative!r} not in classInd.txt'))
        continue
      found = index.find(relative)
      if found is None:
        listing.problems.append((split, relative, f'listed in {list_name} but not found below data.raw_dir'))
      elif found not in seen:
        seen.add(found)
        entries.append(VideoEntry(name=relative, path=found, label=label))
    listing.splits[split] = entries
  index.note_unlisted(listing)
  return listing


def _list_class_folders(index: _VideoIndex, note: str) -> Listing:
  paths = sorted(index.paths)
  class_names = sorted({os.path.basename(os.path.dirname(p)) for p in paths})
  entries = [VideoEntry(name=index.relative(p), path=p, label=class_names.index(os.path.basename(os.path.dirname(p))))
             for p in paths]
  return Listing(splits={'train': entries}, class_names=class_names, notes=[note])


def _split_name(text: str, default: str = 'train') -> str:
  """'validate' -> 'validation', 'kinetics600_train.csv' -> 'train', ... (TFDS split names are \\w+)."""
  text = text.strip().lower()
  if text in _SPLIT_ALIASES:
    return _SPLIT_ALIASES[text]
  base = os.path.splitext(text)[0]
  for token in re.split(r'[^a-z]+', base):
    for prefix, split in (('train', 'train'), ('val', 'validation'), ('test', 'test')):
      if token.startswith(prefix):  # 'trainlist01', 'validate', 'testing', ...
        return split
  return re.sub(r'\W+', '_', base).strip('_') or default


def _looks_like_list_file(path: str) -> bool:
  lines = _read_lines(path)[:3]
  return bool(lines) and all(_LISTED_VIDEO.match(line) for line in lines)


def list_k600(raw_dir: str) -> Listing:
  """Kinetics-600: clips below raw_dir plus the official CSVs or `relative/path.mp4 label` list files."""
  index = _VideoIndex(raw_dir)
  csvs = _find_files(raw_dir, lambda f: f.lower().endswith('.csv'))
  lists = [p for p in _find_files(raw_dir, lambda f: f.lower().endswith('.txt')) if _looks_like_list_file(p)]
  if not csvs and not lists:
    raise PrepareError(f'data.raw_dir={raw_dir!r} holds no Kinetics CSV (label,youtube_id,time_start,time_end,split) '
                       'and no list file of "relative/path.mp4 label" lines; add one of them.')
  rows: list[tuple[str, str, str | None, str]] = []  # (split, name, path, label text)
  problems = []
  for path in csvs:
    with open(path, encoding='utf-8-sig', errors='replace', newline='') as f:
      reader = csv.DictReader(f)
      if 'youtube_id' not in (reader.fieldnames or []):
        continue  # some other CSV
      for row in reader:
        split = _split_name(row.get('split') or '', default='') or _split_name(os.path.basename(path))
        yid = row['youtube_id'].strip()
        stems = [yid]
        try:
          stems.insert(0, f'{yid}_{int(float(row["time_start"])):06d}_{int(float(row["time_end"])):06d}')
        except (KeyError, TypeError, ValueError):
          pass
        found = next((index.by_stem[s] for s in stems if s in index.by_stem), None)
        name = index.relative(found) if found else stems[0]
        if found is None:
          problems.append((split, name, f'listed in {os.path.basename(path)} but no file named {stems[0]}.* '
                                        'found below data.raw_dir'))
        rows.append((split, name, found, (row.get('label') or '').strip()))
  for path in lists:
    split = _split_name(os.path.basename(path))
    for line in _read_lines(path):
      relative, label = _split_list_line(line)
      beside_list = os.path.join(os.path.dirname(path), relative)
      found = beside_list if os.path.isfile(beside_list) else index.find(relative)
      name = index.relative(found) if found else relative
      if found is None:
        problems.append((split, relative, f'listed in {os.path.basename(path)} but not found below data.raw_dir'))
      rows.append((split, name, found, label))

  labels = {label for *_, label in rows if label}
  numeric = all(re.fullmatch(r'-?\d+', label) for label in labels)
  class_names = [] if numeric else sorted(labels)
  class_id = {name: i for i, name in enumerate(class_names)}
  splits: dict[str, list[VideoEntry]] = collections.defaultdict(list)
  seen = collections.defaultdict(set)
  for split, name, found, label in rows:
    if found is None or found in seen[split]:
      continue  # missing (already reported) or listed twice
    seen[split].add(found)
    value = UNKNOWN_LABEL if not label else (int(label) if numeric else class_id[label])
    splits[split].append(VideoEntry(name=name, path=found, label=value))
  if numeric and labels:
    class_names = [str(i) for i in range(max(int(l) for l in labels) + 1)]
  listing = Listing(splits=dict(splits), class_names=class_names, problems=problems)
  index.note_unlisted(listing)
  return listing


# --------------------------------------------------------------------------------------------------------------
# Report and summary.


def _write_report(folder: str, problems: Iterable[tuple[str, str, str]], header: dict[str, Any]) -> str:
  """Writes REPORT_NAME into `folder`: one tab-separated line per skipped video (split, file, reason)."""
  problems = list(problems)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, REPORT_NAME)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('# nbp-jax prepare_data report\n')
    for k, v in header.items():
      f.write(f'# {k}: {v}\n')
    f.write(f'# skipped videos: {len(problems)}\n')
    f.write('split\tfile\treason\n')
    for split, name, reason in problems:
      f.write(f'{split}\t{name}\t{reason}\n')
  return path


def read_report(folder: str) -> list[tuple[str, str, str]]:
  """(split, file, reason) of every video skipped when the dataset in `folder` was prepared."""
  path = os.path.join(folder, REPORT_NAME)
  if not os.path.isfile(path):
    return []
  lines = [l.rstrip('\n') for l in open(path, encoding='utf-8') if not l.startswith('#')]
  return [tuple(l.split('\t', 2)) for l in lines[1:] if l]


def summary(location: builder.Location, config=None) -> str:
  """A few lines for the terminal: clips per split, clip shape, classes, skipped videos, location."""
  info = builder.load_info(location)
  md = dict(info.metadata or {})
  features = info.features
  video_shape = tuple(features['video'].shape) if 'video' in features else None
  lines = [f'Dataset {location.tfds_name!r} ({md.get("source", "?")}), array_record at {location.path}']
  order = {'train': 0, 'validation': 1, 'test': 2}
  for split, split_info in sorted(info.splits.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])):
    extra = f' from {md["num_videos"][split]} videos' if split in md.get('num_videos', {}) else ''
    lines.append(f'  {split:<11s} {split_info.num_examples:>8d} clips{extra}')
  if video_shape:
    lines.append(f'  clip        video uint8 {list(video_shape)} at {md.get("fps", "?")} fps, label int32')
  classes = md.get('class_names') or []
  if classes:
    shown = ', '.join(classes[:5]) + (', ...' if len(classes) > 5 else '')
    lines.append(f'  classes     {len(classes)} ({shown})')
  problems = read_report(location.path)
  if problems:
    lines.append(f'  skipped     {len(problems)} video(s), listed with reasons in '
                 f'{os.path.join(location.path, REPORT_NAME)}')
  if not {'validation', 'test'} & set(info.splits):
    lines.append('  note        no held-out split (the folder had no split lists): training evaluates on one only '
                 'with --config.data.eval_split=train')
  if config is not None and config.data.num_classes and classes and len(classes) != config.data.num_classes:
    lines.append(f'  note        config.data.num_classes={config.data.num_classes} but the dataset has '
                 f'{len(classes)} classes; set --config.data.num_classes={len(classes)} to train on it.')
  return '\n'.join(lines)
