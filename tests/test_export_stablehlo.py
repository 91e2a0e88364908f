"""--mode=export: safetensors + a jax.export program that a fresh process runs with JAX alone, bit-exact.

The reference is the in-process generation through the public APIs (tokenizer encode -> generation.generate ->
tokenizer decode) with the same seed; the fresh process loads only generate.stablehlo, generate.json and the
safetensors files, through the run_generate.py copied into the export folder, and must not import nbp_jax.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import flatbuffers  # noqa: F401  jax.export serialization needs it (requirements.txt)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax.data import video_io
from nbp_jax.export import bundle
from nbp_jax.export import run_generate
from nbp_jax.export import safetensors_io
from nbp_jax.export import stablehlo
from nbp_jax.interop import official
from nbp_jax.nbp import generation
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.tokenizer import load as tokenizer_load
from nbp_jax.tokenizer import model as tokenizer_model


def _config():
  """Micro class-conditional model on 5-frame 16x16 clips: latents (2, 2, 2), blocks of 2, 1 context frame."""
  c = config_lib.task_config('demo', 'micro')
  c.tokenizer = config_lib.tokenizer_config('micro')
  c.data.num_frames, c.data.resolution = 5, 16
  c.nbp.block_shape = (1, 1, 2)
  c.nbp.context_frames = 1
  c.sample.batch_size = 2
  c.sample.top_k, c.sample.top_p = 50, 0.9
  return c


def _random_like(abstract, seed, scale=0.5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(a.dtype), abstract)


def _workdir(tmp_path, config, with_tokenizer=True):
  spec = spec_from_config(config, dtype='float32')
  params = _random_like(nn.unbox(jax.eval_shape(lambda r: nbp_train.init_params(spec, r), jax.random.key(0))), 0)
  workdir = str(tmp_path / 'wd')
  official.save_workdir(workdir, params, config)
  if with_tokenizer:
    model = tokenizer_model.make_model(config)
    tparams = _random_like(nn.unbox(jax.eval_shape(lambda r: tokenizer_model.init_params(model, r),
                                                   jax.random.key(0))), 1, 0.2)
    official.save_workdir(os.path.join(workdir, 'tokenizer'), tparams, config)
  return workdir


# Runs the exported runner as a script, then checks that no model code was imported.
_FRESH = textwrap.dedent('''
    import runpy, sys
    script = SCRIPT
    sys.argv = [script] + sys.argv[1:]
    try:
      runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
      assert not e.code, e.code
    leaked = sorted(m for m in sys.modules if m.startswith(('nbp_jax', 'flax')))
    assert not leaked, leaked
''')


def test_export_runs_in_a_fresh_process_bit_exact(tmp_path):
  config = _config()
  workdir = _workdir(tmp_path, config)
  written = bundle.run(config, workdir)
  sig = json.load(open(written['signature']))
  assert [i['name'] for i in sig['inputs'][:3]] == ['key', 'labels', 'context_video']
  assert [o['name'] for o in sig['outputs']] == ['codes', 'video']
  assert sig['outputs'][1]['shape'] == [2, 5, 16, 16, 3] and sig['num_steps'] == 2
  # For this machine's backend (CPU): the run's 'auto' settings as CPU runs them.
  assert sig['compute_dtype'] == 'float32' and sig['tokenizer_compute'] == {'dtype': 'float32', 'conv_impl': '2d'}

  seed, labels = 3, np.array([1, 2], np.int32)
  context = np.random.default_rng(5).integers(0, 256, (2, 1, 16, 16, 3)).astype(np.uint8)
  ctx_path = str(tmp_path / 'context.npy')
  np.save(ctx_path, context)
  out = str(tmp_path / 'fresh.npz')
  script = _FRESH.replace('SCRIPT', repr(written['runner']))
  proc = subprocess.run([sys.executable, '-c', script, '--seed', str(seed), '--labels', '1,2', '--context', ctx_path,
                         '--out', out], capture_output=True, text=True, timeout=300,
                        cwd=str(tmp_path), env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  fresh = np.load(out)

  # In-process generation with the same weights and seed, through the public APIs.
  params, _ = checkpoint_lib.restore_params(workdir)
  model, tparams, _ = tokenizer_load.load_tokenizer(config, workdir)
  spec = spec_from_config(config)
  # Jitted: op by op, the micro tokenizer's encode and decode took ~25 s of this test.
  ctx_codes = tokenizer_model.jit_encode(tparams, jnp.asarray(context), model=model)
  z = generation.generate(spec, params, jax.random.PRNGKey(seed), Sampling.from_config(config.sample),
                          labels=jnp.asarray(labels), context=generation.context_to_seq(spec, ctx_codes))
  codes = spec.layout.seq_to_grid(z)
  video = tokenizer_model.jit_decode(tparams, codes, model=model)
  np.testing.assert_array_equal(fresh['codes'], np.asarray(codes))
  np.testing.assert_array_equal(fresh['video'], np.asarray(video))
  assert fresh['video'].dtype == np.uint8 and fresh['codes'].dtype == np.int32
  # The given frame's codes are kept; new codes were sampled for the rest.
  np.testing.assert_array_equal(fresh['codes'][:, :1], np.asarray(ctx_codes))


def test_embedded_codes_only_export_matches_generate(tmp_path):
  """No tokenizer, weights baked in, no condition inputs beyond the key: codes equal generation.generate's."""
  config = _config()
  config.nbp.condition, config.nbp.context_frames, config.data.num_classes = 'none', 0, 0
  config.export.embed_params = True
  workdir = _workdir(tmp_path, config, with_tokenizer=False)
  written = bundle.run(config, workdir)
  assert 'tokenizer' not in written
  sig = json.load(open(written['signature']))
  assert [i['name'] for i in sig['inputs']] == ['key'] and sig['embedded_params']
  exported = jax.export.deserialize(bytearray(open(written['program'], 'rb').read()))
  (codes,) = exported.call(np.array([0, 4], np.uint32))
  params, _ = checkpoint_lib.restore_params(workdir)
  spec = spec_from_config(config)
  z = generation.generate(spec, params, jax.random.PRNGKey(4), Sampling.from_config(config.sample), batch_size=2)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(spec.layout.seq_to_grid(z)))
  # The weights file is still written, and reads back as the checkpoint.
  flat, _ = safetensors_io.load(written['params'])
  np.testing.assert_array_equal(flat['head']['kernel'], np.asarray(params['head']['kernel']))


