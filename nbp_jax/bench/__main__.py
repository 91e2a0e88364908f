"""`python -m nbp_jax.bench NAME --config=... [--config.x=y ...]`: runs one benchmark of nbp_jax.bench.BENCHMARKS."""

from __future__ import annotations

import importlib

from absl import app
from absl import flags
from ml_collections import config_flags

from nbp_jax import bench
from nbp_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file('config', config_lib.config_file('demo'),
                                          'Config file or bundled config name; override with --config.x=y.',
                                          lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with --config a bundled config by name too (`--config=bench_cpu`, `configs/demo.py`
  from any folder), as nbp_jax.main takes it."""
  try:
    argv = config_lib.last_overrides_only(config_lib.with_config_file(argv))
  except config_lib.ConfigError as e:
    raise SystemExit(f'Config error: {e}') from None
  return flags.FLAGS(argv)


def main(argv: list[str]) -> None:
  name = bench.ALIASES.get(argv[1], argv[1]) if len(argv) == 2 else None
  if name not in bench.BENCHMARKS:
    raise app.UsageError(f'usage: python -m nbp_jax.bench {{{"|".join(bench.BENCHMARKS)}}} --config=...')
  module_name, fn_name = bench.BENCHMARKS[name].split(':')
  # The same override path as nbp_jax.main, so that --config.model.size=3b chooses that size's fields here too.
  config = config_lib.apply_overrides(_CONFIG.value, config_flags.get_override_values(flags.FLAGS['config']))
  getattr(importlib.import_module(module_name), fn_name)(config)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
