"""Block layouts and token-id layouts: how a latent code grid becomes the transformer's sequence.

Two small frozen (hashable, jit-static) dataclasses:

* `Vocab`: which id means what (video codes, begin-of-video, hybrid placeholders, class-prefix ids). The native
  layout puts video codes first; `Vocab.official_k600` / `Vocab.official_ucf` keep the released checkpoints' ids.
* `BlockLayout`: the block rule of docs/design.md. Tokens are ordered block by block (blocks in raster order over the
  block grid, raster order inside a block). The *full* sequence is

      bov:    [prefix (P), BOV x L,                      z_0 .. z_{N-1}]
      hybrid: [prefix (P), BOV, z_0 .. z_{L-1}, ph_1 .. ph_{L-1}, z_L .. z_{N-1}]
      none:   [prefix (P),                               z_0 .. z_{N-1}]

  The model input is the full sequence without its last L ids (length `seq_len`); input position q predicts the
  video token `target_index[q]` (-1: not scored, i.e. the prefix). Past the start, position q predicts the token L
  places later. Every input position has a block id (prefix: -1); a query may attend to a key iff
  `block_id(key) <= block_id(query)`. In 'hybrid' the first L positions after the prefix are singleton blocks
  (token by token, as the official UCF-101 model), so its mask is causal there.

  'none' (official K600) never predicts the first block: such a model needs at least one block of context at
  sampling time (frame prediction); `decode_plan` raises otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from nbp_jax import config_lib
from nbp_jax import errors

# Kinds of input positions (see BlockLayout.input_sources).
PREFIX, VIDEO, BOV, PLACEHOLDER = 0, 1, 2, 3

# Official UCF-101 layout (docs/design.md): BOV 0, placeholders 1..15, LLaMA-2 text ids + 16, video codes + 32016.
OFFICIAL_UCF_TEXT_OFFSET = 16
OFFICIAL_UCF_VIDEO_OFFSET = 32016
OFFICIAL_UCF_VOCAB_SIZE = 96016
OFFICIAL_UCF_PREFIX_LEN = 8
OFFICIAL_CODEBOOK_SIZE = 64000


class LayoutError(errors.UserError, ValueError):
  """A block or id layout does not fit; the message names the field and the fix."""


def block_name(block_shape: Sequence[int]) -> str:
  """(1, 1, 16) -> '1x1x16', as tables, run folders and logs name a block shape."""
  return 'x'.join(str(int(b)) for b in block_shape)


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary.


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Token-id layout.

  Attributes:
    codebook_size: C, number of video codes (64000 for FSQ 8,8,8,5,5,5).
    video_offset: id of video code 0; video ids are the contiguous range [video_offset, video_offset + C).
    vocab_size: V, rows of the embedding and columns of the head.
    bov_id: begin-of-video id, -1 if none.
    placeholder_ids: ids fed after the first row in the 'hybrid' start (needs >= L-1 of them).
    class_prefix: per class, the prefix ids that condition on it (native: one class id; official UCF: the 8
      LLaMA-2 ids of the class name, already shifted by the text offset). Empty = unconditional.
  """
  codebook_size: int
  video_offset: int
  vocab_size: int
  bov_id: int = -1
  placeholder_ids: tuple[int, ...] = ()
  class_prefix: tuple[tuple[int, ...], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'placeholder_ids', tuple(int(i) for i in self.placeholder_ids))
    object.__setattr__(self, 'class_prefix', tuple(tuple(int(i) for i in row) for row in self.class_prefix))
    if self.video_offset < 0 or self.video_offset + self.codebook_size > self.vocab_size:
      raise LayoutError(f'video ids [{self.video_offset}, {self.video_offset + self.codebook_size}) do not fit '
                        f'vocab_size={self.vocab_size}; raise vocab_size or fix video_offset.')
    if len({len(r) for r in self.class_prefix}) > 1:
      raise LayoutError('class_prefix rows differ in length; every class needs the same number of prefix ids.')
    ids = [self.bov_id] * (self.bov_id >= 0) + list(self.placeholder_ids) + [i for r in self.class_prefix for i in r]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise LayoutError(f'special ids {bad[:4]} are outside [0, vocab_size={self.vocab_size}).')
    video = [i for i in ids if self.video_offset <= i < self.video_offset + self.codebook_size]
    if video:  # they would read as video codes (e.g. an official_ucf class prompt id of 32000 or more)
      raise LayoutError(f'special ids {video[:4]} fall among the video ids [{self.video_offset}, '
                        f'{self.video_offset + self.codebook_size}); check nbp.class_prefix_ids.')

  @property
  def prefix_len(self) -> int:
    return len(self.class_prefix[0]) if self.class_prefix else 0

  @property
  def num_classes(self) -> int:
    return len(self.class_prefix)

  @property
  def video_slice(self) -> tuple[int, int]:
    """[lo, hi) of the video ids: the only columns of the head that are trained and sampled."""
    return (self.video_offset, self.video_offset + self.codebook_size)

  def prefix_ids(self, labels: jnp.ndarray | None, batch_size: int) -> jnp.ndarray:
    """labels [B] int32 class ids -> [B, prefix_len] int32 prefix ids ([B, 0] when unconditional)."""
    if not self.class_prefix:
      return jnp.zeros((batch_size, 0), jnp.int32)
    if labels is None:
      raise LayoutError(f'this model is class-conditional ({self.num_classes} classes); pass labels [B] int32.')
    return jnp.asarray(np.array(self.class_prefix, np.int32))[labels]

  @classmethod
  def native(cls, codebook_size: int, *, first_block: str = 'bov', block_len: int = 16, num_classes: int = 0,
             pad_to: int = 128) -> Vocab:
    """Video codes [0, C), then BOV, then L-1 placeholders ('hybrid' only), then one id per class.

    vocab_size is rounded up to a multiple of `pad_to` so the 'vocab' axis shards evenly over tensor-parallel
    devices (the extra rows are never used).
    """
    nxt = codebook_size
    bov = -1
    if first_block in ('bov', 'hybrid'):
      bov, nxt = nxt, nxt + 1
    placeholders = ()
    if first_block == 'hybrid':
      placeholders = tuple(range(nxt, nxt + block_len - 1))
      nxt += block_len - 1
    classes = tuple((nxt + c,) for c in range(num_classes))
    vocab_size = -(-(nxt + num_classes) // pad_to) * pad_to
    return cls(codebook_size=codebook_size, video_offset=0, vocab_size=vocab_size, bov_id=bov,
               placeholder_ids=placeholders, class_prefix=classes)

  @classmethod
  def official_k600(cls) -> Vocab:
    """Released K600 model: V = 64000, id = video code, no special ids."""
    return cls(codebook_size=OFFICIAL_CODEBOOK_SIZE, video_offset=0, vocab_size=OFFICIAL_CODEBOOK_SIZE)

  @classmethod
  def official_ucf(cls, class_text_ids: Sequence[Sequence[int]]) -> Vocab:
    """Released UCF-101 model: V = 96016, BOV 0, placeholders 1..15, text ids + 16, video codes + 32016.

    Args:
      class_text_ids: per class, the 8 LLaMA-2 token ids of its name (with BOS, padded with EOS), unshifted.
    """
    rows = tuple(tuple(int(i) + OFFICIAL_UCF_TEXT_OFFSET for i in r) for r in class_text_ids)
    if any(len(r) != OFFICIAL_UCF_PREFIX_LEN for r in rows):
      raise LayoutError(f'official UCF-101 class prompts have {OFFICIAL_UCF_PREFIX_LEN} text ids each; '
                        'pad with EOS or truncate.')
    return cls(codebook_size=OFFICIAL_CODEBOOK_SIZE, video_offset=OFFICIAL_UCF_VIDEO_OFFSET,
               vocab_size=OFFICIAL_UCF_VOCAB_SIZE, bov_id=0, placeholder_ids=tuple(range(1, 16)),
               class_prefix=rows)


# ----------------------------------------------------------------------------------------------------------------
# Block layout.


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """Static schedule of one generation (all Python ints).

  Attributes:
    num_context: video tokens given (sequence order), a multiple of L.
    num_tokens: video tokens known at the end (context + generated).
    prefill_len: input positions run in the prefill; its last `first_group` outputs give the first sample.
    first_group: size of the group sampled from the prefill.
    phases: (first input position, group size, number of steps) of the per-step loops after the prefill.
    cache_len: input positions the KV cache must hold.
  """
  num_context: int
  num_tokens: int
  prefill_len: int
  first_group: int
  phases: tuple[tuple[int, int, int], ...]
  cache_len: int

  @property
  def num_steps(self) -> int:
    """Sampling rounds (the prefill's included): 48 for K600 frame prediction, 95 for a hybrid UCF clip."""
    return 1 + sum(n for _, _, n in self.phases)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Latent grid (t, h, w) tiled by blocks (bt, bh, bw); see the module docstring for the sequence.

  Attributes:
    latent_shape: (t, h, w) of the code grid, e.g. (5, 16, 16).
    block_shape: (bt, bh, bw), each dividing the grid; (1, 1, 1) is next-token prediction.
    prefix_len: P, condition tokens seen by every position (0 = unconditional).
    first_block: 'bov', 'hybrid' or 'none' (see module docstring).
  """
  latent_shape: tuple[int, int, int]
  block_shape: tuple[int, int, int] = (1, 1, 16)
  prefix_len: int = 0
  first_block: str = 'bov'

  def __post_init__(self):
    object.__setattr__(self, 'latent_shape', tuple(int(x) for x in self.latent_shape))
    object.__setattr__(self, 'block_shape', tuple(int(x) for x in self.block_shape))
    g, b = self.latent_shape, self.block_shape
    if len(g) != 3 or len(b) != 3 or any(x <= 0 for x in g + b):
      raise LayoutError(f'latent_shape={g} and block_shape={b} must be three positive ints (t, h, w).')
    if any(gi % bi for gi, bi in zip(g, b)):
      raise LayoutError(f'block_shape={b} does not tile latent_shape={g}; each block size must divide the grid.')
    if self.first_block not in config_lib.FIRST_BLOCK_MODES:
      raise LayoutError(f'first_block={self.first_block!r} must be one of {config_lib.FIRST_BLOCK_MODES}.')
    if self.prefix_len < 0:
      raise LayoutError(f'prefix_len={self.prefix_len} must be >= 0.')

  # Sizes. --------------------------------------------------------------------------------------------------

  @property
  def num_tokens(self) -> int:
    """N, video tokens per clip."""
    return math.prod(self.latent_shape)

  @property
  def block_len(self) -> int:
    """L, tokens per block."""
    return math.prod(self.block_shape)

  @property
  def num_blocks(self) -> int:
    return self.num_tokens // self.block_len

  @property
  def block_grid(self) -> tuple[int, int, int]:
    return tuple(g // b for g, b in zip(self.latent_shape, self.block_shape))

  @property
  def num_single(self) -> int:
    """Positions after the prefix that are their own block (the hybrid start, token by token)."""
    return self.block_len if self.first_block == 'hybrid' else 0

  @property
  def target_offset(self) -> int:
    """Video index predicted by the first position after the prefix (L for 'none': block 0 is never predicted)."""
    return self.block_len if self.first_block == 'none' else 0

  @property
  def seq_len(self) -> int:
    """S, model input length (full sequence minus its last L ids)."""
    return self.prefix_len + self.num_tokens - self.target_offset

  @property
  def num_targets(self) -> int:
    """Scored positions per clip: N (bov, hybrid) or N - L (none)."""
    return self.num_tokens - self.target_offset

  # Grid <-> sequence permutation. ---------------------------------------------------------------------------

  def grid_to_seq(self, codes):
    """codes [..., t, h, w] -> [..., N] in block-major order (works on numpy and jax arrays)."""
    (gt, gh, gw), (bt, bh, bw) = self.block_grid, self.block_shape
    lead = codes.shape[:-3]
    x = codes.reshape(*lead, gt, bt, gh, bh, gw, bw)
    n = len(lead)
    x = x.transpose(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5)
    return x.reshape(*lead, self.num_tokens)

  def seq_to_grid(self, seq):
    """seq [..., N] block-major -> [..., t, h, w] (exact inverse of grid_to_seq)."""
    (gt, gh, gw), (bt, bh, bw) = self.block_grid, self.block_shape
    lead = seq.shape[:-1]
    x = seq.reshape(*lead, gt, gh, gw, bt, bh, bw)
    n = len(lead)
    x = x.transpose(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5)
    return x.reshape(*lead, *self.latent_shape)

  @functools.cached_property
  def order(self) -> np.ndarray:
    """[N] int: flat (raster) grid index of each sequence position."""
    return self.grid_to_seq(np.arange(self.num_tokens).reshape(self.latent_shape))

  # Positions, block ids, mask. ------------------------------------------------------------------------------

  def block_ids(self, positions):
    """positions [...] int (input positions) -> block ids [...] int32 (prefix -1); index arithmetic only.

    numpy in -> numpy out (static schedules); jax in -> jax out (traced positions).
    """
    xp = np if isinstance(positions, (np.ndarray, int, list, range)) else jnp
    p = xp.asarray(positions, xp.int32) - self.prefix_len
    ns, blen = self.num_single, self.block_len
    rest = ns + (p - ns) // blen
    return xp.where(p < 0, -1, xp.where(p < ns, p, rest)).astype(xp.int32)

  # Input ids and targets. -----------------------------------------------------------------------------------

  @functools.cached_property
  def input_sources(self) -> tuple[np.ndarray, np.ndarray]:
    """(kind [S], index [S]) int32: what each input position holds.

    kind PREFIX: prefix id `index`; VIDEO: video token z_index; BOV; PLACEHOLDER: placeholder `index` (1-based).
    """
    P, L, N = self.prefix_len, self.block_len, self.num_tokens
    kind = [PREFIX] * P
    index = list(range(P))
    if self.first_block == 'bov':
      kind += [BOV] * L + [VIDEO] * (N - L)
      index += [0] * L + list(range(N - L))
    elif self.first_block == 'hybrid':
      kind += [BOV] + [VIDEO] * L + [PLACEHOLDER] * (L - 1) + [VIDEO] * (N - 2 * L)
      index += [0] + list(range(L)) + list(range(1, L)) + list(range(L, N - L))
      # A one-block clip has no room after the placeholders: cut to S.
      kind, index = kind[:self.seq_len], index[:self.seq_len]
    else:
      kind += [VIDEO] * (N - L)
      index += list(range(N - L))
    assert len(kind) == self.seq_len, (len(kind), self.seq_len)
    return np.array(kind, np.int32), np.array(index, np.int32)

  @functools.cached_property
  def target_index(self) -> np.ndarray:
    """[S] int32: video index predicted by each input position, -1 for the (unscored) prefix."""
    q = np.arange(self.seq_len) - self.prefix_len
    return np.where(q < 0, -1, q + self.target_offset).astype(np.int32)

  @functools.cached_property
  def target_coordinates(self) -> np.ndarray:
    """[S, 3] int32: latent (t, h, w) of the video token each input position predicts; (-1, -1, -1) for the
    prefix. Every scored position has its own coordinate, and a position and the one a block later are one block
    apart on the grid (e.g. the same place one latent frame on, for frame blocks)."""
    flat = self.order[np.maximum(self.target_index, 0)]  # raster index on the grid
    coords = np.stack(np.unravel_index(flat, self.latent_shape), axis=-1).astype(np.int32)
    return np.where(self.target_index[:, None] < 0, -1, coords).astype(np.int32)

  def input_ids_at(self, positions, prefix_ids, codes, vocab: Vocab):
    """Input ids at some positions.

    Args:
      positions: [T] int32 input positions (may be traced).
      prefix_ids: [B, P] int32.
      codes: [B, n] int32 video codes in sequence order (n >= the largest video index needed; unknown entries
        are never read for positions whose inputs are known).
      vocab: the id layout.
    Returns:
      [B, T] int32 ids.
    """
    kind_all, index_all = self.input_sources
    kind = jnp.asarray(kind_all)[positions]
    index = jnp.asarray(index_all)[positions]
    b = codes.shape[0]
    video = jnp.take(codes, jnp.clip(index, 0, codes.shape[1] - 1), axis=1) + vocab.video_offset
    out = video
    if self.prefix_len:
      out = jnp.where(kind == PREFIX, jnp.take(prefix_ids, jnp.clip(index, 0, self.prefix_len - 1), axis=1), out)
    if self.first_block in ('bov', 'hybrid'):
      if vocab.bov_id < 0:
        raise LayoutError(f"first_block={self.first_block!r} needs a BOV id; the vocabulary has none "
                          "(build it with Vocab.native(..., first_block=...)).")
      out = jnp.where(kind == BOV, vocab.bov_id, out)
    if self.first_block == 'hybrid':
      if len(vocab.placeholder_ids) < self.block_len - 1:
        raise LayoutError(f"first_block='hybrid' with {self.block_len}-token blocks needs {self.block_len - 1} "
                          f'placeholder ids; the vocabulary has {len(vocab.placeholder_ids)}.')
      ph = jnp.asarray(np.array((0,) + vocab.placeholder_ids, np.int32))
      out = jnp.where(kind == PLACEHOLDER, ph[jnp.clip(index, 0, len(vocab.placeholder_ids))], out)
    return jnp.broadcast_to(out, (b, kind.shape[0])).astype(jnp.int32)

  def input_ids(self, prefix_ids, codes, vocab: Vocab):
    """Teacher-forcing input: prefix_ids [B, P], codes [B, N] (sequence order) -> ids [B, S] int32."""
    return self.input_ids_at(jnp.arange(self.seq_len), prefix_ids, codes, vocab)

  def targets(self, codes):
    """codes [B, N] (sequence order) -> (targets [B, S] int32, weights [S] float32: 1 where scored)."""
    t = self.target_index
    return jnp.take(codes, np.maximum(t, 0), axis=1), jnp.asarray((t >= 0).astype(np.float32))

  # Decoding schedule. -----------------------------------------------------------------------------------------

  def groups(self) -> list[tuple[int, int]]:
    """(first input position, size) of every block after the prefix, in order."""
    ids = self.block_ids(np.arange(self.prefix_len, self.seq_len))
    starts = np.flatnonzero(np.diff(ids, prepend=-2)) + self.prefix_len
    sizes = np.diff(np.append(starts, self.seq_len))
    return [(int(s), int(n)) for s, n in zip(starts, sizes)]

  def decode_plan(self, num_context: int = 0, num_blocks: int | None = None) -> DecodePlan:
    """Schedule for generating `num_blocks` blocks (default: the rest) after `num_context` given tokens."""
    L, N = self.block_len, self.num_tokens
    if num_context % L or not 0 <= num_context < N:
      raise LayoutError(f'{num_context} context tokens is not a whole number of {L}-token blocks below {N}; '
                        'give whole blocks (context frames a multiple of block_shape[0]).')
    if self.first_block == 'none' and num_context == 0:
      raise LayoutError("first_block='none' never learns the first block: give at least one block of context "
                        "(frame prediction), or train with nbp.first_block='bov' or 'hybrid'.")
    end = N if num_blocks is None else num_context + num_blocks * L
    if num_blocks is not None and not num_context < end <= N:
      raise LayoutError(f'num_blocks={num_blocks} after {num_context // L} context blocks does not fit the '
                        f'{self.num_blocks} blocks of the clip.')
    kind, index = self.input_sources
    first, phases = None, []
    for start, size in self.groups():
      t0 = start - self.prefix_len + self.target_offset  # first video index this group predicts
      if t0 + size <= num_context:
        continue
      if t0 >= end:
        break
      if first is None:
        assert t0 == num_context, (t0, num_context)
        video_in = index[start:start + size][kind[start:start + size] == VIDEO]
        assert video_in.size == 0 or video_in.max() < num_context
        first = (start + size, size)
        continue
      if phases and phases[-1][1] == size and phases[-1][0] + phases[-1][1] * phases[-1][2] == start:
        phases[-1][2] += 1
      else:
        phases.append([start, size, 1])
    prefill_len, first_group = first
    cache_len = end - self.target_offset + self.prefix_len
    return DecodePlan(num_context=num_context, num_tokens=end, prefill_len=prefill_len, first_group=first_group,
                      phases=tuple(tuple(p) for p in phases), cache_len=cache_len)
