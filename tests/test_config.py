"""Presets load and validate; sizes choose their fields; bad fields give one-line errors naming the field."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from conftest import run_main
from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax.nbp import spec as spec_lib
from nbp_jax.nbp.spec import spec_from_config

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))

# The paper's transformer sizes (docs/design.md): (layers, heads, width).
PAPER_SIZES = {'700m': (24, 16, 1536), '1b': (24, 32, 2048), '3b': (32, 32, 3072)}


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_every_task_size_preset_exists():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  for task in ('ucf101', 'k600'):
    assert f'{task}.py' in names  # the size as its argument: --config=configs/k600.py:3b
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
    ('data.resolution', 0, 'data.resolution=0 is not a positive multiple'),
    ('data.fps', 0, 'data.fps=0 must be > 0'),
    ('eval.fvd_num_frames', 18, 'eval.fvd_num_frames=18 must be from 9 (I3D pools 8 frames into one, then two) to '
                                'the 17 frames of a clip (data.num_frames); use --config.eval.fvd_num_frames=16.'),
    ('eval.fvd_num_frames', 8, 'eval.fvd_num_frames=8 must be from 9'),  # I3D's features were NaN
    ('eval.fvd_resize', -8, 'eval.fvd_resize=-8 must be >= 0'),
    ('eval.num_video_files', -1, 'eval.num_video_files=-1 must be >= 0'),
    ('nbp.first_block', 'middle', 'nbp.first_block'),
    ('model.attention', 'flash3', 'model.attention'),
    ('model.pos_emb_init', 'sincos', 'model.pos_emb_init'),
    ('sample.checkpoint', 'newest', "sample.checkpoint='newest' is unknown"),
    ('synthetic.num_classes', 5, 'data.num_classes=4 but the synthetic videos have data.synthetic.num_classes=5'),
    ('nbp.context_frames', 8, 'nbp.context_frames=8 is not 1 + a multiple of 4'),  # frames 6-8 would be generated
    ('sample.num_frames', 9, 'sample.num_frames=9 is shorter than a clip (data.num_frames=17)'),
    ('sample.temperature', 1e-38, 'sample.temperature=1e-38 must be >= 1e-06'),  # logits / T overflows
    ('export.batch_size', -1, 'export.batch_size=-1 must be >= 0'),
    ('eval.num_samples', 1, 'eval.num_samples=1: an FVD needs at least 2 clips a set'),
    ('eval.batch_size', 0, 'eval.batch_size=0 must be >= 1'),
    ('optim.grad_accum_steps', 0, 'optim.grad_accum_steps=0 must be >= 1'),
    ('optim.grad_accum_steps', 3, 'data.batch_size=4 must be a multiple of optim.grad_accum_steps=3'),
    ('optim.b1', 1.0, 'optim.b1=1.0 and optim.b2=0.95 must be in [0, 1)'),  # b1=1 stopped at step 1 as non-finite
    ('train.eval_every', -3, 'train.eval_every=-3 must be >= 0'),
    ('tokenizer.fsq_levels', (1, 5, 5), 'tokenizer.fsq_levels=(1, 5, 5) must be levels of at least 2'),
    ('tokenizer.tokenize_batch_size', 0, 'tokenizer.tokenize_batch_size=0 must be >= 1'),
    ('train.keep_checkpoints', 0, 'train.keep_checkpoints=0 must be >= 1'),
    ('mesh.shape', (0, 1, 1), 'mesh.shape=(0, 1, 1) must give 3 positive sizes'),
    ('mesh.axis_rules', (('embed', 'model'),), "mesh.axis_rules maps 'embed' to 'model', which is not a mesh axis"),
    ('tokenizer.grad_accum_steps', 3, 'tokenizer.batch_size=8 must be a positive multiple of '
                                      'tokenizer.grad_accum_steps=3'),
    ('model.param_dtype', 'fp32', "model.param_dtype='fp32' is unknown"),
    ('export.platforms', ('cpu', 'gpu'), "export.platforms has 'gpu' (jax's name for NVIDIA GPUs is 'cuda')"),
])
def test_bad_field_names_the_field(field, value, expected):
  c = _demo()
  section, name = field.split('.')
  (c.data if section == 'synthetic' else c)[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(expected)) as info:
    config_lib.validate(c, {'eval': 'eval', 'tokenizer': 'train_tokenizer'}.get(section, 'train'))
  assert '\n' not in str(info.value)


def test_max_positions_is_checked_against_the_exact_input_length_of_each_layout_a_mode_builds():
  c = _demo()
  c.nbp.first_block = 'none'  # K600's start: the first block is given, never predicted, so shorter blocks see more
  seq_len = spec_from_config(c).layout.seq_len
  ntp = c.copy_and_resolve_references()
  ntp.nbp.block_shape = (1, 1, 1)
  ntp_len = spec_from_config(ntp).layout.seq_len
  assert ntp_len > seq_len
  c.model.max_positions = seq_len
  spec_lib.check_layouts(c, 'train')
  with pytest.raises(config_lib.ConfigError, match=f'{ntp_len} input positions do not fit model.max_positions='):
    spec_lib.check_layouts(c, 'pipeline')  # the pipeline trains the next-token model beside it
  c.model.max_positions = seq_len - 1
  with pytest.raises(config_lib.ConfigError, match=f'{seq_len} input positions do not fit model.max_positions='):
    spec_lib.check_layouts(c, 'train')
  spec_lib.check_layouts(c, 'prepare_data')  # a mode that builds no transformer does not ask
  # The same model decoding other blocks (Generator.codes(block_shape=...)): its positions were clamped to the last.
  c.model.max_positions = seq_len
  with pytest.raises(config_lib.ConfigError, match=rf'{ntp_len} input positions \(decoding with block_shape=\(1, '
                                                    r'1, 1\)\) do not fit model.max_positions='):
    spec_from_config(c).with_block_shape((1, 1, 1))
  # A block of the whole grid, never predicted: no target at all (the loss was the mean of nothing, NaN).
  c.nbp.block_shape = config_lib.latent_shape(c)
  with pytest.raises(config_lib.ConfigError, match=r"is the whole latent grid and nbp.first_block='none'"):
    spec_from_config(c)


def test_context_videos_need_a_frame_prediction_model_and_old_runs_read_back_with_the_field(tmp_path):
  c = _demo()
  c.nbp.context_frames = 0
  c.sample.context_videos = 'mine.mp4'
  with pytest.raises(config_lib.ConfigError, match=r'nbp\.context_frames=0\).*drop sample\.context_videos'):
    config_lib.validate(c, 'sample')
  # A run saved before sample.context_videos existed: its config reads back with the field at its default, so that
  # --config.sample.context_videos=... can set it; fields of what was trained are not filled in.
  saved = _demo().to_dict()
  del saved['sample']['context_videos'], saved['model']['attention']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  loaded = checkpoint_lib.load_config(str(tmp_path))
  assert loaded.sample.context_videos == '' and 'attention' not in loaded.model
  assert config_lib.apply_overrides(loaded, {'sample.context_videos': 'a.mp4'}).sample.context_videos == 'a.mp4'


def test_block_shape_error_suggests_tiling_shapes():
  c = _demo()
  c.tokenizer = config_lib.tokenizer_config('micro')  # 8x down in space, 4x in time: 17x32x32 -> (5, 4, 4)
  c.nbp.block_shape = (1, 3, 4)
  with pytest.raises(config_lib.ConfigError, match=r'does not tile the latent grid \(5, 4, 4\)'):
    config_lib.validate(c)
  # The study trains its study.block_shapes instead of nbp.block_shape: only those must tile.
  study = config_lib.task_config('study', 'tiny')
  study.tokenizer, study.nbp.block_shape = c.tokenizer, (1, 3, 4)
  study.study.block_shapes = ((1, 1, 1), (1, 1, 4))
  config_lib.validate(study, 'study')
  study.study.block_shapes = ((1, 1, 1), (1, 1, 3))
  with pytest.raises(config_lib.ConfigError, match=r'study.block_shapes has \(1, 1, 3\), which does not tile'):
    config_lib.validate(study, 'study')
  study.study.block_shapes = ((1, 1, 0),)  # a ZeroDivisionError's traceback
  with pytest.raises(config_lib.ConfigError, match=r'study.block_shapes has \(1, 1, 0\), which does not tile'):
    config_lib.validate(study, 'study')
  study.study.block_shapes, study.study.seeds = ((1, 1, 1),), (0, 0)  # one run counted as two seeds
  with pytest.raises(config_lib.ConfigError, match=r'study.seeds=\(0, 0\) must not repeat an entry'):
    config_lib.validate(study, 'study')


def test_unknown_mode():
  with pytest.raises(config_lib.ConfigError, match='--mode'):
    config_lib.validate(_demo(), 'fly')


def test_missing_data_folder_for_prepare_data(tmp_path):
  c = config_lib.task_config('ucf101', '700m')
  c.data.raw_dir = str(tmp_path / 'nope')
  with pytest.raises(config_lib.ConfigError, match='data.raw_dir'):
    config_lib.validate(c, 'prepare_data')


def test_cli_helpfull_shows_flags():
  out = run_main('--config=configs/k600_3b.py', '--mode=sample', '--helpfull')
  # absl prints the help and exits 1 by design.
  assert 'Traceback' not in out.stderr, out.stderr
  assert '--mode' in out.stdout and '--workdir' in out.stdout and '--config' in out.stdout


def _installed_command() -> str:
  """The `nbp-jax` console script of this environment."""
  command = os.path.join(os.path.dirname(sys.executable), 'nbp-jax')
  assert os.path.exists(command), 'nbp-jax is missing: `make venv` installs this package (pip install -e .)'
  return command


def test_help_of_both_entry_points_shows_the_usage_and_the_flags(tmp_path):
  for argv in ([sys.executable, '-m', 'nbp_jax.main', '--help'], [_installed_command(), '--help']):
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'))
    assert 'Traceback' not in out.stderr, out.stderr
    assert 'one config, one workdir, one mode' in out.stdout, (argv, out.stdout)
    for flag in ('--config:', '--mode:', '--workdir:', '--[no]verbose:'):
      assert out.stdout.count(flag) == 1, (argv, flag, out.stdout)


def test_cli_config_error_is_one_line(tmp_path):
  out = run_main('--config=configs/k600_3b.py', f'--workdir={tmp_path}', '--config.nbp.block_shape=(1,3,3)')
  assert out.returncode == 2
  assert out.stderr.strip().startswith('Config error: nbp.block_shape=(1, 3, 3) does not tile')


def test_cli_unknown_mode_is_rejected(tmp_path):
  out = run_main('--config=configs/demo.py', f'--workdir={tmp_path}', '--mode=fly')
  assert out.returncode != 0 and '--mode' in out.stderr


def test_every_mode_runs_a_stage():
  from nbp_jax import main  # pylint: disable=g-import-not-at-top  (defines the CLI's absl flags)
  assert sorted(main.STAGES) == sorted(config_lib.MODES)
  for mode in config_lib.MODES:
    assert callable(main.resolve_stage(mode)), mode


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
  line = _one_line_error(run_main('--config=configs/demo.py', f'--workdir={workdir}', '--mode=sample'))
  assert 'does not exist: --mode=sample reads a finished run there' in line
  workdir.mkdir()
  line = _one_line_error(run_main('--config=configs/demo.py', f'--workdir={workdir}', '--mode=sample'))
  assert 'No checkpoint in' in line and 'train first (--mode=train' in line
  workdir.rmdir()
  line = _one_line_error(run_main('--config=configs/demo.py', f'--workdir={workdir}', '--mode=train'))
  assert '--mode=prepare_data, then --mode=train_tokenizer, then --mode=tokenize (or --mode=pipeline' in line, line
  assert not workdir.exists()
  # A paper preset is not offered the pipeline (it would train and evaluate an NTP model beside it, for days).
  line = _one_line_error(run_main('--config=configs/k600_700m.py', f'--workdir={workdir}', '--mode=train'))
  assert line.endswith('then --mode=tokenize. Or encode clips on the fly with --config.data.use_tokenized=False.')
  line = _one_line_error(run_main('--config=configs/k600_700m.py', f'--workdir={workdir}', '--mode=import',
                              f'--config.import_.checkpoint={tmp_path}/missing.ckpt'))
  assert 'missing.ckpt does not exist' in line
  line = _one_line_error(run_main('--config=configs/demo.py', f'--workdir={workdir}', '--config.model.num_layer=2'),
                         'Config error: ')
  assert "no field 'model.num_layer'; nearest valid: model.num_layers" in line
  # --verbose (or NBP_VERBOSE=1) shows the traceback of an expected error.
  out = run_main('--config=configs/demo.py', f'--workdir={workdir}', '--mode=sample', '--verbose')
  assert out.returncode != 0 and 'Traceback' in out.stderr and 'MissingError' in out.stderr
  assert not workdir.exists()


def test_cli_help_succeeds():
  out = run_main('--help')
  assert out.returncode == 0, out.stderr[-2000:]  # absl's own status for --help is 1
  assert '--mode' in out.stdout and 'python -m nbp_jax.main' in out.stdout


def test_cli_wrong_flags_and_workdirs_are_one_line(tmp_path):
  """Mistakes in the command line itself: one line each (exit 2), nothing left on disk."""
  demo = '--config=configs/demo.py'
  cases = [
      ((demo, '--mode=trian'), 'Error: ', 'did you mean --mode=train?'),
      ((demo, '--config.model.num_layers=abc'), 'Error: ', "--config.model.num_layers=abc: invalid literal"),
      ((demo, '--num_layers=4'), 'Error: ', 'set as --config.section.field=value'),
      ((demo, 'train'), 'Error: ', "unexpected argument(s) 'train'"),
      (('--config=configs/demo.py:tiny',), 'Config error: ', 'takes no argument'),
      (('--config.model.num_layer=2',), 'Config error: ', "no field 'model.num_layer'"),  # the default config
      ((demo, '--mode=sample', '--config.sample.top_p=1.5'), 'Config error: ', 'sample.top_p=1.5 must be in (0, 1]'),
      ((demo, '--mode=prepare_data', f'--config.data.raw_dir={tmp_path}'), 'Config error: ',
       "data.source='synthetic' generates its clips and reads no folder"),
      (('--mode=export', '--config.model.emb_dim=64'), 'Config error: ', '--config.model.emb_dim would be ignored'),
  ]
  for args, prefix, expected in cases:
    line = _one_line_error(run_main(*args, f'--workdir={tmp_path / "w"}'), prefix)
    assert expected in line, (args, line)
  (tmp_path / 'a_file').write_text('')
  line = _one_line_error(run_main(demo, f'--workdir={tmp_path / "a_file"}'))
  assert 'is a file, not a folder' in line
  line = _one_line_error(run_main(demo, '--workdir='))
  assert '--workdir is empty' in line
  # A failed command removes every folder it created, not only the workdir itself.
  line = _one_line_error(run_main(demo, f'--workdir={tmp_path / "new" / "a" / "b"}', '--mode=train_tokenizer'))
  assert 'run `python -m nbp_jax.main --mode=prepare_data`' in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']


def test_ctrl_c_in_a_stage_that_does_not_handle_it_stops_in_one_line_and_a_preempted_one_exits_as_the_signal(
    tmp_path):
  script = """import sys
