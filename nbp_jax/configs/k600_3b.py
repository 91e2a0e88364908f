"""Kinetics-600 frame prediction (5 frames given, 12 predicted, 128x128, fps 16), 3b transformer.

  python -m nbp_jax.main --config=configs/k600_3b.py --workdir=/path/to/workdir --mode=train

The same as --config=configs/k600.py:3b.
"""

from nbp_jax import config_lib


def get_config():
  return config_lib.task_config('k600', '3b')
