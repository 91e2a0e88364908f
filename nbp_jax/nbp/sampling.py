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
  def from_config(cls, sample_config) -> 'Sampling':
    """From the config's `sample` section (top_k 0 = off, cfg_scale 1 = no guidance)."""
    s = sample_config
    return cls(temperature=float(s.temperature), top_p=float(s.top_p), cfg_scale=float(s.cfg_scale),
               top_k=int(s.top_k), greedy=bool(s.greedy), use_cfg=float(s.cfg_scale) != 1.0)


def guide(logits: jax.Array, scale) -> jax.Array:
  """[2B, ..., C] = [cond rows; null-condition rows] -> [B, ..., C] = uncond + s * (cond - uncond)."""
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + scale * (cond - uncond)


def _candidates(logits: jax.Array, sampling: Sampling) -> tuple[jax.Array, jax.Array]:
  """logits [..., C] -> (filtered logits [..., k] with -inf where dropped, their ids [..., k]), sorted desc."""
  c = logits.shape[-1]
  k = c if sampling.top_k <= 0 else min(sampling.top_k, c)
  # top_k returns sorted values; filtering only k candidates avoids a full-vocabulary sort when k << C.
  vals, idx = jax.lax.top_k(logits.astype(jnp.float32) / sampling.temperature, k)
  probs = jax.nn.softmax(vals, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
  keep = (mass_before < sampling.top_p) | (jnp.arange(k) == 0)  # nucleus keeps at least one token
  return jnp.where(keep, vals, -jnp.inf), idx


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [..., C] -> [..., C] temperature-scaled logits with -inf outside the top-k/top-p set."""
  vals, idx = _candidates(logits, sampling)
  out = jnp.full(logits.shape, -jnp.inf, jnp.float32)
  return jnp.put_along_axis(out, idx, vals, axis=-1, inplace=False)


def sample(rng: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [..., C] float32 -> sampled indices [...] int32 in [0, C)."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  vals, idx = _candidates(logits, sampling)
  choice = jax.random.categorical(rng, vals, axis=-1)
  return jnp.take_along_axis(idx, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