from nbp_jax import errors, main
main.parse_flags(sys.argv)
def interrupted(config, workdir):
  raise KeyboardInterrupt
def preempted(config, workdir):
  raise errors.Preempted('Preempted (SIGTERM): saved W/checkpoints/7', 'SIGTERM')
for stage in (interrupted, preempted):
  main.resolve_stage = lambda mode: stage
  try:
    main.main(sys.argv[:1])
  except SystemExit as e:
    print('exit', e.code, flush=True)"""
  out = subprocess.run([sys.executable, '-c', script, '--config=configs/demo.py', f'--workdir={tmp_path / "w"}',
                        '--mode=prepare_data'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  # Training answers SIGTERM / Ctrl-C with a checkpoint and a line of its own, then raises Preempted: main exits as
  # the signal would (143 = 128 + SIGTERM), so that neither later stages nor a scheduler take the run as finished.
  assert out.stdout.split() == ['exit', '130', 'exit', '143'], out.stdout
  assert out.stderr.strip() == ('Interrupted (--mode=prepare_data); the same command starts it again (reusing what '
                                'earlier runs finished).')
  assert not (tmp_path / 'w').exists()  # the folder it created, empty, is gone


# The config main.py builds from its flags (its own parsing and overrides), printed without running a stage.
_PRINT_CONFIG = """import json, sys
from nbp_jax import main
main.parse_flags(sys.argv)
print(json.dumps(main.config_from_flags('train', None).to_dict()))"""


def _flags_config(*args, cwd=REPO):
  out = subprocess.run([sys.executable, '-c', _PRINT_CONFIG, *args], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def _shape(model):
  return model['num_layers'], model['num_heads'], model['emb_dim']


@pytest.mark.parametrize('size', PAPER_SIZES)
def test_size_override_chooses_the_size(size):
  c = _flags_config('--config=configs/k600_700m.py', f'--config.model.size={size}')
  assert c['model']['size'] == size and _shape(c['model']) == PAPER_SIZES[size]
  assert c['model']['dropout'] == 0.1 and c['name'] == 'k600_700m'  # the section's other fields and the task stay


def test_field_override_wins_over_the_size_in_either_order():
  # A repeated override keeps its last value, a tuple's too (config_flags appended a tuple's repeats).
  repeated = ('--config.nbp.block_shape=(1,1,2)', '--config.nbp.block_shape=(1,1,4)')
  for args in (('--config.model.size=3b', '--config.model.num_layers=4', *repeated),
               ('--config.model.num_layers=4', '--config.model.size=3b', *repeated)):
    c = _flags_config('--config=configs/demo.py', *args)
    assert _shape(c['model']) == (4, 32, 3072), args
    assert c['model']['dropout'] == 0.0  # the demo's own setting, not the size's
    assert list(c['nbp']['block_shape']) == [1, 1, 4]


def test_tokenizer_size_override_chooses_the_released_tokenizer():
  c = _flags_config('--config=configs/demo.py', '--config.tokenizer.size=official')
  tok = c['tokenizer']
  # The release (docs/design.md): widths 128 x (1, 2, 2, 4), 4 residual units per stage and 4 at the widest,
  # GroupNorm, time halved after stages 2 and 3, FSQ levels 8,8,8,5,5,5.
  assert (tok['channels'], tuple(tok['channel_multipliers']), tok['num_res_blocks'], tok['num_mid_blocks']) == (
      128, (1, 2, 2, 4), 4, 4)
  assert tok['norm'] == 'group' and tuple(tok['temporal_downsample']) == (False, True, True)
  assert tuple(tok['fsq_levels']) == (8, 8, 8, 5, 5, 5)
  assert tok['batch_size'] == 8 and tok['pretrained'] == 'demo'  # the demo's training settings stay


def test_preset_argument_is_the_size():
  for size, lr in (('700m', 1e-3), ('1b', 5e-4), ('3b', 2e-4)):
    c = _flags_config(f'--config=configs/k600.py:{size}')
    assert _shape(c['model']) == PAPER_SIZES[size] and c['optim']['lr'] == lr and c['name'] == f'k600_{size}'
  c = _flags_config('--config=configs/ucf101.py:3b', '--config.model.num_heads=16')
  assert _shape(c['model']) == (32, 16, 3072) and c['data']['num_classes'] == 101
  assert _shape(_flags_config('--config=configs/k600.py')['model']) == PAPER_SIZES['700m']  # the default size


def test_bundled_configs_by_name_outside_the_checkout(tmp_path):
  assert _flags_config('--config=k600:3b', cwd=tmp_path)['name'] == 'k600_3b'
  assert _flags_config('--config=k600_1b', cwd=tmp_path)['name'] == 'k600_1b'
  assert _flags_config('--config=configs/ucf101_3b.py', cwd=tmp_path)['name'] == 'ucf101_3b'  # the README's paths
  assert _flags_config(cwd=tmp_path)['name'] == 'demo_tiny'  # the default
  with pytest.raises(config_lib.ConfigError, match=r'nope\.py is not a file.*k600, k600_1b'):
    config_lib.config_file('nope.py')
  # The benchmarks' command line too (it read configs/bench_cpu.py relative to the folder it ran in). An unknown
  # benchmark's usage line comes once the config has loaded.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  bench = lambda config: subprocess.run([sys.executable, '-m', 'nbp_jax.bench', 'nope', f'--config={config}'],
                                        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
  for config in ('configs/bench_cpu.py', 'smoke'):
    out = bench(config)
    assert out.returncode == 1 and 'usage: python -m nbp_jax.bench {generate|' in out.stderr, out.stderr[-2000:]
  out = bench('nope')
  assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith('Config error: --config=nope: nope is')


def test_apply_overrides_resizes_in_python():
  c = config_lib.apply_overrides(config_lib.task_config('ucf101', '700m'), {'model.size': '1b', 'optim.lr': 1e-4})
  assert _shape(c.model) == PAPER_SIZES['1b'] and c.optim.lr == 1e-4
  c = config_lib.apply_overrides(config_lib.task_config('demo', 'tiny'), {'tokenizer.size': 'official'})
  assert c.tokenizer.num_res_blocks == 4 and c.tokenizer.norm == 'group'
  with pytest.raises(KeyError, match='model.num_layer'):
    config_lib.apply_overrides(c, {'model.num_layer': 2})


def test_unknown_size_is_a_one_line_error_naming_the_sizes(tmp_path):
  """Through the installed `nbp-jax` command, from outside the checkout."""
  command = _installed_command()
  for args in (('--config=k600_3b', '--config.model.size=5b'), ('--config=configs/k600.py:5b',),
               ('--config=configs/demo.py', '--config.tokenizer.size=huge')):
    out = subprocess.run([command, *args, f'--workdir={tmp_path}/w'], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'))
    line = _one_line_error(out, 'Config error: ')
    assert 'is unknown; pick one of' in line and ('700m, 1b, 3b' in line or 'demo, tiny, official' in line), line
  assert not (tmp_path / 'w').exists()
