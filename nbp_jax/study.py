r"""`--mode=study`: the paper's block-size and block-shape ablation at toy scale, from one command.

  python -m nbp_jax.main --config=configs/study.py --workdir=workdirs/study --mode=study

Trains the same transformer on the same codes with every block shape of config.study.block_shapes (1x1x1 is
next-token prediction) and every seed of config.study.seeds, evaluates each with the demo's protocols (class FVD and
class accuracy, frame-prediction PSNR against the copy-last-frame baseline) and times its decoding; then writes

  WORKDIR/study.md    the table: one row per block shape, mean +- spread (half the range) over the seeds
  WORKDIR/study.json  every run's numbers and the aggregate
  WORKDIR/study.png   FVD and frames/s against block size (the paper's block-size figure), shapes marked

Layout: data/, tokenizer/, tokens/ shared (as --mode=pipeline); runs/<shape>_s<seed>/ one training workdir each,
with its result in runs/<shape>_s<seed>/study_result.json. A rerun skips every run whose result exists and resumes
the one that was interrupted (from its latest checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import ml_collections
import numpy as np
from tqdm import tqdm

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import metric_logger
from nbp_jax import parallel
from nbp_jax import pipeline
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import layout as layout_lib
from nbp_jax.nbp import train as nbp_train

RESULT_FILE = 'study_result.json'
TIMING_FILE = 'study_timing.json'
_PROTOCOLS = ('class', 'frame_prediction')

# Table columns: (header, key in a run's row).
_COLUMNS = (
    ('class FVD', 'class/fvd'),
    ('class acc.', 'class/class_acc'),
    ('pred. PSNR', 'frame_prediction/psnr'),
    ('copy-last PSNR', 'frame_prediction/copy_last_psnr'),
    ('pred. FVD', 'frame_prediction/fvd'),
    ('frames/s', 'frames_per_s'),
    ('val loss', 'val_loss'),
)


def run_name(block_shape, seed: int) -> str:
  """The study's name for one run: '1x1x16_s0' (its folder and row)."""
  return f'{layout_lib.block_name(block_shape)}_s{seed}'


def _val_loss(vdir: str) -> float:
  """The last validation loss in WORKDIR/metrics.jsonl (the trainer's held-out teacher-forced loss)."""
  losses = [r['val_loss'] for r in metric_logger.read_metrics(vdir) if 'val_loss' in r]
  return float(losses[-1]) if losses else float('nan')


def run_one(config: ml_collections.ConfigDict, workdir: str, block_shape, seed: int) -> dict:
  """Trains and evaluates one (block shape, seed) in WORKDIR/runs/<name>; returns (and saves) its row."""
  name = run_name(block_shape, seed)
  vdir = os.path.join(workdir, 'runs', name)
  path = os.path.join(vdir, RESULT_FILE)
  c = pipeline.model_config(config, workdir, name, block_shape, seed)
  if os.path.exists(path):
    _refuse_other_settings(c, vdir)
    with open(path) as f:
      return json.load(f)
  start = time.perf_counter()
  nbp_train.run(c, vdir)
  train_seconds = time.perf_counter() - start
  row, _ = pipeline.evaluate_model(c, vdir, _PROTOCOLS, stats_dir=workdir)
  row.update(block_shape=list(map(int, block_shape)), block_size=int(math.prod(block_shape)), seed=int(seed),
             val_loss=_val_loss(vdir), train_seconds=round(train_seconds, 1),
             eval_seconds=round(time.perf_counter() - start - train_seconds, 1))
  _save_json(path, row)
  return row


# Fields that say where things are or how a run is watched, not what it computes: a finished run is reused whatever
# they are (the study's own section lists the runs; a new seed or shape leaves the others valid).
_NOT_RESULT_FIELDS = ('name', 'data.dir', 'data.raw_dir', 'data.tokenized_dir', 'data.worker_count',
                      'data.prepare_workers', 'tokenizer.checkpoint', 'tokenizer.pretrained', 'train.log_every',
                      'train.keep_checkpoints', 'train.profile_steps', 'study.', 'export.', 'import_.')


