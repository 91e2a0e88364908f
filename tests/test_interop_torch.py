"""Reading the official PyTorch files: Lightning .ckpt and magvit2 .pt, directly and through convert_torch.

torch is an optional dependency (requirements-torch.txt): without it these tests are skipped, and
tests/test_interop_official.py checks that the import says how to convert instead.
"""

import argparse
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax.export import safetensors_io
from nbp_jax.interop import convert_torch
from nbp_jax.interop import official

torch = pytest.importorskip('torch', reason='torch is optional (pip install -r requirements-torch.txt)')


def _tensors():
  g = torch.Generator().manual_seed(0)
  return {'transformer.tok_emb.weight': torch.randn(5, 4, generator=g),
          'transformer.head.weight': torch.randn(5, 4, generator=g).to(torch.bfloat16),
          'first_stage_model.encoder_layers.0.conv.bias': torch.randn(3, generator=g)}


def test_lightning_ckpt_read_directly_and_converted(tmp_path):
  sd = _tensors()
  sd['alias'] = sd['transformer.tok_emb.weight']  # shared storage: convert_torch must still write it
  path = str(tmp_path / 'model.ckpt')
  torch.save({'state_dict': sd, 'epoch': 3, 'global_step': 10}, path)

  direct = official.read_state_dict(path)
  assert set(direct) == set(sd)
  np.testing.assert_array_equal(direct['transformer.tok_emb.weight'], sd['transformer.tok_emb.weight'].numpy())
  assert direct['transformer.head.weight'].dtype == np.float32  # bf16 read as float32

  out = str(tmp_path / 'model.safetensors')
  assert convert_torch.main([path, out]) == 0
  reader = safetensors_io.Reader(out)
  assert reader['transformer.head.weight'].dtype.name == 'bfloat16'  # converted files keep the dtype
  converted = official.read_state_dict(out)
  for k in sd:
    np.testing.assert_array_equal(converted[k], direct[k])


def test_magvit_pt_drops_module_prefix(tmp_path):
  path = str(tmp_path / 'magvit2.pt')
  torch.save({'model_state_dict': {'module.encoder_layers.0.conv.weight': torch.ones(2, 3, 3, 3, 3)}}, path)
  sd = official.read_state_dict(path)
  assert list(sd) == ['encoder_layers.0.conv.weight'] and sd.shape('encoder_layers.0.conv.weight') == (2, 3, 3, 3, 3)


def _lightning_checkpoint(hparams):
  """What a Lightning Trainer writes: tensors, counters, callback and loop states, optimizer and scheduler states
  (tuples, floats, None) and the hyperparameters."""
  sd = _tensors()
  return {
      'epoch': 3, 'global_step': 10, 'pytorch-lightning_version': '1.9.5', 'state_dict': sd,
      'loops': {'fit_loop': {'state_dict': {}, 'epoch_progress': {'total': {'ready': 4, 'completed': 3}}}},
      'callbacks': {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
          'monitor': 'val_loss', 'best_model_score': torch.tensor(0.5), 'best_model_path': '/runs/best.ckpt',
          'best_k_models': {'/runs/best.ckpt': torch.tensor(0.5)}, 'dirpath': '/runs', 'last_model_path': ''}},
      'optimizer_states': [{'state': {0: {'step': torch.tensor(10.0), 'exp_avg': torch.zeros(5, 4),
                                          'exp_avg_sq': torch.zeros(5, 4)}},
                            'param_groups': [{'lr': 1e-3, 'betas': (0.9, 0.95), 'eps': 1e-8, 'weight_decay': 0.01,
                                              'amsgrad': False, 'foreach': None, 'params': [0]}]}],
      'lr_schedulers': [{'base_lrs': [1e-3], 'last_epoch': 10, '_step_count': 11, 'lr_lambdas': [None]}],
      'hparams_name': 'args', 'hyper_parameters': hparams,
  }


