"""`Spec`: the static description of one NBP model (transformer sizes + block layout + id layout), from a config."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import ml_collections

from nbp_jax import config_lib
from nbp_jax.nbp.layout import BlockLayout
from nbp_jax.nbp.layout import Vocab
from nbp_jax.nbp.transformer import TransformerConfig

ID_LAYOUTS = ('native', 'official_k600', 'official_ucf')


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about a model; hashable, so jitted functions take it as a static argument."""
  model: TransformerConfig
  layout: BlockLayout
  vocab: Vocab

  def with_block_shape(self, block_shape: Sequence[int]) -> Spec:
    """Same model and ids, another block shape (e.g. (1, 1, 1) to decode token by token); ConfigError where its
    sequence is longer than the model's positions (they would be clamped to the last one)."""
    layout = dataclasses.replace(self.layout, block_shape=tuple(block_shape))
    _check_positions(layout, self.model.max_positions, f' (decoding with block_shape={tuple(block_shape)})')
    return dataclasses.replace(self, layout=layout)

  @property
  def num_params(self) -> int:
    """Parameter count (from shapes; no allocation)."""
    m = self.model
    d, f = m.emb_dim, m.mlp_ratio * m.emb_dim
    per_layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    return m.num_layers * per_layer + 2 * m.vocab_size * d + m.max_positions * d + 2 * d + m.prefix_len * d


def _check_positions(layout: BlockLayout, max_positions: int, where: str = '') -> None:
  if layout.seq_len > max_positions:
    raise config_lib.ConfigError(f'{layout.seq_len} input positions{where} do not fit model.max_positions='
                                 f'{max_positions}; raise it or use shorter clips.')


def check_layouts(config: ml_collections.ConfigDict, mode: str) -> None:
  """Builds the specs `mode` trains or samples (the pipeline's next-token model and the study's block shapes too),
  so that a layout longer than model.max_positions, or an id layout's unmet needs, stop before any stage runs
  (ConfigError naming the fix); config_lib.validate checks what it can without building layouts."""
  if mode not in config_lib.TRANSFORMER_MODES or mode == 'import':  # the import writes what the UCF vocabulary needs
    return
  shapes = {tuple(s) for s in config.study.block_shapes} if mode == 'study' else {tuple(config.nbp.block_shape)}
  if mode == 'pipeline':
    shapes.add((1, 1, 1))
  for shape in sorted(shapes):
    trained = config.copy_and_resolve_references()
    trained.nbp.block_shape = shape
    spec_from_config(trained)


def spec_from_config(config: ml_collections.ConfigDict, *, dtype: str | None = None) -> Spec:
  """Builds the Spec of `config` (model.*, nbp.*, data.*, tokenizer.fsq_levels); errors name the field. The same
  model decoding other blocks: `Spec.with_block_shape` (it keeps the vocabulary, so the params still fit)."""
  m, nbp = config.model, config.nbp
  id_layout = nbp.get('id_layout', 'native')
  block_shape = tuple(nbp.block_shape)
  block_len = block_shape[0] * block_shape[1] * block_shape[2]
  codebook = config_lib.codebook_size(config.tokenizer)
  num_classes = config.data.num_classes if nbp.condition == 'class' else 0
  if id_layout == 'native':
    vocab = Vocab.native(codebook, first_block=nbp.first_block, block_len=block_len, num_classes=num_classes)
  elif id_layout == 'official_k600':
    if nbp.condition != 'none' or nbp.first_block != 'none' or codebook != 64000:
      raise config_lib.ConfigError("nbp.id_layout='official_k600' is the released unconditional K600 model: it "
                                   "needs nbp.condition='none', nbp.first_block='none' and FSQ levels (8,8,8,5,5,5).")
    vocab = Vocab.official_k600()
  elif id_layout == 'official_ucf':
    rows = tuple(nbp.get('class_prefix_ids', ()))
    if nbp.condition != 'class' or nbp.first_block != 'hybrid' or block_len != 16 or codebook != 64000:
      raise config_lib.ConfigError("nbp.id_layout='official_ucf' is the released UCF-101 model: it needs "
                                   "nbp.condition='class', nbp.first_block='hybrid', 16-token blocks and FSQ "
                                   "levels (8,8,8,5,5,5).")
    if len(rows) != num_classes:
      raise config_lib.ConfigError(f'nbp.class_prefix_ids has {len(rows)} rows for data.num_classes={num_classes}; '
                                   'run --mode=import with --config.import_.llama_tokenizer=/path/tokenizer.model '
                                   'to write the class prompts.')
    vocab = Vocab.official_ucf(rows)
  else:
    raise config_lib.ConfigError(f'nbp.id_layout={id_layout!r} is unknown; pick one of {ID_LAYOUTS}.')

  layout = BlockLayout(config_lib.latent_shape(config), block_shape, prefix_len=vocab.prefix_len,
                       first_block=nbp.first_block)
  _check_positions(layout, m.max_positions)
  if layout.num_targets == 0:
    raise config_lib.ConfigError(f"nbp.block_shape={block_shape} is the whole latent grid and nbp.first_block="
                                 f"'{nbp.first_block}' predicts no first block: nothing is left to learn; use "
                                 "smaller blocks or nbp.first_block='bov'.")
  model = TransformerConfig(
      vocab_size=vocab.vocab_size, num_layers=m.num_layers, num_heads=m.num_heads, emb_dim=m.emb_dim,
      mlp_ratio=m.mlp_ratio, max_positions=m.max_positions, prefix_len=vocab.prefix_len, dropout=m.dropout,
      dtype=dtype or config_lib.resolve_dtype(m.dtype), param_dtype=m.param_dtype, attention=m.attention,
      scan_layers=bool(m.get('scan_layers', True)), remat=bool(m.remat),
      pos_emb_init=m.get('pos_emb_init', 'zeros'))
  return Spec(model=model, layout=layout, vocab=vocab)
