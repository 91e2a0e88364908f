"""Attention implementations against a naive per-query loop: splash (Pallas, interpret mode on CPU), the
`jax.nn.dot_product_attention` wrapper of the cuDNN path, and splash inside a sharded training step and a generation.

Tolerances are relative to the result's scale (tests/numerics.py): fp32 attention over <= 400 keys agrees with a
float64 loop to ~3e-7 of max |out| and two fp32 paths' gradients to ~7e-7; a key more or less in the mask moves the
output by ~0.5 of its scale, a 5% error in the 1/sqrt(d) scale by ~0.1.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax import parallel
from nbp_jax import trainer
from nbp_jax.bench import train as trainer_bench
from nbp_jax.nbp import attention as attention_lib
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.layout import BlockLayout
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.parallel import sharding as sharding_lib
import numerics

OUT_RTOL = 1e-5  # fp32 against the float64 loop (measured ~3e-7)
GRAD_RTOL = 2e-5  # two fp32 implementations' gradients (measured ~7e-7)


def _naive_attention(q, k, v, q_block, k_block):
  """One query at a time: softmax over the keys whose block id is <= the query's, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros(q.shape, np.float64)
  for b in range(q.shape[0]):
    for h in range(q.shape[1]):
      for i in range(q.shape[2]):
        allowed = [j for j in range(k.shape[2]) if k_block[j] <= q_block[i]]
        scores = np.array([q[b, h, i] @ k[b, h, j] for j in allowed]) / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max())
        out[b, h, i] = (weights / weights.sum()) @ v[b, h, allowed]
  return out


def _dense_reference(q, k, v, q_block, k_block):
  """Differentiable reference with a hand-built [Tq, Tk] mask (for gradients)."""
  mask = np.array([[kb <= qb for kb in k_block] for qb in q_block])
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(mask, s, -jnp.inf)
  return jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(s, axis=-1), v)


def _qkv(seed, b, h, tq, tk, d=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((b, h, t, d)), jnp.float32) for t in (tq, tk, tk))


@pytest.mark.parametrize('case', ['training', 'prefill', 'unordered'])
def test_chunked_xla_attention_matches_a_naive_loop(case, monkeypatch):
  """The xla path with static block ids computes queries in chunks against only the keys they may see: against the
  naive loop, with chunks that do not divide the length, for a whole sequence, a prefill whose cache has unwritten
  slots (larger block ids), and block ids that do not grow with the position (the key range is then not a prefix
  of what any query sees)."""
  monkeypatch.setattr(attention_lib, 'XLA_QUERY_CHUNK', 24)
  layout = BlockLayout(latent_shape=(3, 4, 8), block_shape=(1, 1, 8), prefix_len=3)
  k_block = layout.block_ids(np.arange(layout.seq_len))  # 99 positions
  q_block = k_block[:60] if case == 'prefill' else k_block
  if case == 'unordered':
    q_block = k_block = np.random.default_rng(0).permutation(k_block)
  q, k, v = _qkv(7, 2, 2, len(q_block), len(k_block))
  out = attention_lib.attention(q, k, v, q_block, k_block)
  numerics.assert_close(out, _naive_attention(q, k, v, q_block, k_block), OUT_RTOL)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))
  chunked = lambda q, k, v: attention_lib.attention(q, k, v, q_block, k_block)
  ref_fn = lambda q, k, v: _dense_reference(q, k, v, q_block, k_block)
  grads = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(lambda *a: loss(ref_fn, *a), argnums=(0, 1, 2))(q, k, v)
  for g, r, name in zip(grads, ref_grads, 'qkv'):
    numerics.assert_close(g, r, GRAD_RTOL, err_msg=f'd{name}')


def test_chunked_xla_attention_gradients_in_bfloat16(monkeypatch):
  """The chunked path's written-out backward pass in bfloat16 inputs: its gradients against the float32 reference's
  (of the same bf16-rounded inputs), as close as autodiff of the unchunked bf16 path gets (~1e-2 of their scale)."""
  monkeypatch.setattr(attention_lib, 'XLA_QUERY_CHUNK', 24)
  block = np.repeat(np.arange(12), 8)  # 96 positions, blocks of 8
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(3, 2, 2, 96, 96))
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))
  chunked = jax.grad(loss(lambda q, k, v: attention_lib.attention(q, k, v, block, block)), argnums=(0, 1, 2))(q, k, v)
  unchunked = jax.grad(loss(lambda q, k, v: attention_lib._xla_attention(q, k, v, attention_lib.block_mask(
      block, block))), argnums=(0, 1, 2))(q, k, v)
  exact = jax.grad(loss(lambda q, k, v: _dense_reference(q, k, v, block, block)), argnums=(0, 1, 2))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  for c, u, e, name in zip(chunked, unchunked, exact, 'qkv'):
    assert c.dtype == jnp.bfloat16
    autodiff_error = float(jnp.abs(u.astype(jnp.float32) - e).max() / jnp.abs(e).max())
    numerics.assert_close(c.astype(jnp.float32), e, max(2 * autodiff_error, 1e-2), err_msg=f'd{name}')


