"""Checkpoints: orbax CheckpointManager over WORKDIR/checkpoints/<step>/{params, train_state, data, config}.

  params       the model parameters (restored alone by `restore_params` for sample/eval/export)
  train_state  {'opt_state', 'step', 'rng'}
  data         the grain iterator state, one JSON file per process (each host reads its own shard)
  config       the run's config as JSON (also written to WORKDIR/config.json), so later modes need only --workdir

Saves are asynchronous and atomic (written to a temporary directory, renamed when complete), so a run killed at
any moment leaves only complete checkpoints behind. The manager keeps the last `keep` checkpoints plus the best
by validation loss. A checkpoint whose content is damaged (metadata unreadable, data that does not decode) is
reported by name, moved aside to `<step>.corrupt`, and the previous one is used; one that fails for an I/O error
of the storage (EIO, a stale NFS handle, a timeout, no permission) is left in place and the run stops, naming it.
A checkpoint of another config is refused naming the config fields that differ.
"""

from __future__ import annotations

from collections.abc import Sequence
import errno
import glob
import json
import logging as std_logging
import math
import os
import sys
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import parallel

PyTree = Any

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
# A run's folders that are not runs of their own: the tokenizer it trained or imported, its --mode=export files.
TOKENIZER_SUBDIR = 'tokenizer'
EXPORT_SUBDIR = 'export'
BEST_METRIC = 'val_loss'


class CheckpointMismatchError(errors.UserError, ValueError):
  """The checkpoint was written by another config (a parameter's shape or the parameter set differs)."""


class CheckpointReadError(errors.UserError, OSError):
  """A checkpoint could not be read for a reason outside its content (storage I/O); it was left in place."""


class CheckpointCorruptError(errors.UserError, ValueError):
  """A checkpoint's content does not read back (damaged, or not written by nbp-jax): sample/eval/export stop."""


# Config fields that decide the shapes and the set of the saved arrays; named when a checkpoint is refused.
STRUCTURE_FIELDS = (
    'model.num_layers', 'model.emb_dim', 'model.num_heads', 'model.mlp_ratio', 'model.max_positions',
    'model.scan_layers', 'model.param_dtype', 'nbp.block_shape', 'nbp.condition', 'nbp.first_block', 'nbp.id_layout',
    'data.num_frames', 'data.resolution', 'data.num_classes', 'tokenizer.norm', 'tokenizer.channels',
    'tokenizer.channel_multipliers', 'tokenizer.num_res_blocks', 'tokenizer.num_mid_blocks', 'tokenizer.num_groups',
    'tokenizer.kernel_size', 'tokenizer.temporal_downsample', 'tokenizer.fsq_levels',
    'tokenizer.discriminator_channels', 'tokenizer.discriminator_layers', 'tokenizer.lecam_weight',
    'optim.grad_clip', 'optim.weight_decay', 'optim.grad_accum_steps')
# Fields that change what the transformer's params compute without changing their shapes: a config that differs
# from the checkpoint's in one of them is refused even though the params load (nbp.block_shape may differ: the
# same params sample with other blocks). The class count and the class prompts too: the vocabulary is padded, so
# another class count loads, with labels beyond the trained ones on embedding rows that never learned.
CLASS_FIELDS = ('data.num_classes', 'nbp.class_prefix_ids')
FUNCTION_FIELDS = ('model.num_heads', 'nbp.condition', 'nbp.first_block', 'nbp.id_layout', *CLASS_FIELDS)

# errno values of a storage that failed to answer, as opposed to a file whose content is wrong.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EACCES,
                     errno.EPERM, errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOLCK,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH,
                     errno.EHOSTUNREACH, errno.EREMOTEIO}
# tensorstore / gRPC status names of the same kind, found in the messages of the errors they raise.
_TRANSIENT_STATUS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'ABORTED',
                     'Input/output error', 'Stale file handle', 'Permission denied', 'Connection reset')


