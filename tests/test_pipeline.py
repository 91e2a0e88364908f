"""The whole corridor through the CLI on tiny synthetic data: prepare, tokenizer, tokenize, NBP + NTP, sample, eval."""

import json
import shutil

import numpy as np
from PIL import Image

from conftest import TINY_PIPELINE_FLAGS
from conftest import run_main
from nbp_jax import pipeline
from nbp_jax.image_metrics import PSNR_MAX_DB


def test_pipeline_end_to_end_then_sample_and_eval_from_workdir(tiny_pipeline, tmp_path):
  workdir = tmp_path / 'demo'
  shutil.copytree(tiny_pipeline, workdir)  # the rerun, sample and eval below write into it; others share the fixture

  summary = json.loads((workdir / 'summary.json').read_text())
  assert set(summary['models']) == {'nbp', 'ntp'}
  nbp, ntp = summary['models']['nbp'], summary['models']['ntp']
  # 3x4x4 codes, 2 latent frames of context (32 tokens) given: 16 tokens left = 8 blocks of 2 vs 16 single tokens.
  assert (nbp['decode_steps'], ntp['decode_steps']) == (8, 16)
  # Each score within its range (the metrics' values are tested against references in their own tests).
  ranges = {'class/fvd': (0, np.inf), 'class/class_acc': (0, 1), 'frame_prediction/psnr': (0, PSNR_MAX_DB),
            'frame_prediction/ssim': (-1, 1), 'frame_prediction/lpips': (0, np.inf),
            'frame_prediction/copy_last_psnr': (0, PSNR_MAX_DB)}
  for row in (nbp, ntp):
    for key, (low, high) in ranges.items():
      assert np.isfinite(row[key]) and low <= row[key] <= high, (key, row)
    # The demo scores FVD on the class-conditional samples only (eval.fvd_protocols='class').
    assert 'frame_prediction/fvd' not in row and 'reconstruction/rfvd' not in row, row
  assert 0 < nbp['reconstruction/psnr'] <= PSNR_MAX_DB
  table = (workdir / 'summary.md').read_text().splitlines()
  assert table[0].startswith('| model | decode steps (frame pred.) | frames/s, one clip | frames/s, 4 clips | '
                             'class acc. | class FVD | frame-pred. PSNR | copy-last PSNR |'), table[0]
  assert table[2].startswith(f"| nbp (1x1x2) | 8 | {nbp['frames_per_s']:.1f} | {nbp['batch_frames_per_s']:.1f} | "
                             f"{nbp['class/class_acc']:.3f} | {nbp['class/fvd']:.1f} |"), table[2]
  assert table[3].startswith('| ntp (1x1x1) | 16 |') and table[3].count(' - ') == 3  # no reconstruction row for NTP
  grid = np.asarray(Image.open(workdir / 'grid.png'))
  assert grid.ndim == 3 and grid.shape[0] > 16 and grid.std() > 0
  assert (workdir / 'nbp' / 'eval').is_dir() and any(p.suffix == '.mp4' for p in (workdir / 'nbp' / 'eval').iterdir())
  # The class samples on show are one per class, in class order, as many as eval.num_video_files (2) allows.
  report = json.loads(next((workdir / 'nbp' / 'eval').glob('results_step*.json')).read_text())
  shown = report['protocols']['class']['shown_labels']
  assert shown == sorted(set(shown)) and 1 <= len(shown) <= 2 and all(0 <= c < 4 for c in shown)
  assert len(list((workdir / 'nbp' / 'eval').glob('*_class_*.mp4'))) == len(shown)
  assert (workdir / 'tokenizer' / 'checkpoints').is_dir() and (workdir / 'ntp' / 'checkpoints').is_dir()

  # A finished run resumes: no stage trains or evaluates again.
  logs = {n: (workdir / n / 'metrics.jsonl').read_text() for n in ('nbp', 'ntp', 'tokenizer')}
  again = run_main(*TINY_PIPELINE_FLAGS, f'--workdir={workdir}', '--mode=pipeline')
  assert again.returncode == 0, again.stderr[-3000:]
  assert {n: (workdir / n / 'metrics.jsonl').read_text() for n in logs} == logs
  assert 'Reusing the evaluation of nbp' in again.stdout and 'Reusing the evaluation of ntp' in again.stdout
  # The rerun keeps the first run's record (stage times, decode timings) and files its own times beside it.
  rerun = json.loads((workdir / 'summary.json').read_text())
  assert rerun['stage_seconds'] == summary['stage_seconds']
  assert set(rerun['last_rerun_stage_seconds']) == set(summary['stage_seconds'])
  for name in ('nbp', 'ntp'):
    for key in ('decode_steps', 'seconds_per_clip', 'frames_per_s', 'batch_frames_per_s'):
      assert rerun['models'][name][key] == summary['models'][name][key]
  assert again.stdout.strip().splitlines()[-1].startswith('demo: tokenizer_psnr=')
  line = dict(cell.split('=') for cell in again.stdout.strip().splitlines()[-1][len('demo: '):].split())
  assert int(line['nbp_steps']) == nbp['decode_steps'] and int(line['ntp_steps']) == ntp['decode_steps']
  assert float(line['real_class_acc']) == float(f"{nbp['class/real_class_acc']:.4g}")

  # sample / eval need only --workdir (the saved config).
  sample = run_main(f'--workdir={workdir / "nbp"}', '--mode=sample')
  assert sample.returncode == 0, sample.stderr[-3000:]
  grids = list((workdir / 'nbp' / 'samples').glob('step_*/sample_grid.png'))
  assert grids, sample.stdout
  # Codes made again (another tokenizer step here) are not trained on by the models of the old ones: refused.
  record = workdir / 'nbp' / 'training_data.json'
  assert json.loads(record.read_text())['tokenizer_step'] == 2
  record.write_text(json.dumps({**json.loads(record.read_text()), 'tokenizer_step': 1}))
  stale = run_main(*TINY_PIPELINE_FLAGS, f'--workdir={workdir}', '--mode=pipeline')
  assert stale.returncode == 2 and 'was trained on other codes' in stale.stderr, stale.stderr[-2000:]
  # A --config instead of the run's own has no path to the pipeline's tokenizer: the error names the run's.
  other = run_main('--config=configs/smoke.py', f'--workdir={workdir / "nbp"}', '--mode=sample')
  assert other.returncode == 2 and (f"trained with tokenizer.checkpoint='{workdir / 'tokenizer'}': drop --config"
                                    in other.stderr), other.stderr[-2000:]


def test_the_summary_names_what_its_decoding_timed():
  rows = {'nbp': {'decode_steps': 20, 'frames_per_s': 3.0}, 'ntp': {'decode_steps': 80}}
  table = pipeline._summary_table(rows, {'nbp': '1x1x4', 'ntp': '1x1x1'}, 8, frame_prediction=False).splitlines()
  assert table[0] == '| model | decode steps (whole clip) | frames/s, one clip |'
  assert table[2:] == ['| nbp (1x1x4) | 20 | 3.0 |', '| ntp (1x1x1) | 80 | - |']
