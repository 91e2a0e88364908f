"""--mode=train_tokenizer and --mode=tokenize end to end on a few tiny synthetic clips."""

import collections
import json
import os

import jax
import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import image_metrics
from nbp_jax.data import builder
from nbp_jax.data import pipeline
from nbp_jax.data import prepare
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.tokenizer import load
from nbp_jax.tokenizer import model as M
from nbp_jax.tokenizer import tokenize
from nbp_jax.tokenizer import train


def _config():
  c = config_lib.task_config('demo', 'micro')
  c.tokenizer = config_lib.tokenizer_config('micro')
  c.data.num_frames, c.data.resolution = 5, 16
  c.data.synthetic.num_train, c.data.synthetic.num_val = 16, 12
  # Fewer layers than 'micro' (no middle blocks, no width changes): the 8-device train step compiles faster.
  c.tokenizer.update(dict(num_mid_blocks=0, channel_multipliers=(1, 1, 1, 1)))
  c.tokenizer.update(dict(num_steps=2, batch_size=8, warmup_steps=1, discriminator_start_step=1, dtype='float32',
                          adaptive_weight=False, discriminator_channels=8, discriminator_layers=2,
                          perceptual_weight=0.0, num_samples=2, tokenize_batch_size=8))
  c.train.update(dict(eval_every=0, checkpoint_every=2, log_every=1, sample_every=0))
  return c  # mesh (-1, 1, 1): data-parallel over the 8 fake CPU devices of conftest.py


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tok'))
  config = _config()
  prepare.run(config, workdir)
  return config, workdir, train.run(config, workdir)


def test_train_tokenizer_writes_checkpoint_metrics_and_samples(trained):
  config, workdir, result = trained
  tdir = os.path.join(workdir, 'tokenizer')
  assert result['step'] == 2 and result['eval_clips'] == 8 and 0 < result['psnr'] <= image_metrics.PSNR_MAX_DB
  with open(os.path.join(tdir, 'eval.json')) as f:
    assert json.load(f) == result and result['metrics_version'] == train.EVAL_VERSION
  samples = os.path.join(tdir, 'samples', 'tokenizer_0000002')
  assert sorted(os.listdir(samples)) == ['grid.png', 'recon_00.mp4', 'recon_01.mp4']
  with open(os.path.join(tdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  # The discriminator is off at step 0 and on at step 1 (the trainer passes the step in the batch).
  assert [r.get('gan_active') for r in records if 'gan_active' in r] == [0.0, 1.0]
  # The generator's learning rate: 0 at step 0, then the peak at the end of its 1-step warmup.
  assert [r['learning_rate'] for r in records if 'learning_rate' in r] == pytest.approx([0.0, config.tokenizer.lr])
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))  # the transformer's folder stays untouched
  transformer = config.copy_and_resolve_references()
  transformer.nbp.block_shape = (1, 2, 2)  # tiles these clips' (2, 2, 2) codes
  with pytest.raises(errors.MissingError, match=r'holds a tokenizer \(--mode=train_tokenizer\), not a transformer'):
    generator_lib.Generator.load(tdir, transformer)  # sampling from the tokenizer's folder by mistake


def test_a_rerun_reuses_only_an_evaluation_of_the_same_step_clips_dataset_and_metrics(tmp_path):
  path = str(tmp_path / 'eval.json')
  assert train.previous_evaluation(path, 2, 8, 'd1') is None  # none yet
  current = {'psnr': 20.0, 'step': 2, 'eval_clips': 8, 'dataset_id': 'd1', 'metrics_version': train.EVAL_VERSION}
  for saved, reused in ((current, True), ({**current, 'step': 1}, False), ({**current, 'eval_clips': 16}, False),
                        ({**current, 'dataset_id': 'd0'}, False),  # the clips were prepared again since
                        ({**current, 'metrics_version': train.EVAL_VERSION - 1}, False),
                        # written before metrics_version existed (PSNR of each clip's mean squared error)
                        ({k: v for k, v in current.items() if k != 'metrics_version'}, False)):
    with open(path, 'w') as f:
      json.dump(saved, f)
    assert train.previous_evaluation(path, 2, 8, 'd1') == (saved if reused else None), saved