def test_bfloat16_export_builds(tmp_path):
  """export.dtype=bfloat16: half-size weight files; the function takes them as they are."""
  config = _config()
  config.export.dtype, config.export.stablehlo = 'bfloat16', False
  workdir = _workdir(tmp_path, config, with_tokenizer=False)
  written = bundle.run(config, workdir)
  reader = safetensors_io.Reader(written['params'])
  assert reader['head/kernel'].dtype.name == 'bfloat16'
  # Every parameter in 2 bytes: the file is the safetensors header (its u64 length first) and 2 bytes a weight.
  with open(written['params'], 'rb') as f:
    header_len = int.from_bytes(f.read(8), 'little')
  params, _ = checkpoint_lib.restore_params(workdir)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert os.path.getsize(written['params']) == 8 + header_len + 2 * num_params
  gen = stablehlo.build(config, reader, batch_size=2, context_frames=1)
  assert gen.inputs[2]['name'] == 'context_codes' and gen.inputs[3]['dtype'] == 'bfloat16'
  # Weights of another config are named before anything is traced, in both layer layouts.
  for scan in (True, False):
    other = _config()
    other.model.update(mlp_ratio=2 * config.model.mlp_ratio, scan_layers=scan)
    with pytest.raises(stablehlo.ExportError, match=r"weight 'blocks.*/mlp/fc1/.*' has shape .* in the weights but"):
      stablehlo.build(other, reader, batch_size=2, context_frames=1)
  # A refused export leaves the earlier one as it was; the next one replaces it whole (no earlier file stays).
  export_dir = os.path.dirname(written['params'])
  open(os.path.join(export_dir, 'context_3.mp4'), 'w').close()  # as from an earlier export of a larger batch
  config.export.update(dtype='float32', stablehlo=True, context_frames=5)  # the whole clip given: nothing to make
  with pytest.raises(stablehlo.ExportError, match=r'export.context_frames=5 gives the whole clip \(2 latent frames\)'):
    bundle.run(config, workdir)
  assert safetensors_io.Reader(written['params'])['head/kernel'].dtype.name == 'bfloat16'
  assert sorted(os.listdir(os.path.dirname(export_dir))).count('export.partial') == 0
  config.export.update(stablehlo=False, context_frames=-1)
  bundle.run(config, workdir)
  assert os.listdir(export_dir) == ['params.safetensors']
  assert safetensors_io.Reader(written['params'])['head/kernel'].dtype.name == 'float32'


