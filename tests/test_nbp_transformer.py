"""Transformer: cached decode == full forward, block 1x1x1 == a numpy causal LM, names and logical axes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax.nbp import attention as attention_lib
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.layout import BlockLayout
from nbp_jax.nbp.transformer import Transformer
from nbp_jax.nbp.transformer import TransformerConfig
from nbp_jax.nbp.transformer import init_cache
from nbp_jax.nbp.transformer import official_name
import numerics

V, D, H, LAYERS = 20, 32, 2, 2


def _cfg(**kw):
  base = dict(vocab_size=V, num_layers=LAYERS, num_heads=H, emb_dim=D, max_positions=64, prefix_len=2)
  base.update(kw)
  return TransformerConfig(**base)


def _params(cfg, seed=0):
  """Random params; every leaf perturbed so zero-init biases/pos_emb and unit LayerNorms are exercised too."""
  @jax.jit
  def init(rng):
    params = nn.meta.unbox(Transformer(cfg).init(rng, jnp.zeros((1, 8), jnp.int32), jnp.arange(8))['params'])
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return init(jax.random.key(seed))


def _full_logits(cfg, params, ids, layout, null_cond=None):
  fn = jax.jit(lambda p, i, b, n: Transformer(cfg).apply({'params': p}, i, b, null_cond=n))
  return fn(params, ids, layout.block_ids(np.arange(ids.shape[1])), null_cond)


# ('none' with 1x2x2 blocks is covered through generation in test_nbp_generation.) prefill: the prefix and that many
# blocks fed as one group, cut into chunks of 4 queries (as a long prefill is: attention.XLA_QUERY_CHUNK).
# model: unrolled layers ([B, T, d]) and generation's layout (transformer.decoding: unrolled, feature-major
# [d, B, T], [out, in] kernels) with the params of either training layout (scanned or unrolled layers), each
# decoding against the training forward of its params.
@pytest.mark.parametrize('first_block,block,model,prefill', [('bov', (1, 1, 3), 'decoding_of_scanned', 0),
                                                              ('hybrid', (1, 1, 3), 'unrolled', 0),
                                                              ('bov', (1, 1, 3), 'unrolled', 3),
                                                              ('hybrid', (1, 1, 3), 'decoding', 0),
                                                              ('bov', (1, 1, 3), 'decoding', 3)])
def test_cached_decode_equals_full_forward(first_block, block, model, prefill, monkeypatch):
  monkeypatch.setattr(attention_lib, 'XLA_QUERY_CHUNK', 4)
  cfg = _cfg(scan_layers=model == 'decoding_of_scanned')
  params = _params(cfg)
  layout = BlockLayout((2, 2, 6) if block == (1, 1, 3) else (2, 4, 4), block, prefix_len=2, first_block=first_block)
  s = layout.seq_len
  ids = jax.random.randint(jax.random.key(3), (2, s), 0, V)
  null_cond = jnp.array([False, True])
  full = _full_logits(cfg, params, ids, layout, null_cond)
  if model.startswith('decoding'):
    cfg, params = transformer_lib.decoding(cfg), transformer_lib.decode_params(params)

  decode = lambda *a: Transformer(cfg).apply({'params': params}, *a, null_cond=null_cond, method=Transformer.decode)
  step = jax.jit(decode)
  cache = init_cache(cfg, 2, s)
  k_block = layout.block_ids(np.arange(s))
  groups = [(0, layout.prefix_len)] + layout.groups()  # the prefix alone, then block by block
  got = []
  if prefill:  # one group, with block ids known at trace time as in generation's prefill (chunking needs them)
    size = groups[prefill + 1][0]
    q_block = layout.block_ids(np.arange(size))
    logits, cache = jax.jit(lambda x, c: decode(x, 0, c, q_block, k_block))(ids[:, :size], cache)
    got.append(logits)
    groups = groups[prefill + 1:]
  for start, size in groups:
    pos = np.arange(start, start + size)
    logits, cache = step(ids[:, start:start + size], jnp.int32(start), cache, layout.block_ids(pos), k_block)
    got.append(logits)
  # fp32 paths that sum in another order: ~5e-7 of the logits' scale apart (tests/numerics.py).
  numerics.assert_close(np.concatenate(got, axis=1), full, 1e-5)


# ---- an independent numpy forward of the official architecture (docs/design.md), plain causal mask ----

def _np_ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def _np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _np_causal_lm(params, ids, num_heads):
  p = jax.tree_util.tree_map(np.asarray, params)
  t = ids.shape[1]
  x = p['tok_emb']['embedding'][ids] + p['pos_emb'][:t]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(LAYERS):
    blk = p[f'blocks_{i}']
    h = _np_ln(x, blk['ln1'])
    dense = lambda y, q: y @ q['kernel'] + q['bias']
    split = lambda y: y.reshape(*y.shape[:2], num_heads, -1).transpose(0, 2, 1, 3)
    q, k, v = (split(dense(h, blk['attn'][n])) for n in ('query', 'key', 'value'))
    att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    att = np.where(causal, att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = x + dense(y, blk['attn']['proj'])
    h = _np_gelu(dense(_np_ln(x, blk['ln2']), blk['mlp']['fc1']))
    x = x + dense(h, blk['mlp']['fc2'])
  return _np_ln(x, p['ln_f']) @ p['head']['kernel']


def test_block_1x1x1_is_a_plain_causal_lm():
  cfg = _cfg(scan_layers=False, prefix_len=0)
  params = _params(cfg, seed=4)
  layout = BlockLayout((1, 3, 4), (1, 1, 1), first_block='none')  # NTP: block ids are the positions
  ids = jax.random.randint(jax.random.key(5), (2, layout.seq_len), 0, V)
  block_ids = layout.block_ids(np.arange(layout.seq_len))
  np.testing.assert_array_equal(np.asarray(attention_lib.block_mask(block_ids, block_ids)),
                                np.tril(np.ones((11, 11), bool)))
  got = _full_logits(cfg, params, ids, layout)
  numerics.assert_close(got, _np_causal_lm(params, np.asarray(ids), H), 1e-5)  # float64 reference; ~4e-7


def test_scan_and_unrolled_layers_agree():
  cfg_u = _cfg(scan_layers=False)
  params_u = _params(cfg_u, seed=6)
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[params_u[f'blocks_{i}'] for i in range(LAYERS)])
  params_s = {k: v for k, v in params_u.items() if not k.startswith('blocks_')} | {'blocks': stacked}
  layout = BlockLayout((1, 2, 6), (1, 1, 3), prefix_len=2)
  ids = jax.random.randint(jax.random.key(7), (1, layout.seq_len), 0, V)
  numerics.assert_close(_full_logits(_cfg(scan_layers=True), params_s, ids, layout),
                        _full_logits(cfg_u, params_u, ids, layout), 1e-5)


def test_generation_parameter_layout_gives_the_same_model():
  """decode_params: layers unrolled and every kernel stored [out, in]; the decoding config on them computes the
  training forward's logits, the layout matches what that config initialises, and a second conversion is a no-op."""
  cfg = _cfg(scan_layers=True)
  params = _params(cfg, seed=10)
  decoded = transformer_lib.decode_params(params)
  dcfg = transformer_lib.decoding(cfg)
  assert not dcfg.scan_layers and dcfg.feature_major
  fresh = jax.eval_shape(lambda: nn.meta.unbox(Transformer(dcfg).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.arange(4))['params']))
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(decoded)
  assert [x.shape for x in jax.tree_util.tree_leaves(fresh)] == [x.shape for x in jax.tree_util.tree_leaves(decoded)]
  np.testing.assert_array_equal(decoded['head']['kernel_t'], np.asarray(params['head']['kernel']).T)
  np.testing.assert_array_equal(decoded['blocks_1']['mlp']['fc1']['kernel_t'],
                                np.asarray(params['blocks']['mlp']['fc1']['kernel'][1]).T)
  again = transformer_lib.decode_params(decoded)
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(decoded)))
  layout = BlockLayout((1, 2, 6), (1, 1, 3), prefix_len=2)
  ids = jax.random.randint(jax.random.key(11), (2, layout.seq_len), 0, V)
  numerics.assert_close(_full_logits(dcfg, decoded, ids, layout), _full_logits(cfg, params, ids, layout), 1e-5)