def test_tokenize_writes_the_codes_of_every_clip(trained, capsys):
  config, workdir, _ = trained
  location = tokenize.run(config, workdir)
  model, params, step = load.load_tokenizer(config, workdir)
  assert step == 2
  encode = jax.jit(lambda p, v: M.encode(p, v, model))
  for split, count in (('train', 16), ('validation', 12)):
    source = builder.data_source(builder.video_location(config, workdir), split)
    clips = np.stack([source[i]['video'] for i in range(len(source))])
    labels = [int(source[i]['label']) for i in range(len(source))]
    expected = np.asarray(encode(params, clips))
    ds = pipeline.make_dataset(config, workdir, split, seed=0, location=location, batch_size=count, shuffle=False)
    batch = ds[0]
    assert batch['codes'].dtype == np.uint16 and batch['codes'].shape == (count, 2, 2, 2)
    # Record order is TFDS's; compare (code grid, label) pairs as multisets.
    got = collections.Counter((c.tobytes(), int(l)) for c, l in zip(batch['codes'].astype(np.int32),
                                                                     batch['label']))
    want = collections.Counter((c.tobytes(), l) for c, l in zip(expected.astype(np.int32), labels))
    assert got == want
  capsys.readouterr()
  tokenize.run(config, workdir)
  assert 'Reusing' in capsys.readouterr().out
  # What tokenize (and --mode=train, which read codes tokenize refused) compares: the same tokenizer, step, grid and
  # FSQ levels (codes of (8,5,5,5) were reused for a (5,5,5) tokenizer of the same path and step).
  expected = tokenize.codes_metadata(config, workdir, step, model.spec)
  tokenize.check_codes(location, expected, 'clips')
  for change in ({'tokenizer_step': 3}, {'fsq_levels': [5, 5, 5]}, {'latent_shape': [2, 4, 4]}):
    with pytest.raises(errors.UserError, match=r'were written by the tokenizer .* delete that folder to re-tokenize'):
      tokenize.check_codes(location, {**expected, **change}, 'clips')
  # The clips prepared again (say from another folder): the codes of the earlier ones are not reused.
  metadata_path = os.path.join(builder.video_location(config, workdir).path, 'metadata.json')
  with open(metadata_path) as f:
    metadata = f.read()
  try:
    with open(metadata_path, 'w') as f:
      json.dump({**json.loads(metadata), 'dataset_id': 'another preparation'}, f)
    with pytest.raises(errors.UserError, match=r'are of clips prepared before the ones now at .*delete the codes'):
      tokenize.run(config, workdir)
  finally:
    with open(metadata_path, 'w') as f:
      f.write(metadata)


def test_encode_split_resumes_where_it_stopped(trained, tmp_path):
  config, workdir, _ = trained
  calls = []

  def encoder(video):
    calls.append(video.shape[0])
    return np.zeros((video.shape[0], 2, 2, 2), np.int32)

  work = str(tmp_path)
  n = tokenize.encode_split(config, workdir, 'train', encoder, 4, work, np.dtype(np.uint16))
  assert n == 16 and len(calls) == 4
  os.remove(tokenize._chunk_path(work, 'train', 0, 2))  # as if killed before batch 2 was saved
  calls.clear()
  assert tokenize.encode_split(config, workdir, 'train', encoder, 4, work, np.dtype(np.uint16)) == 4
  assert len(calls) == 1
  # 12 validation clips in batches of 5: the last batch is padded for the encoder and trimmed on disk.
  tokenize.encode_split(config, workdir, 'validation', encoder, 5, work, np.dtype(np.uint16))
  assert calls[-1] == 5
  with np.load(tokenize._chunk_path(work, 'validation', 0, 2)) as chunk:
    assert chunk['codes'].shape == (2, 2, 2, 2) and chunk['label'].shape == (2,)
