r"""`--mode=pipeline`: the whole corridor in one command, resumable (the README's demo).

  python -m nbp_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=pipeline

prepare_data -> train_tokenizer -> tokenize -> train the transformer twice, with the config's block shape (NBP) and
with 1x1x1 blocks (NTP, the same model otherwise) -> evaluate both (class-conditional and frame-prediction samples,
FVD/PSNR/SSIM/LPIPS) and time their decoding side by side. Layout of WORKDIR:

  data/  tokenizer/  tokens/            shared by both models
  nbp/  ntp/                            one training workdir each (checkpoints, metrics, samples, eval/)
  summary.md  summary.json  grid.png    the comparison table and one picture of everything

Every stage reuses what an earlier run finished (datasets, the latest checkpoints), so rerunning resumes.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import parallel
from nbp_jax.data import prepare
from nbp_jax.evaluation import protocols
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import layout as layout_lib
from nbp_jax.nbp import train as nbp_train
from nbp_jax.tokenizer import tokenize
from nbp_jax.tokenizer import train as tokenizer_train


def model_config(config: ml_collections.ConfigDict, workdir: str, name: str, block_shape, seed: int | None = None
                 ) -> ml_collections.ConfigDict:
  """`config` for one model of a comparison: its block shape (and seed), reading WORKDIR's data, tokenizer, codes."""
  c = config.copy_and_resolve_references()
  c.name = f'{config.name}_{name}'
  c.nbp.block_shape = tuple(block_shape)
  if seed is not None:
    c.seed = int(seed)
  c.data.dir = config.data.dir or os.path.join(workdir, 'data')
  c.data.tokenized_dir = config.data.tokenized_dir or os.path.join(workdir, 'tokens')
  c.tokenizer.checkpoint = config.tokenizer.checkpoint or os.path.join(workdir, 'tokenizer')
  return c


def variant_configs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """{'nbp': config's block shape, 'ntp': 1x1x1}, both reading WORKDIR's data, tokenizer and codes."""
  variants = {'nbp': tuple(config.nbp.block_shape), 'ntp': (1, 1, 1)}
  out = {name: model_config(config, workdir, name, block) for name, block in variants.items()}
  if variants['nbp'] == variants['ntp']:
    del out['ntp']  # the config already asks for next-token prediction
  return out


def shared_stages(config: ml_collections.ConfigDict, workdir: str, clock: StageClock, total: int = 5) -> None:
  """The stages every model of a comparison shares: data, tokenizer, codes (each reused when finished)."""
  clock.start('prepare_data', f'1/{total} prepare data')
  prepare.run(config, workdir)
  clock.start('train_tokenizer', f'2/{total} train the tokenizer')
  tokenizer_train.run(config, workdir)
  clock.start('tokenize', f'3/{total} tokenize')
  tokenize.run(config, workdir)


def evaluate_model(c: ml_collections.ConfigDict, vdir: str, names: tuple[str, ...], *, stats_dir: str,
                   recorded: dict | None = None) -> tuple[dict, dict]:
  """Evaluates the model trained in `vdir` (reusing a finished evaluation) and times its decoding.

  Returns (row: {'decode_steps', 'seconds_per_clip', 'frames_per_s', 'batch_frames_per_s', '<protocol>/<metric>':
  ...}, eval report): decoding timed for one clip alone (the latency the fewer steps buy) and for a batch of
  sample.batch_size clips (throughput; on a CPU the batch's matmuls make both models compute-bound alike).
  `recorded` holds decode timings of an earlier run at the same checkpoint, kept instead of timing again.
  """
  generator = generator_lib.Generator.load(vdir, c)
  report = _finished_eval(c, vdir, generator.step, names)
  if report is None:
    report = protocols.evaluate(c, vdir, generator, protocols=names, stats_dir=stats_dir)
  elif parallel.is_primary():
    print(f'Reusing the evaluation of {os.path.basename(vdir)} at step {generator.step} ({vdir}/eval).')
  recorded = recorded or {}
  if all(k in recorded for k in _SPEED_KEYS):
    row = {k: recorded[k] for k in _SPEED_KEYS}
  else:
    one = time_decoding(generator, generator_lib.sample_inputs(c, vdir, generator, 1), repeats=5)
    batch = time_decoding(generator, generator_lib.sample_inputs(c, vdir, generator, c.sample.batch_size))
    row = {'decode_steps': one['decode_steps'], 'seconds_per_clip': one['seconds_per_batch'],
           'frames_per_s': one['frames_per_s'], 'batch_frames_per_s': batch['frames_per_s']}
  for protocol, r in report['protocols'].items():
    for metric, value in r['metrics'].items():
      row[f'{protocol}/{metric}'] = float(value)
  return row, report


