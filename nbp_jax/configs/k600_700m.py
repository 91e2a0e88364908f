"""Kinetics-600 frame prediction (5 frames given, 12 predicted, 128x128, fps 16), 700m transformer.

  python -m nbp_jax.main --config=configs/k600_700m.py --workdir=/path/to/workdir --mode=train

The same as --config=configs/k600.py:700m.
"""

from nbp_jax import config_lib


def get_config():
  return config_lib.task_config('k600', '700m')
