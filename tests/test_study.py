"""`--mode=study` end to end at micro size: two block shapes, one seed, a table, a plot, one timing pass,
and a resumed rerun (the aggregation over several seeds is checked by hand below, without training)."""

import json
import shutil

import numpy as np
from PIL import Image

from conftest import TINY_PIPELINE_FLAGS
from conftest import run_main
from nbp_jax import study

# The tests' micro pipeline (3x4x4 codes), as the study: NTP and blocks of one latent row, one seed each.
# Its evaluations in one batch of 4 (the pipeline's two batches of 2 are for tests/test_multihost.py).
STUDY_FLAGS = ('--config=configs/study.py',
               *(f.replace('eval.batch_size=2', 'eval.batch_size=4') for f in TINY_PIPELINE_FLAGS[1:]),
               '--config.study.block_shapes=((1,1,1),(1,1,4))', '--config.study.seeds=(0,)')


def test_study_end_to_end_then_rerun_skips_finished_runs(tiny_pipeline, tmp_path):
  workdir = tmp_path / 'study'
  # The study's shared stages (data, tokenizer, codes, cached FVD statistics and classifier) are the pipeline's: reuse
  # the session's finished ones, so only the study's own runs train here.
  for name in ('data', 'tokenizer', 'tokens', 'fvd_stats', 'eval_classifier'):
    shutil.copytree(tiny_pipeline / name, workdir / name)
  out = run_main(*STUDY_FLAGS, f'--workdir={workdir}', '--mode=study')
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  report = json.loads((workdir / 'study.json').read_text())
  assert sorted((r['block_shape'], r['seed']) for r in report['runs']) == [([1, 1, 1], 0), ([1, 1, 4], 0)]
  entries = {e['block_shape']: e for e in report['aggregate']}
  assert set(entries) == {'1x1x1', '1x1x4'}
  # 3x4x4 codes, 2 latent frames given: 16 tokens to generate = 16 token steps or 4 row steps (from the layout).
  assert entries['1x1x1']['decode_steps'] == 16 and entries['1x1x4']['decode_steps'] == 4
  for e in entries.values():
    for key in ('class/fvd', 'class/class_acc', 'frame_prediction/psnr', 'frame_prediction/copy_last_psnr',
                'frames_per_s', 'val_loss'):
      assert np.isfinite(e[key]), (key, e)
    # The mean and spread (half the range) over the seeds' runs (one seed here: spread 0).
    fvds = [r['class/fvd'] for r in report['runs'] if 'x'.join(map(str, r['block_shape'])) == e['block_shape']]
    assert np.isclose(e['class/fvd'], np.mean(fvds)) and np.isclose(e['class/fvd:spread'], np.ptp(fvds) / 2)
  table = (workdir / 'study.md').read_text().splitlines()
  assert len(table) == 2 + 2 and table[2].startswith('| 1x1x1 |') and table[3].startswith('| 1x1x4 |')
  plot = np.asarray(Image.open(workdir / 'study.png'))
  assert plot.ndim == 3 and plot.shape[0] > 100 and plot.std() > 0

  # frames/s come from the one timing pass after all runs (the eval's own timing is kept beside it).
  timing = json.loads((workdir / 'study_timing.json').read_text())
  assert set(timing) == {'1x1x1_s0', '1x1x4_s0'}
  for r in report['runs']:
    assert r['frames_per_s'] == timing[study.run_name(r['block_shape'], r['seed'])]['frames_per_s']
    assert np.isfinite(r['frames_per_s_at_eval'])
  assert 'train the tokenizer' in out.stdout  # the shared stage ran and reused the copied tokenizer
  assert not list((workdir / 'tokenizer').glob('checkpoints/*.corrupt'))

  # Rerun: every run's result exists, nothing trains again, the same table comes out.
  logs = {p: p.read_text() for p in workdir.glob('runs/*/metrics.jsonl')}
  again = run_main(*STUDY_FLAGS, f'--workdir={workdir}', '--mode=study')
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: p.read_text() for p in logs} == logs
  assert (workdir / 'study.md').read_text().splitlines() == table
  # A rerun with other settings does not pass the finished runs off as theirs (it labelled them with the new ones).
  other = run_main(*STUDY_FLAGS, f'--workdir={workdir}', '--mode=study', '--config.train.num_steps=3')
  assert other.returncode == 2 and 'was made with train.num_steps=2, this study asks for train.num_steps=3' in (
      other.stderr), other.stderr[-2000:]


def test_aggregate_means_and_spreads_against_hand_computed_values():
  runs = [dict(block_shape=[1, 1, 4], block_size=4, decode_steps=12, seed=s, frames_per_s=fps, val_loss=1.0,
               **{'class/fvd': fvd, 'class/class_acc': acc, 'frame_prediction/psnr': 20.0,
                  'frame_prediction/copy_last_psnr': 18.0, 'frame_prediction/fvd': 5.0})
          for s, fvd, acc, fps in ((0, 100.0, 0.5, 10.0), (1, 140.0, 0.75, 12.0))]
  (entry,) = study.aggregate(runs)
  assert entry['class/fvd'] == 120.0 and entry['class/fvd:spread'] == 20.0
  assert entry['class/class_acc'] == 0.625 and entry['class/class_acc:spread'] == 0.125
  assert entry['frames_per_s'] == 11.0 and entry['seeds'] == [0, 1]


def test_raster_order_shapes():
  grid = (5, 8, 8)
  assert study.is_raster((1, 1, 4), grid) and study.is_raster((1, 2, 8), grid) and study.is_raster((1, 8, 8), grid)
  assert not study.is_raster((1, 2, 4), grid) and not study.is_raster((1, 4, 4), grid)