def test_lightning_checkpoint_loads_safely(tmp_path, monkeypatch):
  """argparse.Namespace hyperparameters (the release) and Lightning's AttributeDict load without allowing pickles."""
  path = str(tmp_path / 'model.ckpt')
  torch.save(_lightning_checkpoint(argparse.Namespace(lr=1e-3, num_layers=24, vocab_size=64000)), path)
  sd = official.read_state_dict(path)
  assert set(sd) == set(_tensors())

  # Lightning's AttributeDict, pickled under its own module name (Lightning itself is not installed here).
  module = types.ModuleType('pytorch_lightning.utilities.parsing')

  class AttributeDict(dict):
    pass
  AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, 'AttributeDict'
  module.AttributeDict = AttributeDict
  for name in ('pytorch_lightning', 'pytorch_lightning.utilities'):
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
  monkeypatch.setitem(sys.modules, module.__name__, module)
  torch.save(_lightning_checkpoint(AttributeDict(lr=1e-3)), path)
  monkeypatch.delitem(sys.modules, module.__name__)
  assert set(official.read_state_dict(path)) == set(_tensors())


class _Unknown:
  """A class the safe loader does not know (lives in this test module)."""


def test_other_objects_need_allow_pickle_and_say_what_they_are(tmp_path):
  path = str(tmp_path / 'model.ckpt')
  torch.save({'state_dict': _tensors(), 'extra': _Unknown()}, path)
  with pytest.raises(official.OfficialImportError, match=r'objects of test_interop_torch\._Unknown.*'
                                                         r'import_\.allow_pickle=True'):
    official.read_state_dict(path)
  assert 'transformer.tok_emb.weight' in official.read_state_dict(path, allow_pickle=True)


class _WritesAFile:
  """Unpickling this runs os.system, which creates `path`: what a malicious checkpoint does."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f'touch {self.path}',)


def test_malicious_file_is_refused_by_every_entry_point(tmp_path):
  marker = tmp_path / 'pwned'
  path = str(tmp_path / 'model.ckpt')
  torch.save({'state_dict': _tensors(), 'hyper_parameters': _WritesAFile(marker)}, path)
  tok_path = str(tmp_path / 'magvit2.pt')
  torch.save({'model_state_dict': _tensors(), 'x': _WritesAFile(marker)}, tok_path)
  refusal = r'is not a checkpoint: its pickle calls (posix|os|nt)\.system, which runs code'

  config = config_lib.task_config('k600', 'micro')
  config.import_.checkpoint = path
  with pytest.raises(official.OfficialImportError, match=refusal) as info:
    official.run(config, str(tmp_path / 'wd'))
  assert 'allow_pickle' not in str(info.value)  # never advised for a file that is not a checkpoint
  config.import_.checkpoint, config.import_.tokenizer_checkpoint = '', tok_path
  with pytest.raises(official.OfficialImportError, match=refusal):
    official.run(config, str(tmp_path / 'wd'))
  out = str(tmp_path / 'model.safetensors')
  proc = subprocess.run([sys.executable, '-m', 'nbp_jax.interop.convert_torch', path, out], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and re.search(refusal, proc.stderr), proc.stderr
  assert 'allow-pickle' not in proc.stderr and 'Traceback' not in proc.stderr
  assert not marker.exists() and not os.path.exists(out) and not os.path.exists(tmp_path / 'wd')


def test_random_bytes_are_not_a_checkpoint(tmp_path):
  rng = np.random.default_rng(0)
  for name in ('model.ckpt', 'pickle-like.ckpt'):
    path = tmp_path / name
    data = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(b'\x80\x02' + data if name.startswith('pickle') else data)
    with pytest.raises(official.OfficialImportError, match=r'is not a torch checkpoint') as info:
      official.read_state_dict(str(path))
    assert name in str(info.value) and 'pickle code' not in str(info.value)
  path = tmp_path / 'model.safetensors'
  path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(safetensors_io.SafetensorsError, match=r'model\.safetensors is not a readable safetensors'):
    official.read_state_dict(str(path))
