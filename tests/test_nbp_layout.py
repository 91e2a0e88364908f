"""BlockLayout and Vocab against hand-built references (masks, permutations, official sequences, step counts)."""

import itertools

import numpy as np
import pytest

from nbp_jax.nbp import attention
from nbp_jax.nbp.layout import BlockLayout
from nbp_jax.nbp.layout import LayoutError
from nbp_jax.nbp.layout import Vocab

SHAPES = [(1, 1, 1), (1, 1, 8), (1, 1, 16), (1, 4, 4), (2, 1, 8), (2, 2, 2), (1, 16, 16)]


def _mat(rows):
  return np.array([[c == '1' for c in r.replace(' ', '')] for r in rows])


def _layout_mask(layout):
  """The teacher-forcing mask as the model builds it: attention's rule over the layout's block ids."""
  ids = layout.block_ids(np.arange(layout.seq_len))
  return np.asarray(attention.block_mask(ids, ids))


def test_mask_bov_prefix2_block3_three_blocks():
  layout = BlockLayout((1, 1, 9), (1, 1, 3), prefix_len=2, first_block='bov')
  # positions: p p | BOV BOV BOV | z0 z1 z2 | z3 z4 z5   (z6..z8 are targets only)
  expected = _mat([
      '11 000 000 000',
      '11 000 000 000',
      '11 111 000 000',
      '11 111 000 000',
      '11 111 000 000',
      '11 111 111 000',
      '11 111 111 000',
      '11 111 111 000',
      '11 111 111 111',
      '11 111 111 111',
      '11 111 111 111',
  ])
  np.testing.assert_array_equal(_layout_mask(layout), expected)
  np.testing.assert_array_equal(layout.target_index, [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8])


def test_mask_none_prefix2_block3():
  layout = BlockLayout((1, 1, 9), (1, 1, 3), prefix_len=2, first_block='none')
  expected = _mat([
      '11 000 000',
      '11 000 000',
      '11 111 000',
      '11 111 000',
      '11 111 000',
      '11 111 111',
      '11 111 111',
      '11 111 111',
  ])
  np.testing.assert_array_equal(_layout_mask(layout), expected)
  # Position p predicts the token L later; block 0 is never a target.
  np.testing.assert_array_equal(layout.target_index, [-1, -1, 3, 4, 5, 6, 7, 8])


def test_mask_hybrid_start():
  layout = BlockLayout((1, 1, 9), (1, 1, 3), prefix_len=2, first_block='hybrid')
  # positions: p p | BOV | z0 | z1 | z2 ph1 ph2 | z3 z4 z5: causal through the first row, then blocks.
  expected = _mat([
      '11 0 0 0 000 000',
      '11 0 0 0 000 000',
      '11 1 0 0 000 000',
      '11 1 1 0 000 000',
      '11 1 1 1 000 000',
      '11 1 1 1 111 000',
      '11 1 1 1 111 000',
      '11 1 1 1 111 000',
      '11 1 1 1 111 111',
      '11 1 1 1 111 111',
      '11 1 1 1 111 111',
  ])
  np.testing.assert_array_equal(_layout_mask(layout), expected)
  np.testing.assert_array_equal(layout.target_index, [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8])