def test_null_condition_replaces_the_prefix():
  cfg = _cfg()
  params = _params(cfg, seed=8)
  layout = BlockLayout((1, 1, 6), (1, 1, 3), prefix_len=2)
  ids = jax.random.randint(jax.random.key(9), (1, layout.seq_len), 0, V)
  other = ids.at[:, :2].set((ids[:, :2] + 1) % V)  # another class prefix
  both = jnp.concatenate([ids, other])
  cond = _full_logits(cfg, params, both, layout, jnp.array([False, False]))
  null = _full_logits(cfg, params, both, layout, jnp.array([True, True]))
  assert not np.allclose(cond[0], cond[1])  # the prefix matters ...
  numerics.assert_close(null[0], null[1], 1e-6)  # ... unless it is replaced by the null embedding
  # ... whose rows are what the prefix positions then see: the same logits as a prefix of two ids found nowhere
  # else in the sequence whose token embeddings are set to those rows.
  ids = jnp.concatenate([jnp.array([[V - 2, V - 1]]), ids[:, 2:] % (V - 2)], axis=1)
  table = params['tok_emb']['embedding'].at[V - 2:].set(params['uncond_embedding'])
  as_tokens = dict(params, tok_emb={'embedding': table})
  numerics.assert_close(_full_logits(cfg, params, ids, layout, jnp.array([True])),
                        _full_logits(cfg, as_tokens, ids, layout), 1e-6)


