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
from nbp_jax import notebook_utils
from nbp_jax.data import prepare
from nbp_jax.evaluation import protocols
from nbp_jax.nbp import sample as sample_lib
from nbp_jax.nbp import train as nbp_train
from nbp_jax.tokenizer import tokenize
from nbp_jax.tokenizer import train as tokenizer_train


def variant_configs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """{'nbp': config's block shape, 'ntp': 1x1x1}, both reading WORKDIR's data, tokenizer and codes."""
  variants = {'nbp': tuple(config.nbp.block_shape), 'ntp': (1, 1, 1)}
  out = {}
  for name, block in variants.items():
    c = config.copy_and_resolve_references()
    c.name = f'{config.name}_{name}'
    c.nbp.block_shape = block
    c.data.dir = config.data.dir or os.path.join(workdir, 'data')
    c.data.tokenized_dir = config.data.tokenized_dir or os.path.join(workdir, 'tokens')
    c.tokenizer.checkpoint = config.tokenizer.checkpoint or os.path.join(workdir, 'tokenizer')
    out[name] = c
  if variants['nbp'] == variants['ntp']:
    del out['ntp']  # the config already asks for next-token prediction
  return out


def _decode_speed(generator: sample_lib.Generator, inputs: dict) -> dict[str, float]:
  """Seconds per batch of clips (codes only, compile excluded, best of 3) and generated video frames per second."""
  row = notebook_utils.decode_speed(generator, inputs, block_shapes={'model': None})['model']
  return {'decode_steps': row['steps'], 'seconds_per_batch': row['seconds'], 'frames_per_s': row['frames_per_s']}


def _summary_table(rows: dict[str, dict]) -> str:
  columns = ['decode_steps', 'frames_per_s'] + sorted({k for r in rows.values() for k in r} -
                                                      {'decode_steps', 'frames_per_s', 'seconds_per_batch'})
  lines = ['| model | ' + ' | '.join(columns) + ' |', '|' + '---|' * (len(columns) + 1)]
  for name, r in rows.items():
    cells = [f'{r[c]:.3f}' if isinstance(r.get(c), float) else str(r.get(c, '-')) for c in columns]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


class _StageClock:
  """Wall-clock seconds of each stage of this run (a resumed run times only what it redid)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._name, self._start = None, 0.0

  def start(self, name: str, title: str) -> None:
    self.stop()
    print(f'== {title}', flush=True)
    self._name, self._start = name, time.perf_counter()

  def stop(self) -> None:
    if self._name is not None:
      self.seconds[self._name] = round(time.perf_counter() - self._start, 1)
      self._name = None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  clock = _StageClock()
  clock.start('prepare_data', '1/5 prepare data')
  prepare.run(config, workdir)
  clock.start('train_tokenizer', '2/5 train the tokenizer')
  tokenizer_train.run(config, workdir)
  clock.start('tokenize', '3/5 tokenize')
  tokenize.run(config, workdir)
  variants = variant_configs(config, workdir)
  rows, grids = {}, []
  for name, c in variants.items():
    vdir = os.path.join(workdir, name)
    clock.start(f'train_{name}', f'4/5 train {name} (block {"x".join(map(str, c.nbp.block_shape))})')
    nbp_train.run(c, vdir)
  for name, c in variants.items():
    vdir = os.path.join(workdir, name)
    clock.start(f'eval_{name}', f'5/5 evaluate {name}')
    generator = sample_lib.load_generator(c, vdir)
    # Tokenizer reconstruction is the same for both models: evaluate it once.
    names = tuple(p for p in protocols.auto_protocols(c) if p != 'reconstruction' or name == 'nbp')
    names = protocols.configured_protocols(c, default=names)
    report = _finished_eval(c, vdir, generator.step, names)
    if report is None:
      report = protocols.evaluate(c, vdir, generator, protocols=names, stats_dir=workdir)
    else:
      print(f'Reusing the evaluation of {name} at step {generator.step} ({vdir}/eval).')
    speed_inputs = sample_lib.sample_inputs(c, vdir, generator, c.sample.batch_size)
    row = _decode_speed(generator, speed_inputs)
    for protocol, r in report['protocols'].items():
      for metric, value in r['metrics'].items():
        row[f'{protocol}/{metric}'] = float(value)
    rows[name] = row
    block = 'x'.join(map(str, c.nbp.block_shape))
    grids.extend((f'{name} ({block} blocks): {_GRID_TITLES.get(protocol, protocol)}', path)
                 for protocol, path in report['grids'].items())
  clock.stop()
  summary = {'config': config.name, 'models': rows,
             'train_steps': {n: _latest_step(os.path.join(workdir, n)) for n in rows},
             'stage_seconds': clock.seconds}
  table = _summary_table(rows)
  if 'ntp' in rows and 'nbp' in rows:
    speedup = rows['nbp']['frames_per_s'] / rows['ntp']['frames_per_s']
    table += f'\n\nNBP decodes {speedup:.1f}x faster than NTP ({rows["nbp"]["decode_steps"]} vs ' \
             f'{rows["ntp"]["decode_steps"]} steps per clip, same model size, same CPU, one run).'
    summary['speedup'] = speedup
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write(table + '\n')
  _stack_grids(grids, os.path.join(workdir, 'grid.png'))
  print(table)
  print('Stage times this run: ' + ', '.join(f'{k} {v:.0f}s' for k, v in clock.seconds.items()) +
        f' (total {sum(clock.seconds.values()) / 60:.1f} min)')
  print(f'Summary: {os.path.join(workdir, "summary.md")}; picture: {os.path.join(workdir, "grid.png")}')
  return summary


def _finished_eval(config, vdir: str, step: int, names: tuple[str, ...]):
  """The saved results of an earlier run at the same checkpoint step and sample count, or None."""
  path = os.path.join(vdir, 'eval', f'results_step{step}.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  done = report.get('protocols', {})
  if all(n in done for n in names) and report.get('num_samples_requested') == config.eval.num_samples:
    return {**report, 'protocols': {n: done[n] for n in names}}
  return None


def _latest_step(vdir: str) -> int:
  ckpt = checkpoint_lib.Checkpointer(vdir, read_only=True)
  try:
    return int(ckpt.latest_step() or 0)
  finally:
    ckpt.close()


_GRID_TITLES = {
    'class': 'class-conditional samples, one clip per row, frames left to right',
    'frame_prediction': 'frame prediction: real | predicted, first frames given',
    'reconstruction': 'tokenizer reconstruction: real | reconstructed',
}


def _stack_grids(panels: list[tuple[str, str]], out: str, gap: int = 6, title_height: int = 14) -> None:
  """One PNG of every (title, grid PNG) panel, stacked vertically with its title above it (left-aligned)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
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
