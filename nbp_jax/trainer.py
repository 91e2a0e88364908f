r"""The training loop shared by every stage: trains any `nbp_jax.task.Task` on a device mesh.

  state = trainer.train(config, workdir, task, train_data, eval_data)

One jitted step (explicit in/out shardings, donated state): gradients accumulated over
`config.optim.grad_accum_steps` micro-batches by a `lax.scan`, then one optax update (clip by global norm, AdamW
with weight decay on linear maps' weights only, linear warmup from 0 then cosine to 0). Parameters and optimizer
state are created already sharded (`jax.eval_shape(init)` -> logical axis names -> mesh shardings -> `jax.jit(init,
out_shardings=...)`); FSDP shards both. Metrics go to TensorBoard (with the config as text and the samples' PNGs
as images), WORKDIR/metrics.jsonl and a progress bar; checkpoints (with the data-iterator state) to
WORKDIR/checkpoints; `train.profile_steps` > 0 traces that many steps with jax.profiler into WORKDIR/profile. A
killed run resumes from the latest complete checkpoint and repeats the same loss sequence; SIGTERM or Ctrl-C saves at
the next step boundary and raises errors.Preempted (nothing after training runs); a non-finite loss stops training
without saving the bad state.

Data: `train_data` yields this host's part of each global batch (a dict of numpy arrays whose leading dimension is
config.data.batch_size / the count of parallel.process_data_shard: jax.process_count() unless hosts share rows): a
grain DatasetIterator / DataLoaderIterator (its state is checkpointed), an iterable of those (a grain IterDataset,
MapDataset or DataLoader) or a callable returning one. `eval_data` is iterated afresh at every evaluation (an
iterable, or a callable returning an iterator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import glob
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import PIL.Image
import tqdm

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import metric_logger
from nbp_jax import parallel
from nbp_jax.parallel import sharding as sharding_lib
from nbp_jax.task import Task

PyTree = Any

PROFILE_DIR = 'profile'  # WORKDIR/profile: the jax.profiler trace of train.profile_steps
SAMPLES_DIR = 'samples'  # WORKDIR/samples: where tasks write their samples


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The loss or gradient norm became NaN/Inf; training stopped and the bad state was not saved."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `rng` is a raw uint32[2] key; dropout keys are folded from it per step."""
  step: jax.Array  # int32 scalar: optimizer updates done
  params: PyTree
  opt_state: PyTree
  rng: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(peak: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> `peak` over `warmup_steps`, then cosine to 0 at `num_steps`.

  lr(s) = peak * s / W for s < W;  peak * (1 + cos(pi * (s - W) / (T - W))) / 2 for W <= s <= T. A warmup longer
  than the run is cut to it (then the cosine part is one step long).
  """
  warmup = int(min(max(warmup_steps, 0), num_steps))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + max(int(num_steps) - warmup, 1),
                                            end_value=0.0)


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for the weights of linear maps, the leaves named 'kernel' (or 'kernel_t', stored transposed): dense and
  conv kernels, the output head; False for embeddings, biases and norm scales. By name, not rank: the release decays
  "Linear weights only", and scanned layers stack biases and scales into matrices."""
  def is_kernel(path, _):
    names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in ('kernel', 'kernel_t')
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   num_steps: int | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The default chain from config.optim: clip_by_global_norm -> AdamW(b1, b2, masked decay) with the schedule."""
  o = config.optim
  schedule = learning_rate_schedule(o.lr, o.warmup_steps, config.train.num_steps if num_steps is None else num_steps)
  chain = []
  if o.grad_clip and o.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=weight_decay_mask))
  return optax.chain(*chain), schedule


# ----------------------------------------------------------------------------------------------------------------
# Sharded state.


@dataclasses.dataclass
class Setup:
  """The mesh and shardings one run uses (also handy for the benchmark and for tests)."""
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule | None
  abstract_state: TrainState  # ShapeDtypeStructs with .sharding
  state_shardings: TrainState
  batch_sharding: NamedSharding


def make_setup(config: ml_collections.ConfigDict, task: Task,
               mesh: jax.sharding.Mesh | None = None) -> Setup:
  """The run's Setup: mesh (default from config.mesh), logical-axis rules, optimizer, schedule, and the shardings of
  the train state and the batch."""
  mesh = mesh if mesh is not None else parallel.mesh_from_config(config)
  rules = sharding_lib.normalize_rules(config.mesh.axis_rules)
  if task.make_optimizer is not None:
    tx, schedule = task.make_optimizer()
  else:
    tx, schedule = make_optimizer(config)
  key = jax.random.PRNGKey(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(task.init_params, key)
  param_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = sharding_lib.match_shardings(abstract_opt, abstract_params, param_shardings, mesh)
  rep = sharding_lib.replicated(mesh)
  shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt,
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    shardings)
  return Setup(mesh=mesh, rules=rules, tx=tx, schedule=schedule, abstract_state=abstract,
               state_shardings=shardings, batch_sharding=sharding_lib.batch_sharding(mesh, rules))


def init_compiler_options(platform: str) -> dict[str, Any] | None:
  """XLA options for compiling parameter initialisation on `platform` ('cpu', 'gpu', 'tpu'); None = XLA's defaults.

  XLA:CPU compiles at LLVM -O3 by default; flax init's threefry generators (one unrolled generator per parameter)
  compile 4-6x faster at -O2 (the tests' micro demo-recipe tokenizer: ~16 s -> ~4 s) to the same bits
  (tests/test_trainer.py). Init runs once, so the kernels' speed does not matter.
  """
  return {'xla_backend_optimization_level': 2} if platform == 'cpu' else None


def jit_init(init_fn: Callable[[jax.Array], PyTree], key: jax.Array, *, platform: str | None = None,
             **jit_kwargs) -> PyTree:
  """init_fn(key) jitted (jit_kwargs, e.g. out_shardings) and compiled with init_compiler_options(platform), where
  platform defaults to JAX's default backend."""
  options = init_compiler_options(platform or jax.default_backend())
  return jax.jit(init_fn, compiler_options=options, **jit_kwargs)(key)


def init_state(config: ml_collections.ConfigDict, task: Task, setup: Setup) -> TrainState:
  """Fresh parameters and optimizer state, created directly in their shardings (never whole on one device)."""

  def init(key):
    init_key, train_key = jax.random.split(key)
    params = nn.unbox(task.init_params(init_key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.tx.init(params),
                      rng=train_key)

  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    return jit_init(init, jax.random.PRNGKey(config.seed), platform=setup.mesh.devices.flat[0].platform,
                    out_shardings=setup.state_shardings)


# ----------------------------------------------------------------------------------------------------------------
# Steps.


def _tree_norm(tree: PyTree) -> jax.Array:
  return optax.tree.norm(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree))


def make_train_step(task: Task, setup: Setup, grad_accum_steps: int = 1) -> Callable[[TrainState, PyTree],
                                                                                  tuple[TrainState, dict]]:
  """(state, global batch) -> (new state, scalar metrics); jitted, state donated.

  The loss sees the batch plus batch['step'] = state.step (int32 scalar, 0-based index of this optimizer step;
  e.g. the tokenizer starts its discriminator at a given step). Metrics: the task's (averaged over micro-batches),
  'loss', 'grad_norm' (before clipping), 'param_norm' (after the update), 'update_norm', 'learning_rate' (when the
  optimizer has a schedule; the tokenizer's is its generator's).
  """
  k = int(grad_accum_steps)
  batch_axes = sharding_lib.batch_axes(setup.rules)
  prepare = task.prepare_batch or (lambda b: b)

  def loss_and_grads(params, batch, rng, step):
    batch = dict(batch, step=step)  # the optimizer step (0-based), for losses that change over training

    def loss_fn(p):
      return task.loss_fn(p, prepare(batch), rng, True)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, dict(metrics), grads

  def step_fn(state: TrainState, batch):
    # A new dropout key every step (and micro-batch), identical on resume. No per-device folding is needed: with
    # partitionable threefry (JAX's default) each device draws its own slice of one global random array, so
    # shards get different masks and the numbers do not depend on the mesh.
    rng = jax.random.fold_in(state.rng, state.step)
    if k == 1:
      loss, metrics, grads = loss_and_grads(state.params, batch, rng, state.step)
    else:
      # Micro-batch i = examples i, i+k, ...: every device keeps its share of each micro-batch.
      def split(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(setup.mesh, P(None, batch_axes)))
      micro = jax.tree_util.tree_map(split, batch)
      first = jax.tree_util.tree_map(lambda x: x[0], micro)
      _, metrics_shape, _ = jax.eval_shape(loss_and_grads, state.params, first, rng, state.step)

      def body(carry, inputs):
        i, mb = inputs
        g_acc, l_acc, m_acc = carry
        loss, metrics, grads = loss_and_grads(state.params, mb, jax.random.fold_in(rng, i), state.step)
        g_acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), g_acc, grads)
        m_acc = jax.tree_util.tree_map(lambda a, m: a + m.astype(jnp.float32), m_acc, metrics)
        return (g_acc, l_acc + loss.astype(jnp.float32), m_acc), None

      zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
               jax.tree_util.tree_map(lambda m: jnp.zeros(m.shape, jnp.float32), metrics_shape))
      (grads, loss, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
      grads = jax.tree_util.tree_map(lambda g: g / k, grads)
      loss = loss / k
      metrics = jax.tree_util.tree_map(lambda m: m / k, metrics)
    grads = jax.lax.with_sharding_constraint(grads, setup.state_shardings.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}
    out.update(loss=loss.astype(jnp.float32), grad_norm=_tree_norm(grads), param_norm=_tree_norm(params),
               update_norm=_tree_norm(updates))
    if setup.schedule is not None:
      out['learning_rate'] = jnp.asarray(setup.schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, out

  jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, sharding_lib.replicated(setup.mesh)), donate_argnums=(0,))

  def train_step(state, batch):
    # The mesh and rules are in context while tracing: the splash kernel runs per shard under them
    # (attention.splash_attention).
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return jitted(state, batch)

  train_step.jitted = jitted
  return train_step


