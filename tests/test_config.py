"""Presets load and validate; bad fields give one-line errors naming the field."""

import glob
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (import check: the CLI's config loader)

from nbp_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_every_task_size_preset_exists():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  for task in ('ucf101', 'k600'):
    for size in ('700m', '1b', '3b'):
      assert f'{task}_{size}.py' in names
  assert 'demo.py' in names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_preset_loads_and_validates(path):
  config = _load(path)
  config_lib.validate(config, 'train')


@pytest.mark.parametrize('task,size,layers,heads,width,lr', [
    ('k600', '700m', 24, 16, 1536, 1e-3), ('k600', '1b', 24, 32, 2048, 5e-4), ('k600', '3b', 32, 32, 3072, 2e-4),
    ('ucf101', '700m', 24, 16, 1536, 6e-4), ('ucf101', '3b', 32, 32, 3072, 6e-4)])
def test_paper_hyperparameters(task, size, layers, heads, width, lr):
  c = _load(os.path.join(REPO, 'configs', f'{task}_{size}.py'))
  assert (c.model.num_layers, c.model.num_heads, c.model.emb_dim) == (layers, heads, width)
  assert c.optim.lr == lr
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.grad_clip) == (0.9, 0.95, 0.01, 1.0)
  assert c.model.dropout == 0.1 and tuple(c.nbp.block_shape) == (1, 1, 16)
  assert config_lib.latent_shape(c) == (5, 16, 16)
  if task == 'k600':
    assert (c.data.fps, c.data.batch_size, c.optim.warmup_steps, c.nbp.context_frames) == (16, 64, 10_000, 5)
    assert config_lib.context_latent_frames(c) == 2
  else:
    assert (c.data.fps, c.data.batch_size, c.optim.warmup_steps, c.train.num_steps) == (8, 256, 5_000, 100_000)
    assert c.data.num_classes == 101 and c.nbp.condition == 'class'


def _demo():
  return config_lib.task_config('demo', 'tiny')


@pytest.mark.parametrize('field,value,expected', [
    ('nbp.block_shape', (1, 3, 4), 'nbp.block_shape'),
    ('model.num_heads', 7, 'model.num_heads'),
    ('data.num_frames', 16, 'data.num_frames'),
    ('data.resolution', 36, 'data.resolution'),
    ('nbp.first_block', 'middle', 'nbp.first_block'),
    ('model.attention', 'flash3', 'model.attention'),
])
def test_bad_field_names_the_field(field, value, expected):
  c = _demo()
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=expected.replace('.', r'\.')) as info:
    config_lib.validate(c, 'train')
  assert '\n' not in str(info.value)


def test_block_shape_error_suggests_tiling_shapes():
  c = _demo()
  c.tokenizer = config_lib.tokenizer_config('micro')  # 8x down in space, 4x in time: 17x32x32 -> (5, 4, 4)
  c.nbp.block_shape = (1, 3, 4)
  with pytest.raises(config_lib.ConfigError, match=r'does not tile the latent grid \(5, 4, 4\)'):
    config_lib.validate(c)


def test_unknown_mode():
  with pytest.raises(config_lib.ConfigError, match='--mode'):
    config_lib.validate(_demo(), 'fly')


def test_missing_data_folder_for_prepare_data(tmp_path):
  c = config_lib.task_config('ucf101', '700m')
  c.data.raw_dir = str(tmp_path / 'nope')
  with pytest.raises(config_lib.ConfigError, match='data.raw_dir'):
    config_lib.validate(c, 'prepare_data')


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'nbp_jax.main', *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


def test_cli_helpfull_shows_flags():
  out = _cli('--config=configs/k600_3b.py', '--mode=sample', '--helpfull')
  # absl prints the help and exits 1 by design.
  assert 'Traceback' not in out.stderr, out.stderr
  assert '--mode' in out.stdout and '--workdir' in out.stdout and '--config' in out.stdout


def test_cli_config_error_is_one_line(tmp_path):
  out = _cli('--config=configs/k600_3b.py', f'--workdir={tmp_path}', '--config.nbp.block_shape=(1,3,3)')
  assert out.returncode == 2
  assert out.stderr.strip().startswith('Config error: nbp.block_shape=(1, 3, 3) does not tile')


def test_cli_unknown_mode_is_rejected(tmp_path):
  out = _cli('--config=configs/demo.py', f'--workdir={tmp_path}', '--mode=fly')
  assert out.returncode != 0 and '--mode' in out.stderr


def test_prepare_data_is_not_refused_for_a_transformer_field():
  c = _demo()
  c.tokenizer = config_lib.tokenizer_config('micro')  # GroupNorm: tokenizer.num_groups is checked
  c.nbp.block_shape = (1, 3, 4)  # does not tile the latent grid: only the transformer's modes care
  c.model.num_heads = 7
  config_lib.validate(c, 'prepare_data')
  c.tokenizer.num_groups = 5  # the tokenizer's modes check the tokenizer, not the transformer
  with pytest.raises(config_lib.ConfigError, match='tokenizer.num_groups'):
    config_lib.validate(c, 'train_tokenizer')
  c.tokenizer.num_groups = 4
  config_lib.validate(c, 'tokenize')
  with pytest.raises(config_lib.ConfigError, match='model.num_heads'):
    config_lib.validate(c, 'train')


def _one_line_error(out, prefix='Error: '):
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(prefix), out.stderr[-3000:]
  return lines[0]


def test_cli_expected_errors_are_one_line_and_leave_no_empty_workdir(tmp_path):
  workdir = tmp_path / 'new'
  line = _one_line_error(_cli('--config=configs/demo.py', f'--workdir={workdir}', '--mode=sample'))
  assert 'No checkpoint in' in line and 'train first (--mode=train' in line
  assert not workdir.exists()  # the failed command created it, then removed it again
  line = _one_line_error(_cli('--config=configs/demo.py', f'--workdir={workdir}', '--mode=train'))
  assert '--mode=prepare_data, then --mode=train_tokenizer, then --mode=tokenize' in line, line
  assert not workdir.exists()
  line = _one_line_error(_cli('--config=configs/k600_700m.py', f'--workdir={workdir}', '--mode=import',
                              f'--config.import_.checkpoint={tmp_path}/missing.ckpt'))
  assert 'missing.ckpt does not exist' in line
  line = _one_line_error(_cli('--config=configs/demo.py', f'--workdir={workdir}', '--config.model.num_layer=2'),
                         'Config error: ')
  assert "no field 'model.num_layer'; nearest valid: model.num_layers" in line
  # --verbose (or NBP_VERBOSE=1) shows the traceback of an expected error.
  out = _cli('--config=configs/demo.py', f'--workdir={workdir}', '--mode=sample', '--verbose')
  assert out.returncode != 0 and 'Traceback' in out.stderr and 'MissingError' in out.stderr
  assert not workdir.exists()
