"""Block-causal attention behind one function, for training and decoding alike.

The mask is never passed around as an [T, T] tensor: each query and key carries a block id (prefix -1) and a
query may attend to a key iff `key_block <= query_block` (DESIGN.md, the block rule). Training passes the same
positions for queries and keys; decoding passes the new group's positions (a query offset) against the cache's.
Keys not yet written to the cache have larger block ids than any query, so they are masked by the same rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ('xla', 'cudnn', 'splash')


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
    return _xla_attention(q, k, v, block_mask(q_block, k_block))
  if impl == 'cudnn':
    if jax.default_backend() != 'gpu':
      raise ValueError(f"model.attention='cudnn' needs a GPU (backend is {jax.default_backend()!r}); "
                       "use --config.model.attention=xla.")
    mask = block_mask(q_block, k_block)[None, None]
    out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                       mask=mask, implementation='cudnn')
    return out.transpose(0, 2, 1, 3)
  if impl == 'splash':
    raise NotImplementedError("model.attention='splash' (Pallas splash attention on TPU) is not wired into "
                              "nbp_jax.nbp.attention yet; use --config.model.attention=xla.")
  raise ValueError(f'model.attention={impl!r} is unknown; pick one of {IMPLS}.')


def _xla_attention(q, k, v, mask):
  scale = q.shape[-1] ** -0.5
  # Scores and softmax in float32; the mask is a select, not an additive -1e10 (which breaks in bf16).
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', p, v)