def make_eval_step(task: Task, setup: Setup) -> Callable[[PyTree, PyTree], dict]:
  """(params, global batch) -> {'loss', task metrics...} with train=False (no dropout)."""
  prepare = task.prepare_batch or (lambda b: b)

  def eval_fn(params, batch):
    loss, metrics = task.loss_fn(params, prepare(batch), jax.random.PRNGKey(0), False)
    out = {name: jnp.asarray(v, jnp.float32) for name, v in dict(metrics).items()}
    out['loss'] = jnp.asarray(loss, jnp.float32)
    return out

  jitted = jax.jit(eval_fn, in_shardings=(setup.state_shardings.params, setup.batch_sharding),
                   out_shardings=sharding_lib.replicated(setup.mesh))

  def eval_step(params, batch):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return jitted(params, batch)
  return eval_step


# ----------------------------------------------------------------------------------------------------------------
# Data.


def _as_iterator(data: Any) -> Iterator:
  if callable(data) and not hasattr(data, '__iter__') and not hasattr(data, '__next__'):
    data = data()
  if hasattr(data, 'to_iter_dataset') and not hasattr(data, '__next__'):  # grain MapDataset
    data = data.to_iter_dataset()
  if hasattr(data, '__next__'):
    return data
  return iter(data)


def _check_batch(batch: PyTree, setup: Setup, grad_accum_steps: int, task: Task) -> int:
  """Returns the global batch size; errors name the task's batch fields and the mesh when it cannot be split."""
  sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f'batch leaves disagree on the batch size: {sorted(sizes)}.')
  global_batch = sizes.pop() * sharding_lib.process_data_shard(setup.batch_sharding)[1]
  _check_global_batch(global_batch, setup, grad_accum_steps, task)
  return global_batch