def test_chunked_xla_attention_skips_the_keys_no_query_of_a_chunk_sees(monkeypatch):
  """With block ids growing with the position, chunk i's scores stop at the end of the last block its queries
  are in: the score matrices have the lengths of the block-causal staircase, not the whole sequence."""
  monkeypatch.setattr(attention_lib, 'XLA_QUERY_CHUNK', 32)
  block = np.repeat(np.arange(8), 16)  # 128 positions, blocks of 16
  q, k, v = _qkv(8, 1, 1, 128, 128)
  lengths = []
  real = attention_lib._xla_attention

  def spy(q, k, v, mask, **kw):
    lengths.append(k.shape[-2])
    return real(q, k, v, mask, **kw)
  monkeypatch.setattr(attention_lib, '_xla_attention', spy)
  attention_lib.attention(q, k, v, block, block)
  assert lengths == [32, 64, 96, 128]
  jax.jit(lambda q, k, v, b: attention_lib.attention(q, k, v, b, b))(q, k, v, block)  # traced ids: one product
  assert lengths[4:] == [128]


def test_cache_attention_prefill_is_chunked_over_the_keys_it_may_see(monkeypatch):
  """A prefill against the KV cache (keys stored transposed, static block ids, the cache longer than the prefill)
  computes its queries in chunks, each against the keys up to the last one it may see (none of the unwritten
  slots after the prefill): against the naive loop over the whole cache, and the lengths of the score matrices."""
  monkeypatch.setattr(attention_lib, 'XLA_QUERY_CHUNK', 24)
  layout = BlockLayout(latent_shape=(3, 4, 8), block_shape=(1, 1, 8), prefix_len=3)
  k_block = layout.block_ids(np.arange(layout.seq_len))  # a cache of 99 positions
  q_block = k_block[:59]  # the prefill writes the prefix and the first 7 blocks
  q, k, v = _qkv(9, 1, 3, 59, 99)
  lengths = []
  real = attention_lib._xla_attention

  def spy(q, k, v, mask, keys_transposed=False, **kw):
    lengths.append(k.shape[-1] if keys_transposed else k.shape[-2])
    return real(q, k, v, mask, keys_transposed=keys_transposed, **kw)
  monkeypatch.setattr(attention_lib, '_xla_attention', spy)
  out = attention_lib.cache_attention(q[0], k[0].swapaxes(1, 2), v[0], q_block, k_block)
  numerics.assert_close(out[None], _naive_attention(q, k, v, q_block, k_block), OUT_RTOL)
  last_seen = [int(np.nonzero(k_block <= q_block[i:i + 24].max())[0][-1]) + 1 for i in range(0, 59, 24)]
  assert lengths == last_seen and lengths[-1] == 59
  jax.jit(lambda q, k_t, v, b: attention_lib.cache_attention(q, k_t, v, b, k_block))(
      q[0], k[0].swapaxes(1, 2), v[0], q_block)  # traced query ids (a decoding step): one product over the cache
  assert lengths[len(last_seen):] == [99]


def test_splash_tile_pads_least_and_prefers_large_tiles():
  assert attention_lib.splash_tile(1024) == 512
  assert attention_lib.splash_tile(200) == 256  # 256 and 128 both pad by 56
  assert attention_lib.splash_tile(1281) == 128  # K600: pads to 1408 (512 would pad to 1536)
  assert attention_lib.splash_tile(768) == 256


