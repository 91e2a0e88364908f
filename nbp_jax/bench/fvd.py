"""FVD feature-extraction throughput: `python -m nbp_jax.bench fvd --config=configs/demo.py`.

Times the jitted I3D feature function (resize to 224 included) on the config's clip shape: best of `num_batches`
calls after a warm-up call.
Last line: `videos_per_s=...`.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from nbp_jax import timing
from nbp_jax.evaluation import fvd


def run(config, num_batches: int = 3):
  batch = config.eval.batch_size
  shape = (batch, config.data.num_frames, config.data.resolution, config.data.resolution, 3)
  videos = np.random.RandomState(0).randint(0, 256, shape, dtype=np.uint8)
  feature_fn = fvd.make_feature_fn(config.eval.fvd_num_frames, config.eval.fvd_resize)
  start = time.perf_counter()
  jax.block_until_ready(feature_fn(videos))
  compile_s = time.perf_counter() - start
  per_batch = timing.best_of(lambda: feature_fn(videos), num_batches, warmup=0)
  rate = batch / per_batch
  print(f'devices={jax.device_count()} ({jax.devices()[0].platform}) batch={batch} clip={shape[1:]} '
        f'first_call_s={compile_s:.2f} seconds_per_batch={per_batch:.3f}')
  print(f'videos_per_s={rate:.3f}')
