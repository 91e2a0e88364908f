"""Block-causal attention behind one function, for training and decoding alike.

The mask is never passed around as an [T, T] tensor: each query and key carries a block id (prefix -1) and a
query may attend to a key iff `key_block <= query_block` (docs/design.md, the block rule). Training passes the same
positions for queries and keys; decoding passes the new group's positions (a query offset) against the cache's.
Keys not yet written to the cache have larger block ids than any query, so they are masked by the same rule.

Implementations (config `model.attention`):
  xla     materialised mask, scores in float32; the reference, runs everywhere. With static block ids (training, a
          prefill) and at least 2 * XLA_QUERY_CHUNK queries, the queries go in chunks, each against only the keys
          some query of the chunk may see (a prefix, for block ids that grow with the position): the scores above
          the block diagonal, about half of them, are never computed.
  cudnn   `jax.nn.dot_product_attention(implementation='cudnn')`, the fused GPU kernel (bf16/fp16 inputs).
  splash  Pallas splash attention (TPU). The block ids are static (numpy: they follow from the layout), so the mask
          is a static splash `NumpyMask` whose tiles are classified (empty / full / partial) at trace time, as
          MaxText does with its mask classes; the kernel skips the empty tiles (above the block diagonal: about half
          of them in training). Sequences are padded to whole tiles. Steps with fewer than SPLASH_MIN_QUERIES queries
          (decoding one block against the cache) and traced block ids use the xla path. Off TPU the kernel runs in
          Pallas interpret mode (CPU tests only).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
import jax.numpy as jnp
import numpy as np

from nbp_jax import config_lib
from nbp_jax.parallel import sharding as sharding_lib

SPLASH_TILES = (512, 256, 128)  # candidate tile lengths (queries and keys); the smallest padding wins, then the larger
SPLASH_MIN_QUERIES = 128
_PAD_BLOCK = np.iinfo(np.int32).max  # block id of padding: no real query sees a padded key
# Queries per chunk of the xla path with static block ids. Measured on a 2-core CPU (B=2, 12 heads, 1264 positions,
# head_dim 64, blocks of 16, forward + backward): whole [Tq, Tk] scores 0.43 s, chunks of 128 0.22 s, 256 0.25 s,
# 512 0.26 s.
XLA_QUERY_CHUNK = 128


def block_mask(q_block: jax.Array, k_block: jax.Array) -> jax.Array:
  """q_block [Tq], k_block [Tk] int32 -> bool [Tq, Tk] (True = may attend)."""
  return k_block[None, :] <= q_block[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_block: jax.Array, k_block: jax.Array, *,
              impl: str = 'xla') -> jax.Array:
  """Scaled dot-product attention with the block-causal mask.

  Args:
    q: [B, H, Tq, D] queries (compute dtype).
    k, v: [B, H, Tk, D] keys and values (e.g. the whole KV cache of one layer).
    q_block, k_block: [Tq], [Tk] int32 block ids of the query and key positions.
    impl: 'xla' (materialised mask; the reference, works everywhere), 'cudnn' (fused, GPU), 'splash' (TPU).
  Returns:
    [B, H, Tq, D] in the dtype of v.
  """
  if impl == 'xla':
    if is_static(q_block) and is_static(k_block) and q.shape[2] >= 2 * XLA_QUERY_CHUNK:
      return chunked_attention(q, k, v, np.asarray(q_block), np.asarray(k_block), XLA_QUERY_CHUNK)
    return _xla_attention(q, k, v, block_mask(q_block, k_block))
  if impl == 'cudnn':
    if jax.default_backend() != 'gpu':
      raise config_lib.ConfigError(f"model.attention='cudnn' needs a GPU (backend is {jax.default_backend()!r}); "
                                   'use --config.model.attention=xla.')
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise config_lib.ConfigError(f"model.attention='cudnn' computes in bfloat16 or float16, not {q.dtype}; use "
                                   '--config.model.dtype=bfloat16 (or auto), or --config.model.attention=xla.')
    return fused_attention(q, k, v, block_mask(q_block, k_block), implementation='cudnn')
  if impl == 'splash':
    if jax.default_backend() == 'gpu':
      raise config_lib.ConfigError("model.attention='splash' is a TPU kernel; on GPU use "
                                   '--config.model.attention=cudnn.')
    if q.shape[2] < SPLASH_MIN_QUERIES or not is_static(q_block) or not is_static(k_block):
      return _xla_attention(q, k, v, block_mask(q_block, k_block))
    return splash_attention(q, k, v, q_block, k_block, interpret=jax.default_backend() != 'tpu')
  raise config_lib.ConfigError(f'model.attention={impl!r} is unknown; pick one of {config_lib.ATTENTION_IMPLS}.')


def cache_attention(q: jax.Array, k_t: jax.Array, v: jax.Array, q_block: jax.Array, k_block: jax.Array, *,
                    impl: str = 'xla') -> jax.Array:
  """`attention` against one layer's KV cache (transformer.KVCache): q [N, Tq, D], keys stored transposed
  k_t [N, D, Tk], v [N, Tk, D], N = batch x heads; returns [N, Tq, D].

  The xla path, and every decoding step (fewer than SPLASH_MIN_QUERIES queries: a fused kernel gains nothing
  there, and giving it [Tk, D] keys would copy the layer's whole cache on every step), multiplies by k_t directly;
  only a long prefill with cudnn or splash gets the keys back as [1, N, Tk, D], once. A prefill on the xla path
  (static block ids, 2 x XLA_QUERY_CHUNK queries or more) is chunked: no scores over the keys its queries may not
  see, nor over the cache beyond it (the 187M bench model's K600 prefill, 512 queries on a cache of 700: 468 ->
  436 ms on a 2-core CPU).
  """
  static = is_static(q_block) and is_static(k_block)
  if impl == 'xla' or q.shape[1] < SPLASH_MIN_QUERIES or (impl == 'splash' and not static):
    if static and q.shape[1] >= 2 * XLA_QUERY_CHUNK:  # a prefill: only the keys each chunk of queries may see
      return chunked_attention(q, k_t, v, np.asarray(q_block), np.asarray(k_block), XLA_QUERY_CHUNK,
                               keys_transposed=True)
    return _xla_attention(q, k_t, v, block_mask(q_block, k_block), keys_transposed=True)
  return attention(q[None], k_t.swapaxes(1, 2)[None], v[None], q_block, k_block, impl=impl)[0]


def chunked_attention(q, k, v, q_block: np.ndarray, k_block: np.ndarray, chunk: int, *,
                      keys_transposed: bool = False):
  """The xla path for static (numpy) block ids, `chunk` queries at a time: each chunk's scores only over the keys
  up to the last one any of its queries may see, with that chunk's static mask. Same result as the whole [Tq, Tk]
  product, about half its work for block-causal training (q_block = k_block growing with position), and for a
  prefill also none over the cache positions after it. q [..., Tq, D], k [..., Tk, D] (or [..., D, Tk] with
  keys_transposed), v [..., Tk, D].

  Its gradient is written out (`jax.custom_vjp`): the backward pass keeps q, k, v, the output and each chunk's
  float32 probabilities, and takes each chunk's slices of them again, where autodiff keeps every chunk's slices of
  q, k and v as well (~7x the keys and values per layer, each copied into a scanned model's stacked residuals). The
  187M bench model's training step on a 2-core CPU (`bench train`, two alternating rounds): 16.61 / 16.24 -> 15.04 /
  15.05 s, its compilation 52 / 50 -> 40 / 40 s.
  """
  spans = []  # (first query, end of the queries, end of the keys they may see, the chunk's mask)
  for start in range(0, q.shape[-2], chunk):
    q_ids = q_block[start:start + chunk]
    visible = np.nonzero(k_block <= q_ids.max())[0]
    end = int(visible[-1]) + 1 if len(visible) else 1  # (no layout has a query that sees no key)
    spans.append((start, start + len(q_ids), end, block_mask(q_ids, k_block[:end])))
  keys_upto = lambda k, end: k[..., :end] if keys_transposed else k[..., :end, :]

  def chunks(q, k, v):
    outs, probs = [], []
    for start, stop, end, mask in spans:
      out, p = _xla_attention(q[..., start:stop, :], keys_upto(k, end), v[..., :end, :], mask,
                              keys_transposed=keys_transposed, return_probs=True)
      outs.append(out)
      probs.append(p)
    return jnp.concatenate(outs, axis=-2), probs

  @jax.custom_vjp
  def run(q, k, v):
    return chunks(q, k, v)[0]

  def forward(q, k, v):
    out, probs = chunks(q, k, v)
    return out, (q, k, v, out, probs)

  def backward(residuals, g):
    q, k, v, out, probs = residuals
    f32, scale = jnp.float32, q.shape[-1] ** -0.5
    dq, dk, dv = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
    for (start, stop, end, _), p in zip(spans, probs):
      g_chunk, q_chunk = g[..., start:stop, :], q[..., start:stop, :]
      # The softmax's backward needs sum_k(dp * p) per query, which is g . out: over D instead of the keys.
      g_dot_out = jnp.sum(g_chunk.astype(f32) * out[..., start:stop, :].astype(f32), axis=-1, keepdims=True)
      dv = dv.at[..., :end, :].add(jnp.einsum('...qk,...qd->...kd', p.astype(v.dtype), g_chunk,
                                              preferred_element_type=f32))
      dp = jnp.einsum('...qd,...kd->...qk', g_chunk, v[..., :end, :], preferred_element_type=f32)
      ds = (p * (dp - g_dot_out) * scale).astype(q.dtype)  # the softmax's backward
      if keys_transposed:
        dq.append(jnp.einsum('...qk,...dk->...qd', ds, keys_upto(k, end), preferred_element_type=f32))
        dk = dk.at[..., :end].add(jnp.einsum('...qk,...qd->...dk', ds, q_chunk, preferred_element_type=f32))
      else:
        dq.append(jnp.einsum('...qk,...kd->...qd', ds, keys_upto(k, end), preferred_element_type=f32))
        dk = dk.at[..., :end, :].add(jnp.einsum('...qk,...qd->...kd', ds, q_chunk, preferred_element_type=f32))
    return jnp.concatenate(dq, axis=-2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

  run.defvjp(forward, backward)
  return run(q, k, v)


def fused_attention(q, k, v, mask, *, implementation: str):
  """`jax.nn.dot_product_attention` on our [B, H, T, D] layout (it wants [B, T, H, D]); mask bool [Tq, Tk]."""
  out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                     mask=mask[None, None], implementation=implementation)
  return out.transpose(0, 2, 1, 3)


def splash_tile(length: int) -> int:
  """Tile length for a sequence of `length`: the one of SPLASH_TILES that pads least (ties: the larger tile)."""
  return min(SPLASH_TILES, key=lambda t: (-length % t, -t))


def is_static(x) -> bool:
  """True for block ids known at trace time (numpy, or a concrete array), which a static splash mask needs."""
  return not isinstance(x, jax.core.Tracer)


def splash_block_mask(q_block: np.ndarray, k_block: np.ndarray, tiles: tuple[int, int]) -> splash_mask.MultiHeadMask:
  """The static splash mask of block ids [Tq], [Tk], padded to whole tiles: one head's [Tq', Tk'] mask, shared.

  Padded keys get the largest block id (no real query sees them); padded queries see every key (no empty row).
  """
  tq, tk = len(q_block), len(k_block)
  q_block = np.pad(np.asarray(q_block, np.int32), (0, -tq % tiles[0]), constant_values=_PAD_BLOCK)
  k_block = np.pad(np.asarray(k_block, np.int32), (0, -tk % tiles[1]), constant_values=_PAD_BLOCK)
  return splash_mask.MultiHeadMask([splash_mask.NumpyMask(k_block[None, :] <= q_block[:, None])])


def splash_attention(q, k, v, q_block, k_block, *, interpret: bool = False):
  """Block-causal attention with the Pallas splash kernel; same arguments and result as `attention`, except that
  the block ids must be static (numpy or concrete): the kernel's tile classification is computed from them here.

  Under a mesh (`jax.set_mesh`) the kernel runs per shard through `jax.shard_map`: the batch split as the logical
  axis 'batch' and the heads as 'heads' (the current `nn.logical_axis_rules`), the sequence whole on every device.
  """
  _, _, tq, d = q.shape
  tk = k.shape[2]
  tile_q, tile_k = splash_tile(tq), splash_tile(tk)
  pad_q, pad_k = -tq % tile_q, -tk % tile_k
  mask = splash_block_mask(np.asarray(q_block), np.asarray(k_block), (tile_q, tile_k))
  q = jnp.pad(q * jnp.asarray(d ** -0.5, q.dtype), ((0, 0), (0, 0), (0, pad_q), (0, 0)))  # the kernel does not scale
  k = jnp.pad(k, ((0, 0), (0, 0), (0, pad_k), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, 0), (0, pad_k), (0, 0)))
  run = functools.partial(_splash_per_shard, mask=mask, tiles=(tile_q, tile_k), interpret=interpret)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    out = run(q, k, v)
  else:
    spec = sharding_lib.fit_spec(nn.logical_to_mesh_axes(('batch', 'heads', None, None)), q.shape, mesh,
                                 'splash attention')
    out = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
  return out[:, :, :tq].astype(v.dtype)


def _splash_per_shard(q, k, v, *, mask, tiles, interpret):
  tile_q, tile_k = tiles
  sizes = splash.BlockSizes(block_q=tile_q, block_kv=tile_k, block_kv_compute=tile_k,
                            block_q_dkv=tile_q, block_kv_dkv=tile_k, block_kv_dkv_compute=tile_k,
                            block_q_dq=tile_q, block_kv_dq=tile_k)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  return jax.vmap(kernel)(q, k, v)


def _xla_attention(q, k, v, mask, keys_transposed: bool = False, return_probs: bool = False):
  """q [..., Tq, D], k [..., Tk, D] (or [..., D, Tk] with keys_transposed), v [..., Tk, D], mask [Tq, Tk] ->
  [..., Tq, D] (and the float32 probabilities [..., Tq, Tk], with return_probs)."""
  scale = q.shape[-1] ** -0.5
  # Scores and softmax in float32; a masked score is float32's lowest value (not an additive -1e10, which breaks in
  # bf16). For several queries it is added as a bias of 0 or that value, which XLA:CPU fuses into the scores'
  # matmul (12 layers of a 16-query decoding step at 1024 keys: 15.5 -> 12.3 ms; the 187M bench's NBP step ~3 ms
  # faster, its training step unchanged); a single query's select fuses into its softmax instead (the NTP step
  # ~1 ms slower with the add).
  s = jnp.einsum('...qd,...dk->...qk' if keys_transposed else '...qd,...kd->...qk', q, k,
                 preferred_element_type=jnp.float32) * scale
  lowest = jnp.finfo(jnp.float32).min
  s = jnp.where(mask, s, lowest) if q.shape[-2] == 1 else s + jnp.where(mask, 0.0, lowest)
  if return_probs or q.shape[-2] == 1:
    probs = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum('...qk,...kd->...qd', probs.astype(v.dtype), v)
    return (out, probs) if return_probs else out
  # The softmax's division after p.v, on [Tq, D] instead of [Tq, Tk] (12 layers of a 16-query decoding step at 980
  # keys on a 2-core CPU: 12.7 -> 12.1 ms; a single query's is no faster, and keeps the plain softmax).
  weights = jnp.exp(s - s.max(axis=-1, keepdims=True))
  out = jnp.einsum('...qk,...kd->...qd', weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)
