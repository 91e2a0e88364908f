r"""Generation benchmark: the same clip generated with next-block (config's block, 1x1x16) and next-token (1x1x1)
prediction on the same model, in one run, each after a warm-up compile.

  python -m nbp_jax.bench generate --config=configs/bench_cpu.py

Times `Generator.generation_speed` (transformer decoding with the KV cache, best of `repeats`; the tokenizer is not
included) and `Generator.first_frame_seconds` (time until the stream has the first generated latent frame).

Then a roofline line per mode, all measured in this run on this machine, each the best of its repeats (the clip
and the prefill of `repeats`, the matmuls and the weight read of IDEAL_REPEATS): the least disturbed run on both
sides of the ratio, so that a busy minute of the machine moves neither the step nor its ideal alone (with medians
of 5 for the ideal, two runs of one commit gave 1.38x and 1.59x, the median matmuls 50.7 and 42.0 ms):
- step: one decoding step, (clip - prefill) / (steps - 1), the prefill timed alone as a generation of one block;
- matmuls: the step's weight matmuls alone (per layer query, key, value, proj, fc1, fc2, then the head's video
  rows, chained on the same weight arrays in generation's layout: [out, in] kernels times feature-major [d, B*L]
  activations), nothing else;
- weights: the time to read those weights once, at the bandwidth of a reduction over them;
- roofline = step / max(matmuls, weights): 1.0 is a step that costs only its weight reads and matmuls (what is left
  above that: attention over the cache, layer norms, embedding, sampling, loop and copy overhead).
The speed-up line adds the ceiling of this machine: both clips with the prefill as measured and every other step at
its ideal, max(matmuls, weights).

Last line: `nbp_steps=48 ntp_steps=768 nbp_frames_per_s=... ntp_frames_per_s=... speedup=... nbp_first_frame_s=...
ntp_first_frame_s=... nbp_step_ms=... ntp_step_ms=... nbp_roofline=... ntp_roofline=... ideal_speedup=...`.
"""

from __future__ import annotations

import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nbp_jax import config_lib
from nbp_jax import timing
from nbp_jax import trainer
from nbp_jax.nbp import generation
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import train
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.spec import spec_from_config


def _mib(n: float) -> str:
  return f'{n / 2**20:.0f} MiB'


_LAYER_MATMULS = (('attn', 'query'), ('attn', 'key'), ('attn', 'value'), ('attn', 'proj'), ('mlp', 'fc1'),
                  ('mlp', 'fc2'))


def step_weights(params, video_slice: tuple[int, int]) -> tuple[list[tuple[jax.Array, ...]], jax.Array]:
  """The kernels a decoding step multiplies by, as generation stores them ([out, in]; transformer.decode_params):
  per layer (query, key, value, proj, fc1, fc2), and the head's video rows [V_video, d] (a copy made here, outside
  anything timed)."""
  params = transformer_lib.decode_params(params)
  layers = []
  i = 0
  while f'blocks_{i}' in params:
    layers.append(tuple(params[f'blocks_{i}'][m][n]['kernel_t'] for m, n in _LAYER_MATMULS))
    i += 1
  head = jnp.array(params['head']['kernel_t'][video_slice[0]:video_slice[1]])
  return layers, head


@jax.jit
def _chained_matmuls(x, layers, head):
  """x [d, rows] (feature-major, as generation runs) through every layer's six matmuls (the same wiring as a block,
  without anything between them), then the head: the matmul work of one step on its weights, chained so that
  nothing can be skipped."""
  times = transformer_lib.kernel_times  # the product FeatureMajorDense computes
  for wq, wk, wv, wo, w1, w2 in layers:
    x = times(wo, times(wq, x) + times(wk, x) + times(wv, x))
    x = times(w2, times(w1, x))
  return times(head, x)


@jax.jit
def _read_all(layers, head):
  """One pass over every weight (a sum of each): the time to stream them from memory."""
  return sum(jnp.sum(w) for w in jax.tree_util.tree_leaves((layers, head)))


IDEAL_REPEATS = 15  # timed calls of the matmuls and of the weight read (tens of ms each)


def matmul_seconds(layers, head, rows: int, repeats: int = IDEAL_REPEATS) -> float:
  """Best-of seconds of a step's weight matmuls alone with `rows` = B*L new positions."""
  x = jax.random.normal(jax.random.key(0), (head.shape[1], rows), head.dtype) * 0.02
  return timing.best_of(lambda: _chained_matmuls(x, layers, head), repeats)


