r"""`--mode=eval`: the numbers papers report, computed the way the field computes them.

  python -m nbp_jax.main --config=configs/k600_3b.py --workdir=W --mode=eval --config.eval.num_samples=50000

Protocols (config.eval.protocols; 'auto' picks what the model can do):
  - 'class': class-conditional generation; classes drawn like the train split (the labels of the real clips);
    FVD of the samples against train-split real clips (UCF-101: 10,000 at 128x128), and the class accuracy of the
    samples by a classifier trained on the real train clips (classifier.py; eval.classifier_steps > 0), beside
    its accuracy on real held-out clips (the ceiling) and on the same clips with shuffled labels (the floor).
  - 'frame_prediction': for held-out clips, condition on the first nbp.context_frames frames, predict the rest
    (sampled as sample.* says, or greedily with eval.frame_prediction_greedy);
    FVD of the whole clips against the real ones (K600: resized to 64x64 first), PSNR/SSIM of the predicted frames
    and LPIPS of the first predicted frame against the truth (the release's protocol), beside the PSNR/SSIM of
    repeating the last given frame (copy_last_*).
  - 'reconstruction': the tokenizer alone: rFVD, PSNR, SSIM, LPIPS of decode(encode(x)) on held-out clips.
Writes WORKDIR/eval/results_step<step>.json (config, checkpoint step, sample counts, every metric), a PNG grid and
mp4s of the first samples beside it, and prints a table.

Multi-host: the sampling batches are shared among the processes (each samples its share on its own devices, batch
i with the key fold_in(rng, i)) and their results gathered, so the scores are the single-process ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import image_metrics
from nbp_jax import parallel
from nbp_jax.data import builder
from nbp_jax.data import pipeline
from nbp_jax.evaluation import classifier as classifier_lib
from nbp_jax.evaluation import fvd
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp.sampling import Sampling

PROTOCOLS = ('class', 'frame_prediction', 'reconstruction')


def auto_protocols(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What `config` can be evaluated on: its generation tasks, then the tokenizer's reconstruction."""
  names = []
  if config.nbp.condition == 'class':
    names.append('class')
  if config.nbp.context_frames > 0:
    names.append('frame_prediction')
  names.append('reconstruction')
  return tuple(names)


