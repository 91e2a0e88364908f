"""FSQ against a naive numpy transcription of the reference formula; exact index <-> code inverse."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from nbp_jax.tokenizer import fsq

LEVELS = (8, 8, 8, 5, 5, 5)


def _naive_quantize(z, levels):
  """docs/design.md, written out per channel in float64: bound, round half to even, code, index."""
  codes = np.zeros(z.shape, np.float64)
  index = np.zeros(z.shape[:-1], np.int64)
  place = 1
  for j, lv in enumerate(levels):
    half_l = (lv - 1) * (1 - 1e-3) / 2
    offset = 0.5 if lv % 2 == 0 else 0.0
    shift = math.tan(offset / half_l)
    bounded = np.tanh(z[..., j].astype(np.float64) + shift) * half_l - offset
    rounded = np.round(bounded)
    codes[..., j] = rounded / (lv // 2)
    index += ((codes[..., j] * (lv // 2) + lv // 2).round().astype(np.int64)) * place
    place *= lv
  return codes, index


def test_basis_and_size():
  np.testing.assert_array_equal(fsq.basis(LEVELS), [1, 8, 64, 512, 2560, 12800])
  assert fsq.codebook_size(LEVELS) == 64_000


def test_every_index_round_trips():
  indices = jnp.arange(64_000, dtype=jnp.int32)
  codes = fsq.codes_from_indices(indices, LEVELS)
  assert codes.shape == (64_000, 6)
  assert float(jnp.min(codes)) == -1.0 and float(jnp.max(codes)) <= 1.0
  np.testing.assert_array_equal(np.asarray(fsq.indices_from_codes(codes, LEVELS)), np.arange(64_000))
  # Distinct indices are distinct codes (the inverse is a bijection, not just a left inverse).
  assert len({tuple(c) for c in np.asarray(codes).round(6).tolist()}) == 64_000


def test_quantize_matches_naive_reference():
  z = np.random.default_rng(0).normal(0.0, 2.0, (4096, 6)).astype(np.float32)
  codes, indices = fsq.quantize(jnp.asarray(z), LEVELS)
  ref_codes, ref_indices = _naive_quantize(z, LEVELS)
  np.testing.assert_allclose(np.asarray(codes), ref_codes, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(indices), ref_indices)
  # Quantised codes decode back to themselves.
  np.testing.assert_allclose(np.asarray(fsq.codes_from_indices(indices, LEVELS)), ref_codes, atol=1e-6)


def test_all_levels_reachable_and_indices_in_range():
  z = np.tile(np.linspace(-8.0, 8.0, 401, dtype=np.float32)[:, None], (1, 6))
  codes, indices = fsq.quantize(jnp.asarray(z), LEVELS)
  for j, lv in enumerate(LEVELS):
    assert len(np.unique(np.asarray(codes)[:, j])) == lv, f'channel {j} does not reach all {lv} levels'
  assert int(indices.min()) == 0 and int(indices.max()) == 63_999


def test_straight_through_gradient():
  z = jnp.asarray(np.random.default_rng(1).normal(size=(16, 6)).astype(np.float32))
  w = jnp.asarray(np.random.default_rng(2).normal(size=(16, 6)).astype(np.float32))
  grad = jax.grad(lambda v: jnp.sum(fsq.quantize(v, LEVELS)[0] * w))(z)
  # Rounding passes the gradient straight through: d code / dz = d/dz [tanh(z + shift) * half_l] / (l // 2), the
  # bound's derivative written out as in _naive_quantize (float64).
  expected = np.zeros(z.shape, np.float64)
  for j, lv in enumerate(LEVELS):
    half_l = (lv - 1) * (1 - 1e-3) / 2
    shift = math.tan((0.5 if lv % 2 == 0 else 0.0) / half_l)
    slope = (1 - np.tanh(np.asarray(z[:, j], np.float64) + shift) ** 2) * half_l / (lv // 2)
    expected[:, j] = slope * np.asarray(w[:, j], np.float64)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-6)  # float32 against float64
  assert float(jnp.min(jnp.abs(grad))) > 0
