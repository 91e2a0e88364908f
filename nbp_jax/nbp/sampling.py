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
  """float32 -> int32 with the same order (thresholds are searched over these exactly)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _key_value(key: jax.Array) -> jax.Array:
  """The inverse of _sortable_key: int32 key -> the float32 it orders."""
  return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


INTERPOLATION_STEPS = 24  # then bisection of the keys, which ends in at most 32 more


def _threshold(stat, target, lo, hi, stat_lo, stat_hi, done) -> tuple[jax.Array, ...]:
  """The largest key t with y(t) >= target, where stat(t) = (y, n) over the codes with key >= t and y falls as t rises.

  Per row, lo/hi [...] int32 keys with y(lo) >= target > y(hi) and their stats (y, n: how many keys are >= them).
  Each step costs one pass over the logits, so the candidate threshold is interpolated on the values (Illinois
  regula falsi: ~12-20 passes for 64k logits instead of bisection's 32); after INTERPOLATION_STEPS it bisects the
  keys, which always ends. Stops early once done(n_lo, n_hi) holds for every row (or its bracket is one key wide).
  Returns the final bracket (lo, hi, n_lo, n_hi): t = lo where done says so or hi == lo + 1, else lo <= t < hi.
  """
  (y_lo, n_lo), (y_hi, n_hi) = stat_lo, stat_hi

  def cond(c):
    lo, hi, _, _, n_lo, n_hi, _, i = c
    return ~jnp.all(done(n_lo, n_hi) | (lo + 1 == hi)) & (i < INTERPOLATION_STEPS + 32)

  def body(c):
    lo, hi, f_lo, f_hi, n_lo, n_hi, side, i = c
    v_lo, v_hi = _key_value(lo), _key_value(hi)
    guess = _sortable_key(v_lo + f_lo / (f_lo - f_hi) * (v_hi - v_lo))
    half = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    mid = jnp.clip(jnp.where(i < INTERPOLATION_STEPS, guess, half), lo + 1, jnp.maximum(hi - 1, lo + 1))
    y, n = stat(mid)
    ok = y >= target
    f = y - target
    # Illinois: an end kept twice in a row has its residual halved, so that both ends move.
    f_lo, f_hi = jnp.where(ok, f, jnp.where(side < 0, 0.5 * f_lo, f_lo)), jnp.where(
        ok, jnp.where(side > 0, 0.5 * f_hi, f_hi), f)
    return (jnp.where(ok, mid, lo), jnp.where(ok, hi, mid), f_lo, f_hi, jnp.where(ok, n, n_lo),
            jnp.where(ok, n_hi, n), jnp.where(ok, 1, -1), i + 1)

  init = (lo, hi, y_lo - target, y_hi - target, n_lo, n_hi, jnp.zeros(lo.shape, jnp.int32), jnp.int32(0))
  lo, hi, _, _, n_lo, n_hi, _, _ = jax.lax.while_loop(cond, body, init)
  return lo, hi, n_lo, n_hi


def _count(mask: jax.Array) -> jax.Array:
  """bool [..., C] -> float32 [...] how many are True."""
  # A float32 matrix-vector product with ones: exact below 2^24 codes, and twice as fast on XLA:CPU as an integer
  # sum of the comparisons.
  return jnp.einsum('...c,c->...', mask.astype(jnp.float32), jnp.ones(mask.shape[-1], jnp.float32))


def _top_k_bracket(x: jax.Array, key: jax.Array, k: int, width: int = 0,
                   start: tuple[jax.Array, ...] | None = None) -> tuple[jax.Array, ...]:
  """Keys bracketing the k-th largest of key [..., C] (key = _sortable_key(x)): (lo, hi, n_lo, n_hi) [...] with
  n_lo = #(key >= lo) >= k > n_hi = #(key >= hi), searched until n_lo - n_hi <= width (0: until exact), from
  `start` (such a bracket, e.g. an earlier search's; default: the whole range of x).
  The bracket is exact, lo the k-th largest key, where n_lo == k or hi == lo + 1 (ties at the k-th value)."""
  if start is None:
    full = jnp.full(x.shape[:-1], x.shape[-1], jnp.float32)
    zero = jnp.zeros(x.shape[:-1], jnp.float32)
    start = (_sortable_key(x.min(-1)), _sortable_key(x.max(-1)) + 1, full, zero)
  lo, hi, n_lo, n_hi = start

  def count(t):  # _threshold's stat: (y, n) = how many keys are >= t, twice
    n = _count(key >= t[..., None])
    return n, n
  return _threshold(count, k - 0.5, lo, hi, (n_lo, n_lo), (n_hi, n_hi),
                    lambda n_lo, n_hi: (n_lo == k) | (n_lo - n_hi <= width))


def _top_k(x: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """x [..., C] with -inf outside the top-k (all ties at the k-th value kept); key = _sortable_key(x)."""
  if not 0 < sampling.top_k < x.shape[-1]:
    return x
  kth = _top_k_bracket(x, key, sampling.top_k)[0]
  return jnp.where(key >= kth[..., None], x, -jnp.inf)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [..., C] -> [..., C] temperature-scaled logits with -inf outside the top-k/top-p set.

  Thresholds are searched on the values rather than found by sorting: a full sort of 64k logits per position
  costs more than the transformer step on CPU. Ties at the k-th value are all kept. `sample` draws from this set
  without computing the nucleus threshold; this is the exact set it draws from.
  """
  x = logits.astype(jnp.float32) / sampling.temperature
  return _filter_scaled(x, _sortable_key(x), sampling)


def _filter_scaled(x: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """filter_logits of logits already divided by the temperature: x [..., C] float32, key = _sortable_key(x)."""
  x = _top_k(x, key, sampling)
  kept = jnp.isfinite(x)
  probs = jax.nn.softmax(x, axis=-1)
  # Nucleus: keep code i iff the mass of the codes strictly more likely than i is < top_p, i.e. keep the codes with
  # key >= v for the largest v with mass(key >= v) >= top_p (the most likely code whatever top_p).
  def stat(t):
    above = key >= t[..., None]
    return jnp.where(above, probs, 0.0).sum(-1), _count(above)

  lo = jnp.where(kept, key, jnp.iinfo(jnp.int32).max).min(-1)
  hi = key.max(-1) + 1
  n_lo = kept.sum(-1).astype(jnp.float32)
  one, zero = jnp.ones_like(n_lo), jnp.zeros_like(n_lo)
  target = jnp.maximum(sampling.top_p, jnp.finfo(jnp.float32).tiny)
  cut = _threshold(stat, target, lo, hi, (one, n_lo), (zero, zero), lambda n_lo, n_hi: n_lo - n_hi == 1)[0]
  return jnp.where((sampling.top_p >= 1.0) | (key >= cut[..., None]), x, -jnp.inf)


def _chunks(x: jax.Array, size: int, fill: float) -> jax.Array:
  """x [..., C] -> [..., ceil(C / size), size], the last chunk padded with `fill` (the two-level searches')."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % size)], constant_values=fill).reshape(
      *x.shape[:-1], -1, size)


ARGMAX_CHUNK = 256  # codes per chunk of the two-level argmax


def argmax(logits: jax.Array) -> jax.Array:
  """jnp.argmax(logits, -1) as int32 [...]: the first index of the largest value of logits [..., C] (logits
  without NaN; with one the index is unspecified, as in the sampled path).

  For several rows of many codes in two levels: each chunk's maximum, the first chunk holding the largest, then
  the first index of it inside that chunk. XLA:CPU runs argmax as a reduction of (value, index) pairs that costs
  several times a plain maximum over the same logits (16 x 64k, a decoding step's greedy choice on a 2-core CPU:
  1.87 -> 0.33 ms); for one row the two are about as fast (0.32 vs 0.39 ms) and it stays one argmax.
  """
  c = logits.shape[-1]
  if logits.size == c or c <= 2 * ARGMAX_CHUNK:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  chunks = _chunks(logits, ARGMAX_CHUNK, -jnp.inf)  # -inf padding: a real code at least as large comes first
  j = jnp.argmax(chunks.max(-1), axis=-1)
  chunk = jnp.take_along_axis(chunks, j[..., None, None], -2)[..., 0, :]
  return (j * ARGMAX_CHUNK + jnp.argmax(chunk, axis=-1)).astype(jnp.int32)


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
  chunks = _chunks(probs, CDF_CHUNK, 0.0)
  ends = jnp.cumsum(chunks.sum(-1), axis=-1)  # [..., n_chunks] mass up to the end of each chunk
  j = jnp.minimum((ends < u[..., None]).sum(-1), ends.shape[-1] - 1)  # the chunk where the cdf reaches u
  start = jnp.where(j > 0, jnp.take_along_axis(ends, jnp.maximum(j - 1, 0)[..., None], -1)[..., 0], 0.0)
  chunk = jnp.take_along_axis(chunks, j[..., None, None], -2)[..., 0, :]  # [..., CDF_CHUNK]
  i = ((start[..., None] + jnp.cumsum(chunk, axis=-1)) < u[..., None]).sum(-1)
  # Rounding (the chunk's sum vs its running sum) can leave u just past the chunk's last step: take its last
  # non-zero probability then, never a zero-probability (filtered or padding) index.
  last = CDF_CHUNK - 1 - jnp.argmax((chunk > 0)[..., ::-1], axis=-1)
  return (j * CDF_CHUNK + jnp.minimum(i, last)).astype(jnp.int32)


NUCLEUS_CANDIDATES = 4  # draws per position tested against the nucleus before the exact search (see sample)
# Codes the top-k threshold search may leave between its bracket's ends (see sample). Its last passes over the
# logits only close the bracket's last few codes: stopping here takes 9 passes instead of 13 for the benchmark's
# 16 x 64k logits (top-k 16000), and leaves about 1e-4 of the positions undecided, to the exact path.
TOP_K_BRACKET = 32


def sample(rng: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [..., C] float32 -> sampled indices [...] int32 in [0, C), from the set filter_logits keeps.

  By rejection, with exact fallbacks. The top-k threshold is searched only until TOP_K_BRACKET codes at most lie
  between the ends of its bracket [lo, hi) (#(key >= lo) >= top_k > #(key >= hi)). NUCLEUS_CANDIDATES codes are
  drawn from the top-k distribution widened to {key >= lo}, and the first one that is in the top-k and inside the
  nucleus is taken: a code is inside iff the mass of the codes more likely than it is < top_p x the top-k's total
  Z_k (one pass over the logits for all candidates, instead of the ~20 a nucleus threshold search costs). A
  candidate's membership is decided from bounds: key >= hi is in the top-k; Z_k lies between the widened total
  and that total less (#bracket codes beyond the k-th) x the largest weight below hi. Each candidate is inside with
  probability ~top_p, so with top_p = 0.9 all of a position's candidates miss once in 10^4; then, or when the first
  candidate that may be inside is undecided (it lies in the bracket, or its nucleus test between the bounds: ~1e-4
  of the positions), the positions that need it get the exact threshold and Z_k: their candidates are tested
  exactly, and if all miss, the exact set is computed and drawn from. The first of i.i.d. draws inside the target
  set, or a draw from the exact set, is a draw from the top-k distribution restricted to the nucleus: exactly what
  filtering then sampling gives. Up to a few thousand codes (the demo's 1000) filtering first costs less, and is
  what it does.
  """
  if sampling.greedy:
    return argmax(logits)
  c = logits.shape[-1]
  if c <= _FLAT_CDF_MAX:  # a few thousand codes: the exact set costs less than the candidates
    return _draw(rng, filter_logits(logits, sampling))
  # The scaled logits again from their keys, exactly: XLA:CPU then computes the keys straight from the head's
  # transposed output, and the exact branch below filters these (with the raw logits it kept a copy of its own).
  key = _sortable_key(logits.astype(jnp.float32) / sampling.temperature)
  x = _key_value(key)
  x_top = x.max(-1)  # a float reduction: XLA:CPU reduces the int32 keys as a tree of windows, several passes
  top = _sortable_key(x_top)
  k = sampling.top_k
  if 0 < k < c:
    lo, hi, n_lo, n_hi = _top_k_bracket(x, key, k, TOP_K_BRACKET)
    exact = (n_lo == k) | (hi == lo + 1)  # lo is the k-th largest key
  else:
    lo = hi = jnp.full(top.shape, jnp.iinfo(jnp.int32).min)
    n_lo = n_hi = jnp.full(top.shape, float(c))
    exact = jnp.ones(top.shape, bool)
  sure_hi = jnp.where(exact, lo, hi)  # keys >= sure_hi are in the top-k
  # The top-k distribution unnormalised and widened to {key >= lo}: the draws and the nucleus test scale by totals
  # instead, which saves the softmax's division pass over the 64k logits.
  weights = jnp.where(key >= lo[..., None], jnp.exp(x - x_top[..., None]), 0.0)
  total = weights.sum(-1)  # >= Z_k
  beyond = jnp.where(exact, 0.0, n_lo - k)  # widened codes that may be outside the top-k, each weighing < w(hi)
  total_low = total - beyond * jnp.exp(_key_value(hi) - x_top)  # <= Z_k
  draw_rng, exact_rng = jax.random.split(rng)
  u = jax.random.uniform(draw_rng, (*total.shape, NUCLEUS_CANDIDATES), minval=jnp.finfo(jnp.float32).tiny)
  candidates = jax.vmap(inverse_cdf, in_axes=(None, -1), out_axes=-1)(weights, u * total[..., None])  # [..., M]
  candidate_key = jnp.take_along_axis(key, candidates, axis=-1)
  # The codes above a candidate in the top-k are all in it: this is its nucleus statistic, exactly. (A product of
  # the 0/1 mask with the weights, as _count: 16 x 4 x 64k, 1.4 -> 0.9 ms on XLA:CPU against a sum of a select.)
  above = (key[..., None, :] > candidate_key[..., None]).astype(jnp.float32)
  mass_above = jnp.einsum('...mc,...c->...m', above, weights)
  p = sampling.top_p
  is_top = candidate_key == top[..., None]  # the most likely code is always kept
  no_nucleus = p >= 1.0
  sure_in = (candidate_key >= sure_hi[..., None]) & (
      (mass_above < p * total_low[..., None]) | no_nucleus | is_top)
  sure_out = (mass_above >= p * total[..., None]) & ~no_nucleus & ~is_top
  open_ = jnp.argmax(~sure_out, axis=-1)[..., None]  # the first candidate that may be inside
  fast = jnp.take_along_axis(candidates, open_, axis=-1)[..., 0]
  undecided = ~jnp.take_along_axis(sure_in, open_, axis=-1)[..., 0]  # (also when every candidate is out)

  def exact_draw():
    kth = _top_k_bracket(x, key, k, start=(lo, hi, n_lo, n_hi))[0] if 0 < k < c else lo  # the search, finished
    total_k = jnp.where(key >= kth[..., None], weights, 0.0).sum(-1)
    inside = (candidate_key >= kth[..., None]) & (
        (mass_above < p * total_k[..., None]) | no_nucleus | is_top)
    first = jnp.take_along_axis(candidates, jnp.argmax(inside, axis=-1)[..., None], axis=-1)[..., 0]
    first = jnp.where(undecided, first, fast)
    missed = undecided & ~inside.any(-1)
    return jax.lax.cond(missed.any(), lambda: jnp.where(missed, _draw(exact_rng, _filter_scaled(x, key, sampling)),
                                                        first), lambda: first)

  return jax.lax.cond(undecided.any(), exact_draw, lambda: fast)


def _draw(rng: jax.Array, logits: jax.Array) -> jax.Array:
  """One code per position from softmax(logits [..., C]) -> int32 [...]."""
  probs = jax.nn.softmax(logits, axis=-1)
  # Inverse CDF with one uniform per position (a Gumbel draw per logit costs more than the filtering on CPU).
  u = jax.random.uniform(rng, probs.shape[:-1], minval=jnp.finfo(jnp.float32).tiny) * probs.sum(-1)
  return inverse_cdf(probs, u)