def _real_batches(config, workdir: str, split: str, num: int, batch_size: int, batches: Iterable[int] | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """The real clips the protocols score against: the first `num` of `split` in config.seed's shuffled order (only
  the batches with the indices `batches`, when given)."""
  return pipeline.first_clips(config, workdir, num, split=split, batch_size=batch_size, shuffle=True, seed=config.seed,
                              batches=batches)


def _shared_real_batches(config, workdir: str, split: str, num: int, batch_size: int, desc: str
                         ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """(batch index, batch) of the real batches this process samples for (parallel.share), with a progress bar."""
  mine = parallel.share(_num_batches(num, batch_size))
  return zip(mine, tqdm(_real_batches(config, workdir, split, num, batch_size, mine), desc=desc, total=len(mine)))


def _dataset_key(config, workdir: str) -> dict[str, str | None]:
  """Which clips the cached real statistics and classifier were computed from: the dataset's name and the id of its
  preparation (a dataset deleted and prepared again, maybe from another folder, has another)."""
  return {'dataset': builder.video_dataset_name(config),
          'dataset_id': builder.dataset_id(builder.video_location(config, workdir))}


def evaluation_settings(config, workdir: str) -> dict[str, Any]:
  """What an evaluation's numbers depend on besides the checkpoint (recorded in its report; a finished evaluation
  is reused only where they are the same)."""
  ev = config.eval
  settings = {'sampling': dataclasses.asdict(Sampling.from_config(config.sample)), 'seed': config.seed,
              'block_shape': list(config.nbp.block_shape), 'num_samples': ev.num_samples,
              'fvd_num_frames': ev.fvd_num_frames, 'fvd_resize': ev.fvd_resize, 'fvd_stats': fvd.STATS_VERSION,
              'fvd_protocols': list(fvd_protocols(config)), 'frame_prediction': frame_prediction_decoding(config),
              'classifier_steps': ev.classifier_steps, 'eval_split': pipeline.eval_split(config, workdir),
              'context_frames': config.nbp.context_frames, **_dataset_key(config, workdir)}
  return json.loads(json.dumps(settings, default=float))  # as read back from the report


def real_stats(config, workdir: str, split: str, feature_fn, stats_dir: str | None = None
               ) -> dict[str, np.ndarray] | None:
  """I3D statistics of the first eval.num_samples clips of `split`, cached in STATS_DIR (default WORKDIR)/fvd_stats
  and reused; None when `feature_fn` is None (a protocol that scores no FVD)."""
  if feature_fn is None:
    return None
  ev = config.eval
  path = fvd.stats_cache_path(stats_dir or workdir, **_dataset_key(config, workdir), split=split,
                              resolution=config.data.resolution, frames=ev.fvd_num_frames, resize=ev.fvd_resize,
                              num=ev.num_samples, seed=config.seed, version=fvd.STATS_VERSION)

  def compute():
    real = _Collector(feature_fn, ev.batch_size)
    for i, batch in _shared_real_batches(config, workdir, split, ev.num_samples, ev.batch_size,
                                         f'I3D real ({split})'):
      real.add(i, batch['video'])
    return real.gathered()[0]

  return fvd.cached_real_stats(path, compute)


class _Collector:
  """The results of a protocol's batches: I3D features (none if `feature_fn` is None), per-video metrics and the
  videos at the global sample indices `show` (for the sample files). Each process adds the batches of its share;
  `result` gathers them all, in batch order."""

  def __init__(self, feature_fn, batch_size: int, show: Sequence[int] = ()):
    self.feature_fn, self.batch_size, self.show = feature_fn, batch_size, list(show)
    self.batches: dict[int, dict] = {}

  def add(self, index: int, videos: np.ndarray, shown: np.ndarray | None = None, **per_video: np.ndarray) -> None:
    """Batch `index` (its samples index * batch_size, ...): features of `videos`; `shown` (default `videos`) is what
    the sample files show."""
    out = {'values': {name: np.asarray(value, np.float64) for name, value in per_video.items()}, 'features': None,
           'count': len(videos)}
    if self.feature_fn is not None:
      # A smaller last batch padded to the others' size: the feature function compiles once.
      pad = np.repeat(videos[-1:], self.batch_size - len(videos), axis=0)
      out['features'] = fvd.extract_features([np.concatenate([videos, pad])], self.feature_fn,
                                             desc='I3D')[:len(videos)]
    start, shown = index * self.batch_size, videos if shown is None else shown
    out['shown'] = {i: shown[i - start] for i in self.show if start <= i < start + len(videos)}
    self.batches[index] = out

  def gathered(self) -> tuple[np.ndarray | None, dict[str, np.ndarray], np.ndarray | None, int]:
    """(features [N, 400] or None, {metric: per-video values [N]}, the videos at `show` or None, N) of all
    batches."""
    batches = parallel.gather(self.batches)
    features = np.concatenate([b['features'] for b in batches]) if self.feature_fn is not None else None
    values = {name: np.concatenate([b['values'][name] for b in batches]) for name in batches[0]['values']}
    shown = {i: video for b in batches for i, video in b['shown'].items()}
    shown = [shown[i] for i in self.show if i in shown]  # (fewer samples than `show` asks for)
    return features, values, np.stack(shown) if shown else None, sum(b['count'] for b in batches)

  def result(self, stats: dict[str, np.ndarray] | None, fvd_name: str = 'fvd'
             ) -> tuple[dict[str, float], np.ndarray | None, int]:
    """({fvd_name: FVD against the real `stats` (if features were taken), per-video metric: mean}, shown videos,
    how many videos)."""
    features, values, shown, count = self.gathered()
    means = {name: float(v.mean()) for name, v in values.items()}
    if features is not None:
      means = {fvd_name: fvd.fvd_from_stats(fvd.feature_stats(features), stats), **means}
    return means, shown, count


def _num_batches(num: int, batch_size: int) -> int:
  return -(-num // batch_size)


def eval_classifier(config, workdir: str, stats_dir: str | None = None):
  """The class-accuracy classifier of config's dataset (trained on batches drawn from its train split, cached in
  STATS_DIR)."""
  split = 'train'
  num = pipeline.num_examples(config, workdir, split)

  def train_clips():
    # Every clip of the split in _real_batches' order (config.seed's permutation), read where a step needs it.
    ds = pipeline.make_dataset(config, workdir, split, seed=config.seed, shard_index=0, shard_count=1, batch_size=1,
                               shuffle=True, num_epochs=1, drop_remainder=False)

    def read(indices):
      clips = [ds[int(i)] for i in indices]
      return np.concatenate([c['video'] for c in clips]), np.concatenate([c['label'] for c in clips])

    return classifier_lib.Clips(len(ds), read)

  key = {**_dataset_key(config, workdir), 'split': split, 'num_clips': num, 'seed': config.seed}
  return classifier_lib.cached_classifier(stats_dir or workdir, key, train_clips, config.data.num_classes,
                                          config.data.num_frames, config.eval.classifier_steps)


def classifier_references(config, workdir: str, predict) -> dict[str, float]:
  """The classifier's accuracy on real held-out clips (ceiling) and on them with shuffled labels (floor)."""
  split = pipeline.eval_split(config, workdir)
  labels, predicted = [], []
  for batch in _real_batches(config, workdir, split, config.eval.num_samples, config.eval.batch_size):
    labels.append(batch['label'])  # batch by batch: the clips of a UCF evaluation are ~8 GB together
    predicted.append(predict(batch['video']))
  labels, predicted = np.concatenate(labels), np.concatenate(predicted)
  return {'real_class_acc': classifier_lib.accuracy(predicted, labels),
          'shuffled_class_acc': classifier_lib.accuracy(predicted, classifier_lib.shuffled(labels, config.seed))}


def evaluate_class(config, workdir: str, generator: generator_lib.Generator, feature_fn, rng, *, keep: int,
                   stats_dir: str | None = None) -> dict:
  """Class-conditional FVD (samples with the real clips' labels vs those real train clips) and class accuracy; the
  sample files show one sample per class, in class order (`shown_labels`)."""
  ev = config.eval
  real_split = 'train'
  # Class frequencies as in the train split: the labels of the same real clips the samples are compared with.
  labels = np.concatenate([b['label'] for b in _real_batches(config, workdir, real_split, ev.num_samples,
                                                             ev.batch_size)]).astype(np.int32)
  stats = real_stats(config, workdir, real_split, feature_fn, stats_dir)
  predict = eval_classifier(config, workdir, stats_dir) if ev.classifier_steps > 0 else None
  # The sample files show the first sample of each of the first `keep` classes to appear, in class order.
  first = {}
  for i, label in enumerate(labels.tolist()):
    if label not in first and len(first) < keep:
      first[label] = i
  shown_labels = sorted(first)
  fake = _Collector(feature_fn, ev.batch_size, show=[first[label] for label in shown_labels])
  mine = parallel.share(_num_batches(len(labels), ev.batch_size))
  for i in tqdm(mine, desc='sampling (class)'):
    chunk = labels[i * ev.batch_size:(i + 1) * ev.batch_size]
    videos = generator.decode(generator.codes(jax.random.fold_in(rng, i), labels=chunk))
    fake.add(i, videos, **({'class_acc': predict(videos) == chunk} if predict else {}))
  means, shown, _ = fake.result(stats)
  extra = classifier_references(config, workdir, predict) if predict else {}
  return {'metrics': {**means, **extra}, 'num_samples': int(len(labels)), 'real_split': real_split,
          'shown_labels': shown_labels, 'videos': shown}


def evaluate_frame_prediction(config, workdir: str, generator: generator_lib.Generator, feature_fn, lpips_fn, rng, *,
                              keep: int, stats_dir: str | None = None) -> dict:
  """Frame prediction: context from held-out clips; FVD of whole clips (unless `feature_fn` is None); PSNR/SSIM of
  the predicted frames and LPIPS of the first one; PSNR/SSIM of the copy-last-frame baseline."""
  ev = config.eval
  split = pipeline.eval_split(config, workdir)
  given = config.nbp.context_frames
  decoding = frame_prediction_decoding(config)
  stats = real_stats(config, workdir, split, feature_fn, stats_dir)
  fake = _Collector(feature_fn, ev.batch_size, show=range(keep))
  batches = _shared_real_batches(config, workdir, split, ev.num_samples, ev.batch_size, 'sampling (frame prediction)')
  for i, batch in batches:
    truth = batch['video']
    labels = batch['label'].astype(np.int32) if config.nbp.condition == 'class' else None
    codes = generator.codes(jax.random.fold_in(rng, i), labels=labels, context_codes=generator.context_codes(truth),
                            sampling={'greedy': True} if decoding == 'greedy' else None)
    pred = generator.decode(codes)
    pf, tf = pred[:, given:], truth[:, given:]
    copy_last = copy_last_prediction(truth, given)[:, given:]
    # LPIPS of the first predicted frame, as in the release's protocol; PSNR and SSIM of all of them.
    # Sample files show truth | prediction side by side.
    fake.add(i, pred, np.concatenate([truth, pred], axis=3), psnr=np.asarray(image_metrics.psnr(pf, tf)),
             copy_last_psnr=np.asarray(image_metrics.psnr(copy_last, tf)), **_lpips(lpips_fn, pf[:, :1], tf[:, :1]),
             **_ssim(pf, tf), **_ssim(copy_last, tf, 'copy_last_ssim'))
  means, kept, count = fake.result(stats)
  return {'metrics': means,
          'num_samples': count, 'decoding': decoding,
          'real_split': split, 'videos': kept}


def _lpips(lpips_fn, videos: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
  """{'lpips': LPIPS per clip [B], the mean over its frames}, or {} for frames smaller than VGG's receptive
  field needs (image_metrics.LPIPS_MIN_SIZE; LPIPS is NaN there)."""
  if min(videos.shape[-3:-1]) < image_metrics.LPIPS_MIN_SIZE:
    return {}
  per_frame = [np.asarray(lpips_fn(videos[:, t], truth[:, t])) for t in range(videos.shape[1])]
  return {'lpips': np.stack(per_frame, 1).mean(1)}


def _ssim(videos: np.ndarray, truth: np.ndarray, name: str = 'ssim') -> dict[str, np.ndarray]:
  """{name: SSIM per clip [B]}, or {} for frames smaller than SSIM's window (the table then shows '-')."""
  if min(videos.shape[-3:-1]) < image_metrics.SSIM_WINDOW:
    return {}
  return {name: np.asarray(image_metrics.ssim(videos, truth))}


def frame_prediction_decoding(config) -> str:
  """How the frame-prediction protocol decodes: 'greedy' (eval.frame_prediction_greedy) or 'sampled'."""
  return 'greedy' if config.eval.get('frame_prediction_greedy', False) else 'sampled'


def copy_last_prediction(videos: np.ndarray, given: int) -> np.ndarray:
  """The copy-last-frame baseline: [B, T, H, W, 3] with every frame from `given` on replaced by frame given-1."""
  if not 0 < given < videos.shape[1]:
    raise ValueError(f'copy_last_prediction needs 0 < given < T; got given={given} for {videos.shape[1]} frames.')
  out = np.array(videos, copy=True)
  out[:, given:] = videos[:, given - 1:given]
  return out


def evaluate_reconstruction(config, workdir: str, generator: generator_lib.Generator, feature_fn, lpips_fn, *,
                            keep: int, stats_dir: str | None = None) -> dict:
  """The tokenizer alone on held-out clips: rFVD (unless `feature_fn` is None), PSNR, SSIM, LPIPS (all frames)."""
  ev = config.eval
  split = pipeline.eval_split(config, workdir)
  stats = real_stats(config, workdir, split, feature_fn, stats_dir)
  fake = _Collector(feature_fn, ev.batch_size, show=range(keep))
  for i, batch in _shared_real_batches(config, workdir, split, ev.num_samples, ev.batch_size, 'reconstruction'):
    truth = batch['video']
    recon = generator.decode(generator.encode(truth))
    fake.add(i, recon, np.concatenate([truth, recon], axis=3), psnr=np.asarray(image_metrics.psnr(recon, truth)),
             **_lpips(lpips_fn, recon, truth), **_ssim(recon, truth))
  means, kept, count = fake.result(stats, fvd_name='rfvd')
  return {'metrics': means,
          'num_samples': count,
          'real_split': split, 'videos': kept}


def _note_repeated_clips(config, workdir: str, protocols: Sequence[str]) -> None:
  """Says where eval.num_samples is more real clips than a split the protocols read holds: its clips then repeat
  (pipeline.first_clips cycles through them), so some weigh twice in the real statistics and the means."""
  # The class protocol's real set is the train split; its classifier's ceiling, and the other protocols, the eval split.
  splits = {pipeline.eval_split(config, workdir)} | ({'train'} if 'class' in protocols else set())
  for split in sorted(splits):
    count = pipeline.num_examples(config, workdir, split)
    if config.eval.num_samples > count and parallel.is_primary():
      print(f'Note: eval.num_samples={config.eval.num_samples} is more than the {count} clips of split {split!r}: '
            'its clips repeat in the real set (some count twice); lower eval.num_samples to score each once.',
            flush=True)


def format_table(results: dict[str, dict]) -> str:
  """A plain-text table: one row per protocol, one column per metric."""
  columns = sorted({m for r in results.values() for m in r['metrics']})
  header = ['protocol', 'samples'] + columns
  rows = [[name, str(r['num_samples'])] + [f"{r['metrics'][c]:.3f}" if c in r['metrics'] else '-' for c in columns]
          for name, r in results.items()]
  widths = [max(len(x) for x in col) for col in zip(header, *rows)]
  line = lambda cells: '  '.join(c.rjust(w) for c, w in zip(cells, widths))
  return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


def evaluate(config: ml_collections.ConfigDict, workdir: str, generator: generator_lib.Generator | None = None,
             *, protocols: tuple[str, ...] | None = None, stats_dir: str | None = None
             ) -> dict:
  """Runs the protocols, writes results JSON + samples under WORKDIR/eval, returns the results.

  `stats_dir` holds the cached real-video statistics (default WORKDIR), so runs on one dataset can share them.
  """
  generator = generator or generator_lib.Generator.load(workdir, config)
  protocols = protocols or configured_protocols(config)
  ev = config.eval
  feature_fn = fvd.make_feature_fn(ev.fvd_num_frames, ev.fvd_resize)
  lpips_fn = image_metrics.make_lpips()
  rng = jax.random.key(config.seed + 1)
  keep = int(ev.get('num_video_files', 4))
  with_fvd = fvd_protocols(config)
  _note_repeated_clips(config, workdir, protocols)
  results: dict[str, dict] = {}
  for name in protocols:
    start = time.perf_counter()
    features = feature_fn if name in with_fvd else None
    if name == 'class':
      results[name] = evaluate_class(config, workdir, generator, features, rng, keep=keep, stats_dir=stats_dir)
    elif name == 'frame_prediction':
      results[name] = evaluate_frame_prediction(config, workdir, generator, features, lpips_fn, rng, keep=keep,
                                                stats_dir=stats_dir)
    elif name == 'reconstruction':
      results[name] = evaluate_reconstruction(config, workdir, generator, features, lpips_fn, keep=keep,
                                              stats_dir=stats_dir)
    else:
      raise ValueError(f'eval.protocols has {name!r}; pick from {PROTOCOLS} or auto.')
    results[name]['seconds'] = time.perf_counter() - start

  out_dir = os.path.join(workdir, 'eval')
  tag = f'step{generator.step}'
  files = {}
  for name, r in results.items():
    videos = r.pop('videos')
    if videos is not None:  # eval.num_video_files=0 keeps none
      files[name] = generator_lib.write_samples(videos, out_dir, config.data.fps, num_files=keep,
                                                name=f'{tag}_{name}')
  report = {
      'config': config.name, 'checkpoint_step': generator.step, 'block_shape': list(generator.spec.layout.block_shape),
      'fvd_num_frames': ev.fvd_num_frames, 'fvd_resize': ev.fvd_resize, 'num_samples_requested': ev.num_samples,
      'settings': evaluation_settings(config, workdir), 'protocols': results, 'grids': files,
  }
  path = os.path.join(out_dir, f'results_{tag}.json')
  if parallel.is_primary():
    checkpoint_lib.write_json(path, report)
    print(format_table(results))
    print(f'Results: {path}')
  return report


def _protocol_names(value, field: str) -> tuple[str, ...]:
  names = tuple(n.strip() for n in (value.split(',') if isinstance(value, str) else value) if n.strip())
  for n in names:
    if n not in PROTOCOLS:
      raise config_lib.ConfigError(f'{field} has {n!r}; pick from {", ".join(PROTOCOLS)}.')
  return names


def configured_protocols(config, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
  """config.eval.protocols as a tuple; 'auto' = `default`, or what the model can do (auto_protocols)."""
  names = config.eval.get('protocols', 'auto')
  if names in ('auto', '', None):
    return default or auto_protocols(config)
  return _protocol_names(names, 'eval.protocols (or auto)')


def fvd_protocols(config) -> tuple[str, ...]:
  """config.eval.fvd_protocols as a tuple: the protocols that score FVD ('all' = every one)."""
  names = config.eval.get('fvd_protocols', 'all')
  if names == 'all':
    return PROTOCOLS
  return _protocol_names(names, "eval.fvd_protocols (or 'all')")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  evaluate(config, workdir)
