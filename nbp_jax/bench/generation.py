r"""Generation benchmark: the same clip generated with next-block (config's block, 1x1x16) and next-token (1x1x1)
prediction on the same model, in one run, each after a warm-up compile.

  python -m nbp_jax.bench generate --config=configs/bench_cpu.py

Times `Generator.generation_speed` (transformer decoding with the KV cache, best of `repeats`; the tokenizer is not
included) and `Generator.first_frame_seconds` (time until the stream has the first generated latent frame). Last line:
`nbp_steps=48 ntp_steps=768 nbp_frames_per_s=... ntp_frames_per_s=... speedup=... nbp_first_frame_s=...
ntp_first_frame_s=...`.
"""

from __future__ import annotations

import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nbp_jax import config_lib
from nbp_jax.nbp import generation
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import train
from nbp_jax.nbp.spec import spec_from_config


def _mib(n: float) -> str:
  return f'{n / 2**20:.0f} MiB'


def run(config: ml_collections.ConfigDict, repeats: int = 3) -> dict[str, float]:
  """Prints one line per mode, the ratio, and the machine-readable last line; returns the numbers."""
  config_lib.validate(config, 'sample')
  nbp_spec = spec_from_config(config)
  ntp_spec = nbp_spec.with_block_shape((1, 1, 1))  # = Generator.codes(..., block_shape=(1, 1, 1))
  layout = nbp_spec.layout
  b = config.sample.batch_size
  t, h, w = layout.latent_shape
  ctx_latent = config_lib.context_latent_frames(config)
  n_ctx = ctx_latent * h * w
  frames = config.data.num_frames - config.nbp.context_frames  # video frames produced per clip
  print(f'generation benchmark: {config.name}, {jax.devices()[0].device_kind} ({jax.default_backend()}), '
        f'{nbp_spec.num_params / 1e6:.0f}M params ({nbp_spec.model.num_layers} layers, width '
        f'{nbp_spec.model.emb_dim}), dtype {nbp_spec.model.dtype}, batch {b}, grid {layout.latent_shape}, '
        f'{n_ctx} context tokens, {layout.num_tokens - n_ctx} generated tokens = {frames} frames')

  params = nn.meta.unbox(jax.jit(lambda r: train.init_params(nbp_spec, r))(jax.random.key(config.seed)))
  generator = generator_lib.Generator(config, nbp_spec, params)
  inputs = {}
  if ctx_latent:
    inputs['context_codes'] = jax.random.randint(jax.random.key(1), (b, ctx_latent, h, w), 0,
                                                 nbp_spec.vocab.codebook_size)
  if nbp_spec.vocab.prefix_len:
    inputs['labels'] = jnp.zeros((b,), jnp.int32)
  if not inputs:
    inputs['batch_size'] = b

  results = {}
  for name, block, reps in (('nbp', None, repeats), ('ntp', (1, 1, 1), 1)):
    spec = nbp_spec if block is None else ntp_spec
    context = None if not ctx_latent else generation.context_to_seq(spec, inputs['context_codes'])
    t0 = time.perf_counter()
    compiled = generation.generate.lower(spec, params, jax.random.key(2), generator.sampling(),
                                         labels=inputs.get('labels'), context=context,
                                         batch_size=inputs.get('batch_size')).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    r = generator.generation_speed(inputs, block_shape=block, repeats=reps)
    steps, secs = r['steps'], r['seconds']
    first = generator.first_frame_seconds(inputs, block_shape=block, repeats=reps)
    results[name] = dict(steps=steps, seconds=secs, tokens_per_s=r['tokens_per_s'], frames_per_s=r['frames_per_s'],
                         first_frame_s=first)
    temp = getattr(mem, 'temp_size_in_bytes', 0) + getattr(mem, 'argument_size_in_bytes', 0)
    print(f'{name}: block {r["block"]}, {steps} steps, compile {compile_s:.1f} s, '
          f'{secs:.2f} s/clip, {r["tokens_per_s"]:.1f} tokens/s, {r["frames_per_s"]:.2f} frames/s, '
          f'first latent frame after {first:.2f} s, '
          f'compiled memory {_mib(temp)}, peak RSS {_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}')
  speedup = results['nbp']['frames_per_s'] / results['ntp']['frames_per_s']
  print(f'speed-up of next-block over next-token prediction: {speedup:.1f}x '
        f'({results["ntp"]["steps"] / results["nbp"]["steps"]:.0f}x fewer steps)')
  print(f'nbp_steps={results["nbp"]["steps"]} ntp_steps={results["ntp"]["steps"]} '
        f'nbp_frames_per_s={results["nbp"]["frames_per_s"]:.3f} ntp_frames_per_s={results["ntp"]["frames_per_s"]:.3f} '
        f'speedup={speedup:.2f} nbp_first_frame_s={results["nbp"]["first_frame_s"]:.3f} '
        f'ntp_first_frame_s={results["ntp"]["first_frame_s"]:.3f}')
  return dict(speedup=speedup, **{f'{k}_{m}': v for k, r in results.items() for m, v in r.items()})
