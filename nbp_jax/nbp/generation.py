"""Block decoding: one `jax.jit` that prefills the prefix (+ given context) and loops over blocks.

The schedule (`BlockLayout.decode_plan`) is static: a prefill whose last group's outputs give the first sampled
group, then at most two `lax.fori_loop`s (hybrid: token-by-token steps, then blocks of L). Each step feeds the
ids of the group at its fixed input positions (the tokens just sampled, or the hybrid placeholder block), writes
their K/V into the preallocated cache at that offset, and samples the L tokens they predict in parallel.
Static shapes throughout: no Python loop over steps, no growing arrays, one compilation per (spec, shapes).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from nbp_jax.nbp import sampling as sampling_lib
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.layout import LayoutError
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.transformer import Transformer
from nbp_jax.nbp.transformer import init_cache

Sampling = sampling_lib.Sampling
_DEFAULT_SAMPLING = Sampling()


@functools.partial(jax.jit, static_argnames=('spec', 'num_blocks', 'batch_size'))
def generate(spec: Spec, params, rng: jax.Array, sampling: Sampling = _DEFAULT_SAMPLING, *,
             labels: jax.Array | None = None, context: jax.Array | None = None,
             num_blocks: int | None = None, batch_size: int | None = None, first_round=0) -> jax.Array:
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
  cache = init_cache(cfg, rows, plan.cache_len)
  k_block = layout.block_ids(np.arange(plan.cache_len))
  model = Transformer(cfg)
  shift = layout.target_offset - layout.prefix_len  # input position q predicts video index q + shift

  def run(z, cache, start, size, last, key):
    """Feeds input positions [start, start+size); samples the video tokens predicted by the last `last`."""
    # The prefill's positions are static (start 0): numpy block ids let attention use a static mask (the splash
    # kernel on TPU); the steps' positions are traced.
    pos = start + (np.arange(size) if isinstance(start, int) else jnp.arange(size))
    zz = jnp.concatenate([z, z]) if sampling.use_cfg else z
    ids = layout.input_ids_at(pos, prefix, zz, vocab)
    logits, cache = model.apply({'params': params}, ids, start, cache, layout.block_ids(pos), k_block,
                                null_cond=null_cond, last=last, vocab_slice=vocab.video_slice,
                                method=Transformer.decode)
    if sampling.use_cfg:
      logits = sampling_lib.guide(logits, sampling.cfg_scale)
    tokens = sampling_lib.sample(key, logits, sampling)
    return lax.dynamic_update_slice(z, tokens, (0, start + size - last + shift)), cache

  z, cache = run(z, cache, 0, plan.prefill_len, plan.first_group, jax.random.fold_in(rng, first_round))
  done = 1
  for start, size, steps in plan.phases:
    def body(i, carry, start=start, size=size, done=done):
      return run(*carry, start + i * size, size, size, jax.random.fold_in(rng, first_round + done + i))
    z, cache = lax.fori_loop(0, steps, body, (z, cache))
    done += steps
  return z


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