def time_decoding(generator: generator_lib.Generator, inputs: dict, repeats: int = 3) -> dict[str, float]:
  """Seconds per batch of clips (codes only, compile excluded, best of `repeats`) and generated frames per second."""
  row = generator.generation_speed(inputs, repeats=repeats)
  return {'decode_steps': row['steps'], 'seconds_per_batch': row['seconds'], 'frames_per_s': row['frames_per_s']}


# summary.md's columns: (summary.json's key, heading, decimals), in the README's order; keys not named here follow
# under their own names, so that nothing measured is left out of the table.
_SUMMARY_COLUMNS = (
    ('decode_steps', 'decode steps ({timed})', 0), ('frames_per_s', 'frames/s, one clip', 1),
    ('batch_frames_per_s', 'frames/s, {batch} clips', 1), ('class/class_acc', 'class acc.', 3),
    ('class/fvd', 'class FVD', 1), ('frame_prediction/psnr', 'frame-pred. PSNR', 2),
    ('frame_prediction/copy_last_psnr', 'copy-last PSNR', 2), ('frame_prediction/ssim', 'frame-pred. SSIM', 3),
    ('frame_prediction/lpips', 'frame-pred. LPIPS (1st frame)', 3), ('reconstruction/psnr', 'recon. PSNR', 2),
    ('reconstruction/ssim', 'recon. SSIM', 3), ('reconstruction/lpips', 'recon. LPIPS', 3),
    ('class/real_class_acc', 'real clips acc.', 3), ('class/shuffled_class_acc', 'shuffled-label acc.', 3),
    ('frame_prediction/copy_last_ssim', 'copy-last SSIM', 3),
)