def test_export_for_accelerators_from_a_cpu_machine_resolves_auto_for_them(tmp_path):
  """export.platforms naming an accelerator: the run's 'auto' compute settings become bfloat16 and 3D
  convolutions (not this CPU's float32 and 2D ones), recorded in the signature; one program for every platform."""
  config = _config()
  assert config.model.dtype == config.tokenizer.dtype == config.tokenizer.conv_impl == 'auto'
  config.export.platforms = ('cpu', 'tpu')
  written = bundle.run(config, _workdir(tmp_path, config))
  signature = json.load(open(written['signature']))
  assert signature['compute_dtype'] == 'bfloat16'
  assert signature['tokenizer_compute'] == {'dtype': 'bfloat16', 'conv_impl': '3d'}
  exported = jax.export.deserialize(bytearray(open(written['program'], 'rb').read()))
  assert exported.platforms == ('cpu', 'tpu')
  assert bundle.compute_platform(()) is None and bundle.compute_platform(('cpu',)) == 'cpu'
  assert bundle.compute_platform(('cpu', 'cuda', 'tpu')) == 'cuda'


def test_printed_command_runs_outside_the_repo(tmp_path, capsys):
  """The command export prints works as it is, from another folder, without nbp_jax: it reads the example context
  clips (mp4) written beside the runner and writes the samples and a video; fewer labels/clips than the batch (2)
  are padded and dropped."""
  config = _config()
  workdir = _workdir(tmp_path, config)
  written = bundle.run(config, workdir)
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith('Run it with JAX alone: ')][-1]
  argv = shlex.split(line[len('Run it with JAX alone: '):])
  assert argv[0] == 'python' and argv[1] == os.path.abspath(written['runner'])
  assert any(a.startswith('--context=') and a.endswith('.mp4') for a in argv)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  script = _FRESH.replace('SCRIPT', repr(argv[1]))

  def run(*args):
    proc = subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True, timeout=300,
                          cwd=str(elsewhere), env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  run(*argv[2:])
  samples = np.load(elsewhere / 'samples.npz')
  assert samples['video'].shape == (2, 5, 16, 16, 3) and samples['codes'].shape == (2, 2, 2, 2)
  frames, _ = video_io.read_video(str(elsewhere / 'samples.mp4'))
  assert frames.shape == (5, 16, 32, 3)  # the two samples side by side
  # One label and one clip for a batch of 2: padded, and only the one sample is kept.
  first_clip = written['context'].split(',')[0]
  run('--seed=1', '--labels=3', f'--context={first_clip}', '--out=one.npz')
  assert np.load(elsewhere / 'one.npz')['video'].shape == (1, 5, 16, 16, 3)


