"""UCF-101 class-conditional generation (17 frames, 128x128, fps 8), 3b transformer.

  python -m nbp_jax.main --config=configs/ucf101_3b.py --workdir=/path/to/workdir --mode=train

The same as --config=configs/ucf101.py:3b.
"""

from nbp_jax import config_lib


def get_config():
  return config_lib.task_config('ucf101', '3b')