def test_mask_2x2x2_layout_matches_naive_blocks():
  layout = BlockLayout((2, 4, 4), (2, 2, 2), prefix_len=1, first_block='bov')
  s = layout.seq_len
  assert s == 1 + 32
  # Naive: position 0 is the prefix; positions 1..8 the BOV block; then 8-token blocks of video.
  block = [-1] + [q // 8 for q in range(32)]
  expected = np.array([[block[k] <= block[q] for k in range(s)] for q in range(s)])
  np.testing.assert_array_equal(_layout_mask(layout), expected)


def _naive_order(grid, block):
  (t, h, w), (bt, bh, bw) = grid, block
  order = []
  for tb, hb, wb in itertools.product(range(t // bt), range(h // bh), range(w // bw)):
    for i, j, k in itertools.product(range(bt), range(bh), range(bw)):
      order.append(((tb * bt + i) * h + hb * bh + j) * w + wb * bw + k)
  return np.array(order)


@pytest.mark.parametrize('block', SHAPES, ids=lambda b: 'x'.join(map(str, b)))
def test_permutation_round_trip_and_naive(block):
  grid = (4, 16, 16) if block[0] == 2 else (5, 16, 16)
  layout = BlockLayout(grid, block)
  codes = np.random.default_rng(0).integers(0, 64000, (2, *grid))
  seq = layout.grid_to_seq(codes)
  assert seq.shape == (2, np.prod(grid))
  np.testing.assert_array_equal(seq, codes.reshape(2, -1)[:, _naive_order(grid, block)])
  np.testing.assert_array_equal(layout.seq_to_grid(seq), codes)
  np.testing.assert_array_equal(layout.order, _naive_order(grid, block))


def test_rows_and_frames_are_raster_order():
  for block in [(1, 1, 16), (1, 16, 16), (1, 1, 1)]:
    np.testing.assert_array_equal(BlockLayout((5, 16, 16), block).order, np.arange(1280))


def test_bad_tiling_names_the_shapes():
  with pytest.raises(LayoutError, match=r'block_shape=\(2, 1, 8\) does not tile latent_shape=\(5, 16, 16\)'):
    BlockLayout((5, 16, 16), (2, 1, 8))


@pytest.mark.parametrize('first,block,ctx,steps', [
    ('hybrid', (1, 1, 16), 0, 95),   # official UCF-101: 16 single steps + 79 rows
    ('none', (1, 1, 16), 512, 48),   # official K600 frame prediction
    ('none', (1, 1, 1), 512, 768),   # NTP on the same clip
    ('bov', (1, 1, 16), 0, 80),
    ('bov', (1, 16, 16), 0, 5),
    ('bov', (1, 4, 4), 256, 64),
])
def test_decode_step_counts(first, block, ctx, steps):
  prefix = 8 if first == 'hybrid' else 0
  layout = BlockLayout((5, 16, 16), block, prefix_len=prefix, first_block=first)
  plan = layout.decode_plan(ctx)
  assert plan.num_steps == steps
  assert plan.cache_len == layout.seq_len and plan.num_tokens == 1280


def test_decode_plan_hybrid_phases():
  plan = BlockLayout((5, 16, 16), (1, 1, 16), prefix_len=8, first_block='hybrid').decode_plan(0)
  assert (plan.prefill_len, plan.first_group) == (9, 1)  # prefix + BOV -> z0
  assert plan.phases == ((9, 1, 15), (24, 16, 79))  # then z0..z14 one by one, then blocks from position 24


def test_none_without_context_is_a_clear_error():
  layout = BlockLayout((5, 16, 16), (1, 1, 16), first_block='none')
  with pytest.raises(LayoutError, match='at least one block of context'):
    layout.decode_plan(0)
  with pytest.raises(LayoutError, match='whole number'):
    layout.decode_plan(8)


def test_official_ucf_sequence():
  text = [[1, 450, 2, 2, 2, 2, 2, 2]] * 101
  vocab = Vocab.official_ucf(text)
  assert vocab.vocab_size == 96016 and vocab.video_slice == (32016, 96016) and vocab.bov_id == 0
  assert vocab.placeholder_ids == tuple(range(1, 16)) and vocab.prefix_len == 8
  layout = BlockLayout((5, 16, 16), (1, 1, 16), prefix_len=8, first_block='hybrid')
  z = np.random.default_rng(1).integers(0, 64000, (1, 1280))
  prefix = np.asarray(vocab.prefix_ids(np.array([3]), 1))
  np.testing.assert_array_equal(prefix[0], np.array(text[3]) + 16)
  # The official sequence (docs/design.md): [8 text ids, BOV, z0..z15, placeholders 1..15, z16..z1279], minus 16.
  full = np.concatenate([prefix[0], [0], z[0, :16] + 32016, np.arange(1, 16), z[0, 16:] + 32016])
  ids = np.asarray(layout.input_ids(prefix, z, vocab))
  assert ids.shape == (1, 1288)
  np.testing.assert_array_equal(ids[0], full[:-16])
  # Outputs from position 8 on are scored against z0..z1279.
  np.testing.assert_array_equal(layout.target_index, np.r_[[-1] * 8, np.arange(1280)])
  # Mask: every row sees the 8 text columns; causal to position 24, then 16-blocks.
  m = _layout_mask(layout)
  assert m[:, :8].all()
  np.testing.assert_array_equal(m[8:24, 8:24], np.tril(np.ones((16, 16), bool)))
  assert m[24, 24:40].all() and not m[24, 40:].any() and m[39, 24:40].all()


def test_official_k600_and_native_vocab():
  k600 = Vocab.official_k600()
  assert (k600.vocab_size, k600.video_offset, k600.bov_id, k600.prefix_len) == (64000, 0, -1, 0)
  native = Vocab.native(64000, first_block='hybrid', block_len=16, num_classes=101)
  assert native.bov_id == 64000 and native.placeholder_ids == tuple(range(64001, 64016))
  assert native.class_prefix[0] == (64016,) and native.vocab_size == 64128  # 64117 ids, padded to 128
  layout = BlockLayout((1, 1, 8), (1, 1, 4), prefix_len=0, first_block='bov')
  with pytest.raises(LayoutError, match='BOV'):
    layout.input_ids(np.zeros((1, 0), np.int32), np.zeros((1, 8), np.int32), k600)


@pytest.mark.parametrize('first_block', ['bov', 'hybrid', 'none'])
@pytest.mark.parametrize('block', [(1, 1, 1), (1, 2, 4), (1, 4, 4), (2, 2, 2)])
def test_target_coordinates_are_the_grid_place_of_each_target(first_block, block):
  layout = BlockLayout((2, 4, 4), block, prefix_len=1, first_block=first_block)
  # Reference: walk the blocks in raster order, their tokens in raster order, and note each token's (t, h, w).
  bt, bh, bw = block
  walk = [(t0 + t, h0 + h, w0 + w)
          for t0, h0, w0 in itertools.product(range(0, 2, bt), range(0, 4, bh), range(0, 4, bw))
          for t, h, w in itertools.product(range(bt), range(bh), range(bw))]
  coords = layout.target_coordinates
  assert coords.shape == (layout.seq_len, 3)
  np.testing.assert_array_equal(coords[0], [-1, -1, -1])  # the prefix
  for q in range(1, layout.seq_len):
    assert tuple(coords[q]) == walk[layout.target_index[q]]
