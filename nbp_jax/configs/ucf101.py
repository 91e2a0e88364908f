"""UCF-101 class-conditional generation (17 frames, 128x128, fps 8) at a transformer size of
config_lib.MODEL_SIZES (default 700m; the paper's are 700m, 1b and 3b).

  python -m nbp_jax.main --config=configs/ucf101.py:3b --workdir=/path/to/workdir --mode=train
"""

from nbp_jax import config_lib


def get_config(arg: str = '700m'):
  return config_lib.task_config('ucf101', arg)