def _refuse_other_settings(c: ml_collections.ConfigDict, vdir: str) -> None:
  """UserError when the finished run in `vdir` was made with other settings than `c` (a rerun with more steps or
  other evaluation settings reused its result and labelled it with the new ones)."""
  saved = checkpoint_lib.load_config(vdir)
  differ = [(k, a, b) for k, a, b in checkpoint_lib.config_differences(saved, c, fields=None)
            if not k.startswith(_NOT_RESULT_FIELDS)]
  if differ:
    raise errors.UserError(
        f'{vdir} was made with {", ".join(f"{k}={b!r}" for k, _, b in differ[:4])}, this study asks for '
        f'{", ".join(f"{k}={a!r}" for k, a, _ in differ[:4])}: rerun with those settings, use another --workdir, '
        f'or delete {os.path.join(vdir, RESULT_FILE)} (and its checkpoints, to retrain) to redo it.')


def _result_digest(vdir: str) -> str:
  """A fingerprint of a run's result file: its decode timing is kept only for the result it was measured with."""
  with open(os.path.join(vdir, RESULT_FILE), 'rb') as f:
    return hashlib.sha1(f.read()).hexdigest()[:12]


def _save_json(path: str, value) -> None:
  """Writes `value` as JSON to `path` in one step (a file that exists is whole); process 0 only."""
  if parallel.is_primary():
    checkpoint_lib.write_json(path, value)


def time_all_runs(config: ml_collections.ConfigDict, workdir: str, todo) -> dict[str, dict]:
  """Decode timings of every run, measured back to back in one pass after all training, so that the frames/s
  ratios between block shapes come from one quiet stretch of the machine rather than from timings taken hours apart.

  Kept in WORKDIR/study_timing.json; a rerun reuses it when it covers every run and times them all again otherwise.
  """
  path = os.path.join(workdir, TIMING_FILE)
  names = [run_name(b, s) for b, s in todo]
  results = {n: _result_digest(os.path.join(workdir, 'runs', n)) for n in names}
  if os.path.exists(path):
    with open(path) as f:
      timings = json.load(f)
    if all(timings.get(n, {}).get('result') == results[n] for n in names):
      return timings
  timings = {}
  for (block, seed), name in zip(todo, tqdm(names, desc='decode timing', unit='run')):
    vdir = os.path.join(workdir, 'runs', name)
    c = pipeline.model_config(config, workdir, name, block, seed)
    generator = generator_lib.Generator.load(vdir, c)
    timings[name] = {**pipeline.time_decoding(generator, generator_lib.sample_inputs(c, vdir, generator,
                                                                                     c.sample.batch_size)),
                     'result': results[name]}
  _save_json(path, timings)
  return timings


def aggregate(runs: list[dict]) -> list[dict]:
  """One entry per block shape (in first-seen order): mean and spread (half the range) of each column over seeds."""
  by_shape: dict[str, list[dict]] = {}
  for r in runs:
    by_shape.setdefault(layout_lib.block_name(r['block_shape']), []).append(r)
  out = []
  for shape, rows in by_shape.items():
    entry = {'block_shape': shape, 'block_size': rows[0]['block_size'], 'decode_steps': rows[0]['decode_steps'],
             'seeds': [r['seed'] for r in rows]}
    for _, key in _COLUMNS:
      values = np.asarray([r.get(key, np.nan) for r in rows], np.float64)
      entry[key] = float(np.mean(values))
      entry[key + ':spread'] = float((np.max(values) - np.min(values)) / 2) if len(values) > 1 else 0.0
    out.append(entry)
  return out


