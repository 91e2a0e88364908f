"""The Colab notebooks (notebooks/*.ipynb), executed on CPU at micro size with nbclient so that they never rot, and
the helpers they call (nbp_jax/notebook_utils.py)."""

import ast
import os
import shutil

import nbformat
from nbclient import NotebookClient
import pytest

from conftest import REPO, TINY_PIPELINE_FLAGS
from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import notebook_utils as nu

NOTEBOOKS = ('quickstart', 'tpu_generate')


def _execute(name: str, workdir, *, devices: int = 1, **env) -> nbformat.NotebookNode:
  """Runs notebooks/NAME.ipynb in a fresh python3 kernel (cwd = the repo) with the tiny settings; returns it with its
  outputs, or fails with the cell that raised."""
  nb = nbformat.read(os.path.join(REPO, 'notebooks', f'{name}.ipynb'), as_version=4)
  kernel_env = dict(os.environ, JAX_PLATFORMS='cpu', NBP_WORKDIR=str(workdir), NBP_NOTEBOOK_TINY='1', **env)
  kernel_env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}' if devices > 1 else ''
  client = NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': REPO}})
  client.execute(env=kernel_env)
  return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, list[dict]]:
  """(all printed and displayed text, the rich display_data payloads)."""
  text, rich = [], []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if out.output_type == 'stream':
        text.append(out.text)
      elif out.output_type in ('display_data', 'execute_result'):
        rich.append(dict(out.data))
        text.extend(str(out.data.get(k, '')) for k in ('text/markdown', 'text/plain'))
  return '\n'.join(text), rich


def _flag_overrides(flags) -> dict:
  out = {}
  for flag in flags:
    key, value = flag[len('--config.'):].split('=', 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def test_tiny_overrides_are_the_tests_micro_pipeline():
  # The quickstart must rebuild exactly the fixture's config, or its pipeline.run would train again.
  assert TINY_PIPELINE_FLAGS[0] == '--config=configs/demo.py'
  assert _flag_overrides(TINY_PIPELINE_FLAGS[1:]) == nu.TINY_OVERRIDES


def test_notebooks_are_stored_clean_and_valid():
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(REPO, 'notebooks', f'{name}.ipynb'), as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == 'python3'
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:80])
    # One parameters cell at the top, overridable from the environment.
    first_code = next(c for c in nb.cells if c.cell_type == 'code').source
    assert "os.environ.get('NBP_WORKDIR'" in first_code and 'NBP_NOTEBOOK_TINY' in first_code, name


def test_helpers_errors_say_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match='run the quickstart'):
    nu.model_workdir(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='--mode=import'):
    nu.model_workdir(tmp_path)
  with pytest.raises(KeyError, match='model.num_layer'):
    nu.demo_config(overrides={'model.num_layer': 2})
  config = nu.demo_config(tiny=True, overrides={'sample.top_k': 3})
  assert config.nbp.block_shape == (1, 1, 2) and config.sample.top_k == 3 and config.name == 'demo_tiny'


def test_load_config_relocates_a_moved_pipeline_workdir(tmp_path):
  config = nu.demo_config(tiny=True)
  config.data.dir = '/gone/demo/data'
  config.tokenizer.checkpoint = '/gone/demo/tokenizer'
  (tmp_path / 'data').mkdir()
  (tmp_path / 'tokenizer').mkdir()
  checkpoint_lib.write_config(str(tmp_path / 'nbp'), config)
  assert nu.model_workdir(tmp_path) == str(tmp_path / 'nbp')
  moved = nu.load_config(nu.model_workdir(tmp_path))
  assert moved.data.dir == str(tmp_path / 'data') and moved.tokenizer.checkpoint == str(tmp_path / 'tokenizer')
  assert moved.data.tokenized_dir == config.data.tokenized_dir  # unset paths stay unset


def test_notebooks_run_on_cpu(tiny_pipeline, tmp_path):
  workdir = tmp_path / 'demo'
  shutil.copytree(tiny_pipeline, workdir)  # the notebooks must not change the session fixture
  logs = {n: (workdir / n / 'metrics.jsonl').read_text() for n in ('tokenizer', 'nbp', 'ntp')}

  # quickstart: the demo pipeline resumes (same config: nothing trains again), then samples, videos and the table.
  nb = _execute('quickstart', workdir)
  text, rich = _outputs(nb)
  assert {n: (workdir / n / 'metrics.jsonl').read_text() for n in logs} == logs
  assert 'Reusing the evaluation of nbp' in text and 'Reusing the evaluation of ntp' in text
  assert 'demo_tiny_nbp at step 2' in text and 'demo_tiny_ntp at step 2' in text
  videos = [r['text/html'] for r in rich if 'show_videos' in r.get('text/html', '')]
  assert len(videos) == 4 and all('data:image/gif;base64' in v for v in videos)  # 2 tasks x NBP, NTP
  assert 'bouncing_ball' in videos[0] and 'real | predicted' in videos[2]
  table = [r['text/markdown'] for r in rich if 'text/markdown' in r]
  assert len(table) == 1 and '| nbp |' in table[0] and '| ntp |' in table[0] and 'NBP decodes' in table[0]
  assert any('grid.png' in r.get('text/html', '') for r in rich)

  # tpu_generate: 2 devices stand in for the TPU cores; the batch is split, not replicated.
  nb = _execute('tpu_generate', workdir, devices=2)
  text, rich = _outputs(nb)
  assert "2 devices (cpu, cpu); mesh {'data': 2, 'fsdp': 1, 'tensor': 1}; batch 2 = 1 per device" in text
  assert text.count('batch of 2 split over 2 devices (1 each)') == 2  # class-conditional, frame prediction
  assert len([r for r in rich if 'show_videos' in r.get('text/html', '')]) == 2
  for task in ('class-conditional', 'frame prediction'):
    assert f'{task} (batch 2 on 2 devices):' in text
  assert text.count('NBP: block 1x1x2') == 2 and text.count('NTP: block 1x1x1') == 2
  assert text.count('speed-up NBP/NTP: ') == 2 and '(2.0x fewer steps)' in text
