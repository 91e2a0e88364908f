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

# mode -> 'module:function' taking (config, workdir). Modes not listed here are not built yet.
STAGES = {
    'prepare_data': 'nbp_jax.data.prepare:run',
}


def resolve_stage(mode: str):
  """Returns the callable for `mode`, or exits with status 2 if that stage is not built yet."""
  if mode not in STAGES:
    print(f'--mode={mode} is not implemented yet in this version of nbp-jax '
          f'(implemented: {", ".join(sorted(STAGES))}).', file=sys.stderr)
    sys.exit(2)
  module_name, fn_name = STAGES[mode].split(':')
  return getattr(importlib.import_module(module_name), fn_name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from nbp_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize_distributed()  # multi-host: before any other JAX use (a no-op on one host)
  config = _CONFIG.value
  mode = _MODE.value
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