def is_transient_io_error(error: BaseException) -> bool:
  """True when `error` (or one it was raised from) is a storage I/O failure, not a sign of damaged content."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
      return True
    if isinstance(error, (TimeoutError, ConnectionError, PermissionError)):
      return True
    if any(status in str(error) for status in _TRANSIENT_STATUS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _flat(d: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(d, ml_collections.ConfigDict):
    d = config_to_dict(d)
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = _tuplify(v)
  return out


# Config fields that decide what a saved data-iterator state means (a position per host and worker, in batches).
DATA_LAYOUT_FIELDS = ('data.batch_size', 'data.worker_count')


def config_differences(saved: Any, config: ml_collections.ConfigDict,
                       fields: Sequence[str] | None = STRUCTURE_FIELDS) -> list[tuple[str, Any, Any]]:
  """(field, value in `config`, value in `saved`) for every entry of `fields` (None: every field) where the two
  differ; a field one of them lacks (added since a run saved its config) is not compared."""
  a, b = _flat(config), _flat(saved)
  return [(k, a[k], b[k]) for k in (sorted(a) if fields is None else fields) if k in a and k in b and a[k] != b[k]]


class _IteratorState:
  """A frozen snapshot of a data iterator's state, in the shape grain's orbax handler expects.

  grain's handler writes `get_state()` of a non-DatasetIterator as bytes; snapshotting at save time (rather than
  handing over the live iterator) keeps an asynchronous save from racing the prefetching pipeline.
  """

  def __init__(self, state: bytes | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    pass


def _snapshot(it: Any) -> _IteratorState:
  state = it.get_state()
  return _IteratorState(state if isinstance(state, bytes) else json.dumps(state).encode())


def _apply_snapshot(it: Any, snap: _IteratorState) -> None:
  state = snap.state
  if isinstance(it, grain.DatasetIterator):
    state = json.loads(state)
  it.set_state(state)


def is_checkpointable(it: Any) -> bool:
  """True for a data iterator whose position can be saved and restored (grain's get_state / set_state)."""
  return hasattr(it, 'get_state') and hasattr(it, 'set_state')


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON types (as checkpoints, exports and TensorBoard store it)."""
  return json.loads(config.to_json_best_effort())


def _tuplify(x):
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  return x


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """Inverse of config_to_dict; JSON lists become tuples again, as the config files write them."""
  return ml_collections.ConfigDict(_tuplify(d))


# Saved paths that point into a pipeline workdir (WORKDIR/data, ...), found again when WORKDIR was moved or copied
# (Google Drive, /content): (config field, folder beside the model's workdir).
_RELOCATABLE = (('data.dir', 'data'), ('data.tokenized_dir', 'tokens'), ('tokenizer.checkpoint', 'tokenizer'))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run in `workdir` was started with (WORKDIR/config.json), with the sampling and evaluation
  fields added since then at their defaults (`config_lib.with_new_runtime_fields`) and its paths into a moved or
  copied pipeline workdir found again: a saved path that no longer exists (or was relative to another folder) is
  replaced by the folder of that name beside `workdir` (WORKDIR/../tokenizer, ../data, ../tokens) where there is one."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise not_a_run(workdir, f'{path} does not exist: {workdir!r} is not a training workdir (train first with '
                             '--mode=train, or pass --config).')
  with open(path) as f:
    try:
      config = config_lib.with_new_runtime_fields(config_from_dict(json.load(f)))
    except json.JSONDecodeError as e:
      raise CheckpointCorruptError(f'{path} is not valid JSON ({e}): restore it from a copy, or pass the run\'s '
                                   '--config instead.') from e
  root = os.path.dirname(os.path.abspath(workdir))
  for field, folder in _RELOCATABLE:
    section, name = field.split('.')
    saved, here = config[section].get(name, ''), os.path.join(root, folder)
    if saved and not os.path.exists(saved) and os.path.exists(here):
      config[section][name] = here
  return config


def training_workdirs(workdir: str) -> list[str]:
  """WORKDIR when it holds a run (config.json and checkpoints/), else its sub-folders that do (a pipeline's nbp/,
  ntp/; not a tokenizer/ or export/ folder)."""
  def is_run(folder):
    return os.path.isfile(os.path.join(folder, CONFIG_FILE)) and os.path.isdir(os.path.join(folder, CHECKPOINT_DIR))
  if is_run(workdir):
    return [workdir]
  if not os.path.isdir(workdir):
    return []
  subs = sorted(os.path.join(workdir, d) for d in os.listdir(workdir) if d not in (TOKENIZER_SUBDIR, EXPORT_SUBDIR))
  return [d for d in subs if is_run(d)]


def not_a_run(workdir: str, otherwise: str) -> errors.MissingError:
  """The refusal of a --workdir that holds no run, saying which folder to pass where it can tell: a path that does
  not exist, a run's export/ folder, a folder whose sub-folders hold runs; else `otherwise`."""
  parent = os.path.dirname(os.path.abspath(workdir))
  if not os.path.isdir(workdir):
    return errors.MissingError(f'--workdir={workdir} does not exist: check the path (a typo?), or train there first '
                               f'(--mode=train --workdir={workdir}).')
  if os.path.basename(os.path.abspath(workdir)) == EXPORT_SUBDIR and training_workdirs(parent) == [parent]:
    return errors.MissingError(f'{workdir} holds the --mode=export files of the run in {parent} (they run with its '
                               f'run_generate.py, without nbp-jax); to sample or export again pass --workdir={parent}.')
  runs = training_workdirs(workdir)
  if runs:  # e.g. a --mode=pipeline workdir: its models are in nbp/ and ntp/
    return errors.MissingError(f'{workdir} holds no run itself, but its sub-folders do: {", ".join(runs)}; pass one '
                               'of them as --workdir.')
  return errors.MissingError(otherwise)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json, written by process 0 only."""
  if not parallel.is_primary():
    return
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, CONFIG_FILE), config_to_dict(config), sort_keys=True)


def write_json(path: str, value: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
  """Writes `value` as JSON to `path` in one step (a temporary file beside it, then os.replace): a run killed while
  writing leaves the old file or the new one, never half of one, so a rerun that reads it back (to resume, to reuse
  an evaluation) can. Callers decide which process writes."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=indent, sort_keys=sort_keys)
  os.replace(tmp, path)


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """{'params/dense/kernel': shape} of every array (or array metadata) leaf; names as in the error messages."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))
  return {jax.tree_util.keystr(p, simple=True, separator='/'): tuple(x.shape) for p, x in leaves
          if hasattr(x, 'shape')}


def shape_mismatch(saved: PyTree, wanted: PyTree, what: str, source: str = 'the checkpoint') -> str | None:
  """The first {what} whose shape (or presence) differs between `saved` (found in `source`) and `wanted` (this
  config's), said in a sentence; None when they match."""
  s, w = _shapes(saved), _shapes(wanted)
  for name in sorted(w):
    if name not in s:
      return f'{what} {name!r} (shape {w[name]}) is missing from {source}.'
    if s[name] != w[name]:
      return f'{what} {name!r} has shape {s[name]} in {source} but {w[name]} in this config.'
  extra = sorted(set(s) - set(w))
  if extra:
    return f'{source} has {what} {extra[0]!r} (shape {s[extra[0]]}) that this config does not have.'
  return None


def check_shapes(saved: PyTree, wanted: PyTree, what: str, where: str) -> None:
  """Raises CheckpointMismatchError naming the first parameter whose shape (or presence) differs."""
  detail = shape_mismatch(saved, wanted, what)
  if detail is not None:
    error = CheckpointMismatchError(f'{where}: {detail} It was written by another config: resume with the config it '
                                    'was trained with (WORKDIR/config.json) or start a fresh --workdir.')
    error.detail = detail
    raise error


def _item_handlers() -> dict[str, Any]:
  return {
      'params': ocp.StandardCheckpointHandler(),
      'train_state': ocp.StandardCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
  }


def _drop_closed_loop_reports() -> None:
  """Keeps Python from printing an 'Event loop is closed' traceback for each array of a damaged checkpoint.

  When one array of an orbax read fails, orbax closes its event loop while tensorstore still reads the others on
  its own threads; as each finishes, its callback posts to the closed loop, and Python reports the RuntimeError as
  unraisable (tens of tracebacks after the one-line report of the damage). Only that report is dropped; every
  other goes to the hook installed before (pytest's, or Python's default). Idempotent.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_reports', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


def _validation_loss(metrics: dict[str, float]) -> float:
  """The metric "best" minimises; a checkpoint saved without one, or with a NaN / Inf one, never wins (NaN would
  compare false both ways and make orbax keep it over the best)."""
  value = metrics.get(BEST_METRIC, math.inf)
  return value if math.isfinite(value) else math.inf


class _ReadOnlyNotices(std_logging.Filter):
  """Orbax warns twice for every read-only manager (each Generator.load opens two): 'read_only=True, setting
  save_interval_steps=0' and 'Given directory is read only'. That is what was asked for, not a problem."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not message.startswith(('CheckpointManagerOptions.read_only=True', 'Given directory is read only'))


def _drop_read_only_notices() -> None:
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _ReadOnlyNotices) for f in logger.filters):
    logger.addFilter(_ReadOnlyNotices())


