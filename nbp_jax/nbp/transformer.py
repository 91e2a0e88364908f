"""Decoder-only transformer (Flax linen) with the official NBP architecture and a preallocated KV cache.

Pre-LN blocks (x += Attn(LN1(x)); x += MLP(LN2(x))), separate query/key/value/proj Dense layers with bias, exact
(erf) GELU MLP of width 4d, learned absolute position embeddings (zero-init), final LayerNorm and an untied
bias-free head; dropout on the embeddings and both residual branches; N(0, 0.02) init (docs/design.md).

Parameter names follow the official state dict so the import is a rename plus a transpose of Linear weights:

  official (under `transformer.`)          here (`params/...`)
  tok_emb.weight [V, d]                    tok_emb/embedding [V, d]
  pos_emb [1, 5120, d]                     pos_emb [5120, d]
  uncond_embedding [P, d]                  uncond_embedding [P, d]            (only with a class prefix)
  blocks.{i}.ln1/ln2.{weight,bias}         blocks/ln1/{scale,bias}            ([layers, ...] when scanned;
  blocks.{i}.attn.{query,key,value,proj}   blocks/attn/{query,...}/{kernel,bias}  blocks_{i}/... otherwise)
  blocks.{i}.mlp.0.{weight,bias}           blocks/mlp/fc1/{kernel,bias}
  blocks.{i}.mlp.2.{weight,bias}           blocks/mlp/fc2/{kernel,bias}
  ln_f.{weight,bias}                       ln_f/{scale,bias}
  head.weight [V, d]                       head/kernel [d, V]

(`official_name` maps a path to its key.) Every parameter carries logical axis names from
config_lib.DEFAULT_AXIS_RULES.

The model is layout-agnostic: callers pass block ids for queries and keys and attention applies
`key_block <= query_block` (attention.py). `__call__` is the training forward (whole sequence, no cache);
`decode` runs a group of new positions at an offset against a preallocated KV cache (KVCache: per layer, keys
[B*heads, head_dim, max_len], values [B*heads, max_len, head_dim]), writing their K/V with
`lax.dynamic_update_slice` (the prefill is a decode call at offset 0).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from nbp_jax.nbp import attention as attention_lib

_INIT = nn.initializers.normal(stddev=0.02)
_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static transformer hyperparameters (hashable: usable as a jit static argument)."""
  vocab_size: int
  num_layers: int
  num_heads: int
  emb_dim: int
  mlp_ratio: int = 4
  max_positions: int = 5120
  prefix_len: int = 0  # rows of the learned null-condition embedding (0 = no class prefix)
  dropout: float = 0.0
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'
  attention: str = 'xla'
  scan_layers: bool = True
  remat: bool = False
  # Initial value of pos_emb: 'zeros' (the release) or 'grid' (sinusoids of each position's latent (t, h, w),
  # set by nbp.train.init_params from the block layout). Only the start differs: the parameter is the same.
  pos_emb_init: str = 'zeros'
  # Generation's layout (`decoding`, `decode_params`): activations [d, B, T] from the embedding to the head, and
  # kernels stored [out, in] as 'kernel_t' (the head [V, d]), so that every dense layer is kernel_t @ x, XLA:CPU's
  # fastest form of a few-row matmul (the 187M bench model's 12 layers + head, chained, 2-core CPU: 16 rows
  # 64.6 ms with [in, out] kernels, 52.9 with [out, in] ones on [T, d] rows; feature-major 44.2 against 53.3 the
  # same day; 1 row 26.2, 24.4, then unchanged). Training and checkpoints keep [B, T, d] and [in, out] 'kernel's.
  feature_major: bool = False

  @property
  def head_dim(self) -> int:
    return self.emb_dim // self.num_heads


