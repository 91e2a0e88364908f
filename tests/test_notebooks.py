"""The Colab notebooks (notebooks/*.ipynb), executed on CPU at micro size with nbclient so that they never rot.

Each run appends one probe cell that prints the notebook's results as JSON (shapes, steps, timings, how the batch lay
on the devices); the assertions are on those data and on the files and displays the notebook produced."""

import ast
import json
import os
import shutil

from nbclient import NotebookClient
import nbformat

from conftest import REPO
from conftest import TEST_XLA_FLAGS
from conftest import TINY_PIPELINE_FLAGS

NOTEBOOKS = ('quickstart', 'tpu_generate')
_PROBE = 'NOTEBOOK_STATE='

# What each notebook's probe cell reports (the variables are the notebook's own).
_QUICKSTART_PROBE = '''
print('NOTEBOOK_STATE=' + json.dumps({
    'train_steps': summary['train_steps'], 'decode_steps': {n: r['decode_steps'] for n, r in summary['models'].items()},
    'speedup': summary.get('speedup'), 'steps': {n: g.step for n, g in models.items()},
    'config': models['nbp'].config.name, 'class_names': [names[i] for i in labels],
    'samples': {n: [list(v.shape), str(v.dtype)] for n, v in samples.items()},
    'predictions': {n: list(v.shape) for n, v in predictions.items()}, 'clips': list(clips['video'].shape),
    'rollouts': list(rollouts.shape), 'stream': [n for n, _ in arrivals]}))
'''
_TPU_PROBE = '''
print('NOTEBOOK_STATE=' + json.dumps({
    'devices': jax.device_count(), 'mesh': dict(mesh.shape), 'batch': BATCH, 'step': generator.step,
    'shards': {t: sorted(s.data.shape[0] for s in c.addressable_shards) for t, c in codes.items()},
    'codes': {t: list(c.shape) for t, c in codes.items()}, 'speeds': speeds}))
'''


def _flag_overrides(flags) -> dict:
  """`--config.x=y` flags -> {'x': y}, the values parsed as the flags parser does (literals, else strings)."""
  out = {}
  for flag in flags:
    key, value = flag[len('--config.'):].split('=', 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _execute(name: str, workdir, probe: str, *, devices: int = 1, **env) -> tuple[nbformat.NotebookNode, dict]:
  """Runs notebooks/NAME.ipynb and then `probe` in a fresh python3 kernel (cwd = the repo); returns the notebook with
  its outputs and the probe's JSON, or fails with the cell that raised."""
  nb = nbformat.read(os.path.join(REPO, 'notebooks', f'{name}.ipynb'), as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell('import json\n' + probe))
  kernel_env = dict(os.environ, JAX_PLATFORMS='cpu', NBP_WORKDIR=str(workdir), **env)
  devices_flag = f' --xla_force_host_platform_device_count={devices}' if devices > 1 else ''
  kernel_env['XLA_FLAGS'] = TEST_XLA_FLAGS + devices_flag
  client = NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': REPO}})
  client.execute(env=kernel_env)
  printed = [out.text for out in nb.cells[-1].outputs if out.output_type == 'stream']
  state = [line for text in printed for line in text.splitlines() if line.startswith(_PROBE)]
  assert len(state) == 1, printed
  return nb, json.loads(state[0][len(_PROBE):])


def _displays(nb: nbformat.NotebookNode) -> list[dict]:
  """The rich display_data / execute_result payloads of every cell."""
  return [dict(out.data) for cell in nb.cells for out in cell.get('outputs', [])
          if out.output_type in ('display_data', 'execute_result')]


def test_notebooks_are_stored_clean_and_valid():
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(REPO, 'notebooks', f'{name}.ipynb'), as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == 'python3'
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:80])
        assert 'sys.path' not in cell.source, name  # the package is installed, not put on the path
    # One parameters cell at the top, overridable from the environment; an install cell; an Open in Colab badge.
    code = [c.source for c in nb.cells if c.cell_type == 'code']
    assert "os.environ.get('NBP_WORKDIR'" in code[0], name
    assert '%pip install' in code[1] and "find_spec('nbp_jax')" in code[1], name
    assert 'colab-badge.svg' in nb.cells[0].source, name
    assert 'YOUR_ORG' not in json.dumps(nb), name