class Checkpointer:
  """Saves and restores training checkpoints under WORKDIR/checkpoints (call on every process)."""

  def __init__(self, workdir: str, *, save_every: int = 1000, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    if read_only:
      _drop_read_only_notices()
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.save_every = save_every
    policies = [ocp.checkpoint_managers.LatestN(n=max(keep, 1))]
    if keep_best:
      # reverse=True sorts descending, so the kept tail is the lowest validation loss.
      policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=_validation_loss, reverse=True, n=1,
                                                    keep_checkpoints_without_metrics=False))
    self._options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,  # partial saves of a killed run
        read_only=read_only,
        create=not read_only,
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(1),  # the trainer decides when
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # Orbax writes a save's metrics only when best_fn is set (without it no checkpoint had a validation loss,
        # so BestN kept none); what is kept is still the preservation policy's decision.
        best_fn=_validation_loss,
        best_mode='min',
    )
    self._manager = self._make_manager()
    _drop_closed_loop_reports()  # before any read: the reports come from other threads, right after a failure

  def _make_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, item_handlers=_item_handlers(), options=self._options)

  # ------------------------------------------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def best_step(self) -> int | None:
    """The checkpoint with the lowest finite validation loss; None when none has one."""
    best, best_val = None, math.inf
    for step in self.all_steps():
      value = _validation_loss(self._manager.metrics(step) or {})
      if value < best_val:
        best, best_val = step, value
    return best

  def saved_config(self, step: int) -> dict | None:
    """The config saved with checkpoint `step` (a dict), else WORKDIR/config.json's, else None."""
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config'])
    except Exception:  # pylint: disable=broad-except  (older checkpoints have no config item)
      pass
    path = os.path.join(os.path.dirname(self.directory), CONFIG_FILE)
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def params_metadata(self, step: int) -> PyTree:
    """Tree of orbax ArrayMetadata (shape, dtype) of the params saved at `step`."""
    return self._manager.item_metadata(step)['params'].tree

  def restore_params(self, step: int, abstract_params: PyTree) -> PyTree:
    """Only the params of `step` (no optimizer state: a third of the memory), onto the abstract's shardings."""
    return self._manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))[
        'params']

  def save(self, step: int, params: PyTree, train_state: PyTree, data_iter: Any = None,
           config: ml_collections.ConfigDict | None = None, metrics: dict[str, float] | None = None) -> bool:
    """Starts an asynchronous save of step `step`; returns False if that step is already saved."""
    if step in self._manager.all_steps():
      return False
    items = dict(params=ocp.args.StandardSave(params), train_state=ocp.args.StandardSave(train_state))
    if data_iter is not None and is_checkpointable(data_iter):
      items['data'] = grain.checkpoint.CheckpointSave(_snapshot(data_iter))
    if config is not None:
      items['config'] = ocp.args.JsonSave(config_to_dict(config))
    # {} rather than None for a save without a validation loss: orbax warns on every save without metrics.
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True on every process once any got a preemption notice (JAX's sync point), at the same step."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # ------------------------------------------------------------------------------------------------------------
  def naming_config_fields(self, error: CheckpointMismatchError, step: int, config: ml_collections.ConfigDict | None,
                           verb: str, alternative: str = '', only: Sequence[str] | None = None
                           ) -> CheckpointMismatchError:
    """`error` naming the STRUCTURE_FIELDS (or those of them in `only`) where `config` differs from the config saved
    with checkpoint `step`, and ending '<verb> the config it was trained with (... or the --config
    overrides)<alternative>.'; `error` itself when none differ or there is no config to compare."""
    fields = config_differences(self.saved_config(step) or {}, config) if config is not None else []
    fields = [f for f in fields if only is None or f[0] in only]
    if not fields:
      return error
    config_json = os.path.join(os.path.dirname(self.directory), CONFIG_FILE)
    return CheckpointMismatchError(
        f'checkpoint {self.step_dir(step)} was written by another config: this config has '
        f'{", ".join(f"{k}={a!r}" for k, a, _ in fields)}, the checkpoint '
        f'{", ".join(f"{k}={b!r}" for k, _, b in fields)} ({getattr(error, "detail", error)}). {verb} the config '
        f'it was trained with ({config_json}, or {" ".join(f"--config.{k}={b!r}" for k, _, b in fields)})'
        f'{alternative}.')

  def refuse_another_function(self, step: int, config: ml_collections.ConfigDict | None, fields: Sequence[str],
                              verb: str, alternative: str = '') -> None:
    """Raises CheckpointMismatchError when `config` differs from checkpoint `step`'s in one of `fields`: params that
    load (the same shapes) but would compute another function. No fields (a tokenizer's resume): nothing is read."""
    if config is not None and config.nbp.get('condition') != 'class':
      fields = [f for f in fields if f not in CLASS_FIELDS]  # an unconditional model has no classes to differ in
    if not fields:
      return
    same_shapes = CheckpointMismatchError('the same parameter shapes, computing another function')
    error = self.naming_config_fields(same_shapes, step, config, verb, alternative, only=fields)
    if error is not same_shapes:
      raise error

  def storage_error(self, step: int, error: Exception) -> CheckpointReadError:
    """The refusal for a checkpoint the storage failed to read (is_transient_io_error): left where it is."""
    return CheckpointReadError(
        f'checkpoint {self.step_dir(step)} could not be read ({_first_line(error)}); the storage failed, not the '
        'checkpoint, so it was left in place: rerun when the storage answers.')

  def _quarantine(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint aside (so a later save of that step does not collide) and says so."""
    src = self.step_dir(step)
    logging.error('Checkpoint %s is unreadable (%s); moving it to %s.corrupt and using the previous one.',
                  src, _first_line(error), src)
    print(f'Checkpoint {src} is unreadable ({type(error).__name__}); moved it to {src}.corrupt and '
          'using the previous checkpoint.', flush=True)
    if parallel.is_primary():
      dst = src + '.corrupt'
      n = 1
      while os.path.exists(dst):
        dst, n = f'{src}.corrupt{n}', n + 1
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'quarantine_checkpoint_{step}')
    self._manager.reload()

  def _check_step(self, step: int, abstract_params: PyTree, abstract_train_state: PyTree | None) -> None:
    md = self._manager.item_metadata(step)
    where = f'checkpoint {self.step_dir(step)}'
    if md is None or md.get('params') is None:
      raise FileNotFoundError(f'{where} has no readable params metadata')
    check_shapes(md['params'].tree, abstract_params, 'parameter', where)
    if abstract_train_state is not None:
      ts = md.get('train_state')
      if ts is None:
        raise FileNotFoundError(f'{where} has no readable train_state metadata')
      check_shapes(ts.tree, abstract_train_state, 'optimizer-state entry', where)

  def restore(self, abstract_params: PyTree, abstract_train_state: PyTree, data_iter: Any = None,
              config: ml_collections.ConfigDict | None = None, function_fields: Sequence[str] = ()
              ) -> tuple[int, PyTree, PyTree] | None:
    """Restores the latest readable checkpoint onto the shardings in the abstract trees.

    Args:
      abstract_params, abstract_train_state: jax.ShapeDtypeStruct trees with `.sharding` set (any mesh: a
        checkpoint written on 8 devices restores onto 1).
      data_iter: if given, its state is set to the state saved with the checkpoint.
      config: this run's config; a refusal then names the config fields that differ from the checkpoint's.
      function_fields: fields of `config` that must equal the checkpoint's even where the shapes match.
    Returns:
      (step, params, train_state), or None when there is no checkpoint (a fresh run).
    Raises:
      CheckpointMismatchError: the checkpoint belongs to another config (not retried on older checkpoints).
      CheckpointReadError: the storage failed to read it (left in place: rerun when the storage answers).
    """
    for step in sorted(self.all_steps(), reverse=True):
      self.refuse_another_function(step, config, function_fields, 'Resume with', ' or start a fresh --workdir')
      try:
        self._check_step(step, abstract_params, abstract_train_state)
        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     train_state=ocp.args.StandardRestore(abstract_train_state))
        data_dir = os.path.join(self.step_dir(step), 'data')
        # grain writes one state file per process, named by the process count of the run that saved it.
        state_file = os.path.join(data_dir, f'process_{jax.process_index()}-of-{jax.process_count()}.json')
        snap = _IteratorState()
        if data_iter is not None and is_checkpointable(data_iter):
          # grain's state counts this host's batches, per worker: it means nothing under another batch or worker
          # count (a KeyError, or worse, the workers' positions applied to other slices).
          changed = config_differences(self.saved_config(step) or {}, config or {}, DATA_LAYOUT_FIELDS)
          if os.path.isfile(state_file) and not changed:
            items['data'] = grain.checkpoint.CheckpointRestore(snap)
          elif changed or glob.glob(os.path.join(data_dir, 'process_*-of-*.json')):
            why = (f'with {", ".join(f"{k}={b!r}" for k, _, b in changed)} (this run: '
                   f'{", ".join(f"{a!r}" for _, a, _ in changed)})' if changed else
                   f'by another number of processes than this run\'s {jax.process_count()}')
            if parallel.is_primary():
              print(f'Note: checkpoint {self.step_dir(step)} was saved {why}: the params and optimizer state are '
                    'restored, the data pipeline starts from its beginning.', flush=True)
          else:
            logging.warning('Checkpoint %s has no data-iterator state; the data pipeline starts from the '
                            'beginning.', self.step_dir(step))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except CheckpointMismatchError as e:
        raise self.naming_config_fields(e, step, config, 'Resume with', ' or start a fresh --workdir') from e
      except Exception as e:  # pylint: disable=broad-except
        if is_transient_io_error(e):
          raise self.storage_error(step, e) from e
        self._quarantine(step, e)
        continue
      if 'data' in items:
        _apply_snapshot(data_iter, snap)
      logging.info('Restored checkpoint %s', self.step_dir(step))
      return step, restored['params'], restored['train_state']
    return None


def _abstract_from_metadata(tree: PyTree, sharding_for: Any) -> PyTree:
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=sharding_for(m)), tree,
      is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))


def restore_params(workdir: str, step: int | str | None = None, *, shardings: PyTree | None = None,
                   mesh: jax.sharding.Mesh | None = None, expected: PyTree | None = None,
                   config: ml_collections.ConfigDict | None = None) -> tuple[PyTree, int]:
  """Parameters of a training run, for the sample/eval/export modes. Returns (params, step).

  Args:
    workdir: the training workdir (or a directory holding `checkpoints/`).
    step: which checkpoint: a step number, 'latest' (or None) or 'best' (the lowest validation loss), as
      sample.checkpoint and export.checkpoint give it.
    shardings: a tree of shardings matching the params (e.g. from `parallel.logical_shardings`) to restore
      straight onto a mesh; default: replicated over `mesh`, or on the first local device when no mesh is given.
    expected: the params' abstract tree as a config builds them; checked against the checkpoint's metadata before
      anything is read (CheckpointMismatchError naming the fields where `config` and the checkpoint's differ).
  """
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise not_a_run(workdir, f'No checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}: train first '
                             f'(--mode=train --workdir={workdir}).')
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    if step == 'best':
      step = ckpt.best_step()
      if step is None:
        raise errors.MissingError(
            f'No checkpoint in {ckpt.directory} has a validation loss (was train.eval_every 0?), so none is the best; '
            f"load 'latest' or a step ({ckpt.all_steps()}).")
    if step not in (None, 'latest') and not str(step).isdigit():
      raise errors.UserError(f"checkpoint step {step!r} is unknown; pick 'latest', 'best' or a step number "
                             f'({ckpt.all_steps()}).')
    step = ckpt.latest_step() if step in (None, 'latest') else int(step)
    if step is None:
      raise errors.MissingError(f'No checkpoint in {ckpt.directory}: train first (--mode=train --workdir={workdir}).')
    if step not in ckpt.all_steps():
      raise errors.MissingError(f'No checkpoint for step {step} in {ckpt.directory}; have {ckpt.all_steps()}.')
    try:
      tree = ckpt.params_metadata(step)
      # A trained tokenizer's params ({generator, discriminator}) or an imported one's (its encoder layers).
      tokenizer = 'generator' in tree or any(str(k).startswith('encoder_layers_') for k in tree)
      if expected is not None and tokenizer and 'generator' not in expected:
        raise errors.MissingError(
            f'{workdir} holds a tokenizer (--mode=train_tokenizer), not a transformer: pass the transformer\'s workdir '
            f'({os.path.dirname(os.path.abspath(workdir))} after --mode=train, its nbp/ or ntp/ after a pipeline).')
      if expected is not None:
        try:
          check_shapes(tree, expected, 'parameter', f'checkpoint {ckpt.step_dir(step)}')
        except CheckpointMismatchError as e:
          raise ckpt.naming_config_fields(e, step, config, 'Use') from e
        ckpt.refuse_another_function(step, config, FUNCTION_FIELDS, 'Use')
      return _restore_params_of(ckpt, step, tree, shardings, mesh), step
    except errors.UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types for bad content)
      if is_transient_io_error(e):
        raise ckpt.storage_error(step, e) from e
      others = [s for s in ckpt.all_steps() if s != step]
      where = ckpt.step_dir(step)
      # Training moves only the latest checkpoint aside (the one it resumes from); an older one (a 'best') stays.
      way_out = ('training again (the same command with --mode=train) resumes from the last good one, which moves '
                 'this one aside' if step == ckpt.latest_step() else
                 f'move it aside (mv {where} {where}.corrupt) to use the others')
      raise CheckpointCorruptError(
          f'checkpoint {where} is unreadable ({_first_line(e)}): damaged, or not a transformer '
          f'checkpoint of nbp-jax. {f"Other steps there: {others}; " if others else ""}{way_out}.') from e
  finally:
    ckpt.close()


def _first_line(error: BaseException) -> str:
  """'Type: the first line of the message' of an error from the storage libraries (theirs run to pages)."""
  return f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else repr(error)}'


def _restore_params_of(ckpt: Checkpointer, step: int, tree: PyTree, shardings: PyTree | None,
                       mesh: jax.sharding.Mesh | None) -> PyTree:
  """Step `step`'s params (metadata `tree`), onto `shardings`, else replicated over `mesh`, else on the first local
  device."""
  if shardings is not None:
    abstract = jax.tree_util.tree_map(
        lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=s), tree, shardings,
        is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))
  else:
    if mesh is not None:
      default = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
      default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = _abstract_from_metadata(tree, lambda m: default)
  return ckpt.restore_params(step, abstract)