def test_params_have_official_names_and_logical_axes():
  cfg = _cfg(scan_layers=False)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                                        jnp.arange(4))['params'])
  rules = {name for name, _ in config_lib.DEFAULT_AXIS_RULES}
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  names = {}
  for path, leaf in flat:
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) - {None} <= rules, (path, leaf.names)
    names[official_name(tuple(k.key for k in path))] = leaf.value.shape
  expected = {'transformer.tok_emb.weight', 'transformer.pos_emb', 'transformer.uncond_embedding',
              'transformer.ln_f.weight', 'transformer.ln_f.bias', 'transformer.head.weight'}
  for i in range(LAYERS):
    for n in ('ln1', 'ln2', 'attn.key', 'attn.query', 'attn.value', 'attn.proj', 'mlp.0', 'mlp.2'):
      expected |= {f'transformer.blocks.{i}.{n}.weight', f'transformer.blocks.{i}.{n}.bias'}
  assert set(names) == expected
  assert names['transformer.blocks.0.mlp.0.weight'] == (D, 4 * D)  # Flax [in, out]: transpose torch's [out, in]
  assert names['transformer.pos_emb'] == (64, D) and names['transformer.head.weight'] == (D, V)
  scanned = jax.eval_shape(lambda: Transformer(_cfg()).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                                            jnp.arange(4))['params'])
  q = scanned['blocks']['attn']['query']['kernel']
  assert q.names == ('layers', 'embed', 'heads') and q.value.shape == (LAYERS, D, D)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = _cfg(dtype='bfloat16')
  boxed = jax.jit(lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32), jnp.arange(4))['params'])(
      jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.meta.unbox(boxed)))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(init_cache(cfg, 1, 8)))
  # The same params and ids in float32 and in bfloat16 compute: the same logits to bfloat16's precision (8 bits of
  # mantissa over a 2-layer forward: ~1e-2 of their scale; a wrong cast or a dropped term moves them by far more).
  params = _params(_cfg(), seed=3)
  layout = BlockLayout((1, 1, 6), (1, 1, 3), prefix_len=2)
  ids = jax.random.randint(jax.random.key(4), (2, layout.seq_len), 0, V)
  logits = _full_logits(cfg, params, ids, layout)
  assert logits.dtype == jnp.float32
  numerics.assert_close(logits, _full_logits(_cfg(), params, ids, layout), 3e-2)


@pytest.mark.parametrize('dtype, rtol', [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_exact_gelu_gradient_is_autodiff_of_the_erf_gelu(dtype, rtol):
  """The MLP's GELU keeps only its input for the backward pass: its values and gradients against autodiff of
  nn.gelu(approximate=False) in float32, over the range where the slope goes from 0 through its 1.13 peak to 1."""
  x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32).astype(dtype)
  ours = jax.vmap(jax.grad(lambda v: transformer_lib.exact_gelu(v).astype(jnp.float32)))(x)
  reference = jax.vmap(jax.grad(lambda v: nn.gelu(v, approximate=False)))(x.astype(jnp.float32))
  assert ours.dtype == dtype
  numerics.assert_close(ours.astype(jnp.float32), reference, rtol)
  numerics.assert_close(transformer_lib.exact_gelu(x).astype(jnp.float32),
                        nn.gelu(x.astype(jnp.float32), approximate=False), rtol)
