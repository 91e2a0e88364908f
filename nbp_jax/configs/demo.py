"""Tiny end-to-end pipeline on bundled synthetic videos, on CPU in minutes (the README's main command).

  python -m nbp_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=pipeline   # = make demo
"""

from nbp_jax import config_lib


def get_config():
  return config_lib.task_config('demo', 'tiny')
