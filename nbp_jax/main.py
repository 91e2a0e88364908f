r"""Command line entry point: one config, one workdir, one mode.

  python -m nbp_jax.main --config=configs/k600_3b.py --workdir=/tmp/k600 --mode=train \
      --config.optim.lr=1e-4 --config.nbp.block_shape='(1,4,4)'

Each mode is one stage of the corridor (DESIGN.md); this file only validates the config and dispatches.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nbp_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/demo.py', 'Config file (ml_collections); override fields with --config.section.field=value.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where data, checkpoints, metrics and samples go. '
                               'Default: workdirs/<config.name>.')
_MODE = flags.DEFINE_enum('mode', 'train', config_lib.MODES, 'What to run.')

# Modes that use a finished run: without --config they take the config saved in the workdir.
_USES_SAVED_CONFIG = ('sample', 'eval', 'export')

# mode -> 'module:function' taking (config, workdir). Modes not listed here are not built yet.
STAGES = {
    'prepare_data': 'nbp_jax.data.prepare:run',
    'train_tokenizer': 'nbp_jax.tokenizer.train:run',
    'tokenize': 'nbp_jax.tokenizer.tokenize:run',
    'train': 'nbp_jax.nbp.train:run',
    'sample': 'nbp_jax.nbp.sample:run',
    'eval': 'nbp_jax.evaluation.protocols:run',
    'pipeline': 'nbp_jax.pipeline:run',
    'import': 'nbp_jax.export.official:run',
    'export': 'nbp_jax.export.bundle:run',
}


def resolve_stage(mode: str):
  """Returns the callable for `mode`, or exits with status 2 if that stage is not built yet."""
  if mode not in STAGES:
    print(f'--mode={mode} is not implemented yet in this version of nbp-jax '
          f'(implemented: {", ".join(sorted(STAGES))}).', file=sys.stderr)
    sys.exit(2)
  module_name, fn_name = STAGES[mode].split(':')
  return getattr(importlib.import_module(module_name), fn_name)


def _resolve_config(mode: str, workdir: str | None):
  """--config, or for sample/eval/export with no --config the workdir's saved config (plus --config.x=y overrides)."""
  saved = os.path.join(workdir or '', 'config.json')
  if mode not in _USES_SAVED_CONFIG or flags.FLAGS['config'].present or not workdir or not os.path.exists(saved):
    return _CONFIG.value
  from nbp_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = checkpoint.load_config(workdir)
  for path, value in config_flags.get_override_values(flags.FLAGS['config']).items():
    *parents, name = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[name] = value
  logging.info('Using the config saved in %s', saved)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from nbp_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize_distributed()  # multi-host: before any other JAX use (a no-op on one host)
  mode = _MODE.value
  config = _resolve_config(mode, _WORKDIR.value)
  try:
    config_lib.validate(config, mode)
  except config_lib.ConfigError as e:
    print(f'Config error: {e}', file=sys.stderr)
    sys.exit(1)
  workdir = _WORKDIR.value or os.path.join('workdirs', config.name)
  stage = resolve_stage(mode)
  os.makedirs(workdir, exist_ok=True)
  logging.info('mode=%s workdir=%s config=%s', mode, workdir, config.name)
  stage(config, workdir)


if __name__ == '__main__':
  app.run(main)
