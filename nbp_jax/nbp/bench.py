r"""Decode benchmark: the same clip generated with next-block (config's block, 1x1x16) and next-token (1x1x1)
prediction on the same model, in one run, each after a warm-up compile.

  python -m nbp_jax.bench decode --config=configs/bench_cpu.py

Times `decode.generate` only (transformer decoding with the KV cache; the tokenizer is not included). Last line:
`nbp_steps=48 ntp_steps=768 nbp_frames_per_s=... ntp_frames_per_s=... speedup=...`.
"""

from __future__ import annotations

import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nbp_jax import config_lib
from nbp_jax.nbp import decode, train
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import spec_from_config


def _time(fn, repeats: int) -> float:
  """Best wall time of `repeats` runs (seconds); the best is the least disturbed by other processes."""
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best


def _mib(n: float) -> str:
  return f'{n / 2**20:.0f} MiB'


def run(config: ml_collections.ConfigDict, repeats: int = 3) -> dict[str, float]:
  """Prints one line per mode, the ratio, and the machine-readable last line; returns the numbers."""
  config_lib.validate(config, 'sample')
  nbp_spec = spec_from_config(config)
  ntp_spec = nbp_spec.with_block_shape((1, 1, 1))
  layout = nbp_spec.layout
  b = config.sample.batch_size
  t, h, w = layout.latent_shape
  ctx_latent = config_lib.context_latent_frames(config)
  n_ctx = ctx_latent * h * w
  frames = config.data.num_frames - config.nbp.context_frames  # video frames produced per clip
  print(f'decode benchmark: {config.name}, {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'{nbp_spec.num_params / 1e6:.0f}M params ({nbp_spec.model.num_layers} layers, width '
        f'{nbp_spec.model.emb_dim}), dtype {nbp_spec.model.dtype}, batch {b}, grid {layout.latent_shape}, '
        f'{n_ctx} context tokens, {layout.num_tokens - n_ctx} generated tokens = {frames} frames')

  params = nn.meta.unbox(jax.jit(lambda r: train.init_params(nbp_spec, r))(jax.random.key(config.seed)))
  context = jax.random.randint(jax.random.key(1), (b, n_ctx), 0, nbp_spec.vocab.codebook_size) if n_ctx else None
  labels = jnp.zeros((b,), jnp.int32) if nbp_spec.vocab.prefix_len else None
  sampling = Sampling.from_config(config.sample)

  results = {}
  for name, spec, reps in (('nbp', nbp_spec, repeats), ('ntp', ntp_spec, 1)):
    kwargs = dict(labels=labels, context=context, batch_size=None if (labels is not None or n_ctx) else b)
    steps = spec.layout.decode_plan(n_ctx).num_steps
    t0 = time.perf_counter()
    compiled = decode.generate.lower(spec, params, jax.random.key(2), sampling, **kwargs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    fn = lambda spec=spec, kwargs=kwargs: decode.generate(spec, params, jax.random.key(3), sampling, **kwargs)  # noqa
    jax.block_until_ready(fn())  # warm-up
    secs = _time(fn, reps)
    tokens = b * (layout.num_tokens - n_ctx)
    results[name] = dict(steps=steps, seconds=secs, tokens_per_s=tokens / secs, frames_per_s=b * frames / secs)
    temp = getattr(mem, 'temp_size_in_bytes', 0) + getattr(mem, 'argument_size_in_bytes', 0)
    print(f'{name}: block {"x".join(map(str, spec.layout.block_shape))}, {steps} steps, compile {compile_s:.1f} s, '
          f'{secs:.2f} s/clip, {tokens / secs:.1f} tokens/s, {b * frames / secs:.2f} frames/s, '
          f'compiled memory {_mib(temp)}, peak RSS {_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}')
  speedup = results['nbp']['frames_per_s'] / results['ntp']['frames_per_s']
  print(f'speed-up of next-block over next-token prediction: {speedup:.1f}x '
        f'({results["ntp"]["steps"] / results["nbp"]["steps"]:.0f}x fewer steps)')
  print(f'nbp_steps={results["nbp"]["steps"]} ntp_steps={results["ntp"]["steps"]} '
        f'nbp_frames_per_s={results["nbp"]["frames_per_s"]:.3f} ntp_frames_per_s={results["ntp"]["frames_per_s"]:.3f} '
        f'speedup={speedup:.2f}')
  return dict(speedup=speedup, **{f'{k}_{m}': v for k, r in results.items() for m, v in r.items()})
