"""The teacher-forced objective, the `Task` the shared trainer consumes, and `--mode=train`.

Batch: {'codes': int32 [B, t, h, w], 'label': int32 [B] (class-conditional only)}. The codes are put in block-major
order, the input is [prefix, start block, z...] without its last L ids (layout.py), and the loss is the
cross-entropy of the video targets only: prefix outputs are not scored, and the softmax runs over the video ids
(the only ids ever sampled), so the head's other columns are neither computed nor trained.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import parallel
from nbp_jax import trainer
from nbp_jax.data import builder
from nbp_jax.data import pipeline
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.nbp.transformer import Transformer
from nbp_jax.task import Task
from nbp_jax.tokenizer import load as tokenizer_load
from nbp_jax.tokenizer import model as tokenizer_model
from nbp_jax.tokenizer import tokenize


def init_params(spec: Spec, rng: jax.Array):
  """rng -> params with logical axis names (flax `LogicallyPartitioned` boxes); pos_emb as model.pos_emb_init says."""
  layout, cfg = spec.layout, spec.model
  ids = jnp.zeros((1, layout.seq_len), jnp.int32)
  params = Transformer(cfg).init({'params': rng}, ids, layout.block_ids(np.arange(layout.seq_len)))['params']
  if cfg.pos_emb_init == 'grid':
    table = transformer_lib.grid_position_table(layout.target_coordinates, layout.latent_shape, cfg.emb_dim,
                                                cfg.max_positions)
    params = {**params, 'pos_emb': params['pos_emb'].replace_boxed(jnp.asarray(table, cfg.param_dtype))}
  return params


def abstract_params(spec: Spec):
  """The params' abstract tree (shapes and dtypes, unboxed) that `spec` builds, without computing them."""
  return nn.unbox(jax.eval_shape(lambda rng: init_params(spec, rng), jax.random.key(0)))


def logits_fn(spec: Spec, params, batch, rng: jax.Array | None = None, train: bool = False,
              cond_drop_prob: float = 0.0):
  """Teacher-forced logits of the scored positions.

  Returns:
    (logits [B, T, C] float32 over the video ids, targets [B, T] int32 video codes), T = layout.num_targets.
  """
  layout, vocab, cfg = spec.layout, spec.vocab, spec.model
  codes = layout.grid_to_seq(batch['codes'].astype(jnp.int32))
  b = codes.shape[0]
  prefix = vocab.prefix_ids(batch.get('label'), b)
  ids = layout.input_ids(prefix, codes, vocab)
  targets, _ = layout.targets(codes)
  p = layout.prefix_len
  null_cond = None
  rngs = {}
  if train:
    rng, drop_rng = jax.random.split(rng)
    rngs = {'dropout': drop_rng}
    if cfg.prefix_len and cond_drop_prob > 0:
      null_cond = jax.random.bernoulli(rng, cond_drop_prob, (b,))
  logits = Transformer(cfg).apply({'params': nn.meta.unbox(params)}, ids, layout.block_ids(np.arange(ids.shape[1])),
                                  null_cond=null_cond, train=train, out_slice=(p, layout.seq_len),
                                  vocab_slice=vocab.video_slice, rngs=rngs)
  return logits, targets[:, p:]


def loss_fn(spec: Spec, params, batch, rng: jax.Array, train: bool = True, cond_drop_prob: float = 0.0):
  """-> (mean cross-entropy over video targets, {'loss', 'accuracy', 'top5_accuracy'}). No perplexity: the trainer
  averages metrics over micro-batches and eval batches, and a mean of exp(loss) is not exp of the mean loss
  (exp(val_loss) is the perplexity)."""
  logits, targets = logits_fn(spec, params, batch, rng, train, cond_drop_prob)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  loss = ce.mean()
  # Accuracy and top-5 from one count of the codes scored above the target (the target's rank; a tie with the top
  # counts as a hit): one O(V) pass. lax.top_k fused behind the head's matmul falls back to a full sort on CPU
  # (seconds per step over 64k codes), and a separate argmax is one more pass over the [B, T, V] logits (~0.25 s of
  # bench train's 15 s step).
  scored = jax.lax.stop_gradient(logits)
  target_logit = jnp.take_along_axis(scored, targets[..., None], axis=-1)
  rank = jnp.sum(scored > target_logit, axis=-1, dtype=jnp.int32)
  metrics = {
      'loss': loss,
      'accuracy': (rank == 0).mean(),
      'top5_accuracy': (rank < 5).mean(),
  }
  return loss, metrics


