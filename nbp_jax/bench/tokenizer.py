r"""Tokenizer throughput: encode and decode clips/s at the config's clip shape, and peak memory.

  python -m nbp_jax.bench tokenizer --config=configs/demo.py
  python -m nbp_jax.bench tokenizer --config=configs/k600_700m.py --config.tokenizer.batch_size=16

Random weights (speed does not depend on them); batch = tokenizer.batch_size clips of data.num_frames frames at
data.resolution. Each function is compiled and run once, then timed as the best of 5 calls (timing.best_of). Last
line:
  encode_clips_per_s=... decode_clips_per_s=... peak_mb=...
peak_mb is the device's peak bytes in use where the backend reports it (GPU/TPU), else the process's peak RSS.
"""

from __future__ import annotations

import resource
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbp_jax import config_lib
from nbp_jax import timing
from nbp_jax import trainer
from nbp_jax.tokenizer import model as tokenizer_model

REPEATS = 5


def _peak_mb() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2 ** 20
  # ru_maxrss is KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(config: ml_collections.ConfigDict) -> dict[str, float]:
  model = tokenizer_model.make_model(config)
  batch = int(config.tokenizer.batch_size)
  t, h, w = config_lib.latent_shape(config)
  shape = (batch, config.data.num_frames, config.data.resolution, config.data.resolution, 3)
  params = trainer.jit_init(lambda r: tokenizer_model.init_params(model, r), jax.random.key(0))
  video = jnp.asarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
  codes = tokenizer_model.jit_encode(params, video, model=model)
  if codes.shape != (batch, t, h, w):
    raise AssertionError(f'encode gave codes {codes.shape}, expected {(batch, t, h, w)}.')
  enc_s = timing.best_of(lambda: tokenizer_model.jit_encode(params, video, model=model), REPEATS)
  dec_s = timing.best_of(lambda: tokenizer_model.jit_decode(params, codes, model=model), REPEATS)
  result = {'encode_clips_per_s': batch / enc_s, 'decode_clips_per_s': batch / dec_s, 'peak_mb': _peak_mb()}
  counts = tokenizer_model.param_counts(params)
  print(f'device={jax.devices()[0].device_kind} tokenizer={config.tokenizer.size} dtype={model.dtype} '
        f'params={counts["total"] / 1e6:.2f}M batch={batch} clip={shape[1]}x{shape[2]}x{shape[3]} '
        f'codes={t}x{h}x{w}', file=sys.stderr)
  print(f'encode {enc_s * 1e3:.1f} ms/batch, decode {dec_s * 1e3:.1f} ms/batch', file=sys.stderr)
  print(' '.join(f'{k}={v:.2f}' for k, v in result.items()), flush=True)
  return result
