"""Teacher-forced objective: scored positions and targets vs a hand-written reference; the trainer Task."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nbp_jax import config_lib
from nbp_jax.nbp import train
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.nbp.transformer import Transformer
from nbp_jax.task import Task


def _config(first_block='bov'):
  c = config_lib.task_config('demo', 'micro')  # latent (5, 4, 4), block 1x1x4, class prefix, 4 classes
  c.tokenizer.fsq_levels = (4, 4)  # 16 codes
  c.nbp.first_block = first_block
  return c


def _batch(b=2, seed=0):
  rng = np.random.default_rng(seed)
  return {'codes': jnp.asarray(rng.integers(0, 16, (b, 5, 4, 4)), jnp.int32),
          'label': jnp.asarray(rng.integers(0, 4, (b,)), jnp.int32)}


def _reference_loss(spec, params, batch):
  """CE from the full forward (all positions, full vocabulary), scoring by hand: position q predicts z[q - P]."""
  layout, vocab = spec.layout, spec.vocab
  z = np.asarray(layout.grid_to_seq(batch['codes']))
  prefix = vocab.prefix_ids(batch['label'], z.shape[0])
  ids = layout.input_ids(prefix, z, vocab)
  logits = np.asarray(Transformer(spec.model).apply({'params': nn.meta.unbox(params)}, ids,
                                                    layout.block_ids(np.arange(ids.shape[1]))))
  lo, hi = vocab.video_slice
  p, off = layout.prefix_len, layout.target_offset
  losses = []
  for q in range(p, layout.seq_len):  # the prefix outputs are skipped
    v = logits[:, q, lo:hi]
    logp = v - v.max(-1, keepdims=True) - np.log(np.exp(v - v.max(-1, keepdims=True)).sum(-1, keepdims=True))
    losses.append(-logp[np.arange(z.shape[0]), z[:, q - p + off]])
  return np.mean(losses)


def test_loss_scores_video_targets_only():
  for first in ('bov', 'none'):
    spec = spec_from_config(_config(first))
    params = train.init_params(spec, jax.random.key(0))
    batch = _batch()
    loss, metrics = train.loss_fn(spec, params, batch, jax.random.key(1), train=False)
    np.testing.assert_allclose(loss, _reference_loss(spec, params, batch), rtol=1e-5)
    assert 0 <= metrics['accuracy'] <= metrics['top5_accuracy'] <= 1
    logits, targets = train.logits_fn(spec, params, batch)
    assert logits.shape == (2, spec.layout.num_targets, 16) and targets.shape == (2, spec.layout.num_targets)


def test_condition_dropout_uses_the_null_embedding():
  spec = spec_from_config(_config())
  params = nn.meta.unbox(train.init_params(spec, jax.random.key(0)))
  params['uncond_embedding'] = params['uncond_embedding'] + 1.0
  batch = _batch()
  other = dict(batch, label=(batch['label'] + 1) % 4)
  # Dropout off (micro demo has model.dropout 0); cond_drop_prob ~1 drops every prefix: labels stop mattering.
  a, _ = train.loss_fn(spec, params, batch, jax.random.key(2), train=True, cond_drop_prob=0.999999)
  b, _ = train.loss_fn(spec, params, other, jax.random.key(2), train=True, cond_drop_prob=0.999999)
  c, _ = train.loss_fn(spec, params, other, jax.random.key(2), train=True, cond_drop_prob=0.0)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert abs(float(a) - float(c)) > 1e-4


def test_make_task_trains():
  config = _config()
  task = train.make_task(config)
  assert isinstance(task, Task) and task.name == 'nbp'
  assert task.tokens_per_example == 80 and task.flops_per_example > 6 * 80 * 2 * 12 * 32 * 32
  params = task.init_params(jax.random.key(0))
  assert isinstance(params['head']['kernel'], nn.LogicallyPartitioned)
  params = nn.meta.unbox(params)
  opt = optax.adam(3e-3)
  state = opt.init(params)
  batch = _batch(4)

  @jax.jit
  def step(params, state, rng):
    (loss, _), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, rng, True)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(30):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