def _check_global_batch(global_batch: int, setup: Setup, grad_accum_steps: int, task: Task) -> None:
  """ConfigError naming the task's batch fields and the mesh when `global_batch` does not split into
  accumulation steps over the batch shards."""
  shards = sharding_lib.num_batch_shards(setup.mesh, setup.rules)
  if global_batch % (shards * grad_accum_steps):
    raise config_lib.ConfigError(
        f'global batch {global_batch} ({task.batch_fields[0]}) is not divisible by the {shards} batch shards of the '
        f'mesh (mesh.shape={tuple(setup.mesh.shape.values())}, batch over {sharding_lib.batch_axes(setup.rules)}) '
        f'x {task.batch_fields[1]}={grad_accum_steps}; change one of them.')


# ----------------------------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """SIGTERM (a preemption, a scheduler's time limit) or Ctrl-C (SIGINT, also a notebook's interrupt) -> save at the
  next step boundary and stop; a second Ctrl-C stops at once (KeyboardInterrupt, nothing saved). Multi-host runs use
  JAX's preemption sync point instead, so that every host stops at the same step."""

  def __init__(self, checkpointer: checkpoint_lib.Checkpointer):
    self._event = threading.Event()
    self._ckpt = checkpointer
    self._old = {}
    self.reason = 'SIGTERM'
    self._multihost = jax.process_count() > 1
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT:
      if self._event.is_set():
        raise KeyboardInterrupt
      self.reason = 'Ctrl-C'
      # Handlers are installed on a single process only, which is the primary one.
      print('\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, without '
            'saving).', flush=True)
    self._event.set()

  def reached(self, step: int) -> bool:
    if self._multihost:
      return self._ckpt.reached_preemption(step)
    return self._event.is_set()

  def signalled(self) -> bool:
    """A signal arrived since the last step's check (single process; on several, JAX's sync point decides)."""
    return not self._multihost and self._event.is_set()

  def close(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def evaluate(eval_step, params: PyTree, eval_data: Any, setup: Setup, num_batches: int) -> dict[str, float]:
  """Mean of the eval metrics over up to `num_batches` batches (0 = the whole eval set)."""
  totals, n = {}, 0
  for batch in _as_iterator(eval_data):
    out = eval_step(params, sharding_lib.make_global_batch(batch, setup.batch_sharding))
    for name, v in jax.device_get(out).items():
      totals[name] = totals.get(name, 0.0) + float(v)
    n += 1
    if num_batches and n >= num_batches:
      break
  return {f'val_{name}': v / max(n, 1) for name, v in totals.items()}


@dataclasses.dataclass(frozen=True)
class StepActions:
  """What the loop does after an optimizer step, besides logging it."""
  evaluate: bool
  save: bool
  sample: bool
  stop: bool  # preempted: save, then return


def step_actions(step: int, num_steps: int, tc: ml_collections.ConfigDict, *, has_eval: bool, has_samples: bool,
                 preempted: bool) -> StepActions:
  """What is due after `step` optimizer steps, by the intervals of config.train (0 = never).

  The last step always saves, and evaluates when there is eval data and train.eval_every > 0; a preempted step
  saves and stops, nothing else.
  """
  # A preempted step only saves: its evaluation or samples would eat into the signal's grace period.
  return StepActions(
      evaluate=(has_eval and bool(tc.eval_every) and (step % tc.eval_every == 0 or step == num_steps)
                and not preempted),
      save=preempted or step == num_steps or bool(tc.checkpoint_every and step % tc.checkpoint_every == 0),
      sample=has_samples and bool(tc.sample_every and step % tc.sample_every == 0) and not preempted,
      stop=preempted)


class _StepLogger:
  """Fetches the metrics of dispatched steps, stops on a non-finite loss, logs them (files, progress bar).

  Fetching lags one step behind dispatch, so the host queues the next step before waiting for this one;
  `flush()` fetches everything, before a state is saved, sampled from or given its evaluation record.
  """

  def __init__(self, writer: metric_logger.MetricWriter, ckpt: checkpoint_lib.Checkpointer, task: Task, *,
               num_steps: int, log_every: int, num_devices: int, peak_flops: float, label: str, primary: bool):
    self.writer, self.ckpt, self.task = writer, ckpt, task
    self.num_steps, self.log_every = num_steps, max(log_every, 1)
    self.num_devices, self.peak_flops = num_devices, peak_flops
    self.label, self.primary = label, primary
    self.global_batch = 0  # set from the first batch
    self.bar = None  # created once the first step (and its compilation) is done: the ETA leaves the compile out
    self._pending: list[tuple[int, dict]] = []  # (step, device metrics) dispatched but not yet checked
    self._evals: dict[int, dict] = {}  # step -> eval metrics to log with that step's record
    self._t, self._t_step = None, 0  # time and step of the last rate measurement

  def start_bar(self, step: int) -> None:
    self.bar = tqdm.tqdm(total=self.num_steps, initial=step - 1, desc=self.label, disable=not self.primary,
                         dynamic_ncols=True, smoothing=0.1)

  def push(self, step: int, device_metrics: dict) -> None:
    """Queues step `step`'s metrics and logs the steps before it."""
    self._pending.append((step, device_metrics))
    while len(self._pending) > 1:
      self._log(*self._pending.pop(0))

  def add_eval(self, step: int, metrics: dict[str, float]) -> None:
    self._evals[step] = metrics

  def flush(self) -> None:
    while self._pending:
      self._log(*self._pending.pop(0))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

  def _log(self, step: int, device_metrics: dict) -> None:
    m = {name: float(v) for name, v in jax.device_get(device_metrics).items()}
    self._check_finite(step, m)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
    now = time.perf_counter()
    if self._t is None:  # the first step includes compilation: time from its end
      self._t, self._t_step = now, step
    if not (step % self.log_every == 0 or step == self.num_steps or step in self._evals):
      return
    if step > self._t_step:
      m.update(self._rates((step - self._t_step) / max(now - self._t, 1e-9)))
      self._t, self._t_step = now, step
    m.update(self._evals.pop(step, {}))
    self.writer.write(step, m)
    if self.bar is not None:
      self.bar.set_postfix({k: f'{m[k]:.4g}' for k in ('loss', 'val_loss') if k in m}, refresh=False)

  def _rates(self, steps_per_s: float) -> dict[str, float]:
    out = {'steps_per_s': steps_per_s, 'examples_per_s': steps_per_s * self.global_batch}
    if self.task.tokens_per_example:
      out['tokens_per_s'] = out['examples_per_s'] * self.task.tokens_per_example
    mfu = metric_logger.mfu(self.task.flops_per_example, out['examples_per_s'], self.num_devices, self.peak_flops)
    if math.isfinite(mfu):
      out['mfu'] = mfu
    return out

  def _check_finite(self, step: int, m: dict[str, float]) -> None:
    # The update and the new params too: a finite loss and gradient can still step the params to Inf, and that
    # state would be saved as the last good one.
    checked = {k: m[k] for k in ('loss', 'grad_norm', 'update_norm', 'param_norm') if k in m}
    if all(math.isfinite(v) for v in checked.values()):
      return
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    self.writer.write(step, m)
    raise NonFiniteLossError(
        f'{" ".join(f"{k}={v}" for k, v in checked.items())} at step {step}: training stopped and this state was not '
        f'saved. The last good checkpoint is ' +
        (f'{self.ckpt.step_dir(last)}' if last is not None else 'none (no checkpoint was written yet)') +
        f'. To go on: {self.task.stability_fields}, check the data, then rerun with '
        'the same --workdir to resume from it.')


class _Profiler:
  """A `jax.profiler` trace of `num_steps` optimizer steps into WORKDIR/profile (TensorBoard's profile tab,
  Perfetto), from the step after `first_step` (whose time is mostly compilation); 0 steps = off."""

  def __init__(self, workdir: str, num_steps: int, first_step: int):
    self.directory = os.path.join(workdir, PROFILE_DIR)
    self._start, self._stop = first_step, first_step + max(int(num_steps), 0)  # steps done at start / stop
    self._on = False

  def before_step(self, done: int) -> None:
    if self._stop > self._start and done == self._start:
      jax.profiler.start_trace(self.directory)
      self._on = True

  def after_step(self, done: int, outputs: Any) -> None:
    if self._on and done >= self._stop:
      self.stop(outputs)

  def stop(self, outputs: Any = None) -> None:
    if self._on:
      jax.block_until_ready(outputs)  # the trace then holds the device time of its last step
      jax.profiler.stop_trace()
      self._on = False


def _restore_or_init(config: ml_collections.ConfigDict, workdir: str, task: Task, setup: Setup,
                     ckpt: checkpoint_lib.Checkpointer, train_iter: Iterator
                     ) -> tuple[TrainState, metric_logger.MetricWriter]:
  """The latest checkpoint's state (and data-iterator state), else a fresh one; and the metric writer, whose files
  are cut back to the state's step (lines of a killed run's steps after it)."""
  a = setup.abstract_state
  try:
    restored = ckpt.restore(a.params, {'opt_state': a.opt_state, 'step': a.step, 'rng': a.rng},
                            data_iter=train_iter, config=config, function_fields=task.function_fields)
  except BaseException:
    ckpt.close()
    raise
  # Only now that the checkpoint (if any) is known to fit: a refused resume leaves the workdir as it was.
  checkpoint_lib.write_config(workdir, config)
  start = 0 if restored is None else restored[0]
  writer = metric_logger.MetricWriter(workdir, purge_step=start + 1 if metric_logger.has_events(workdir) else None)
  if restored is None:
    state = init_state(config, task, setup)
    logging.info('Fresh start: %s', _param_summary(state.params))
  else:
    _, params, ts = restored
    state = TrainState(step=ts['step'], params=params, opt_state=ts['opt_state'], rng=ts['rng'])
    if int(jax.device_get(state.step)) != start:
      raise RuntimeError(f'checkpoint {ckpt.step_dir(start)} holds step {int(state.step)}; it is inconsistent.')
    logging.info('Resumed from %s', ckpt.step_dir(start))
  writer.truncate_after(start)
  return state, writer


def _next_batch(train_iter: Iterator, step: int, num_steps: int) -> PyTree:
  try:
    return next(train_iter)
  except StopIteration:
    raise RuntimeError(f'the training data ran out after step {step} of {num_steps}; make the pipeline repeat '
                       '(e.g. grain `.repeat()`) or lower train.num_steps.') from None


def _save(ckpt: checkpoint_lib.Checkpointer, step: int, state: TrainState, train_iter: Iterator,
          config: ml_collections.ConfigDict, val: dict[str, float] | None) -> None:
  # Only checkpoints evaluated at their own step compete for "best".
  best = {checkpoint_lib.BEST_METRIC: val[checkpoint_lib.BEST_METRIC]} if val else None
  ckpt.save(step, state.params, {'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng},
            data_iter=train_iter, config=config, metrics=best)


def _write_samples(task: Task, params: PyTree, step: int, workdir: str, writer: metric_logger.MetricWriter) -> None:
  """task.write_samples, then the PNGs it wrote under WORKDIR/samples as TensorBoard images ('samples/<name>')."""
  folder = os.path.join(workdir, SAMPLES_DIR)
  before = _pngs(folder) if writer.enabled else {}
  # On every process: sampling from sharded params is collective; the task writes on process 0.
  task.write_samples(params, step, workdir)
  if not writer.enabled:
    return
  for path, mtime in sorted(_pngs(folder).items()):
    if before.get(path) != mtime:
      with PIL.Image.open(path) as image:
        writer.write_image(step, f'{SAMPLES_DIR}/{os.path.splitext(os.path.basename(path))[0]}',
                           np.asarray(image.convert('RGB')))


def _pngs(folder: str) -> dict[str, int]:
  """{path: modification time in ns} of the PNG files under `folder`."""
  return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, '**', '*.png'), recursive=True)}


