"""UCF-101 class-conditional generation (17 frames, 128x128, fps 8), 1b transformer.

  python -m nbp_jax.main --config=configs/ucf101_1b.py --workdir=/path/to/workdir --mode=train

The same as --config=configs/ucf101.py:1b.
"""

from nbp_jax import config_lib


def get_config():
  return config_lib.task_config('ucf101', '1b')
