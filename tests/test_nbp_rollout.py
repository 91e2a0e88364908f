"""Beyond one clip: sliding-window rollouts, decoding long codes in windows, and streaming frames as they exist.

References: a direct `generation.generate` call with the window's context; one-pass decoding of the whole code
sequence; the batch path (`codes` then `decode`) for the stream.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_main
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import image_metrics
from nbp_jax import trainer
from nbp_jax.data import video_io
from nbp_jax.nbp import generation
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import train
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.tokenizer import model as tokenizer_model

SAMPLING = Sampling(temperature=1.0, top_k=50, top_p=1.0)


def _generator(first_block='bov', context_frames=5):
  """The demo's shapes (17x32x32 clips, 5x8x8 codes of 1000, row blocks of 8) with random weights."""
  config = config_lib.task_config('demo', 'micro')
  config.tokenizer.channels = 8
  config.nbp.first_block = first_block
  config.nbp.context_frames = context_frames
  spec = spec_from_config(config)
  tokenizer = tokenizer_model.make_model(config)
  params = trainer.jit_init(lambda r: train.init_params(spec, r), jax.random.key(0))
  tokenizer_params = trainer.jit_init(lambda r: tokenizer_model.init_params(tokenizer, r), jax.random.key(1))
  return generator_lib.Generator(config, spec, params, tokenizer=tokenizer, tokenizer_params=tokenizer_params)


@pytest.fixture(scope='module')
def generator():
  return _generator()


def _one_pass(generator, codes):
  return np.asarray(tokenizer_model.jit_decode(generator.tokenizer_params, jnp.asarray(codes),
                                               model=generator.tokenizer))


def test_long_codes_decode_in_windows_as_in_one_pass(generator, monkeypatch):
  codes = np.random.default_rng(0).integers(0, 1000, (2, 23, 8, 8)).astype(np.int32)  # 89 frames
  whole = _one_pass(generator, codes)
  assert whole.shape == (2, 89, 32, 32, 3)
  np.testing.assert_array_equal(generator.decode(codes), whole)
  # The decoder's history matters: windows that see too little of it give other frames.
  monkeypatch.setattr(tokenizer_model, 'decoder_history', lambda spec: 1)
  assert np.abs(generator.decode(codes).astype(int) - whole).max() > 0


def test_decoder_history_is_the_causal_receptive_field():
  # Hand count for the demo decoder: conv 2 + mid residual 4 + residual 4 + conv 2 (latent rate), then at 2 frames
  # per latent frame a residual 4/2 and a conv 2/2, then at 4 frames the last conv 2/4: 15.5 -> 16, plus one.
  assert tokenizer_model.decoder_history(tokenizer_model.make_model(config_lib.task_config('demo', 'micro')).spec) == 17


def test_a_rollout_window_is_generate_with_its_context(generator):
  rng = jax.random.key(4)
  labels = np.array([0, 3], np.int32)
  context = np.random.default_rng(1).integers(0, 1000, (2, 2, 8, 8)).astype(np.int32)
  codes = generator.rollout(rng, 33, labels=labels, context_codes=context, sampling=SAMPLING)
  assert codes.shape == (2, 9, 8, 8)  # 33 frames: a clip of 5 latent frames, then windows adding 3 each, cut at 9
  spec = generator.spec

  def direct(key, ctx):  # the reference: one generate call from the window's context sequence
    z = generation.generate(spec, generator.params, key, SAMPLING, labels=jnp.asarray(labels),
                            context=generation.context_to_seq(spec, jnp.asarray(ctx)))
    return np.asarray(spec.layout.seq_to_grid(z))

  first = direct(jax.random.fold_in(rng, 0), context)
  np.testing.assert_array_equal(codes[:, :5], first)
  second = direct(jax.random.fold_in(rng, 1), first[:, 3:5])  # the window keeps the last 2 latent frames
  np.testing.assert_array_equal(codes[:, 5:8], second[:, 2:])
  third = direct(jax.random.fold_in(rng, 2), second[:, 3:5])
  np.testing.assert_array_equal(codes[:, 8:9], third[:, 2:3])