def _say(primary: bool, message: str) -> None:
  if primary:
    print(message, file=sys.stderr, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, task: Task, train_data: Any, eval_data: Any = None,
          *, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Trains `task` for config.train.num_steps steps, resuming from WORKDIR/checkpoints if there are any.

  Returns the final state (sharded over the mesh). Raises NonFiniteLossError on a NaN/Inf loss or gradient, and
  errors.Preempted once a SIGTERM or Ctrl-C has been answered by a checkpoint.
  """
  tc = config.train
  num_steps = int(tc.num_steps)
  accum = int(config.optim.grad_accum_steps)
  primary = parallel.is_primary()
  setup = make_setup(config, task, mesh)
  _check_global_batch(int(config.data.batch_size), setup, accum, task)  # before anything is built or read
  ckpt = checkpoint_lib.Checkpointer(workdir, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                                     keep_best=eval_data is not None)
  train_iter = _as_iterator(train_data)
  state, writer = _restore_or_init(config, workdir, task, setup, ckpt, train_iter)
  start = int(jax.device_get(state.step))
  label = run_label(config, task)
  if start >= num_steps:
    _say(primary, f'{label}: already trained ({start} of {num_steps} steps, {ckpt.step_dir(start)}).')
  else:
    writer.write_text(start + 1, 'config', json.dumps(checkpoint_lib.config_to_dict(config), indent=2,
                                                      sort_keys=True))

  train_step = make_train_step(task, setup, accum)
  eval_step = make_eval_step(task, setup) if eval_data is not None else None
  logger = _StepLogger(writer, ckpt, task, num_steps=num_steps, log_every=tc.log_every, num_devices=setup.mesh.size,
                       peak_flops=metric_logger.peak_flops_per_device(override_tflops=tc.get('peak_tflops', 0.0)),
                       label=label, primary=primary)
  profiler = _Profiler(workdir, tc.get('profile_steps', 0), first_step=start + 1)
  preemption = _Preemption(ckpt)
  step = start
  try:
    while step < num_steps:
      local = _next_batch(train_iter, step, num_steps)
      first = step == start
      if first:
        logger.global_batch = _check_batch(local, setup, accum, task)
        t0 = time.perf_counter()
        _say(primary, f'{label}: compiling the train step ...')
      profiler.before_step(step)
      state, dev_metrics = train_step(state, sharding_lib.make_global_batch(local, setup.batch_sharding))
      step += 1
      if first:
        jax.block_until_ready(dev_metrics)
        _say(primary, f'{label}: compiled and ran step {step} in {time.perf_counter() - t0:.1f} s.')
        logger.start_bar(step)
      profiler.after_step(step, dev_metrics)
      logger.push(step, dev_metrics)

      due = step_actions(step, num_steps, tc, has_eval=eval_step is not None,
                         has_samples=task.write_samples is not None, preempted=preemption.reached(step))
      val = None
      if due.evaluate:
        val = evaluate(eval_step, state.params, eval_data, setup, tc.num_eval_batches)
        logger.add_eval(step, val)
      if due.save or due.sample or due.evaluate:
        logger.flush()  # never save (or sample from) a state whose loss was not checked
      if due.save:
        writer.flush()  # TensorBoard's buffer: a killed run resumes after this step and never writes it again
        _save(ckpt, step, state, train_iter, config, val)
      if due.sample:
        _write_samples(task, state.params, step, workdir, writer)
      if due.stop:
        ckpt.wait()
        msg = f'Preempted ({preemption.reason}): saved {ckpt.step_dir(step)}; rerun the same command to resume.'
        logging.warning(msg)
        if primary:
          print(msg, flush=True)
        raise errors.Preempted(msg, preemption.reason)
    logger.flush()
    if preemption.signalled():  # during the last step's evaluation or save: nothing is lost, but stop here too
      msg = (f'{preemption.reason} during the last step: training is complete and saved ({ckpt.step_dir(step)}); '
             'rerun the same command to go on from there.')
      if primary:
        print(msg, flush=True)
      raise errors.Preempted(msg, preemption.reason)
  finally:
    profiler.stop()
    logger.close()
    ckpt.close()  # waits for a save in flight while a signal still only asks to stop, not kills
    preemption.close()
    writer.close()
  return state


def run_label(config: ml_collections.ConfigDict, task: Task) -> str:
  """The progress bar's label: the run's name ('train demo_ntp'), plus the task when the name does not say it."""
  name = config.get('name', '') or task.name
  return f'train {name}' if task.name == 'nbp' or task.name in name else f'train {name} {task.name}'


def _param_summary(params: PyTree) -> str:
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  return f'{n / 1e6:.2f}M parameters'
