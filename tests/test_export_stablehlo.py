"""--mode=export: safetensors + a jax.export program that a fresh process runs with JAX alone, bit-exact.

The reference is the in-process generation through the public APIs (tokenizer encode -> decode.generate ->
tokenizer decode) with the same seed; the fresh process loads only generate.stablehlo, generate.json and the
safetensors files, through the run_generate.py copied into the export folder, and must not import nbp_jax.
"""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax.export import bundle
from nbp_jax.export import official
from nbp_jax.export import safetensors_io
from nbp_jax.export import stablehlo
from nbp_jax.nbp import decode
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.tokenizer import model as tokenizer_model

pytest.importorskip('flatbuffers', reason='jax.export serialization needs flatbuffers (requirements.txt)')


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
  model, tparams, _ = bundle.load_tokenizer(config, workdir)
  spec = spec_from_config(config)
  ctx_codes = tokenizer_model.encode(tparams, jnp.asarray(context), model)
  z = decode.generate(spec, params, jax.random.PRNGKey(seed), Sampling.from_config(config.sample),
                      labels=jnp.asarray(labels), context=decode.context_to_seq(spec, ctx_codes))
  codes = spec.layout.seq_to_grid(z)
  video = tokenizer_model.decode(tparams, codes, model)
  np.testing.assert_array_equal(fresh['codes'], np.asarray(codes))
  np.testing.assert_array_equal(fresh['video'], np.asarray(video))
  assert fresh['video'].dtype == np.uint8 and fresh['codes'].dtype == np.int32
  # The given frame's codes are kept; new codes were sampled for the rest.
  np.testing.assert_array_equal(fresh['codes'][:, :1], np.asarray(ctx_codes))


def test_embedded_codes_only_export_matches_generate(tmp_path):
  """No tokenizer, weights baked in, no condition inputs beyond the key: codes equal decode.generate's."""
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
  z = decode.generate(spec, params, jax.random.PRNGKey(4), Sampling.from_config(config.sample), batch_size=2)
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
  gen = stablehlo.build(config, reader, batch_size=2, context_frames=1)
  assert gen.inputs[2]['name'] == 'context_codes' and gen.inputs[3]['dtype'] == 'bfloat16'
