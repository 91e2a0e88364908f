"""Finite scalar quantisation (FSQ) exactly as in the official NBP tokenizer (no parameters, no projection).

Per channel j with L_j levels: bound z to (-half_l - offset, half_l - offset) with a shifted tanh, round with a
straight-through gradient, and scale to codes in [-1, 1]. One index per latent position:
  index = sum_j (code_j * (L_j // 2) + L_j // 2) * basis_j,  basis = cumprod((1,) + levels[:-1]).
For the official levels (8, 8, 8, 5, 5, 5): basis (1, 8, 64, 512, 2560, 12800) and 64,000 indices.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
import numpy as np

# Keeps the bounded value strictly inside the outermost rounding bins (as the release).
_EPS = 1e-3


def basis(levels: Sequence[int]) -> np.ndarray:
  """Mixed-radix place values: (8, 8, 8, 5, 5, 5) -> (1, 8, 64, 512, 2560, 12800)."""
  return np.cumprod((1,) + tuple(levels[:-1])).astype(np.int64)


def codebook_size(levels: Sequence[int]) -> int:
  """Codes of an FSQ with these levels: their product."""
  return math.prod(levels)


def bound(z: jax.Array, levels: Sequence[int]) -> jax.Array:
  """[..., D] float -> [..., D] in (-half_l - offset, half_l - offset) per channel.

  shift = tan(offset / half_l) (tan, not the atanh of the FSQ paper): the released weights were trained with it.
  """
  levels_np = np.asarray(levels, np.float64)
  half_l = (levels_np - 1) * (1 - _EPS) / 2
  offset = np.where(levels_np % 2 == 0, 0.5, 0.0)
  shift = np.tan(offset / half_l)
  z = z.astype(jnp.float32)
  return jnp.tanh(z + shift.astype(np.float32)) * half_l.astype(np.float32) - offset.astype(np.float32)


def _round_ste(x: jax.Array) -> jax.Array:
  """Round half to even (as torch.round) in the forward pass, identity gradient in the backward pass."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def quantize(z: jax.Array, levels: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Latents [..., D] -> (codes [..., D] float32 in [-1, 1] with straight-through gradient, indices [...] int32)."""
  if z.shape[-1] != len(levels):
    raise ValueError(f'FSQ got latents with {z.shape[-1]} channels but tokenizer.fsq_levels={tuple(levels)} has '
                     f'{len(levels)}; the encoder output width must equal len(fsq_levels).')
  half_width = np.asarray([lv // 2 for lv in levels], np.float32)
  codes = _round_ste(bound(z, levels)) / half_width
  return codes, indices_from_codes(codes, levels)


def indices_from_codes(codes: jax.Array, levels: Sequence[int]) -> jax.Array:
  """Codes [..., D] in [-1, 1] (multiples of 1 / (L_j // 2)) -> int32 indices [...] in [0, prod(levels))."""
  half_width = np.asarray([lv // 2 for lv in levels], np.float32)
  digits = jnp.round(jax.lax.stop_gradient(codes) * half_width + half_width).astype(jnp.int32)
  return jnp.sum(digits * jnp.asarray(basis(levels), jnp.int32), axis=-1)


def codes_from_indices(indices: jax.Array, levels: Sequence[int]) -> jax.Array:
  """The exact inverse of `indices_from_codes`: int indices [...] -> float32 codes [..., D]."""
  levels_np = np.asarray(levels, np.int32)
  half_width = (levels_np // 2).astype(np.float32)
  digits = (indices.astype(jnp.int32)[..., None] // jnp.asarray(basis(levels), jnp.int32)) % levels_np
  return (digits.astype(jnp.float32) - half_width) / half_width