class KVCache(NamedTuple):
  """Preallocated keys and values in the compute dtype, per layer, batch and heads merged into one leading axis:
  keys transposed [B*heads, head_dim, max_len] (the scores are then a plain [q, d] x [d, len] matmul per head; with
  keys [len, d] XLA:CPU transposes the whole cache of a layer on every step), values [B*heads, max_len, head_dim]
  (one batch axis and no size-1 one: XLA then updates the buffer in place and hands the same buffer to the
  attention matmuls; with [B, heads, ...] and B = 1 it fused the update into each user separately and copied the
  layer's cache for them on every step). A tuple of per-layer arrays each, as decoding runs unrolled layers: a layer
  writes and reads its own buffer in place (a scan over layers with one stacked cache in its carry copied the
  cache, or slices of it, on every step: issue #16)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]


def init_cache(cfg: TransformerConfig, batch_size: int, length: int) -> KVCache:
  """Zero cache for `length` positions, one buffer per layer."""
  k_shape = (batch_size * cfg.num_heads, cfg.head_dim, length)
  v_shape = (batch_size * cfg.num_heads, length, cfg.head_dim)
  return KVCache(tuple(jnp.zeros(k_shape, cfg.dtype) for _ in range(cfg.num_layers)),
                 tuple(jnp.zeros(v_shape, cfg.dtype) for _ in range(cfg.num_layers)))


def cache_length(cache: KVCache) -> int:
  """Positions the cache holds."""
  return cache.v[0].shape[-2]


def grow_cache(cache: KVCache, length: int) -> KVCache:
  """The cache padded with zeros to `length` positions (the same cache when it already holds that many)."""
  extra = length - cache_length(cache)
  if extra == 0:
    return cache

  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)

  # Positions: the keys' last axis, the values' second to last.
  return KVCache(tuple(pad(k, -1) for k in cache.k), tuple(pad(v, -2) for v in cache.v))


def decoding(cfg: TransformerConfig) -> TransformerConfig:
  """The same model as generation runs it: one module (and parameter subtree `blocks_{i}`) per layer, activations
  feature-major and kernels stored transposed (TransformerConfig.feature_major); its params come from
  `decode_params`."""
  return dataclasses.replace(cfg, scan_layers=False, remat=False, feature_major=True)


def decode_params(params) -> dict:
  """Params of the training layout (scanned or unrolled, boxed or not) -> those of `decoding(cfg)`: layers unrolled
  (`unstack_layers`) and every kernel [in, out] stored as 'kernel_t' [out, in]. Params already in that layout are
  returned as they are, so callers may convert once (Generator.load) or let `generation.generate` do it."""
  params = unstack_layers(nn.meta.unbox(params))
  if 'kernel_t' in params['head']:
    return params

  def transpose(tree):
    if not isinstance(tree, dict):
      return tree
    return {('kernel_t' if k == 'kernel' else k): (jnp.swapaxes(v, -1, -2) if k == 'kernel' else transpose(v))
            for k, v in tree.items()}

  return transpose(params)


def unstack_layers(params) -> dict:
  """Scanned params ({'blocks': leaves [layers, ...], ...}) -> unrolled ones ({'blocks_0': ..., 'blocks_1': ...});
  unrolled params are returned as they are.

  Generation runs the layers unrolled: in a scan over layers, XLA slices each layer's weights (and KV cache) out of
  the stacked arrays as copies on every decoding step, which doubles what a memory-bound step reads.
  """
  if 'blocks' not in params:
    return params
  out = {k: v for k, v in params.items() if k != 'blocks'}
  num_layers = jax.tree_util.tree_leaves(params['blocks'])[0].shape[0]
  for i in range(num_layers):
    out[f'blocks_{i}'] = jax.tree_util.tree_map(lambda x, i=i: x[i], params['blocks'])
  return out


def grid_position_table(coords, extents: tuple[int, int, int], emb_dim: int, max_positions: int,
                        scale: float = 0.02) -> np.ndarray:
  """Sinusoids of latent grid coordinates, as an initial value for `pos_emb`.

  Args:
    coords: [S, 3] int (t, h, w) per input position; rows with a negative t (the prefix) get zeros.
    extents: the grid's (t, h, w) sizes; each axis gets emb_dim // 6 frequencies, wavelengths from 2 to 4x its size.
    emb_dim: d. max_positions: rows of the table (positions past S are zeros, as the zero init).
    scale: root-mean-square of an entry (0.02: the token embeddings' init).
  Returns:
    float32 [max_positions, emb_dim].
  """
  coords = np.asarray(coords, np.float64)
  per_axis = emb_dim // 6
  table = np.zeros((max_positions, emb_dim), np.float32)
  if per_axis == 0:
    return table
  columns = []
  for axis, size in enumerate(extents):
    wavelengths = 2.0 * (2.0 * max(size, 1)) ** (np.arange(per_axis) / max(per_axis - 1, 1))
    angle = 2 * np.pi * coords[:, axis:axis + 1] / wavelengths[None]
    columns += [np.sin(angle), np.cos(angle)]
  rows = np.concatenate(columns, axis=1) * scale * np.sqrt(2.0)
  rows[coords[:, 0] < 0] = 0.0
  table[:len(rows), :rows.shape[1]] = rows
  return table


def _dense(features: int, axes: tuple[str, str], cfg: TransformerConfig, name: str) -> nn.Module:
  if cfg.feature_major:
    return FeatureMajorDense(features, axes, cfg, name=name)
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(_INIT, axes),
                  bias_init=nn.with_logical_partitioning(_ZEROS, (axes[1],)))


def kernel_times(kernel_t: jax.Array, x: jax.Array, preferred_element_type=None) -> jax.Array:
  """A kernel stored [out, in] times feature-major x [in, ...] -> [out, ...] (generation's layout)."""
  return lax.dot_general(kernel_t, x, (((1,), (0,)), ((), ())), preferred_element_type=preferred_element_type)


class FeatureMajorDense(nn.Module):
  """nn.Dense on feature-major x [in, ...] -> [out, ...], its kernel stored [out, in] as 'kernel_t'
  (TransformerConfig.feature_major says why)."""
  features: int
  axes: tuple[str, str]  # logical names of the [in, out] kernel, as nn.Dense's
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param('kernel_t', nn.with_logical_partitioning(_INIT, self.axes[::-1]),
                        (self.features, x.shape[0]), cfg.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(_ZEROS, (self.axes[1],)), (self.features,),
                      cfg.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=cfg.dtype)
    return kernel_times(kernel, x) + bias.reshape(-1, *(1,) * (x.ndim - 1))


def _layer_norm(cfg: TransformerConfig, name: str | None = None) -> nn.LayerNorm:
  # PyTorch's default eps, as the released checkpoints were trained with it.
  feature_axis = 0 if cfg.feature_major else -1
  return nn.LayerNorm(epsilon=1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                      reduction_axes=feature_axis, feature_axes=feature_axis,
                      scale_init=nn.with_logical_partitioning(_ONES, ('embed',)),
                      bias_init=nn.with_logical_partitioning(_ZEROS, ('embed',)))


class SelfAttention(nn.Module):
  """Multi-head self-attention; with a cache, writes this group's K/V at `offset` and attends to the cache.
  x [B, T, d], or [d, B, T] feature-major."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, layer, q_block, k_block, offset, cache: KVCache | None):
    cfg = self.cfg
    nh, hd = cfg.num_heads, cfg.head_dim
    if cfg.feature_major:
      _, b, t = x.shape
      heads = lambda y: y.reshape(nh, hd, b, t).transpose(2, 0, 3, 1)  # [H*D, B, T] -> [B, H, T, D]
      merge = lambda y: y.transpose(1, 3, 0, 2).reshape(cfg.emb_dim, b, t)  # [B, H, T, D] -> [H*D, B, T]
    else:
      b, t, _ = x.shape
      heads = lambda y: y.reshape(b, t, nh, hd).transpose(0, 2, 1, 3)  # [B, T, H*D] -> [B, H, T, D]
      merge = lambda y: y.transpose(0, 2, 1, 3).reshape(b, t, cfg.emb_dim)
    q = heads(_dense(cfg.emb_dim, ('embed', 'heads'), cfg, 'query')(x))
    k = heads(_dense(cfg.emb_dim, ('embed', 'heads'), cfg, 'key')(x))
    v = heads(_dense(cfg.emb_dim, ('embed', 'heads'), cfg, 'value')(x))
    if cache is None:
      y = attention_lib.attention(q, k, v, q_block, k_block, impl=cfg.attention)
    else:
      # The cache's layouts (KVCache): keys [B*H, D, T], values [B*H, T, D].
      bh = b * nh
      k_t = k.transpose(0, 1, 3, 2).reshape(bh, hd, t)
      v = v.reshape(bh, t, hd)
      # This layer's own buffers, updated in place.
      k_t = lax.dynamic_update_slice(cache.k[layer], k_t.astype(cache.k[layer].dtype), (0, 0, offset))
      v = lax.dynamic_update_slice(cache.v[layer], v.astype(cache.v[layer].dtype), (0, offset, 0))
      cache = KVCache(cache.k[:layer] + (k_t,) + cache.k[layer + 1:], cache.v[:layer] + (v,) + cache.v[layer + 1:])
      y = attention_lib.cache_attention(q.reshape(bh, t, hd), k_t, v, q_block, k_block,
                                        impl=cfg.attention).reshape(b, nh, t, hd)
    return _dense(cfg.emb_dim, ('heads', 'embed'), cfg, 'proj')(merge(y)), cache


@jax.custom_vjp
def exact_gelu(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU, as torch.nn.GELU() and `nn.gelu(x, approximate=False)`, whose backward pass keeps only x
  (autodiff of nn.gelu keeps x, its erfc and more: [B, T, 4d] arrays that a scanned model copies into its stacked
  residuals, layer by layer; the 187M bench model's training step on a 2-core CPU, two alternating rounds: 15.13 /
  15.30 -> 15.03 / 14.98 s)."""
  return nn.gelu(x, approximate=False)


def _exact_gelu_forward(x):
  return exact_gelu(x), x


def _exact_gelu_backward(x, g):
  x32 = x.astype(jnp.float32)
  # d/dx [x Phi(x)] = Phi(x) + x phi(x), Phi the standard normal CDF and phi its density.
  slope = 0.5 * lax.erfc(-x32 * np.sqrt(0.5)) + x32 * jnp.exp(-0.5 * x32 * x32) / np.sqrt(2 * np.pi)
  return ((g.astype(jnp.float32) * slope).astype(g.dtype),)


exact_gelu.defvjp(_exact_gelu_forward, _exact_gelu_backward)


class MLP(nn.Module):
  """fc1 (d -> mlp_ratio * d), exact GELU, fc2 (back to d), on [B, T, d] or feature-major [d, B, T]."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = _dense(cfg.mlp_ratio * cfg.emb_dim, ('embed', 'mlp'), cfg, 'fc1')(x)
    h = exact_gelu(h)
    return _dense(cfg.emb_dim, ('mlp', 'embed'), cfg, 'fc2')(h)


class StaticBlockIds:
  """Block ids [T] known at trace time, hashable, so that they stay numpy inside a rematerialised layer (an argument
  of nn.remat's static_argnums): attention's chunked path and the splash kernel need them static
  (attention.is_static); traced, every layer would attend over the whole [T, T] mask."""

  def __init__(self, ids):
    self.ids = np.asarray(ids)

  def __hash__(self):
    return hash((self.ids.shape, self.ids.tobytes()))

  def __eq__(self, other):
    return isinstance(other, StaticBlockIds) and np.array_equal(self.ids, other.ids)


class Block(nn.Module):
  """One pre-LN block. carry = (x [B, T, d] (or [d, B, T] feature-major), cache or None); returns (carry, None) so
  it can be scanned."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, carry, layer, q_block, k_block, offset, deterministic: bool):
    cfg = self.cfg
    x, cache = carry
    q_block, k_block = (b.ids if isinstance(b, StaticBlockIds) else b for b in (q_block, k_block))
    h, cache = SelfAttention(cfg, name='attn')(_layer_norm(cfg, 'ln1')(x), layer, q_block, k_block, offset, cache)
    x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    h = MLP(cfg, name='mlp')(_layer_norm(cfg, 'ln2')(x))
    x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    return (x, cache), None


class Head(nn.Module):
  """Untied, bias-free output projection: x [B, T, d] (or [d, B, T] feature-major) -> logits [B, T, V] float32;
  `vocab_slice` computes only some columns (e.g. the video ids)."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, vocab_slice: tuple[int, int] | None = None):
    cfg = self.cfg
    lo, hi = vocab_slice or (0, cfg.vocab_size)
    if cfg.feature_major:  # x [d, B, T]
      kernel = self.param('kernel_t', nn.with_logical_partitioning(_INIT, ('vocab', 'embed')),
                          (cfg.vocab_size, cfg.emb_dim), cfg.param_dtype)[lo:hi]
      logits = kernel_times(kernel.astype(cfg.dtype), x.astype(cfg.dtype), preferred_element_type=jnp.float32)
      return logits.transpose(1, 2, 0)
    kernel = self.param('kernel', nn.with_logical_partitioning(_INIT, ('embed', 'vocab')),
                        (cfg.emb_dim, cfg.vocab_size), cfg.param_dtype)[:, lo:hi]
    return jnp.einsum('btd,dv->btv', x.astype(cfg.dtype), kernel.astype(cfg.dtype),
                      preferred_element_type=jnp.float32)


class Transformer(nn.Module):
  """The NBP transformer; see the module docstring for the two entry points."""
  cfg: TransformerConfig

  def setup(self):
    cfg = self.cfg
    self.tok_emb = nn.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            embedding_init=nn.with_logical_partitioning(_INIT, ('vocab', 'embed')))
    self.pos_emb = self.param('pos_emb', nn.with_logical_partitioning(_ZEROS, ('length', 'embed')),
                              (cfg.max_positions, cfg.emb_dim), cfg.param_dtype)
    if cfg.prefix_len:
      self.uncond_embedding = self.param('uncond_embedding', nn.with_logical_partitioning(_INIT, (None, 'embed')),
                                         (cfg.prefix_len, cfg.emb_dim), cfg.param_dtype)
    block = Block
    if cfg.remat:
      # Static for the rematerialised function (arguments counting self): the block ids (3, 4; as StaticBlockIds,
      # which _blocks passes) and deterministic (6), a Python bool.
      block = nn.remat(Block, prevent_cse=not cfg.scan_layers, static_argnums=(3, 4, 6))
    if cfg.scan_layers:
      # One compiled layer body for any depth; params get a leading 'layers' axis.
      self.blocks = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})(cfg)
    else:
      self.blocks = [block(cfg) for _ in range(cfg.num_layers)]
    self.ln_f = _layer_norm(cfg)
    self.head = Head(cfg)
    self.drop = nn.Dropout(cfg.dropout)

  def _embed(self, ids, offset, null_cond, deterministic):
    cfg = self.cfg
    t = ids.shape[1]
    x = self.tok_emb(ids)
    if cfg.prefix_len and null_cond is not None:
      # Condition dropout / the unconditional half of CFG: prefix rows -> the learned null embedding.
      pos = offset + jnp.arange(t)
      uncond = jnp.take(self.uncond_embedding, jnp.clip(pos, 0, cfg.prefix_len - 1), axis=0).astype(x.dtype)
      use = null_cond[:, None, None] & (pos < cfg.prefix_len)[None, :, None]
      x = jnp.where(use, uncond[None], x)
    x = x + lax.dynamic_slice_in_dim(self.pos_emb, offset, t, axis=0).astype(x.dtype)[None]
    if cfg.feature_major:
      x = x.transpose(2, 0, 1)  # [d, B, T]
    return self.drop(x, deterministic=deterministic)

  def _positions(self, x, start: int, stop: int):
    """Positions [start, stop) of the activations (axis 1, or the last one feature-major)."""
    return x[..., start:stop] if self.cfg.feature_major else x[:, start:stop]

  def _blocks(self, x, q_block, k_block, offset, cache, deterministic):
    cfg = self.cfg
    if cfg.remat:
      if not (attention_lib.is_static(q_block) and attention_lib.is_static(k_block)):
        raise ValueError('model.remat needs block ids known at trace time (numpy, as the training forward passes '
                         'them); pass layout.block_ids(np.arange(T)), or set model.remat=False.')
      q_block, k_block = StaticBlockIds(q_block), StaticBlockIds(k_block)
    if cfg.scan_layers:
      (x, cache), _ = self.blocks((x, cache), jnp.arange(cfg.num_layers), q_block, k_block, offset, deterministic)
    else:
      for i, blk in enumerate(self.blocks):
        (x, cache), _ = blk((x, cache), i, q_block, k_block, offset, deterministic)
    return x, cache

  def __call__(self, ids, block_ids, *, null_cond=None, train: bool = False,
               out_slice: tuple[int, int] | None = None, vocab_slice: tuple[int, int] | None = None):
    """Training forward over a whole sequence.

    Args:
      ids: [B, T] int32 input ids (positions 0..T-1).
      block_ids: [T] int32 block id of each position (prefix -1); position q sees k iff block[k] <= block[q].
      null_cond: [B] bool, rows whose prefix is replaced by the null embedding (None = none).
      train: enables dropout (needs the 'dropout' rng).
      out_slice: (start, stop) positions to project to logits (default all).
      vocab_slice: (lo, hi) head columns to compute (default all V).
    Returns:
      logits [B, stop - start, hi - lo] float32.
    """
    x = self._embed(ids, 0, null_cond, not train)
    x, _ = self._blocks(x, block_ids, block_ids, 0, None, not train)
    if out_slice is not None:
      x = self._positions(x, *out_slice)
    return self.head(self.ln_f(x), vocab_slice)

  def decode(self, ids, offset, cache: KVCache, q_block, k_block, *, null_cond=None, last: int | None = None,
             vocab_slice: tuple[int, int] | None = None):
    """Prefill or one decoding step: run `ids` at positions offset.. against the cache (no dropout).

    Args:
      ids: [B, g] int32 new ids at input positions offset..offset+g-1.
      offset: int32 scalar (may be traced).
      cache: KVCache with max_len = len(k_block); this group's K/V are written at `offset`.
      q_block: [g] int32 block ids of the new positions; k_block: [max_len] block ids of the cache positions.
      null_cond: [B] bool (see __call__).
      last: project only the last `last` positions (default all g).
      vocab_slice: (lo, hi) head columns.
    Returns:
      (logits [B, last, hi - lo] float32, updated cache).
    """
    if self.cfg.scan_layers:
      raise ValueError('Transformer.decode runs unrolled layers (one KV cache buffer each): use '
                       'transformer.decoding(cfg) and decode_params(params), as generation.generate does.')
    x = self._embed(ids, offset, null_cond, True)
    x, cache = self._blocks(x, q_block, k_block, offset, cache, True)
    if last is not None:
      x = self._positions(x, ids.shape[1] - last, ids.shape[1])
    return self.head(self.ln_f(x), vocab_slice), cache


def official_name(path: tuple[str, ...]) -> str:
  """Flax param path (without the leading 'params') -> official state-dict key (scanned: '{i}' for the layer).

  E.g. ('blocks', 'attn', 'query', 'kernel') -> 'transformer.blocks.{i}.attn.query.weight' (transpose it).
  """
  leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'embedding': 'weight'}
  head, rest = path[0], list(path[1:])
  if head == 'pos_emb' or head == 'uncond_embedding':
    return f'transformer.{head}'
  if head.startswith('blocks'):
    layer = head.split('_')[1] if '_' in head else '{i}'
    if rest[:1] == ['mlp']:
      rest = ['mlp', {'fc1': '0', 'fc2': '2'}[rest[1]]] + rest[2:]
    return '.'.join(['transformer', 'blocks', layer] + rest[:-1] + [leaf[rest[-1]]])
  return '.'.join(['transformer', head] + rest[:-1] + [leaf[rest[-1]]])