def flops_per_example(spec: Spec) -> float:
  """Training FLOPs (forward + backward = 3x forward) of one clip: matmuls + attention scores."""
  m, layout = spec.model, spec.layout
  d, s = m.emb_dim, layout.seq_len
  per_token = m.num_layers * (4 * d * d + 2 * m.mlp_ratio * d * d)  # q, k, v, proj + MLP multiply-adds
  head = layout.num_targets * d * spec.vocab.codebook_size
  # QK^T and AV: 2 * s^2 * d multiply-adds per layer; about half the pairs are visible (block-causal).
  attn = m.num_layers * 2 * s * s * d * 0.5
  return float(3 * 2 * (per_token * s + head + attn))


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The NBP transformer as a trainer Task."""
  spec = spec_from_config(config)
  drop = float(config.nbp.cond_drop_prob)

  def task_loss(params, batch, rng, train):
    return loss_fn(spec, params, batch, rng, train, drop if train else 0.0)

  return Task(name='nbp', init_params=lambda rng: init_params(spec, rng), loss_fn=task_loss,
              flops_per_example=flops_per_example(spec), tokens_per_example=spec.layout.num_targets,
              # A resume also keeps the objective: another block shape trains another model from these params.
              function_fields=(*checkpoint_lib.FUNCTION_FIELDS, 'nbp.block_shape'))


def _sample_writer(config: ml_collections.ConfigDict, spec: Spec, tok_model, tok_params):
  """Task.write_samples: a few generated clips as mp4/gif + PNG grid in WORKDIR/samples/step_<step>."""
  count = min(config.sample.num_samples, config.sample.batch_size)
  labels = np.arange(count, dtype=np.int32) % config.data.num_classes if config.nbp.condition == 'class' else None
  generator = generator_lib.Generator(config, spec, params=None, tokenizer=tok_model, tokenizer_params=tok_params)

  def write(params, step, workdir):
    if config.nbp.first_block == 'none':
      return  # such a model only continues given frames; --mode=sample does that with held-out clips
    at_step = dataclasses.replace(generator, params=params, step=step)
    codes = at_step.codes(jax.random.key(step), labels=labels, batch_size=None if labels is not None else count)
    generator_lib.write_samples(at_step.decode(codes), os.path.join(workdir, 'samples', f'step_{step}'),
                                config.data.fps)

  return write


def missing_stages(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The modes still to run, in order, before `--mode=train` has data: prepare_data, train_tokenizer, tokenize."""
  if config.data.use_tokenized and tokenize.tokens_location(config, workdir).exists():
    return []
  have_tokenizer = os.path.isdir(os.path.join(tokenizer_load.tokenizer_workdir(config, workdir),
                                              checkpoint_lib.CHECKPOINT_DIR))
  needed = [] if builder.video_location(config, workdir).exists() else ['prepare_data']
  needed += [] if have_tokenizer else ['train_tokenizer']
  return needed + (['tokenize'] if config.data.use_tokenized else [])


