"""Params <-> safetensors: exact round trips, per-layer names independent of scan_layers, dtype selection."""

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax.export import safetensors_io
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.tokenizer import model as tokenizer_model


def _params(scan_layers):
  c = config_lib.task_config('demo', 'micro')
  c.model.scan_layers = scan_layers
  spec = spec_from_config(c, dtype='float32')
  return nn.unbox(jax.jit(lambda r: nbp_train.init_params(spec, r))(jax.random.key(0)))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_names_are_per_layer(tmp_path):
  scanned, unscanned = _params(True), _params(False)
  path = str(tmp_path / 'p.safetensors')
  names = safetensors_io.save(scanned, path, metadata={'step': '7'})
  assert names['blocks/0/attn/query/kernel'] == (32, 32)
  assert names['blocks/1/mlp/fc1/kernel'] == (32, 128)
  assert 'tok_emb/embedding' in names and not any(k.startswith('blocks/attn') for k in names)
  # An unscanned model has the same flat names.
  assert set(safetensors_io.flatten(unscanned)) == set(names)
  loaded, meta = safetensors_io.load(path, scan_layers=True)
  assert meta['format'] == 'nbp-jax' and meta['step'] == '7'
  _assert_trees_equal(jax.device_get(scanned), loaded)
  restacked, _ = safetensors_io.load(path, scan_layers=False)
  assert set(restacked) >= {'blocks_0', 'blocks_1'}
  np.testing.assert_array_equal(restacked['blocks_1']['attn']['proj']['kernel'],
                                np.asarray(scanned['blocks']['attn']['proj']['kernel'][1]))


def test_dtype_is_selectable(tmp_path):
  params = _params(True)
  path = str(tmp_path / 'p.safetensors')
  safetensors_io.save(params, path, dtype='bfloat16')
  loaded, meta = safetensors_io.load(path)
  assert meta['dtype'] == 'bfloat16'
  k = loaded['blocks']['attn']['key']['kernel']
  assert k.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(k, np.asarray(params['blocks']['attn']['key']['kernel']).astype(ml_dtypes.bfloat16))
  back, _ = safetensors_io.load(path, dtype='float32')
  assert back['head']['kernel'].dtype == np.float32
  with pytest.raises(safetensors_io.SafetensorsError, match='export.dtype'):
    safetensors_io.save(params, path, dtype='int4')


def test_tokenizer_round_trip(tmp_path):
  model = tokenizer_model.make_model(config_lib.tokenizer_config('micro'))
  abstract = nn.unbox(jax.eval_shape(lambda r: tokenizer_model.init_params(model, r), jax.random.key(1)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
  path = str(tmp_path / 't.safetensors')
  names = safetensors_io.save(params, path, scanned=())
  assert 'encoder_layers/1/fn/2/conv/kernel' in names and 'encoder_layers/1/residual_fn/0/conv/kernel' not in names
  loaded, _ = safetensors_io.load(path, scan_layers=False, scanned=())
  _assert_trees_equal(params, loaded)
