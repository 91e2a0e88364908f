"""Import of the official release: random official-layout state dicts -> workdir -> logits vs a numpy forward.

The numpy forward and the official masks/id sequences below are written from docs/design.md alone (not from the
model code), so the test checks the key mapping, the transposes, the id layouts and the masks together.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax.interop import official
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.tokenizer import model as tokenizer_model
import numerics

D, LAYERS, HEADS = 32, 2, 2  # the 'micro' model size
NUM_CLASSES = 101


def _config(task):
  """Micro model, official ids; 64x64 clips (8x8 latents) with 16-token blocks of two latent rows, which keeps the
  block-major order equal to the official raster order."""
  c = config_lib.task_config(task, 'micro')
  c.tokenizer = config_lib.tokenizer_config('micro')
  c.data.resolution = 64
  c.nbp.block_shape = (1, 2, 8)
  if task == 'k600':
    c.data.num_frames = 5  # 2 latent frames: 128 tokens
    c.nbp.context_frames = 1
  else:
    c.data.num_frames = 1  # 1 latent frame: 64 tokens
  return c


def _official_state_dict(vocab, prefix_rows, seed=0):
  """The release's key names and PyTorch shapes (docs/design.md), random values."""
  rng = np.random.default_rng(seed)
  n = lambda *s, std=0.2: (std * rng.standard_normal(s)).astype(np.float32)
  sd = {'transformer.tok_emb.weight': n(vocab, D, std=1.0), 'transformer.pos_emb': n(1, 5120, D, std=0.5),
        'transformer.uncond_embedding': n(prefix_rows, D),
        'transformer.ln_f.weight': 1 + n(D), 'transformer.ln_f.bias': n(D), 'transformer.head.weight': n(vocab, D),
        'first_stage_model.quantizer.dummy': n(3)}  # other modules of the Lightning checkpoint: ignored
  for i in range(LAYERS):
    b = f'transformer.blocks.{i}.'
    for ln in ('ln1', 'ln2'):
      sd[b + ln + '.weight'], sd[b + ln + '.bias'] = 1 + n(D), n(D)
    for lin in ('key', 'query', 'value', 'proj'):
      sd[b + f'attn.{lin}.weight'], sd[b + f'attn.{lin}.bias'] = n(D, D, std=0.4), n(D)
    sd[b + 'mlp.0.weight'], sd[b + 'mlp.0.bias'] = n(4 * D, D), n(4 * D)
    sd[b + 'mlp.2.weight'], sd[b + 'mlp.2.bias'] = n(D, 4 * D), n(D)
  return sd


def _ln(x, w, b):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b