def _require_the_datasets_classes(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A class-conditional model has one embedding per class of its dataset: refuses a dataset whose class count
  differs from data.num_classes, or whose training clips lack labels (-1), which the embedding's gather would clamp
  to its last class, silently."""
  location = builder.video_location(config, workdir)
  if config.nbp.condition != 'class' or not location.exists():
    return
  metadata = builder.load_info(location).metadata
  classes = metadata.get('class_names') or []
  if classes and len(classes) != config.data.num_classes:
    raise config_lib.ConfigError(
        f'data.num_classes={config.data.num_classes} but the dataset at {location.path} has {len(classes)} classes; '
        f'set --config.data.num_classes={len(classes)}.')
  unlabeled = (metadata.get('unlabeled_videos') or {}).get('train', 0)
  if not classes or unlabeled:
    which = f'{unlabeled} of its training videos have' if classes else 'its videos have'
    raise config_lib.ConfigError(
        f'a class-conditional model needs a label for every training clip, but {which} no class (the dataset at '
        f'{location.path}); label them in the data folder, or train without classes: --config.nbp.condition=none.')


TRAINING_DATA_FILE = 'training_data.json'


def _check_training_data(workdir: str, data: dict) -> None:
  """Refuses to resume (or call trained) a run on other codes than it trained on: its clips' preparation and the
  tokenizer step that encoded them, recorded in WORKDIR/training_data.json once it has a checkpoint
  (_record_training_data; a pipeline rerun after the tokenizer or the clips changed reused models trained on the old
  codes)."""
  path = os.path.join(workdir, TRAINING_DATA_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != data:
      raise errors.UserError(
          f'{workdir} was trained on other codes ({saved}; now {data}: the clips were prepared again or another '
          f'tokenizer encoded them). Train into a fresh --workdir, or delete {workdir} to train it again.')


def _record_training_data(workdir: str, data: dict) -> None:
  """Writes what _check_training_data compares, once the run has a checkpoint (a refused start writes nothing)."""
  path = os.path.join(workdir, TRAINING_DATA_FILE)
  if (parallel.is_primary() and not os.path.exists(path)
      and os.path.isdir(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR))):
    checkpoint_lib.write_json(path, data)


def run(config: ml_collections.ConfigDict, workdir: str) -> trainer.TrainState:
  """`--mode=train`: trains the transformer on pre-tokenized codes (data.use_tokenized) or on clips encoded on the
  fly by the trained tokenizer; checkpoints, metrics and samples go to WORKDIR."""
  _require_the_datasets_classes(config, workdir)
  task = make_task(config)
  spec = spec_from_config(config)
  missing = missing_stages(config, workdir)
  if missing:
    where = (tokenize.tokens_location(config, workdir).path if config.data.use_tokenized else
             builder.video_location(config, workdir).path if 'prepare_data' in missing else
             tokenizer_load.tokenizer_workdir(config, workdir))
    raise errors.MissingError(
        f'Nothing to train on yet ({where} does not exist). Run first, in order, with the same --config and '
        f'--workdir: {", then ".join(f"--mode={m}" for m in missing)}'
        # The pipeline also trains and evaluates an NTP model beside this one: a toy's minutes, a paper preset's days.
        + (' (or --mode=pipeline, which runs every stage).' if config.data.source == 'synthetic' else '.')
        + (' Or encode clips on the fly with --config.data.use_tokenized=False.' if config.data.use_tokenized else ''))
  try:
    tok_model, tok_params, tok_step = tokenizer_load.load_tokenizer(config, workdir)
  except FileNotFoundError:
    if not config.data.use_tokenized:
      raise
    tok_model = tok_params = tok_step = None  # training on stored codes needs no tokenizer; samples do
  if config.data.use_tokenized:
    location = tokenize.tokens_location(config, workdir)
    if tok_model is not None:  # the codes the tokenize stage would refuse are refused here too
      tokenize.check_codes(location, tokenize.codes_metadata(config, workdir, tok_step, tok_model.spec),
                           builder.video_location(config, workdir).path, same_workdir=False)
    codes = builder.load_info(location).metadata
    data = {'clips': codes.get('source_id'), 'tokenizer_step': codes.get('tokenizer_step')}
  else:
    data = {'clips': builder.dataset_id(builder.video_location(config, workdir)), 'tokenizer_step': tok_step}
    location = None
    encode = functools.partial(tokenizer_model.encode, model=tok_model)
    task = dataclasses.replace(task, prepare_batch=lambda b: {**b, 'codes': encode(tok_params, b['video'])})
  _check_training_data(workdir, data)
  if tok_model is not None and config.train.sample_every:
    task = dataclasses.replace(task, write_samples=_sample_writer(config, spec, tok_model, tok_params))
  train_data = pipeline.make_iterator(pipeline.make_dataset(config, workdir, 'train', seed=config.seed,
                                                            location=location),
                                      worker_count=config.data.worker_count)
  eval_data = pipeline.make_dataset(config, workdir, 'eval', seed=0, location=location)
  try:
    state = trainer.train(config, workdir, task, train_data, eval_data)
  except errors.Preempted:  # saved: the checkpoint is of these codes (a refused start records nothing)
    _record_training_data(workdir, data)
    raise
  _record_training_data(workdir, data)
  return state
