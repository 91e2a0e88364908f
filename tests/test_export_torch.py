"""Reading the official PyTorch files: Lightning .ckpt and magvit2 .pt, directly and through convert_torch.

torch is an optional dependency (requirements-torch.txt): without it these tests are skipped, and
tests/test_export_official.py checks that the import says how to convert instead.
"""

import argparse

import numpy as np
import pytest

from nbp_jax.export import convert_torch
from nbp_jax.export import official
from nbp_jax.export import safetensors_io

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


def test_pickled_objects_need_allow_pickle(tmp_path):
  path = str(tmp_path / 'model.ckpt')

  # A Python object beside the tensors, as Lightning stores hyperparameters: the safe loader refuses it.
  torch.save({'state_dict': _tensors(), 'hyper_parameters': argparse.Namespace(lr=1e-3)}, path)
  with pytest.raises(official.OfficialImportError, match='import_.allow_pickle=True'):
    official.read_state_dict(path)
  assert 'transformer.tok_emb.weight' in official.read_state_dict(path, allow_pickle=True)