def test_notebooks_run_on_cpu(tiny_pipeline, tmp_path):
  workdir = tmp_path / 'demo'
  shutil.copytree(tiny_pipeline, workdir)  # the notebooks must not change the session fixture
  logs = {n: (workdir / n / 'metrics.jsonl').read_text() for n in ('tokenizer', 'nbp', 'ntp')}
  evals = {n: (workdir / n / 'eval' / 'results_step2.json').read_text() for n in ('nbp', 'ntp')}

  # quickstart at the fixture's config (tests/conftest.py's flags, as the notebook's overrides): the demo pipeline
  # resumes (nothing trains or evaluates again), then samples, videos and the table.
  overrides = _flag_overrides(TINY_PIPELINE_FLAGS[1:])
  assert TINY_PIPELINE_FLAGS[0] == '--config=configs/demo.py'  # = the notebook's task_config('demo', 'tiny')
  nb, state = _execute('quickstart', workdir, _QUICKSTART_PROBE, NBP_CONFIG_OVERRIDES=json.dumps(overrides))
  assert {n: (workdir / n / 'metrics.jsonl').read_text() for n in logs} == logs
  assert {n: (workdir / n / 'eval' / 'results_step2.json').read_text() for n in evals} == evals
  assert state['train_steps'] == {'nbp': 2, 'ntp': 2} and state['steps'] == {'nbp': 2, 'ntp': 2}
  # Timed on frame prediction: 1 of 3 latent frames of 4x4 codes to generate, blocks of 1x1x2 -> 8 steps, 1x1x1 -> 16.
  assert state['decode_steps'] == {'nbp': 8, 'ntp': 16} and state['speedup'] > 0
  assert state['config'] == 'demo_tiny_nbp'
  assert state['class_names'][0] == 'bouncing_ball' and len(state['class_names']) == 4
  clip = [4, 9, 16, 16, 3]  # NUM_SAMPLES clips of 9 frames at 16x16
  assert state['samples'] == {'nbp': [clip, 'uint8'], 'ntp': [clip, 'uint8']}
  assert state['predictions'] == {'nbp': clip, 'ntp': clip} and state['clips'] == clip
  # Rollouts of 1 + 4 * 8 frames; the stream yields the 5 given frames, then 4 per generated latent frame (1 of 3).
  assert state['rollouts'] == [4, 33, 16, 16, 3] and state['stream'] == [5, 4]
  rich = _displays(nb)
  videos = [r['text/html'] for r in rich if 'show_videos' in r.get('text/html', '')]
  assert len(videos) == 5 and all('data:image/gif;base64' in v for v in videos)  # 2 tasks x NBP, NTP; the rollouts
  tables = [r['text/markdown'] for r in rich if 'text/markdown' in r]
  assert tables == [(workdir / 'summary.md').read_text()]
  assert '| nbp (1x1x2) |' in tables[0] and '| ntp (1x1x1) |' in tables[0]
  assert any('grid.png' in r.get('text/html', '') for r in rich)

  # tpu_generate: 2 devices stand in for the TPU cores; the batch is split, not replicated.
  nb, state = _execute('tpu_generate', workdir, _TPU_PROBE, devices=2, NBP_SAMPLES_PER_DEVICE='1',
                       NBP_TIMING_REPEATS='1')
  assert state['devices'] == 2 and state['mesh'] == {'data': 2, 'fsdp': 1, 'tensor': 1} and state['batch'] == 2
  assert state['step'] == 2
  tasks = ('class-conditional', 'frame prediction')
  assert state['shards'] == {t: [1, 1] for t in tasks}  # one sample per device
  assert state['codes'] == {t: [2, 3, 4, 4] for t in tasks}
  assert len([r for r in _displays(nb) if 'show_videos' in r.get('text/html', '')]) == 2
  for task in tasks:
    nbp, ntp = state['speeds'][task]['NBP'], state['speeds'][task]['NTP']
    assert (nbp['block'], ntp['block']) == ('1x1x2', '1x1x1')
    assert ntp['steps'] == 2 * nbp['steps'] and nbp['seconds'] > 0 and ntp['seconds'] > 0
  # Frame prediction: 5 of 9 frames (2 of 3 latent frames) given, 4 generated per clip.
  fp = state['speeds']['frame prediction']['NBP']
  assert (fp['steps'], round(fp['frames_per_s'] * fp['seconds'], 6)) == (8, 2 * 4)
