r"""Benchmarks that measure things side by side in one run and print ratios.

  python -m nbp_jax.bench decode --config=configs/bench_cpu.py
  python -m nbp_jax.bench tokenizer --config=configs/demo.py
  python -m nbp_jax.bench train --config=configs/k600_700m.py
  python -m nbp_jax.bench fvd --config=configs/demo.py

Each benchmark lives beside the stage it measures and prints a machine-readable last line (key=value ...). They time
with nbp_jax.timing (best of N, compilation excluded), as does `Generator.generation_speed`.
"""

from __future__ import annotations

import importlib
import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file; override with --config.x=y.',
                                          lock_config=True)

# benchmark name -> 'module:function' taking the config.
BENCHMARKS = {
    'decode': 'nbp_jax.nbp.bench:run',
    'tokenizer': 'nbp_jax.tokenizer.bench:run',
    'train': 'nbp_jax.trainer_bench:run',
    'fvd': 'nbp_jax.evaluation.bench:run',
}


def main(argv):
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise app.UsageError(f'usage: python -m nbp_jax.bench {{{"|".join(BENCHMARKS)}}} --config=...')
  module_name, fn_name = BENCHMARKS[argv[1]].split(':')
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    print(f'benchmark {argv[1]!r} is not implemented yet ({module_name} is missing).', file=sys.stderr)
    sys.exit(2)
  getattr(module, fn_name)(_CONFIG.value)


if __name__ == '__main__':
  app.run(main)
