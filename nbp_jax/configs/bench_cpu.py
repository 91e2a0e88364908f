"""CPU decode benchmark: NBP (block 1x1x16) vs NTP (1x1x1) on the K600 clip, same 187M transformer.

The transformer is GPT-2-small shaped (12 layers, 12 heads, width 768: 85M parameters in the layers, 187M with the
64k-code embedding and head), randomly initialised: decoding speed does not depend on the weights.

  python -m nbp_jax.bench generate --config=configs/bench_cpu.py
"""

from nbp_jax import config_lib


def get_config():
  c = config_lib.task_config('k600', '100m')
  c.name = 'bench_cpu'
  c.model.dtype = 'float32'
  c.model.dropout = 0.0
  c.sample.batch_size = 1  # one clip: latency-bound decoding, as in the paper's frames/s
  return c