def test_pipeline_workdir_exports_each_model(tmp_path, capsys):
  config = _config()
  config.export.stablehlo = False
  pipeline_dir = tmp_path / 'demo'
  for name in ('nbp', 'ntp'):
    os.makedirs(pipeline_dir, exist_ok=True)
    os.rename(_workdir(tmp_path, config, with_tokenizer=False), pipeline_dir / name)
  written = bundle.run(config, str(pipeline_dir))
  assert sorted(written) == ['nbp', 'ntp']
  for name in ('nbp', 'ntp'):
    assert os.path.isfile(pipeline_dir / name / 'export' / 'params.safetensors')
  assert 'holds 2 models (nbp, ntp)' in capsys.readouterr().out
  with pytest.raises(bundle.errors.MissingError, match='empty does not exist: check the path'):
    bundle.run(config, str(tmp_path / 'empty'))
  tokenizer_dir = os.path.join(_workdir(tmp_path, config), 'tokenizer')  # its own config.json and checkpoints/
  with pytest.raises(bundle.errors.MissingError, match=r'holds a tokenizer .*, not a transformer'):
    bundle.run(config, tokenizer_dir)
  assert sorted(os.listdir(tokenizer_dir)) == ['checkpoints', 'config.json']  # no export folder left behind


def test_cli_logs_are_quiet_unless_verbosity(tmp_path):
  """orbax's INFO/WARNING bookkeeping (option dumps, read-only notes) stays out of a run unless --verbosity is set."""
  workdir = _workdir(tmp_path, _config(), with_tokenizer=False)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def export(*flags):
    proc = subprocess.run([sys.executable, '-m', 'nbp_jax.main', '--mode=export', f'--workdir={workdir}', *flags,
                           '--config.export.stablehlo=False'], capture_output=True, text=True, timeout=300,
                          cwd=repo, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  quiet = export()
  assert 'params.safetensors' in quiet.stdout
  assert not re.findall(r'^[IW]\d{4} .*', quiet.stderr, re.M), quiet.stderr[-3000:]
  loud = export('--verbosity=0', '--config=configs/k600_3b.py')
  assert re.search(r'^I\d{4} .*checkpoint_manager', loud.stderr, re.M), loud.stderr[-3000:]
  # Another run's config file: its model is not what is exported, and the run says so.
  assert 'of --config=configs/k600_3b.py only the export section is used' in loud.stdout


def test_the_runner_refuses_inputs_it_would_misread(tmp_path):
  sig = {'batch_size': 2, 'num_classes': 3, 'inputs': [
      {'name': 'key', 'shape': [2], 'dtype': 'uint32'},
      {'name': 'context_video', 'shape': [2, 1, 4, 4, 3], 'dtype': 'uint8'}]}
  frames = np.full((2, 1, 4, 4, 3), 0.5)
  with pytest.raises(SystemExit, match=r'uint8 in 0\.\.255; got float64 \(frames in \[0, 1\]: multiply by 255'):
    run_generate.make_inputs(sig, 0, context=frames)  # cast, they would all be 0: black frames
  _, n = run_generate.make_inputs(sig, 0, context=(255 * frames).astype(np.uint8))
  assert n == 2
  with pytest.raises(SystemExit, match='not class-conditional: it takes no labels'):
    run_generate.make_inputs(sig, 0, labels=[1], context=(255 * frames).astype(np.uint8))
  # The key is jax.random.PRNGKey(seed)'s for any 64-bit seed.
  for seed in (0, 7, -1, 2 ** 40 + 3, -2 ** 63):
    (key, _), _ = run_generate.make_inputs(sig, seed, context=(255 * frames).astype(np.uint8))
    np.testing.assert_array_equal(key, jax.random.key_data(jax.random.PRNGKey(seed)))
  with pytest.raises(SystemExit, match='must fit in 64 bits'):
    run_generate.make_inputs(sig, 2 ** 64, context=(255 * frames).astype(np.uint8))
  (tmp_path / 'generate.json').write_text(json.dumps(sig))
  with pytest.raises(SystemExit, match='--labels=a must be comma-separated class ids'):
    run_generate.main(['--dir', str(tmp_path), '--labels=a'])
