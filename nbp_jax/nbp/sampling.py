"""Per-position sampling from video logits: temperature, top-k, top-p (nucleus), greedy; CFG combination.

Order as in the released scripts (HF-style filtering): logits / temperature -> keep the top-k -> keep the smallest
set of those whose probability mass reaches top_p (always at least the most likely token) -> sample.
Callers pass logits over the video ids only, so nothing else can ever be sampled.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Sampling:
  """Sampling settings. temperature/top_p/cfg_scale are traced (changing them does not recompile);
  top_k, greedy and use_cfg change shapes or the program and are static.

  Attributes:
    temperature: > 0; logits are divided by it.
    top_p: nucleus mass in (0, 1]; 1 = off.
    cfg_scale: classifier-free guidance scale s: uncond + s * (cond - uncond) (used when use_cfg).
    top_k: keep the k most likely codes; 0 = all.
    greedy: argmax (ignores temperature, top-k, top-p).
    use_cfg: run conditional and null-condition rows in one batch and combine.
  """
  temperature: float = 1.0
  top_p: float = 1.0
  cfg_scale: float = 1.0
  top_k: int = flax.struct.field(pytree_node=False, default=0)
  greedy: bool = flax.struct.field(pytree_node=False, default=False)
  use_cfg: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def from_config(cls, sample_config) -> Sampling:
    """From the config's `sample` section (top_k 0 = off, cfg_scale 1 = no guidance)."""
    s = sample_config
    return cls(temperature=float(s.temperature), top_p=float(s.top_p), cfg_scale=float(s.cfg_scale),
               top_k=int(s.top_k), greedy=bool(s.greedy), use_cfg=float(s.cfg_scale) != 1.0)


def guide(logits: jax.Array, scale) -> jax.Array:
  """[2B, ..., C] = [cond rows; null-condition rows] -> [B, ..., C] = uncond + s * (cond - uncond)."""
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + scale * (cond - uncond)


def _sortable_key(x: jax.Array) -> jax.Array:
  """float32 -> int32 with the same order (so thresholds can be bisected exactly in 32 steps)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _bisect(pred, shape) -> jax.Array:
  """Largest int32 t with pred(t) True, for pred monotone (True then False as t grows) and pred(INT_MIN) True."""
  lo = jnp.full(shape, jnp.iinfo(jnp.int32).min, jnp.int32)
  hi = jnp.full(shape, jnp.iinfo(jnp.int32).max, jnp.int32)

  def body(_, carry):
    lo, hi = carry
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    ok = pred(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [..., C] -> [..., C] temperature-scaled logits with -inf outside the top-k/top-p set.

  Thresholds are found by bisection on the values rather than by sorting: a full sort of 64k logits per position
  costs more than the transformer step on CPU. Ties at the k-th value are all kept.
  """
  x = logits.astype(jnp.float32) / sampling.temperature
  key = _sortable_key(x)
  batch = x.shape[:-1]
  keep = jnp.ones(x.shape, bool)
  if 0 < sampling.top_k < x.shape[-1]:
    # Counts as a float32 matrix-vector product with ones: exact below 2^24 codes, and twice as fast on XLA:CPU as
    # an integer sum of the comparisons.
    ones = jnp.ones(x.shape[-1], jnp.float32)
    count = lambda t: jnp.einsum('...c,c->...', (key >= t[..., None]).astype(jnp.float32), ones)
    kth = _bisect(lambda t: count(t) >= sampling.top_k, batch)  # k-th largest key
    keep = key >= kth[..., None]
  probs = jax.nn.softmax(jnp.where(keep, x, -jnp.inf), axis=-1)
  # Nucleus: keep token i iff the mass of tokens strictly more likely than i is < top_p. The cut is the smallest
  # key v with mass(key > v) < top_p, i.e. one more than the largest v with mass(key > v) >= top_p.
  cut = _bisect(lambda t: jnp.where(key > t[..., None], probs, 0.0).sum(-1) >= sampling.top_p, batch)
  nucleus = key > cut[..., None]
  nucleus |= key == key.max(-1, keepdims=True)  # at least the most likely token, even for top_p <= 0
  keep &= jnp.where(sampling.top_p >= 1.0, True, nucleus)
  return jnp.where(keep, x, -jnp.inf)


CDF_CHUNK = 256  # codes per chunk of the two-level inverse CDF
_FLAT_CDF_MAX = 4096  # up to this many codes one flat cumulative sum is cheaper than two levels


def inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
  """The first index whose cumulative probability reaches u: probs [..., C] >= 0, u [...] in (0, sum) -> int32 [...].

  Two levels, O(C) work: the chunks' sums and their cumulative sum pick the chunk u falls in, then only that chunk's
  CDF_CHUNK probabilities are summed cumulatively (a cumulative sum over all 64k codes per position costs as much
  as the rest of sampling on CPU). Never returns a zero-probability index.
  """
  c = probs.shape[-1]
  if c <= _FLAT_CDF_MAX:
    i = (jnp.cumsum(probs, axis=-1) < u[..., None]).sum(-1)
    last = c - 1 - jnp.argmax((probs > 0)[..., ::-1], axis=-1)
    return jnp.minimum(i, last).astype(jnp.int32)
  chunks = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, -c % CDF_CHUNK)]).reshape(
      *probs.shape[:-1], -1, CDF_CHUNK)
  ends = jnp.cumsum(chunks.sum(-1), axis=-1)  # [..., n_chunks] mass up to the end of each chunk
  j = jnp.minimum((ends < u[..., None]).sum(-1), ends.shape[-1] - 1)  # the chunk where the cdf reaches u
  start = jnp.where(j > 0, jnp.take_along_axis(ends, jnp.maximum(j - 1, 0)[..., None], -1)[..., 0], 0.0)
  chunk = jnp.take_along_axis(chunks, j[..., None, None], -2)[..., 0, :]  # [..., CDF_CHUNK]
  i = ((start[..., None] + jnp.cumsum(chunk, axis=-1)) < u[..., None]).sum(-1)
  # Rounding (the chunk's sum vs its running sum) can leave u just past the chunk's last step: take its last
  # non-zero probability then, never a zero-probability (filtered or padding) index.
  last = CDF_CHUNK - 1 - jnp.argmax((chunk > 0)[..., ::-1], axis=-1)
  return (j * CDF_CHUNK + jnp.minimum(i, last)).astype(jnp.int32)


def sample(rng: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [..., C] float32 -> sampled indices [...] int32 in [0, C)."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = jax.nn.softmax(filter_logits(logits, sampling), axis=-1)
  # Inverse CDF with one uniform per position (a Gumbel draw per logit costs more than the filtering on CPU).
  total = probs.sum(-1)
  u = jax.random.uniform(rng, total.shape, minval=jnp.finfo(jnp.float32).tiny) * total
  return inverse_cdf(probs, u)
