"""Helper of the trainer/parallel/checkpoint tests (no tests here): a tiny Task, a 2-layer MLP classifier whose
params carry logical axis names, on random data from a grain pipeline (so the iterator state is checkpointed as in
real runs)."""

from __future__ import annotations

import time

import flax.linen as nn
import grain
import jax.numpy as jnp
import numpy as np
import optax

from nbp_jax import config_lib
from nbp_jax.task import Task

IN, EMBED, MLP, CLASSES = 8, 16, 32, 8


class ToyModel(nn.Module):
  dropout: float = 0.0
  embed: int = EMBED

  @nn.compact
  def __call__(self, x, train: bool):
    dense = lambda feats, names, name: nn.Dense(
        feats, name=name, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), names[-1:]))
    h = dense(self.embed, ('conv_in', 'embed'), 'embed_in')(x)
    h = nn.LayerNorm(name='norm', scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(h)
    h = nn.gelu(dense(MLP, ('embed', 'mlp'), 'mlp_in')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = dense(self.embed, ('mlp', 'embed'), 'mlp_out')(h)
    return dense(CLASSES, ('embed', 'vocab'), 'head')(h)


def make_task(dropout: float = 0.0, nan_at_step: int = 0, embed: int = EMBED) -> Task:
  model = ToyModel(dropout, embed)

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, IN)), False)

  def loss_fn(params, batch, rng, train):
    logits = model.apply(params, batch['x'], train, rngs={'dropout': rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
    if nan_at_step:  # batch['step'] is added by the trainer: the 0-based index of this optimizer step
      loss = jnp.where(batch['step'] + 1 >= nan_at_step, jnp.nan, loss)
    acc = (logits.argmax(-1) == batch['y']).mean()
    return loss, {'accuracy': acc}

  flops = 6 * (IN * EMBED + EMBED * MLP + MLP * EMBED + EMBED * CLASSES)
  return Task(name='toy', init_params=init_params, loss_fn=loss_fn, flops_per_example=flops, tokens_per_example=1)


def _example(i: int, seed: int) -> dict:
  r = np.random.default_rng([seed, i])
  x = r.normal(size=(IN,)).astype(np.float32)
  return {'x': x, 'y': np.int32(int(abs(x[:3].sum()) * 3) % CLASSES)}


def dataset(batch_size: int, seed: int = 0, delay_s: float = 0.0) -> grain.IterDataset:
  """An endless, shuffled, batched grain pipeline of {'x': float32 [B, 8], 'y': int32 [B]}."""

  ds = grain.MapDataset.range(64).shuffle(seed=seed).repeat().map(lambda i: _example(int(i), seed))
  ds = ds.batch(batch_size)
  return _Slow(ds.to_iter_dataset(), delay_s) if delay_s else ds.to_iter_dataset()


class _Slow:
  """Slows the subprocess the tests kill, so that it is stopped mid-run (grain prefetches in threads, so a sleep
  inside the pipeline would not slow the loop). Keeps get_state/set_state: still checkpointable."""

  def __init__(self, ds, delay_s):
    self._it, self._delay = iter(ds), delay_s

  def __iter__(self):
    return self

  def __next__(self):
    time.sleep(self._delay)
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def reference_config():
  """The run that kill/resume, preemption and restore tests compare against."""
  return config(num_steps=12, checkpoint_every=3, eval_every=6, num_eval_batches=2)


def config(num_steps: int = 4, batch_size: int = 16, mesh=(-1, 1, 1), **train):
  c = config_lib.task_config('demo', 'micro')
  c.seed = 0
  c.data.batch_size = batch_size
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 2
  c.optim.weight_decay = 0.1
  c.optim.grad_accum_steps = 1
  c.train.num_steps = num_steps
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 0
  c.train.update(train)
  c.mesh.shape = tuple(mesh)
  return c


if __name__ == '__main__':
  # python tests/trainer_toy.py WORKDIR DELAY_S: the run that tests/test_checkpoint.py kills or preempts.
  import sys  # pylint: disable=g-import-not-at-top

  from nbp_jax import errors  # pylint: disable=g-import-not-at-top
  from nbp_jax import trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.train(reference_config(), sys.argv[1], make_task(), dataset(16, delay_s=float(sys.argv[2])),
                  eval_data=lambda: iter(dataset(16, seed=1)))
  except errors.Preempted as e:  # as nbp_jax.main ends a preempted stage
    sys.exit(e.exit_status)
