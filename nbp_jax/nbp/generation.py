"""Block decoding: one `jax.jit` that prefills the prefix (+ given context) and loops over blocks.

The schedule (`BlockLayout.decode_plan`) is static: a prefill whose last group's outputs give the first sampled
group, then `lax.fori_loop`s over steps (hybrid: token-by-token steps, then blocks of L). Each step feeds the
ids of the group at its fixed input positions (the tokens just sampled, or the hybrid placeholder block), writes
their K/V into the preallocated cache at that offset, and samples the L tokens they predict in parallel.
A long cache grows through a few lengths (`cache_schedule`): the loops are cut where it grows, so that a step
early in the clip attends to a shorter one. Static shapes throughout: no Python loop over steps, one compilation
per (spec, shapes).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from nbp_jax.nbp import sampling as sampling_lib
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.layout import BlockLayout
from nbp_jax.nbp.layout import DecodePlan
from nbp_jax.nbp.layout import LayoutError
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.transformer import Transformer
from nbp_jax.nbp.transformer import init_cache

Sampling = sampling_lib.Sampling
_DEFAULT_SAMPLING = Sampling()


@functools.partial(jax.jit, static_argnames=('spec', 'num_blocks', 'batch_size', 'cache_buckets'))
def generate(spec: Spec, params, rng: jax.Array, sampling: Sampling = _DEFAULT_SAMPLING, *,
             labels: jax.Array | None = None, context: jax.Array | None = None,
             num_blocks: int | None = None, batch_size: int | None = None, first_round=0,
             cache_buckets: int | None = None) -> jax.Array:
  """Generates video codes block by block.

  Args:
    spec: the model's static description (hashable; a jit static argument).
    params: the transformer's params (boxed or not).
    rng: PRNG key.
    sampling: temperature/top-k/top-p/greedy/CFG settings.
    labels: [B] int32 class ids (class-conditional models).
    context: [B, n] int32 video codes in sequence order, n a multiple of L (frame prediction: the leading blocks).
    num_blocks: blocks to generate after the context (default: the rest of the clip).
    batch_size: B when neither labels nor context is given.
    first_round: the sampling round's key index of the first block generated here (round r samples with
      fold_in(rng, r)): a generation cut into pieces (streaming) passes the rounds already done, and then samples
      what one call samples.
    cache_buckets: lengths the KV cache grows through (cache_schedule; default by its length). Results do not
      depend on it.
  Returns:
    [B, n + num_blocks * L] int32 video codes in sequence order (the context included).
  """
  layout, vocab = spec.layout, spec.vocab
  # Generation runs its own parameter layout (layers unrolled, kernels transposed: transformer.decoding says why),
  # whatever the training layout; a Generator converts once at load, other callers' params are converted here.
  cfg = transformer_lib.decoding(spec.model)
  params = transformer_lib.decode_params(params)
  if labels is not None:
    b = labels.shape[0]
  elif context is not None:
    b = context.shape[0]
  elif batch_size is not None:
    b = batch_size
  else:
    raise LayoutError('generate needs labels, context or batch_size to know the batch size.')
  n_ctx = 0 if context is None else context.shape[1]
  plan = layout.decode_plan(n_ctx, num_blocks)

  prefix = vocab.prefix_ids(labels, b)
  null_cond = None
  rows = b
  if sampling.use_cfg:
    if not cfg.prefix_len:
      raise LayoutError('classifier-free guidance needs a class-conditional model (nbp.condition=class); '
                        'set sample.cfg_scale=1.')
    # Conditional rows first, then the same rows with the null condition: one batch, one forward per step.
    prefix = jnp.concatenate([prefix, prefix])
    null_cond = jnp.arange(2 * b) >= b
    rows = 2 * b

  z = jnp.zeros((b, plan.num_tokens), jnp.int32)
  if context is not None:
    z = z.at[:, :n_ctx].set(context.astype(jnp.int32))
  prefill_cache_len, phases = cache_schedule(layout, plan, cache_buckets)
  cache = init_cache(cfg, rows, prefill_cache_len)
  model = Transformer(cfg)
  shift = layout.target_offset - layout.prefix_len  # input position q predicts video index q + shift

  def run(z, cache, start, size, last, key):
    """Feeds input positions [start, start+size); samples the video tokens predicted by the last `last`."""
    # The prefill's positions are static (start 0): numpy block ids let attention use a static mask (the splash
    # kernel on TPU); the steps' positions are traced.
    pos = start + (np.arange(size) if isinstance(start, int) else jnp.arange(size))
    zz = jnp.concatenate([z, z]) if sampling.use_cfg else z
    ids = layout.input_ids_at(pos, prefix, zz, vocab)
    k_block = layout.block_ids(np.arange(transformer_lib.cache_length(cache)))
    logits, cache = model.apply({'params': params}, ids, start, cache, layout.block_ids(pos), k_block,
                                null_cond=null_cond, last=last, vocab_slice=vocab.video_slice,
                                method=Transformer.decode)
    if sampling.use_cfg:
      logits = sampling_lib.guide(logits, sampling.cfg_scale)
    tokens = sampling_lib.sample(key, logits, sampling)
    return lax.dynamic_update_slice(z, tokens, (0, start + size - last + shift)), cache

  z, cache = run(z, cache, 0, plan.prefill_len, plan.first_group, jax.random.fold_in(rng, first_round))
  done = 1
  for start, size, steps, length in phases:
    cache = transformer_lib.grow_cache(cache, length)
    def body(i, carry, start=start, size=size, done=done):
      return run(*carry, start + i * size, size, size, jax.random.fold_in(rng, first_round + done + i))
    z, cache = lax.fori_loop(0, steps, body, (z, cache))
    done += steps
  return z


# A step attends to every position of the cache it is given, so the cache grows with the generation: the prefill
# and the first steps run on a short one, and at up to CACHE_BUCKETS - 1 points it is padded to a longer one (one
# copy of it each time). Each length is one more compiled loop body, so only caches of MIN_BUCKETED_CACHE positions
# or more are cut, into lengths at least MIN_BUCKET_GROWTH apart. 187M bench model, K600 frame prediction on a
# 2-core CPU: NBP step 85.9 -> 81.7 ms, compilation 3.7 -> 8.4 s.
CACHE_BUCKETS = 4
MIN_BUCKETED_CACHE = 1024
MIN_BUCKET_GROWTH = 128


def cache_schedule(layout: BlockLayout, plan: DecodePlan,
                   buckets: int | None = None) -> tuple[int, tuple[tuple[int, int, int, int], ...]]:
  """The plan's steps on a KV cache that grows from what the prefill needs to plan.cache_len in `buckets` equal
  parts (default: up to CACHE_BUCKETS, MIN_BUCKET_GROWTH positions apart, for caches of MIN_BUCKETED_CACHE positions
  or more; else 1).

  A group needs the cache up to the last position any of its queries may see under the block rule, so every step
  attends to the same keys as on the whole cache (the positions cut off are never visible to it).
  Returns (the prefill's cache length, ((first input position, group size, steps, cache length), ...)): the plan's
  phases, cut where the cache grows.
  """
  k_block = layout.block_ids(np.arange(plan.cache_len))

  def needed(start, size):  # 1 + the last cache position the group's queries may attend to
    return int(np.nonzero(k_block <= layout.block_ids(np.arange(start, start + size)).max())[0].max()) + 1

  lo, hi = needed(0, plan.prefill_len), plan.cache_len
  if buckets is None:
    buckets = min(CACHE_BUCKETS, max(1, (hi - lo) // MIN_BUCKET_GROWTH)) if hi >= MIN_BUCKETED_CACHE else 1
  lengths = sorted({lo + -(-(hi - lo) * j // buckets) for j in range(1, buckets + 1)})
  fit = lambda n: next(length for length in lengths if length >= n)
  phases = []
  for start, size, steps in plan.phases:
    for step_start in range(start, start + size * steps, size):
      length = fit(needed(step_start, size))
      last = phases[-1] if phases else None
      if last and last[1] == size and last[3] == length and last[0] + size * last[2] == step_start:
        last[2] += 1
      else:
        phases.append([step_start, size, 1, length])
  return fit(lo), tuple(tuple(p) for p in phases)


def context_to_seq(spec: Spec, context_codes) -> jax.Array:
  """Context frames [B, t_ctx, h, w] -> [B, t_ctx*h*w] in sequence order (t_ctx a multiple of block_shape[0])."""
  layout = spec.layout
  t, h, w = layout.latent_shape
  tc = context_codes.shape[1]
  if tuple(context_codes.shape[2:]) != (h, w) or tc % layout.block_shape[0] or tc >= t:
    raise LayoutError(f'context codes {tuple(context_codes.shape)} must be [B, t_ctx, {h}, {w}] with t_ctx < {t} '
                      f'a multiple of block_shape[0]={layout.block_shape[0]}.')
  # Leading latent frames are the leading blocks: lay out a zero-padded grid and keep the first tokens.
  full = jnp.zeros((context_codes.shape[0], t, h, w), jnp.int32).at[:, :tc].set(context_codes)
  return layout.grid_to_seq(full)[:, :tc * h * w]