def read_seconds(layers, head, repeats: int = IDEAL_REPEATS) -> float:
  """Best-of seconds of reading every weight once."""
  return timing.best_of(lambda: _read_all(layers, head), repeats)


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

  params = nn.meta.unbox(trainer.jit_init(lambda r: train.init_params(nbp_spec, r), jax.random.key(config.seed)))
  params = transformer_lib.decode_params(params)  # as Generator.load does: generation's parameter layout
  generator = generator_lib.Generator(config, nbp_spec, params)
  inputs = {}
  if ctx_latent:
    inputs['context_codes'] = jax.random.randint(jax.random.key(1), (b, ctx_latent, h, w), 0,
                                                 nbp_spec.vocab.codebook_size)
  if nbp_spec.vocab.prefix_len:
    inputs['labels'] = jnp.zeros((b,), jnp.int32)
  if not inputs:
    inputs['batch_size'] = b

  weights = step_weights(generator.params, nbp_spec.vocab.video_slice)
  nbytes = sum(w.nbytes for w in jax.tree_util.tree_leaves(weights))
  read_s = read_seconds(*weights)
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
    # Best of, as the clip: a median prefill against a best-of clip could exceed it on a tiny model.
    prefill_s = timing.best_of(
        lambda spec=spec, context=context: generation.generate(
            spec, generator.params, jax.random.key(3), generator.sampling(), labels=inputs.get('labels'),
            context=context, num_blocks=1, batch_size=inputs.get('batch_size')), max(reps, 3))
    step_s = (secs - prefill_s) / max(steps - 1, 1)
    rows = b * spec.layout.block_len * (2 if generator.sampling().use_cfg else 1)
    matmul_s = matmul_seconds(*weights, rows)
    ideal_s = max(matmul_s, read_s)
    results[name] = dict(steps=steps, seconds=secs, tokens_per_s=r['tokens_per_s'], frames_per_s=r['frames_per_s'],
                         first_frame_s=first, prefill_s=prefill_s, step_ms=1e3 * step_s,
                         roofline=step_s / ideal_s, matmul_ms=1e3 * matmul_s,
                         ideal_clip_s=prefill_s + (steps - 1) * ideal_s)
    temp = getattr(mem, 'temp_size_in_bytes', 0) + getattr(mem, 'argument_size_in_bytes', 0)
    print(f'{name}: block {r["block"]}, {steps} steps, compile {compile_s:.1f} s, '
          f'{secs:.2f} s/clip, {r["tokens_per_s"]:.1f} tokens/s, {r["frames_per_s"]:.2f} frames/s, '
          f'first latent frame after {first:.2f} s, '
          f'compiled memory {_mib(temp)}, peak RSS {_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}')
  for name, m in results.items():
    print(f'{name} roofline: step {m["step_ms"]:.1f} ms (prefill {m["prefill_s"] * 1e3:.0f} ms once); its matmuls '
          f'alone {m["matmul_ms"]:.1f} ms; reading its {_mib(nbytes)} of weights {read_s * 1e3:.1f} ms '
          f'({nbytes / read_s / 1e9:.1f} GB/s); step / max(matmuls, weights) = {m["roofline"]:.2f}x')
  speedup = results['nbp']['frames_per_s'] / results['ntp']['frames_per_s']
  # The most this machine could give: both clips with every step at its ideal (the prefill as measured).
  ideal_speedup = results['ntp']['ideal_clip_s'] / results['nbp']['ideal_clip_s']
  print(f'speed-up of next-block over next-token prediction: {speedup:.1f}x '
        f'({results["ntp"]["steps"] / results["nbp"]["steps"]:.0f}x fewer steps; {ideal_speedup:.1f}x with every '
        f'step at its ideal and the prefill as measured)')
  print(f'nbp_steps={results["nbp"]["steps"]} ntp_steps={results["ntp"]["steps"]} '
        f'nbp_frames_per_s={results["nbp"]["frames_per_s"]:.3f} ntp_frames_per_s={results["ntp"]["frames_per_s"]:.3f} '
        f'speedup={speedup:.2f} nbp_first_frame_s={results["nbp"]["first_frame_s"]:.3f} '
        f'ntp_first_frame_s={results["ntp"]["first_frame_s"]:.3f} nbp_step_ms={results["nbp"]["step_ms"]:.2f} '
        f'ntp_step_ms={results["ntp"]["step_ms"]:.2f} nbp_roofline={results["nbp"]["roofline"]:.2f} '
        f'ntp_roofline={results["ntp"]["roofline"]:.2f} ideal_speedup={ideal_speedup:.2f}')
  return dict(speedup=speedup, ideal_speedup=ideal_speedup,
              **{f'{k}_{m}': v for k, r in results.items() for m, v in r.items()})