def format_table(entries: list[dict]) -> str:
  """Markdown: block shape, size, steps, then each column as mean +- spread."""
  header = ['block', 'tokens', 'decode steps'] + [h for h, _ in _COLUMNS] + ['seeds']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for e in entries:
    cells = [e['block_shape'], str(e['block_size']), str(e['decode_steps'])]
    for _, key in _COLUMNS:
      digits = 3 if key in ('class/class_acc', 'val_loss') else 2 if 'psnr' in key or key == 'frames_per_s' else 1
      cells.append(f'{e[key]:.{digits}f} ± {e[key + ":spread"]:.{digits}f}')
    cells.append(str(len(e['seeds'])))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(entries: list[dict], grid, out: str, title: str = '') -> None:
  """study.png: FVD (left axis) and frames/s (right axis) against block size; raster-order shapes joined by a line,
  the others (same sizes, other shapes) as separate markers. `grid` is the latent (t, h, w)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  ax2 = ax.twinx()
  raster = lambda e: is_raster(e['block_shape'].split('x'), grid)
  rows = sorted((e for e in entries if raster(e)), key=lambda e: e['block_size'])
  others = [e for e in entries if not raster(e)]
  size = lambda es: [e['block_size'] for e in es]
  ax.errorbar(size(rows), [e['class/fvd'] for e in rows], yerr=[e['class/fvd:spread'] for e in rows], color='C0',
              marker='o', capsize=3, label='FVD, raster-order blocks (rows, frames)')
  ax2.errorbar(size(rows), [e['frames_per_s'] for e in rows], yerr=[e['frames_per_s:spread'] for e in rows],
               color='C1', marker='s', capsize=3, label='frames/s')
  if others:
    ax.errorbar(size(others), [e['class/fvd'] for e in others], yerr=[e['class/fvd:spread'] for e in others],
                color='C2', marker='^', linestyle='none', capsize=3, label='FVD, other shapes')
  for e in entries:
    ax.annotate(e['block_shape'], (e['block_size'], e['class/fvd']), textcoords='offset points', xytext=(4, 4),
                fontsize=7)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('block size (tokens per step)')
  ax.set_ylabel('class-conditional FVD (lower is better)', color='C0')
  ax2.set_ylabel('generated frames/s (CPU)', color='C1')
  handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
  ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc='upper left')
  ax.set_title(title or 'NBP block-size study (toy scale)', fontsize=9)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def is_raster(block_shape, grid) -> bool:
  """True if a block's tokens are consecutive in the raster order (1x1xk, whole rows 1xkxW, whole frames kxHxW),
  as the paper's row blocks; False for the other shapes (1x4x4, 2x2x2, ...)."""
  (bt, bh, bw), (_, h, w) = tuple(map(int, block_shape)), tuple(grid)
  return (bt == 1 and bh == 1) or (bt == 1 and bw == w) or (bh == h and bw == w)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  study = config.study
  clock = pipeline.StageClock()
  pipeline.shared_stages(config, workdir, clock, total=4)
  # Seed-major: a study stopped early has every block shape at the first seeds.
  todo = [(tuple(b), int(s)) for s in study.seeds for b in study.block_shapes]
  runs = []
  clock.start('runs', f'4/4 train and evaluate {len(todo)} runs ({len(study.block_shapes)} block shapes x '
              f'{len(study.seeds)} seeds)')
  for i, (block, seed) in enumerate(tqdm(todo, desc='study', unit='run')):
    print(f'== run {i + 1}/{len(todo)}: block {layout_lib.block_name(block)}, seed {seed}', flush=True)
    runs.append(run_one(config, workdir, block, seed))
  clock.start('timing', f'timing the decoding of all {len(todo)} runs, back to back')
  timings = time_all_runs(config, workdir, todo)
  clock.stop()
  for row, (block, seed) in zip(runs, todo):
    row['frames_per_s_at_eval'] = row['frames_per_s']
    row.update({k: v for k, v in timings[run_name(block, seed)].items() if k != 'result'})
  entries = aggregate(runs)
  table = format_table(entries)
  report = {'config': config.name, 'runs': runs, 'aggregate': entries, 'stage_seconds': clock.seconds,
            'train_steps': int(config.train.num_steps), 'num_train_clips': int(config.data.synthetic.num_train)}
  if not parallel.is_primary():
    return report
  checkpoint_lib.write_json(os.path.join(workdir, 'study.json'), report)
  with open(os.path.join(workdir, 'study.md'), 'w') as f:
    f.write(table + '\n')
  grid = config_lib.latent_shape(config)
  plot(entries, grid, os.path.join(workdir, 'study.png'),
       title=f'{config.name}: {len(study.seeds)} seeds, {config.train.num_steps} steps, latent grid '
             f'{"x".join(map(str, grid))}')
  print(table)
  print(f'Study: {os.path.join(workdir, "study.md")}; plot: {os.path.join(workdir, "study.png")}')
  return report
