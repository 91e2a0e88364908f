"""Kinetics-600 frame prediction (5 frames given, 12 predicted, 128x128, fps 16) at a transformer size of
config_lib.MODEL_SIZES (default 700m; the paper's are 700m, 1b and 3b, each with its own learning rate).

  python -m nbp_jax.main --config=configs/k600.py:3b --workdir=/path/to/workdir --mode=train
"""

from nbp_jax import config_lib


def get_config(arg: str = '700m'):
  return config_lib.task_config('k600', arg)
