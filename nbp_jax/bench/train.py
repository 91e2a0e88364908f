r"""Training-step benchmark: step time, tokens/s and MFU of the NBP transformer for a preset and mesh.

  python -m nbp_jax.bench train --config=configs/k600_700m.py --config.data.batch_size=32
  python -m nbp_jax.bench train --config=configs/demo.py --config.mesh.shape='(1,-1,1)'

The step is the trainer's own (same shardings, donation, accumulation); the data are random codes of the preset's
latent shape, already on the devices, so the figure is the model's and not the input pipeline's. MFU counts the
task's `flops_per_example` against the device's dense bf16 peak (nbp_jax.metric_logger.PEAK_FLOPS); where there is no
datasheet peak (CPU) against this machine's measured matmul FLOP/s in the model's dtype (timing.matmul_peak_flops,
measured in the same run), so the figure exists without an accelerator. Last line:
`step_s=... tokens_per_s=... mfu=... peak_source=datasheet|measured`.
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import ml_collections
import numpy as np

from nbp_jax import config_lib
from nbp_jax import metric_logger
from nbp_jax import parallel
from nbp_jax import timing
from nbp_jax import trainer
from nbp_jax.parallel import sharding as sharding_lib


def random_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random codes [B, t, h, w] in the codebook and class labels [B]: the NBP batch contract (docs/design.md)."""
  rng = np.random.default_rng(seed)
  grid = config_lib.latent_shape(config)
  batch = {'codes': rng.integers(0, config_lib.codebook_size(config.tokenizer), (batch_size,) + grid, np.int32)}
  if config.nbp.condition == 'class':
    batch['label'] = rng.integers(0, max(config.data.num_classes, 1), (batch_size,), np.int32)
  return batch


def run(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Times `train.bench_steps` (default 10) steps after `train.bench_warmup` (default 2) compile/warm-up steps."""
  from nbp_jax.nbp import train as nbp_train  # pylint: disable=g-import-not-at-top

  parallel.initialize_distributed()
  num_steps = int(config.train.get('bench_steps', 10))
  warmup = int(config.train.get('bench_warmup', 2))
  task = nbp_train.make_task(config)
  setup = trainer.make_setup(config, task)
  state = trainer.init_state(config, task, setup)
  step_fn = trainer.make_train_step(task, setup, int(config.optim.grad_accum_steps))
  global_batch = int(config.data.batch_size)
  local = random_batch(config, global_batch // jax.process_count(), seed=jax.process_index())
  batch = sharding_lib.make_global_batch(local, setup.batch_sharding)

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  device = jax.devices()[0]
  print(f'preset={config.name} params={n_params / 1e6:.1f}M devices={setup.mesh.size}x{device.device_kind} '
        f'mesh={dict(setup.mesh.shape)} batch={global_batch} grad_accum={config.optim.grad_accum_steps} '
        f'dtype={config_lib.resolve_dtype(config.model.dtype)} attention={config.model.attention} '
        f'tokens/example={task.tokens_per_example} GFLOP/example={task.flops_per_example / 1e9:.2f}', flush=True)

  t0 = time.perf_counter()
  for _ in range(warmup):
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  print(f'compile+warmup: {time.perf_counter() - t0:.1f}s, loss={float(m["loss"]):.4f}', flush=True)

  def step():
    nonlocal state
    state, metrics = step_fn(state, batch)
    return metrics

  # Each step waited for: a slightly pessimistic, but honest, step time.
  times = timing.timings(step, num_steps, warmup=0)
  step_s = statistics.median(times)
  examples_per_s = global_batch / step_s
  tokens_per_s = examples_per_s * task.tokens_per_example
  peak = metric_logger.peak_flops_per_device(device, config.train.get('peak_tflops', 0.0))
  source = 'datasheet'
  if not peak:
    # The whole mesh's devices share this machine's cores (CPU): the measured figure is per machine.
    peak, source = timing.matmul_peak_flops(config_lib.resolve_dtype(config.model.dtype)) / setup.mesh.size, 'measured'
  mfu = metric_logger.mfu(task.flops_per_example, examples_per_s, setup.mesh.size, peak)
  achieved = task.flops_per_example * examples_per_s
  print(f'steps={num_steps} median_step_s={step_s:.4f} min_step_s={min(times):.4f} '
        f'achieved {achieved / 1e9:.1f} GFLOP/s against a {source} peak of {peak * setup.mesh.size / 1e9:.1f} '
        f'GFLOP/s ({"matmul measured on this machine" if source == "measured" else "per device x devices"})',
        flush=True)
  mfu_text = f'{mfu:.4f}' if math.isfinite(mfu) else 'nan'
  print(f'step_s={step_s:.4f} tokens_per_s={tokens_per_s:.1f} mfu={mfu_text} peak_source={source}', flush=True)
  return {'step_s': step_s, 'tokens_per_s': tokens_per_s, 'mfu': mfu, 'achieved_flops': achieved}