def _numpy_forward(sd, ids, mask, positions):
  """Official transformer in float64: logits [len(positions), V] at the given input positions."""
  g = lambda k: sd['transformer.' + k].astype(np.float64)
  t, dh = len(ids), D // HEADS
  x = g('tok_emb.weight')[ids] + g('pos_emb')[0, :t]
  lin = lambda h, name: h @ g(name + '.weight').T + g(name + '.bias')
  for i in range(LAYERS):
    p = f'blocks.{i}.'
    h = _ln(x, g(p + 'ln1.weight'), g(p + 'ln1.bias'))
    q, k, v = (lin(h, p + 'attn.' + n).reshape(t, HEADS, dh) for n in ('query', 'key', 'value'))
    s = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(dh)
    s = np.where(mask[None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + lin(np.einsum('hqk,khd->qhd', a, v).reshape(t, D), p + 'attn.proj')
    h = lin(_ln(x, g(p + 'ln2.weight'), g(p + 'ln2.bias')), p + 'mlp.0')
    x = x + lin(0.5 * h * (1 + erf(h / np.sqrt(2))), p + 'mlp.2')
  return _ln(x[positions], g('ln_f.weight'), g('ln_f.bias')) @ g('head.weight').T


def _k600_mask(t):
  """Blocks of 16 from position 0: bidirectional inside, causal across."""
  b = np.arange(t) // 16
  return b[None, :] <= b[:, None]


def _ucf_mask(t):
  """Causal; every row sees the 8 text columns; from position 24 on, blocks of 16 bidirectional inside."""
  m = np.tril(np.ones((t, t), bool))
  m[:, :8] = True
  q = np.arange(24, t)
  m[24:, 24:] = ((q[None, :] - 24) // 16) <= ((q[:, None] - 24) // 16)
  return m


def _write(tmp_path, sd, name='model.safetensors'):
  path = str(tmp_path / name)
  save_file(sd, path)
  return path


def _class_ids(tmp_path):
  rng = np.random.default_rng(1)
  rows = [[1] + rng.integers(3, 32000, 4).tolist() + [2, 2, 2] for _ in range(NUM_CLASSES)]
  path = tmp_path / 'ids.json'
  path.write_text(json.dumps(rows))
  return str(path), rows


def _import(tmp_path, config, sd):
  config.import_.checkpoint = _write(tmp_path, sd)
  workdir = str(tmp_path / 'wd')
  official.run(config, workdir)
  return workdir


def _logits_from_workdir(workdir, codes, label=None):
  config = checkpoint_lib.load_config(workdir)
  params, step = checkpoint_lib.restore_params(workdir)
  assert step == 0
  spec = spec_from_config(config, dtype='float32')
  batch = {'codes': jnp.asarray(codes)[None]}
  if label is not None:
    batch['label'] = jnp.array([label], jnp.int32)
  logits, _ = jax.jit(lambda p, b: nbp_train.logits_fn(spec, p, b))(params, batch)
  return config, np.asarray(logits[0])


def test_k600_import_matches_numpy_forward(tmp_path):
  config = _config('k600')
  sd = _official_state_dict(64000, prefix_rows=1)  # the unconditional model's unused buffer is ignored
  workdir = _import(tmp_path, config, sd)
  codes = np.random.default_rng(2).integers(0, 64000, (2, 8, 8)).astype(np.int32)
  saved, logits = _logits_from_workdir(workdir, codes)
  assert saved.nbp.id_layout == 'official_k600'

  z = codes.reshape(-1)  # raster order = block-major order here
  ids = z[:-16]  # position p predicts z[p + 16]
  pos = np.array([0, 7, 15, 16, 40, len(ids) - 1])
  want = _numpy_forward(sd, ids, _k600_mask(len(ids)), pos)
  numerics.assert_close(logits[pos], want, 5e-5)  # fp32 vs float64: ~2e-6 of the scale
  # The check is sensitive to the mask: a plain causal mask gives other logits inside a block.
  causal = _numpy_forward(sd, ids, np.tril(np.ones((len(ids),) * 2, bool)), pos)
  assert np.abs(causal[1] - want[1]).max() > 1e-2


def test_ucf_import_matches_numpy_forward(tmp_path):
  config = _config('ucf101')
  config.import_.class_ids, rows = _class_ids(tmp_path)
  sd = _official_state_dict(96016, prefix_rows=8)
  workdir = _import(tmp_path, config, sd)
  label = 7
  codes = np.random.default_rng(3).integers(0, 64000, (1, 8, 8)).astype(np.int32)
  saved, logits = _logits_from_workdir(workdir, codes, label)
  assert saved.nbp.id_layout == 'official_ucf'
  assert [list(r) for r in saved.nbp.class_prefix_ids] == rows  # stored unshifted, used + 16

  z = codes.reshape(-1) + 32016
  full = [i + 16 for i in rows[label]] + [0] + list(z[:16]) + list(range(1, 16)) + list(z[16:])
  ids = np.array(full[:-16])  # 8 + 64 = 72 positions
  pos = np.array([8, 9, 22, 23, 24, 30, 39, 40, len(ids) - 1])  # text|BOV..z14 one by one|[z15, 1..15]|rows
  want = _numpy_forward(sd, ids, _ucf_mask(len(ids)), pos)[:, 32016:]
  numerics.assert_close(logits[pos - 8], want, 5e-5)


def test_k600_frame_prediction_has_official_schedule():
  """The released K600 setting: 5 given frames = 512 tokens of context, then 48 steps of 16 tokens."""
  config = config_lib.task_config('k600', 'micro')
  config.nbp.id_layout = 'official_k600'
  spec = spec_from_config(config)
  num_context = config_lib.context_latent_frames(config) * 16 * 16
  plan = spec.layout.decode_plan(num_context)
  assert (num_context, plan.num_steps, plan.first_group, plan.num_tokens) == (512, 48, 16, 1280)


def test_cli_import_then_export(tmp_path):
  """The real K600 preset with micro sizes: --mode=import, then --mode=export from the workdir alone."""
  path = _write(tmp_path, _official_state_dict(64000, prefix_rows=1))
  workdir = str(tmp_path / 'wd')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  micro = [f'--config.model.{k}={v}' for k, v in config_lib.MODEL_SIZES['micro'].items()]
  run = lambda *args: subprocess.run([sys.executable, '-m', 'nbp_jax.main', f'--workdir={workdir}', *args],
                                     capture_output=True, text=True, timeout=300, env=env)
  proc = run('--mode=import', '--config=configs/k600_700m.py', *micro, f'--config.import_.checkpoint={path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Frame prediction: the command to run next gives it frames to continue (the import has no dataset).
  assert 'official_k600' in proc.stdout and '--mode=sample' in proc.stdout
  assert '--config.sample.context_videos=' in proc.stdout
  saved = checkpoint_lib.load_config(workdir)
  assert (saved.nbp.id_layout, saved.model.emb_dim, saved.nbp.context_frames) == ('official_k600', D, 5)
  proc = run('--mode=export', '--config.export.batch_size=1', '--config.export.dtype=bfloat16')
  assert proc.returncode == 0, proc.stderr[-3000:]
  sig = json.load(open(os.path.join(workdir, 'export', 'generate.json')))
  # Frame prediction with the official schedule: 512 context tokens, 48 steps; codes only (no tokenizer).
  assert (sig['context_tokens'], sig['num_steps'], sig['id_layout']) == (512, 48, 'official_k600')
  assert [i['name'] for i in sig['inputs'][:2]] == ['key', 'context_codes']
  assert sig['inputs'][2]['dtype'] == 'bfloat16' and [o['name'] for o in sig['outputs']] == ['codes']


@pytest.mark.parametrize('edit,message', [
    ('missing', "'transformer.blocks.1.attn.value.bias'"),
    ('extra', "'transformer.blocks.0.attn.rotary.weight'"),
    ('shape', "'transformer.blocks.1.mlp.0.weight' has shape [128, 16]"),
    ('outside', "'text_encoder.weight'"),
])
def test_bad_keys_name_the_key(tmp_path, edit, message):
  config = _config('k600')
  sd = _official_state_dict(64000, prefix_rows=1)
  if edit == 'missing':
    del sd['transformer.blocks.1.attn.value.bias']
  elif edit == 'extra':
    sd['transformer.blocks.0.attn.rotary.weight'] = np.zeros((4,), np.float32)
  elif edit == 'shape':
    sd['transformer.blocks.1.mlp.0.weight'] = np.zeros((128, 16), np.float32)
  else:
    sd['text_encoder.weight'] = np.zeros((4,), np.float32)
  with pytest.raises(official.OfficialImportError, match=re.escape(message)) as e:
    _import(tmp_path, config, sd)
  if edit == 'shape':
    assert 'expects [128, 32]' in str(e.value)
  assert not os.path.exists(tmp_path / 'wd' / 'checkpoints' / '0')


def test_config_size_mismatch_names_the_field(tmp_path):
  config = _config('k600')
  config.model.emb_dim = 64
  with pytest.raises(official.OfficialImportError, match=r'model\.emb_dim=64 .* has 32 .*tok_emb'):
    _import(tmp_path, config, _official_state_dict(64000, prefix_rows=1))
  ucf = _official_state_dict(96016, prefix_rows=8)
  with pytest.raises(official.OfficialImportError, match=r"nbp\.condition='class'.*configs/ucf101_micro\.py"):
    _import(tmp_path, _config('k600'), ucf)


def test_ucf_needs_class_prompts(tmp_path):
  with pytest.raises(official.OfficialImportError, match='import_.llama_tokenizer'):
    _import(tmp_path, _config('ucf101'), _official_state_dict(96016, prefix_rows=8))


def test_class_prompts():
  assert official.class_prompt('ApplyEyeMakeup') == 'apply eye makeup'
  assert official.class_prompt('YoYo') == 'yo yo'


def test_class_ids_files(tmp_path):
  names = ['ApplyEyeMakeup', 'ApplyLipstick', 'Archery']
  by_name = tmp_path / 'by_name.json'
  by_name.write_text(json.dumps({'Archery': [3] * 8, 'ApplyEyeMakeup': [1] * 8, 'ApplyLipstick': [2] * 8}))
  assert official.read_class_ids(str(by_name), names) == [[1] * 8, [2] * 8, [3] * 8]
  with pytest.raises(errors.MissingError, match=r'import_\.class_ids=.*nope\.json.* does not exist'):
    official.read_class_ids(str(tmp_path / 'nope.json'))
  (tmp_path / 'weights.ckpt').write_bytes(b'\x80\x02 not json')
  with pytest.raises(official.OfficialImportError, match=r'weights\.ckpt.* is not JSON'):
    official.read_class_ids(str(tmp_path / 'weights.ckpt'))


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer.


def _tokenizer_state_dict(spec, seed=0):
  """Official magvit2 key names (docs/design.md) and PyTorch shapes for the layer lists of `spec`."""
  rng = np.random.default_rng(seed)
  n = lambda *s, std=0.3: (std * rng.standard_normal(s)).astype(np.float32)
  sd = {}

  def conv(key, cin, cout, k):
    sd[key + '.weight'], sd[key + '.bias'] = n(cout, cin, k, k, k), n(cout)

  for side, layers in (('encoder_layers', tokenizer_model.encoder_layers(spec)),
                       ('decoder_layers', tokenizer_model.decoder_layers(spec))):
    for i, layer in enumerate(layers):
      p = f'module.{side}.{i}'
      if layer.kind == 'conv':
        conv(p + '.conv', layer.cin, layer.cout, layer.kernel)
      elif layer.kind == 'proj':
        conv(p, layer.cin, layer.cout, 1)
      elif layer.kind == 'norm':
        sd[p + '.weight'], sd[p + '.bias'] = 1 + n(layer.cin), n(layer.cin)
      elif layer.kind == 'swish':
        sd[p + '.beta'] = 1 + n(1, layer.cin, 1, 1, 1)
      elif layer.kind == 'res':
        sd[p + '.fn.0.weight'], sd[p + '.fn.0.bias'] = 1 + n(layer.cin), n(layer.cin)
        sd[p + '.fn.1.beta'] = 1 + n(1, layer.cin, 1, 1, 1)
        conv(p + '.fn.2.conv', layer.cin, layer.cout, layer.kernel)
        sd[p + '.fn.3.weight'], sd[p + '.fn.3.bias'] = 1 + n(layer.cout), n(layer.cout)
        sd[p + '.fn.4.beta'] = 1 + n(1, layer.cout, 1, 1, 1)
        conv(p + '.fn.5.conv', layer.cout, layer.cout, layer.kernel)
        if layer.cin != layer.cout:
          conv(p + '.residual_fn.0.conv', layer.cin, layer.cout, 1)
  return sd


def _np_causal_conv(x, w, b):
  """x [T, H, W, Cin]; PyTorch weight [out, in, kt, kh, kw]; replicate padding, 2*(k//2) frames in front."""
  _, _, kt, kh, kw = w.shape
  xp = np.pad(x, ((2 * (kt // 2), 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode='edge')
  t, h, wd = x.shape[:3]
  out = np.zeros((t, h, wd, w.shape[0])) + b
  for dt in range(kt):
    for dh in range(kh):
      for dw in range(kw):
        out += xp[dt:dt + t, dh:dh + h, dw:dw + wd] @ w[:, :, dt, dh, dw].T
  return out


def _np_group_norm(x, w, b, groups):
  t, h, wd, c = x.shape
  y = x.reshape(t, h, wd, groups, c // groups)
  mu = y.mean(axis=(1, 2, 4), keepdims=True)
  var = y.var(axis=(1, 2, 4), keepdims=True)
  return ((y - mu) / np.sqrt(var + 1e-5)).reshape(x.shape) * w + b


def test_tokenizer_import_matches_numpy_convs(tmp_path):
  config = _config('ucf101')
  spec = tokenizer_model.TokenizerSpec.from_config(config.tokenizer)
  sd = _tokenizer_state_dict(spec)
  config.import_.tokenizer_checkpoint = _write(tmp_path, sd, 'magvit2.safetensors')
  workdir = str(tmp_path / 'wd')
  official.run(config, workdir)
  params, _ = checkpoint_lib.restore_params(os.path.join(workdir, 'tokenizer'))
  model = tokenizer_model.make_model(checkpoint_lib.load_config(os.path.join(workdir, 'tokenizer')))
  bound = model.bind({'params': params})

  x = np.random.default_rng(4).random((5, 8, 8, 3))
  g = lambda k: sd['module.encoder_layers.' + k].astype(np.float64)
  y0 = _np_causal_conv(x, g('0.conv.weight'), g('0.conv.bias'))
  # fp32 against float64 numpy: ~3e-7 of the scale (tests/numerics.py).
  numerics.assert_close(np.asarray(bound.encoder_layers[0](jnp.asarray(x[None], jnp.float32))[0]), y0, 1e-5)
  # Encoder layer 1 is a residual unit: GN -> Swish(beta) -> conv -> GN -> Swish(beta) -> conv, plus identity.
  swish = lambda v, beta: v / (1 + np.exp(-beta.reshape(-1) * v))
  h = swish(_np_group_norm(y0, g('1.fn.0.weight'), g('1.fn.0.bias'), spec.num_groups), g('1.fn.1.beta'))
  h = _np_causal_conv(h, g('1.fn.2.conv.weight'), g('1.fn.2.conv.bias'))
  h = swish(_np_group_norm(h, g('1.fn.3.weight'), g('1.fn.3.bias'), spec.num_groups), g('1.fn.4.beta'))
  y1 = _np_causal_conv(h, g('1.fn.5.conv.weight'), g('1.fn.5.conv.bias')) + y0
  numerics.assert_close(np.asarray(bound.encoder_layers[1](jnp.asarray(y0[None], jnp.float32))[0]), y1, 1e-5)
  # The last encoder entry is a plain 1x1x1 Conv3d.
  last = len(tokenizer_model.encoder_layers(spec)) - 1
  feats = np.random.default_rng(5).standard_normal((2, 2, 2, 32))
  want = feats @ g(f'{last}.weight')[:, :, 0, 0, 0].T + g(f'{last}.bias')
  got = bound.encoder_layers[last](jnp.asarray(feats[None], jnp.float32))[0]
  numerics.assert_close(np.asarray(got), want, 1e-5)


def test_tokenizer_bad_key_is_named(tmp_path):
  config = _config('ucf101')
  sd = _tokenizer_state_dict(tokenizer_model.TokenizerSpec.from_config(config.tokenizer))
  del sd['module.decoder_layers.1.fn.4.beta']
  config.import_.tokenizer_checkpoint = _write(tmp_path, sd, 'magvit2.safetensors')
  with pytest.raises(official.OfficialImportError, match=r"'decoder_layers\.1\.fn\.4\.beta' \(shape \[1, 32, 1"):
    official.run(config, str(tmp_path / 'wd'))


def test_an_import_into_a_used_workdir_writes_nothing(tmp_path):
  # A workdir whose transformer exists, no tokenizer yet: importing both is refused before the tokenizer is written.
  config = _config('k600')
  workdir = _import(tmp_path, config, _official_state_dict(64000, prefix_rows=1))
  sd = _tokenizer_state_dict(tokenizer_model.TokenizerSpec.from_config(config.tokenizer))
  config.import_.tokenizer_checkpoint = _write(tmp_path, sd, 'magvit2.safetensors')
  with pytest.raises(official.OfficialImportError, match=r'wd/checkpoints already holds checkpoints \[0\]'):
    official.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'tokenizer'))


def test_torch_ckpt_without_torch_says_how_to_convert(tmp_path):
  if importlib.util.find_spec('torch') is not None:
    pytest.skip('torch is installed here; tests/test_interop_torch.py reads .ckpt files directly')
  path = tmp_path / 'model.ckpt'
  path.write_bytes(b'not read')
  with pytest.raises(official.OfficialImportError, match='convert_torch .*model.ckpt .*model.safetensors'):
    official.read_state_dict(str(path))


def test_llama_prompts_with_sentencepiece(tmp_path):
  """BOS first, EOS padding, truncation to 8; class names from classInd.txt (a tiny SentencePiece model stands in
  for LLaMA-2's)."""
  spm = pytest.importorskip('sentencepiece', reason='sentencepiece is optional (requirements-torch.txt)')
  words = ['apply eye makeup', 'apply lipstick', 'archery', 'baby crawling', 'balance beam'] * 20
  prefix = str(tmp_path / 'sp')
  spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_prefix=prefix, vocab_size=24,
                                 bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=prefix + '.model')
  ind = tmp_path / 'classInd.txt'
  ind.write_text('1 ApplyEyeMakeup\n2 Archery\n')
  config = _config('ucf101')
  config.data.num_classes = 2
  config.import_.llama_tokenizer, config.import_.class_names = prefix + '.model', str(ind)
  rows = official.class_prefix_ids(config)
  for row, text in zip(rows, ['apply eye makeup', 'archery']):
    ids = [1] + sp.encode(text)
    assert row == (ids + [2] * 8)[:8]
  short = official.tokenize_prompts(['a'], prefix + '.model')[0]
  assert short == ([1] + sp.encode('a') + [2] * 8)[:8] and short[-1] == 2  # padded with EOS
  long = official.tokenize_prompts(['apply eye makeup apply eye makeup apply eye makeup'], prefix + '.model')
  assert len(long[0]) == 8 and long[0][0] == 1 and 2 not in long[0]
