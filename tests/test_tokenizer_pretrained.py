"""The bundled demo tokenizer: installed by --mode=train_tokenizer, refused for other settings, and it reconstructs."""

import logging

import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax.data import synthetic
from nbp_jax.tokenizer import load
from nbp_jax.tokenizer import model as tokenizer_model
from nbp_jax.tokenizer import train as tokenizer_train


def test_bundled_tokenizer_installs_and_reconstructs_fresh_clips(tmp_path):
  config = config_lib.task_config('demo', 'tiny')
  tdir = str(tmp_path / 'tokenizer')
  assert tokenizer_train.install_pretrained(config, tdir)
  assert not tokenizer_train.install_pretrained(config, tdir)  # a checkpoint is there now: never overwritten
  config.tokenizer.checkpoint = tdir
  model, params, step = load.load_tokenizer(config, str(tmp_path))
  assert step == config.tokenizer.num_steps
  # Clips it never saw (other seeds than the demo's), one per class.
  clips = np.stack([synthetic.generate_video(10**6 + i, i % 4, 17, 32) for i in range(8)])
  # Jitted (op by op, the two calls took ~15 s).
  codes = tokenizer_model.jit_encode(params, clips, model=model)
  assert codes.shape == (8, 5, 8, 8) and int(codes.max()) < 1000
  recon = np.asarray(tokenizer_model.jit_decode(params, codes, model=model)).astype(np.float64)
  x = clips.astype(np.float64)
  psnr = lambda a: np.mean(10 * np.log10(255.0 ** 2 / np.mean((a - x) ** 2, axis=(1, 2, 3, 4))))
  mean_colour = np.broadcast_to(x.mean(axis=(1, 2, 3), keepdims=True), x.shape)
  # Each clip's mean colour is what the released architecture reaches at this size (about 16.5 dB).
  assert psnr(recon) > psnr(mean_colour) + 5.0, (psnr(recon), psnr(mean_colour))


def test_bundled_tokenizer_is_refused_for_another_architecture_or_recipe(tmp_path):
  # The architecture, and the training recipe too: a config asking for a GAN phase, another loss, learning rate
  # or accumulation would otherwise get the bundled tokenizer under its name, with its own recipe recorded.
  for field, value in (('channels', 8), ('discriminator_start_step', 2000), ('recon_loss', 'l1'), ('lr', 3e-4),
                       ('grad_accum_steps', 2)):
    config = config_lib.task_config('demo', 'tiny')
    config.tokenizer[field] = value
    with pytest.raises(config_lib.ConfigError, match=rf"tokenizer\.{field}.*pretrained=''"):
      tokenizer_train.install_pretrained(config, str(tmp_path / 'tokenizer'))
    assert not (tmp_path / 'tokenizer').exists()
  # How it is computed or logged is not its recipe.
  config = config_lib.task_config('demo', 'tiny')
  config.tokenizer.update(num_samples=2, tokenize_batch_size=4, dtype='float32', remat=True)
  assert tokenizer_train.install_pretrained(config, str(tmp_path / 'tokenizer'))



def test_loading_a_tokenizer_says_which_architecture_fields_of_the_config_it_does_not_use(caplog):
  """The checkpoint's own config decides the architecture (its codes must match its weights); a config that asks
  for another one is told so by name, not silently overruled. The demo's own config loads it without a word."""
  config = config_lib.task_config('demo', 'tiny')
  config.tokenizer.checkpoint = tokenizer_train.BUNDLED['demo']
  with caplog.at_level(logging.WARNING):
    model, _, _ = load.load_tokenizer(config, 'unused')
  assert 'another architecture' not in caplog.text
  config.tokenizer.channels = 2 * config.tokenizer.channels
  with caplog.at_level(logging.WARNING):
    again, _, _ = load.load_tokenizer(config, 'unused')
  assert f"this config's tokenizer.channels={config.tokenizer.channels} are not used" in caplog.text
  assert again.spec == model.spec  # the checkpoint's architecture all the same
  # Except the codebook and the grid: the transformer is built from the config's (it trained on codes beyond its
  # codebook, NaN).
  config.tokenizer.fsq_levels = (4, 4)
  with pytest.raises(config_lib.ConfigError, match=r'makes codes of 1000 values .* this config asks for 16 values'):
    load.load_tokenizer(config, 'unused')
