"""Where a trained tokenizer lives and how every other stage loads it (tokenize, on-the-fly encoding, sampling,
evaluation, export): the one tokenizer loader."""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax.tokenizer import model as tokenizer_model

# The fields that decide the tokenizer's weights (checkpoint.STRUCTURE_FIELDS' tokenizer part, its discriminator's
# and LeCam's aside: loading never builds them).
ARCHITECTURE_FIELDS = tuple(f.split('.', 1)[1] for f in checkpoint_lib.STRUCTURE_FIELDS
                             if f.startswith('tokenizer.') and 'discriminator' not in f and 'lecam' not in f)


def tokenizer_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.tokenizer.checkpoint if set, else WORKDIR/tokenizer (where --mode=train_tokenizer writes)."""
  return config.tokenizer.get('checkpoint', '') or os.path.join(workdir, checkpoint_lib.TOKENIZER_SUBDIR)


def tokenizer_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The tokenizer section the checkpoint was trained with (its saved config), else config.tokenizer."""
  tdir = tokenizer_workdir(config, workdir)
  try:
    return checkpoint_lib.load_config(tdir).tokenizer
  except FileNotFoundError:
    return config.tokenizer


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, *,
                   platform: str | None = None) -> tuple[tokenizer_model.Tokenizer, Any, int]:
  """(model, generator params, step) of the trained tokenizer, params on the first local device.

  The architecture comes from the checkpoint's own config, so codes always match the weights; compute dtype from
  the current config.tokenizer.dtype. 'auto' settings resolve for `platform` (None = this backend; the export
  names the one it compiles for).
  """
  tdir = tokenizer_workdir(config, workdir)
  tok = tokenizer_config(config, workdir).copy_and_resolve_references()
  # The transformer is built from config.tokenizer's codebook and grid: those must be the checkpoint's.
  grid = lambda t: (config_lib.codebook_size(t), config_lib.temporal_factor(t), config_lib.spatial_factor(t))
  (codes, ft, fs), asked = grid(tok), grid(config.tokenizer)
  if asked != (codes, ft, fs):
    raise config_lib.ConfigError(
        f'The tokenizer in {tdir} makes codes of {codes} values on a grid {ft}x / {fs}x smaller than the clips '
        f'(tokenizer.fsq_levels={tuple(tok.fsq_levels)}, temporal_downsample={tuple(tok.temporal_downsample)}); '
        f'this config asks for {asked[0]} values, {asked[1]}x / {asked[2]}x: drop its tokenizer.* overrides, or '
        'train a tokenizer for them.')
  differ = [f'{k}={config.tokenizer.get(k)!r}' for k in ARCHITECTURE_FIELDS
            if k in config.tokenizer and k in tok and config.tokenizer[k] != tok[k]]
  if differ:  # said, not silently dropped: e.g. a --config.tokenizer.size override next to a trained tokenizer
    logging.warning('The tokenizer in %s was trained with another architecture; this config\'s %s are not used '
                    '(the checkpoint\'s own config decides it, so that codes match the weights).', tdir,
                    ', '.join(f'tokenizer.{d}' for d in differ))
  tok.dtype = config.tokenizer.get('dtype', tok.get('dtype', 'float32'))
  model = tokenizer_model.make_model(tok, platform)
  try:
    params, step = checkpoint_lib.restore_params(tdir, step)
  except FileNotFoundError as e:
    # The run's own config may name its tokenizer (a pipeline's nbp/ and ntp/ runs use the pipeline's): a --config
    # given instead of it lost that path.
    try:
      saved = checkpoint_lib.load_config(workdir).tokenizer.get('checkpoint', '')
    except (FileNotFoundError, ValueError):
      saved = ''
    if saved and saved != tdir:
      raise errors.MissingError(
          f'No trained tokenizer in {tdir}; the run in {workdir} was trained with tokenizer.checkpoint={saved!r}: '
          f'drop --config (the run\'s own config is used) or pass --config.tokenizer.checkpoint={saved}.') from e
    raise errors.MissingError(
        f'No trained tokenizer in {tdir}: run --mode=train_tokenizer with this --workdir first, or point '
        '--config.tokenizer.checkpoint at a tokenizer workdir.') from e
  gen = params['generator'] if 'generator' in params else params
  abstract = nn.unbox(jax.eval_shape(lambda r: tokenizer_model.init_params(model, r), jax.random.key(0)))
  checkpoint_lib.check_shapes(gen, abstract, 'tokenizer parameters', tdir)
  return model, gen, step
