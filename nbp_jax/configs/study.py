"""The paper's block-size / block-shape ablation at toy scale (nbp_jax/study.py), on the demo's synthetic data.

  python -m nbp_jax.main --config=configs/study.py --workdir=workdirs/study --mode=study

Every block shape of config.study.block_shapes x every seed of config.study.seeds trains the same transformer on
the same codes and is evaluated with the demo's protocols; the table and plot go to WORKDIR/study.{md,png}.
"""

from nbp_jax import config_lib


def get_config():
  return config_lib.task_config('study', 'tiny')
