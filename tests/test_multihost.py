"""Multi-host runs, for real: two processes joined by jax.distributed on this machine (gloo collectives over
localhost, one CPU device each), against the same work done by one process."""

import json
import shutil
import sys
import textwrap

import numpy as np
from PIL import Image

from conftest import TINY_PIPELINE_FLAGS
from conftest import run_processes
from nbp_jax.data import builder


def _main_command(*args):
  return [sys.executable, '-m', 'nbp_jax.main', *args]


def _check(results):
  for i, (code, out, err) in enumerate(results):
    assert code == 0, f'process {i} exited {code}:\n{out[-2000:]}\n{err[-3000:]}'


def test_share_gather_and_on_primary_across_processes():
  script = textwrap.dedent('''
      import json
      from nbp_jax import errors, parallel
      parallel.initialize_distributed()
      import jax
      mine = list(parallel.share(5))
      squares = parallel.gather({i: {'square': i * i, 'by': jax.process_index()} for i in mine})
      failure = None
      try:
        parallel.on_primary(lambda: 1 / 0, 'dividing')
      except ZeroDivisionError:
        failure = 'ZeroDivisionError'
      except errors.UserError as e:
        failure = str(e)
      print(json.dumps({'mine': mine, 'gathered': squares, 'failure': failure}))
  ''')
  results = run_processes([sys.executable, '-c', script], timeout=120)
  _check(results)
  seen = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
  assert [s['mine'] for s in seen] == [[0, 2, 4], [1, 3]]
  expected = [{'square': i * i, 'by': i % 2} for i in range(5)]
  assert seen[0]['gathered'] == seen[1]['gathered'] == expected
  assert seen[0]['failure'] == 'ZeroDivisionError'  # process 0 raises its own error
  assert seen[1]['failure'] == 'dividing failed on process 0; its log says why.'


def test_file_conversions_refuse_to_run_on_several_processes(tmp_path):
  results = run_processes(_main_command(f'--workdir={tmp_path}', '--mode=export'), timeout=120)
  message = ('Error: --mode=export converts files on one process, and this is one of several (JAX_COORDINATOR_ADDRESS, '
             'SLURM or NBP_DISTRIBUTED says so): run it once, on one host, with NBP_DISTRIBUTED=0.')
  # (The first to fail stops the other, which may not have printed yet.)
  assert any(code == 2 and err.strip().splitlines()[-1] == message for code, _, err in results), results


def _records(location, split):
  source = builder.data_source(location, split)
  return [source[i] for i in range(len(source))]


def test_tokenize_and_train_on_two_processes_match_the_one_process_run(tiny_pipeline, tmp_path):
  # The tiny pipeline's codes and NBP model made again on two processes (one device each) instead of one: the same
  # config, clips and tokenizer.
  paths = {'--config.data.dir': tiny_pipeline / 'data', '--config.data.tokenized_dir': tmp_path / 'tokens',
           '--config.tokenizer.checkpoint': tiny_pipeline / 'tokenizer', '--workdir': tmp_path / 'nbp',
           '--config.train.sample_every': 2}
  flags = (*TINY_PIPELINE_FLAGS, *(f'{k}={v}' for k, v in paths.items()))
  _check(run_processes(_main_command(*flags, '--mode=tokenize')))
  # Each host encodes every second clip; the dataset written is the one process's, record for record.
  ref, got = (builder.Location(str(d), next((d / 'clips').iterdir()).name) for d in (tiny_pipeline / 'tokens',
                                                                                     tmp_path / 'tokens'))
  for split in ('train', 'validation'):
    for a, b in zip(*(_records(location, split) for location in (ref, got)), strict=True):
      np.testing.assert_array_equal(b['codes'], a['codes'])
      assert b['label'] == a['label']

  _check(run_processes(_main_command(*flags, '--mode=train')))
  ref, got = (_metrics(w) for w in (tiny_pipeline / 'nbp', tmp_path / 'nbp'))
  assert [r['step'] for r in got] == [r['step'] for r in ref] == [1, 2]  # one writer, every step once
  # Each host reads every process_count-th clip of the stream: the first global batch holds the same clips as the
  # one process's (rows [0, 2 | 1, 3]), so step 1's loss and gradient are the same up to the order of the sums.
  # Step 2 follows Adam's first update, ~lr * sign(g), where rounding may flip the sign of a gradient near 0.
  for key in ('loss', 'grad_norm', 'accuracy', 'param_norm'):
    np.testing.assert_allclose(got[0][key], ref[0][key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(got[1]['loss'], ref[1]['loss'], rtol=1e-3)
  np.testing.assert_allclose(got[1]['val_loss'], ref[1]['val_loss'], rtol=1e-3)
  assert (tmp_path / 'nbp' / 'checkpoints' / '2').is_dir()
  # The samples of the run, drawn from the params sharded over both processes' devices (it failed to decode them).
  grid = np.asarray(Image.open(tmp_path / 'nbp' / 'samples' / 'step_2' / 'sample_grid.png'))
  assert grid.ndim == 3 and grid.std() > 0

  # The tensor axis across the hosts, the batch unsplit: both hosts load the whole batch, the one process's clips.
  # (Each loaded its own half, and the step saw half a batch of other clips.)
  tensor = (*flags, f'--workdir={tmp_path / "tensor"}', '--config.mesh.shape=(1,1,2)', '--config.train.num_steps=1',
            '--config.train.sample_every=0')
  _check(run_processes(_main_command(*tensor, '--mode=train')))
  (got,) = _metrics(tmp_path / 'tensor')
  for key in ('loss', 'grad_norm', 'accuracy', 'param_norm'):
    np.testing.assert_allclose(got[key], ref[0][key], rtol=1e-5, err_msg=key)


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_eval_on_two_processes_gives_the_one_process_results(tiny_pipeline, tmp_path):
  # The tiny pipeline evaluated its NBP model in two batches of two on one process; two processes take one batch
  # each: their samples (batch i draws with fold_in(key, i)), the real clips' I3D statistics (recomputed: the
  # pipeline cached them in its own folder), the class-accuracy classifier, all gathered into the same scores.
  workdir = tmp_path / 'nbp'
  shutil.copytree(tiny_pipeline / 'nbp', workdir, ignore=shutil.ignore_patterns('eval'))
  _check(run_processes(_main_command(f'--workdir={workdir}', '--mode=eval', '--config.eval.protocols=class')))

  ref, got = (json.loads(next((w / 'eval').glob('results_step*.json')).read_text())['protocols']['class']
              for w in (tiny_pipeline / 'nbp', workdir))
  assert got['num_samples'] == ref['num_samples'] == 4
  assert got['metrics'].keys() == ref['metrics'].keys() >= {'fvd', 'class_acc', 'real_class_acc'}
  for metric, value in ref['metrics'].items():
    np.testing.assert_allclose(got['metrics'][metric], value, rtol=1e-6, err_msg=metric)
  assert got['shown_labels'] == ref['shown_labels']
  # The same samples on show, gathered from both processes.
  grid = next((tiny_pipeline / 'nbp' / 'eval').glob('*_class_grid.png'))
  assert (workdir / 'eval' / grid.name).read_bytes() == grid.read_bytes()