def _summary_table(rows: dict[str, dict], blocks: dict[str, str], batch_size: int, frame_prediction: bool) -> str:
  """Markdown: a row per model ('nbp (1x1x8)'), the README's readable headings, '-' where a model has no value.
  The decoding was timed on frame prediction (`frame_prediction`: its given frames not decoded) or whole clips."""
  present = {k for r in rows.values() for k in r} - {'seconds_per_clip'}
  timed = 'frame pred.' if frame_prediction else 'whole clip'
  columns = [(k, head.format(batch=batch_size, timed=timed), dec) for k, head, dec in _SUMMARY_COLUMNS if k in present]
  columns += [(k, k, 3) for k in sorted(present - {c[0] for c in _SUMMARY_COLUMNS})]
  cell = lambda v, dec: f'{v:.{dec}f}' if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
  lines = ['| model | ' + ' | '.join(head for _, head, _ in columns) + ' |', '|' + '---|' * (len(columns) + 1)]
  for name, r in rows.items():
    cells = [cell(r[k], dec) if k in r else '-' for k, _, dec in columns]
    lines.append(f'| {name} ({blocks[name]}) | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


class StageClock:
  """Wall-clock seconds of each stage of this run (a resumed run times only what it redid)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._name, self._start = None, 0.0

  def start(self, name: str, title: str) -> None:
    self.stop()
    if parallel.is_primary():
      print(f'== {title}', flush=True)
    self._name, self._start = name, time.perf_counter()

  def stop(self) -> None:
    if self._name is not None:
      self.seconds[self._name] = round(time.perf_counter() - self._start, 1)
      self._name = None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  clock = StageClock()
  shared_stages(config, workdir, clock)
  variants = variant_configs(config, workdir)
  blocks = {name: layout_lib.block_name(c.nbp.block_shape) for name, c in variants.items()}
  rows, grids = {}, []
  for name, c in variants.items():
    vdir = os.path.join(workdir, name)
    clock.start(f'train_{name}', f'4/5 train {name} (block {blocks[name]})')
    nbp_train.run(c, vdir)
  summary_path = os.path.join(workdir, 'summary.json')
  previous = _load_json(summary_path)
  train_steps = {n: _latest_step(os.path.join(workdir, n)) for n in variants}
  # What the decode timings depend on besides the checkpoints (a rerun with other blocks reported the old ones).
  timed_with = {'blocks': blocks, 'batch_size': int(config.sample.batch_size),
                'context_frames': int(config.nbp.context_frames)}
  # The same checkpoints as the recorded run: keep its record (the stage times of the work actually done, its decode
  # timings); this run's times, mostly spent reusing finished stages, are kept beside it.
  reuse = previous.get('train_steps') == train_steps and previous.get('timed_with') == timed_with
  for name, c in variants.items():
    clock.start(f'eval_{name}', f'5/5 evaluate {name}')
    # Tokenizer reconstruction is the same for both models: evaluate it once.
    names = tuple(p for p in protocols.auto_protocols(c) if p != 'reconstruction' or name == 'nbp')
    names = protocols.configured_protocols(c, default=names)
    vdir = os.path.join(workdir, name)
    rows[name], report = evaluate_model(c, vdir, names, stats_dir=workdir,
                                        recorded=previous.get('models', {}).get(name) if reuse else None)
    # The grids beside this run's evaluation (a report reused from a moved workdir names the old place).
    grids.extend((f'{name} ({blocks[name]} blocks): {_grid_title(c, vdir, protocol, report["protocols"][protocol])}',
                  os.path.join(vdir, 'eval', os.path.basename(path)))
                 for protocol, path in report['grids'].items())
  clock.stop()
  summary = {'config': config.name, 'models': rows, 'train_steps': train_steps, 'timed_with': timed_with,
             'stage_seconds': previous.get('stage_seconds', clock.seconds) if reuse else clock.seconds}
  if reuse:
    summary['last_rerun_stage_seconds'] = clock.seconds
  table = _summary_table(rows, blocks, config.sample.batch_size, config_lib.context_latent_frames(config) > 0)
  if 'ntp' in rows and 'nbp' in rows:
    speedup = rows['nbp']['frames_per_s'] / rows['ntp']['frames_per_s']
    ratio = f'{speedup:.1f}x faster' if speedup >= 1 else f'{1 / speedup:.1f}x slower'
    batch = rows['nbp']['batch_frames_per_s'] / rows['ntp']['batch_frames_per_s']
    table += (f'\n\nOne clip at a time, NBP decodes {ratio} than NTP ({rows["nbp"]["decode_steps"]} vs '
              f'{rows["ntp"]["decode_steps"]} steps per clip, same model size, same CPU, one run); '
              f'{config.sample.batch_size} clips at a time {batch:.1f}x.')
    summary['speedup'] = speedup
  summary['result_line'] = result_line(rows, summary.get('speedup'))
  if not parallel.is_primary():
    return summary
  checkpoint_lib.write_json(summary_path, summary)
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write(table + '\n')
  _stack_grids(grids, os.path.join(workdir, 'grid.png'))
  print(table)
  print('Stage times this run: ' + ', '.join(f'{k} {v:.0f}s' for k, v in clock.seconds.items()) +
        f' (total {sum(clock.seconds.values()) / 60:.1f} min)')
  print(f'Summary: {os.path.join(workdir, "summary.md")}; picture: {os.path.join(workdir, "grid.png")}')
  print(summary['result_line'], flush=True)
  return summary


_SPEED_KEYS = ('decode_steps', 'seconds_per_clip', 'frames_per_s', 'batch_frames_per_s')

# (name in the result line, model row, metric) for `result_line`.
_RESULT_FIELDS = (
    ('tokenizer_psnr', 'nbp', 'reconstruction/psnr'),
    ('real_class_acc', 'nbp', 'class/real_class_acc'),
    ('nbp_class_acc', 'nbp', 'class/class_acc'),
    ('ntp_class_acc', 'ntp', 'class/class_acc'),
    ('nbp_pred_psnr', 'nbp', 'frame_prediction/psnr'),
    ('ntp_pred_psnr', 'ntp', 'frame_prediction/psnr'),
    ('copy_last_psnr', 'nbp', 'frame_prediction/copy_last_psnr'),
    ('nbp_fvd', 'nbp', 'class/fvd'),
    ('ntp_fvd', 'ntp', 'class/fvd'),
    ('nbp_steps', 'nbp', 'decode_steps'),
    ('ntp_steps', 'ntp', 'decode_steps'),
)


def result_line(rows: dict[str, dict], speedup) -> str:
  """The machine-readable last line: `demo: tokenizer_psnr=.. real_class_acc=.. ... decode_speedup=..`."""
  def fmt(value):
    if value is None:
      return 'nan'
    return str(value) if isinstance(value, int) else f'{float(value):.4g}'
  cells = [f'{name}={fmt(rows.get(model, {}).get(key))}' for name, model, key in _RESULT_FIELDS]
  return 'demo: ' + ' '.join(cells + [f'decode_speedup={fmt(speedup)}'])


def _load_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _finished_eval(config, vdir: str, step: int, names: tuple[str, ...]):
  """The saved results of an earlier run at the same checkpoint step with the same settings
  (protocols.evaluation_settings: sampling, sample count, FVD settings, dataset, ...), or None."""
  path = os.path.join(vdir, 'eval', f'results_step{step}.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  done = report.get('protocols', {})
  if all(n in done for n in names) and report.get('settings') == protocols.evaluation_settings(config, vdir):
    return {**report, 'protocols': {n: done[n] for n in names}}
  return None


def _latest_step(vdir: str) -> int:
  ckpt = checkpoint_lib.Checkpointer(vdir, read_only=True)
  try:
    return int(ckpt.latest_step() or 0)
  finally:
    ckpt.close()


def _grid_title(config: ml_collections.ConfigDict, workdir: str, protocol: str, result: dict) -> str:
  """A panel's caption; the class panel names its rows' classes (prepare.class_names)."""
  title = _GRID_TITLES.get(protocol, protocol)
  if 'shown_labels' in result:
    names = prepare.class_names(config, workdir)
    title = title.replace('one clip per row', 'rows: ' + ', '.join(names[label] for label in result['shown_labels']))
  return title


_GRID_TITLES = {
    'class': 'class-conditional samples, one clip per row, frames left to right',
    'frame_prediction': 'frame prediction: real | predicted, first frames given',
    'reconstruction': 'tokenizer reconstruction: real | reconstructed',
}


def _stack_grids(panels: list[tuple[str, str]], out: str, gap: int = 6, title_height: int = 14) -> None:
  """One PNG of every (title, grid PNG) panel, stacked vertically with its title above it (left-aligned)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  panels = [(title, Image.open(p).convert('RGB')) for title, p in panels if os.path.exists(p)]
  if not panels:
    return
  width = max(max(image.width for _, image in panels), 8 * max(len(title) for title, _ in panels))
  height = sum(title_height + image.height + gap for _, image in panels) - gap
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  y = 0
  for title, image in panels:
    draw.text((2, y + 1), title, fill=(0, 0, 0))  # PIL's built-in bitmap font: no font file needed
    canvas.paste(image, (0, y + title_height))
    y += title_height + image.height + gap
  canvas.save(out)