def test_splash_training_attention_matches_a_naive_loop():
  """Whole sequence against itself: 3 prefix tokens, blocks of 16, a length that is not a whole number of tiles."""
  layout = BlockLayout(latent_shape=(3, 4, 16), block_shape=(1, 1, 16), prefix_len=3)
  t = layout.seq_len
  block = layout.block_ids(np.arange(t))
  q, k, v = _qkv(0, 2, 2, t, t)
  out = attention_lib.splash_attention(q, k, v, jnp.asarray(block), jnp.asarray(block), interpret=True)
  assert out.shape == q.shape
  numerics.assert_close(out, _naive_attention(q, k, v, block, block), OUT_RTOL)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))  # a non-trivial cotangent
  splash_fn = lambda q, k, v: attention_lib.splash_attention(q, k, v, block, block, interpret=True)
  ref_fn = lambda q, k, v: _dense_reference(q, k, v, block, block)
  grads = jax.grad(lambda *a: loss(splash_fn, *a), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(lambda *a: loss(ref_fn, *a), argnums=(0, 1, 2))(q, k, v)
  for g, r, name in zip(grads, ref_grads, 'qkv'):
    numerics.assert_close(g, r, GRAD_RTOL, err_msg=f'd{name}')


def test_splash_prefill_against_a_partly_written_cache():
  """Queries are a prefix of the cache; cache slots not written yet carry larger block ids and stay invisible."""
  layout = BlockLayout(latent_shape=(5, 4, 16), block_shape=(1, 4, 16), prefix_len=1)
  cache_len = layout.seq_len
  q_block = layout.block_ids(np.arange(130))
  k_block = layout.block_ids(np.arange(cache_len))
  q, k, v = _qkv(1, 1, 2, 130, cache_len)
  out = attention_lib.attention(q, k, v, jnp.asarray(q_block), jnp.asarray(k_block), impl='splash')
  numerics.assert_close(out, _naive_attention(q, k, v, q_block, k_block), OUT_RTOL)


def test_splash_mask_is_the_static_block_rule_padded_to_whole_tiles():
  """The static splash mask against a mask built entry by entry: real queries see keys of their block and earlier
  ones, never a padded key; padded queries see every key (no empty softmax row)."""
  layout = BlockLayout(latent_shape=(3, 4, 16), block_shape=(1, 1, 16), prefix_len=3)
  q_block = layout.block_ids(np.arange(150))
  k_block = layout.block_ids(np.arange(layout.seq_len))  # 195 keys
  mask = attention_lib.splash_block_mask(q_block, k_block, (128, 128))
  assert mask.shape == (1, 256, 256)
  expected = np.ones((256, 256), bool)
  for i in range(150):
    for j in range(256):
      expected[i, j] = j < 195 and k_block[j] <= q_block[i]
  np.testing.assert_array_equal(np.asarray(mask[0, :, :]), expected)


def test_splash_with_traced_block_ids_takes_the_xla_path(monkeypatch):
  """Block ids computed under jit are not known at trace time, so no static splash mask exists: the xla path."""
  layout = BlockLayout(latent_shape=(3, 4, 16), block_shape=(1, 1, 16), prefix_len=3)
  block = layout.block_ids(np.arange(layout.seq_len))
  q, k, v = _qkv(4, 1, 2, layout.seq_len, layout.seq_len)
  monkeypatch.setattr(attention_lib, 'splash_attention', lambda *a, **k: pytest.fail('splash with traced ids'))
  out = jax.jit(lambda q, k, v, b: attention_lib.attention(q, k, v, b, b, impl='splash'))(q, k, v, block)
  numerics.assert_close(out, _naive_attention(q, k, v, block, block), OUT_RTOL)


def test_short_query_groups_and_the_fused_wrapper_follow_the_mask():
  """A decoding step (16 queries) under impl='splash' takes the xla path; the jax.nn.dot_product_attention
  wrapper (cuDNN on GPU) is checked here with its XLA implementation for layout, scale and mask."""
  layout = BlockLayout(latent_shape=(3, 4, 16), block_shape=(1, 1, 16), prefix_len=2)
  k_block = layout.block_ids(np.arange(layout.seq_len))
  q_block = layout.block_ids(np.arange(34, 50))
  q, k, v = _qkv(2, 2, 2, 16, layout.seq_len)
  expected = _naive_attention(q, k, v, q_block, k_block)
  out = attention_lib.attention(q, k, v, jnp.asarray(q_block), jnp.asarray(k_block), impl='splash')
  numerics.assert_close(out, expected, OUT_RTOL)
  mask = attention_lib.block_mask(jnp.asarray(q_block), jnp.asarray(k_block))
  numerics.assert_close(attention_lib.fused_attention(q, k, v, mask, implementation='xla'), expected, OUT_RTOL)


def test_cudnn_and_splash_refuse_the_wrong_backend(monkeypatch):
  q, k, v = _qkv(3, 1, 1, 4, 4)
  ids = jnp.arange(4)
  with pytest.raises(ValueError, match='needs a GPU'):
    attention_lib.attention(q, k, v, ids, ids, impl='cudnn')
  with pytest.raises(ValueError, match='unknown'):
    attention_lib.attention(q, k, v, ids, ids, impl='flash')
  # Splash runs on TPU, and off it in Pallas's interpret mode (the tests above), except on a GPU, which has cudnn.
  monkeypatch.setattr(attention_lib.jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(config_lib.ConfigError, match='TPU kernel.*attention=cudnn'):
    attention_lib.attention(q, k, v, ids, ids, impl='splash')
  # cuDNN's fused attention takes half-precision inputs only (JAX raised NotImplementedError inside the step).
  with pytest.raises(config_lib.ConfigError, match="'cudnn' computes in bfloat16 or float16, not float32"):
    attention_lib.attention(q, k, v, ids, ids, impl='cudnn')


def test_splash_in_a_sharded_train_step_matches_xla():
  """The real micro NBP model on a (2, 2, 2) mesh: splash runs per shard (batch over data x fsdp, heads over
  tensor) and two optimizer steps give the losses, gradients and parameters of the reference attention.

  SGD, not Adam: Adam's division by sqrt(v) + eps turns rounding noise in a near-zero gradient entry into a step of
  ~lr. The gradients are the sensitive check: the two paths agree to ~6e-7 of each leaf's norm, while a 5% error in
  the scale moves them by ~4e-2 and a mask that lets queries see the next block by ~0.4 (the loss moves by only 1e-7
  and 1e-5 there: it alone would not notice).
  """
  def two_steps(attention):
    cfg = config_lib.task_config('demo', 'micro')
    cfg.tokenizer = config_lib.tokenizer_config('micro')  # 8x down in space, 64000 codes
    cfg.nbp.block_shape = (1, 1, 4)
    cfg.data.resolution = 64  # 5x8x8 latents: a 321-token sequence, long enough for the kernel
    cfg.data.batch_size = 8
    cfg.mesh.shape = (2, 2, 2)
    cfg.model.attention = attention
    task = dataclasses.replace(nbp_train.make_task(cfg), make_optimizer=numerics.sgd_recording_gradients)
    setup = trainer.make_setup(cfg, task, parallel.create_mesh((2, 2, 2)))
    state = trainer.init_state(cfg, task, setup)
    step = trainer.make_train_step(task, setup)
    losses, grads = [], []
    for i in range(2):
      batch = sharding_lib.make_global_batch(trainer_bench.random_batch(cfg, 8, seed=i), setup.batch_sharding)
      state, m = step(state, batch)
      losses.append(float(m['loss']))
      grads.append(jax.device_get(numerics.first_gradient(state.opt_state)))
    return losses, grads, jax.device_get(state.params)

  splash_losses, splash_grads, splash_params = two_steps('splash')
  xla_losses, xla_grads, xla_params = two_steps('xla')
  np.testing.assert_allclose(splash_losses, xla_losses, rtol=1e-5)
  for i in range(2):
    numerics.assert_trees_close(splash_grads[i], xla_grads[i], rtol=1e-4, err_msg=f'gradients of step {i + 1}')
  numerics.assert_trees_close(splash_params, xla_params, rtol=1e-5, err_msg='params')


def test_frame_prediction_with_splash_prefill_samples_what_xla_samples(monkeypatch):
  """Generation from 2 given latent frames under model.attention='splash' gives the codes of the reference
  attention. (The 133-query prefill has static positions, so its block ids are numpy and it runs the splash
  kernel, in interpret mode here; the steps' ids are traced and take the xla path.)

  Greedy, so that exact equality is robust: the two attentions' fp32 logits differ by ~1e-6, which moves an
  inverse-CDF draw over 64000 near-equal probabilities to the next code about once in 1000 draws (measured), one
  flip in 384 tokens then changing every later one; the argmax moves only where the top two logits are that close.
  """
  context = np.random.default_rng(0).integers(0, 64000, (2, 2, 8, 8)).astype(np.int32)
  codes, kernel_calls = {}, []
  kernel = attention_lib.splash_attention
  monkeypatch.setattr(attention_lib, 'splash_attention', lambda *a, **k: kernel_calls.append(1) or kernel(*a, **k))
  for impl in ('xla', 'splash'):
    cfg = config_lib.task_config('demo', 'micro')
    cfg.tokenizer = config_lib.tokenizer_config('micro')  # 8x down in space (8x8 latents), 64000 codes
    cfg.nbp.block_shape = (1, 1, 4)
    cfg.data.resolution = 64
    cfg.model.attention = impl
    cfg.sample.greedy = True
    spec = spec_from_config(cfg)
    params = trainer.jit_init(lambda r, spec=spec: nbp_train.init_params(spec, r), jax.random.key(0))
    codes[impl] = np.asarray(generator_lib.Generator(cfg, spec, params).codes(
        jax.random.key(1), labels=np.array([0, 1], np.int32), context_codes=context))
  np.testing.assert_array_equal(codes['splash'][:, :2], context)
  np.testing.assert_array_equal(codes['splash'], codes['xla'])
  assert kernel_calls, 'the prefill did not run the splash kernel'