@pytest.mark.parametrize('context', [True, False], ids=['frame_prediction', 'class_from_scratch'])
def test_the_stream_yields_the_batch_path_frames(generator, context):
  rng = jax.random.key(7)
  inputs = {'labels': np.array([1, 2], np.int32), 'sampling': SAMPLING}
  if context:
    inputs['context_codes'] = np.random.default_rng(2).integers(0, 1000, (2, 2, 8, 8)).astype(np.int32)
  codes = np.asarray(generator.codes(rng, **inputs))
  pieces = list(generator.stream_codes(rng, **inputs))
  np.testing.assert_array_equal(pieces[-1], codes)
  assert [p.shape[1] for p in pieces] == ([2, 3, 4, 5] if context else [1, 2, 3, 4, 5])
  frames = list(generator.stream(rng, **inputs))
  # The first frame alone after the first latent frame, then 4 per latent frame (5 given frames first).
  assert [f.shape[1] for f in frames] == ([5, 4, 4, 4] if context else [1, 4, 4, 4, 4])
  np.testing.assert_array_equal(np.concatenate(frames, axis=1), generator.decode(codes))


def test_rollout_arguments_are_user_errors(generator):
  with pytest.raises(errors.UserError, match=r'num_frames=34 is not 1 \+ a multiple of 4'):
    generator.rollout(jax.random.key(0), 34, labels=np.array([0], np.int32))
  with pytest.raises(errors.UserError, match=r'window_context=5 latent frames .* must leave room in a window of 5'):
    generator.rollout(jax.random.key(0), 33, labels=np.array([0], np.int32), window_context=5)


def test_rollout_lengths_and_windows_are_checked():
  config = config_lib.task_config('demo', 'micro')
  config.sample.num_frames = 20
  with pytest.raises(config_lib.ConfigError, match=r'sample\.num_frames=20 is not 1 \+ a multiple of 4'):
    config_lib.validate(config, 'sample')
  config.sample.num_frames = 33
  config.sample.window_context_frames = 5
  with pytest.raises(config_lib.ConfigError, match=r'sample\.window_context_frames=5 leaves no room'):
    config_lib.validate(config, 'sample')
  config.sample.window_context_frames = 4
  config_lib.validate(config, 'sample')
  assert config_lib.window_context_frames(config) == 4
  config.sample.window_context_frames = 0  # default: the model's context (5 frames = 2 latent frames)
  assert config_lib.window_context_frames(config) == 2 and config_lib.rollout_frames(config) == 33


def test_sample_mode_rolls_out_a_long_video_with_a_report_per_window(tiny_pipeline, tmp_path):
  # The micro pipeline's NBP model: 9-frame clips (3x4x4 codes), 5 frames given, windows keeping 2 latent frames.
  shutil.copytree(tiny_pipeline / 'nbp', tmp_path / 'nbp')
  out = run_main(f'--workdir={tmp_path / "nbp"}', '--mode=sample', '--config.sample.num_frames=17')
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  (folder,) = (tmp_path / 'nbp' / 'samples').glob('rollout_17f_step_*')
  report = json.loads((folder / 'rollout.json').read_text())
  # Window 0 generates frames 5..8 of the first clip; each later window adds one latent frame (4 frames).
  assert [w['frames'] for w in report['windows']] == [[5, 9], [9, 13], [13, 17]]
  for w in report['windows']:
    assert 0 < w['psnr'] <= image_metrics.PSNR_MAX_DB and 0 <= w['mean_colour_drift'] < 255 * 3 ** 0.5
  assert report['num_samples'] == 4 and report['window_context_frames'] == 2
  video, _ = video_io.read_video(str(folder / 'sample_0.mp4'))
  assert video.shape[0] == 17
  assert (folder / 'sample_grid.png').exists()

  bad = run_main(f'--workdir={tmp_path / "nbp"}', '--mode=sample', '--config.sample.num_frames=18')
  assert bad.returncode == 2 and 'sample.num_frames=18' in bad.stderr
