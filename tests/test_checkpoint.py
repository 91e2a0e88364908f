"""Checkpoints: kill-and-resume gives the uninterrupted loss sequence, SIGTERM saves cleanly, corrupt checkpoints
fall back (a storage I/O error does not count as corrupt), another config's checkpoint is refused by name without
touching the workdir, and an 8-device checkpoint restores onto 1 device."""

import asyncio
import errno
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import damage_checkpoint_arrays
from nbp_jax import checkpoint
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import metric_logger
from nbp_jax import parallel
from nbp_jax import trainer
from nbp_jax.bench import train as trainer_bench
from nbp_jax.interop import official
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import train as nbp_train
from nbp_jax.tokenizer import load as tokenizer_load
from nbp_jax.tokenizer import model as tokenizer_model
import trainer_toy as toy

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _losses(workdir):
  return {r['step']: r['loss'] for r in metric_logger.read_metrics(workdir) if 'loss' in r}


def _train(workdir, **kw):
  return trainer.train(toy.reference_config(), workdir, toy.make_task(**kw), toy.dataset(16),
                       eval_data=lambda: iter(toy.dataset(16, seed=1)))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """12 uninterrupted steps on 8 devices; checkpoints at 3, 6, 9, 12; validation at 6 and 12."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  state = _train(workdir)
  return workdir, _losses(workdir), jax.device_get(state.params)


def _start(workdir, delay_s=0.3):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE]))
  return subprocess.Popen([sys.executable, os.path.join(HERE, 'trainer_toy.py'), workdir, str(delay_s)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_steps(proc, workdir, n, checkpoint_step=None, timeout=120):
  path = os.path.join(workdir, metric_logger.METRICS_FILE)
  ckpt = os.path.join(workdir, 'checkpoints', str(checkpoint_step), 'commit_success.txt')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail(f'training subprocess exited early ({proc.returncode}):\n{proc.stdout.read()}')
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) >= n and (checkpoint_step is None or os.path.exists(ckpt)):
          return
    time.sleep(0.05)
  proc.kill()
  pytest.fail(f'no {n} steps logged in {timeout}s')


def test_sigkill_then_resume_repeats_the_uninterrupted_losses(reference, tmp_path):
  ref_dir, ref_losses, _ = reference
  workdir = str(tmp_path)
  proc = _start(workdir)
  _wait_for_steps(proc, workdir, 5, checkpoint_step=3)  # past the step-3 checkpoint, mid-way to step 6
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = checkpoint.Checkpointer(workdir, read_only=True).all_steps()
  assert steps and max(steps) < 12, steps
  _train(workdir)  # resumes from the latest complete checkpoint
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 13))  # metrics.jsonl reads as one run: no duplicated steps
  np.testing.assert_allclose([losses[s] for s in range(1, 13)], [ref_losses[s] for s in range(1, 13)], rtol=1e-6)


def test_sigterm_saves_at_the_next_step_and_stops_training(reference, tmp_path):
  _, ref_losses, _ = reference
  workdir = str(tmp_path)
  proc = _start(workdir)
  _wait_for_steps(proc, workdir, 4)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out  # trainer.train raised errors.Preempted after saving
  assert 'Preempted (SIGTERM): saved' in out and 'Traceback' not in out
  last_logged = max(_losses(workdir))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == last_logged < 12  # saved at the step it stopped at, between the every-3 saves too
  ckpt.close()
  # The preemption checkpoint is whole (params, optimizer, data position): resuming repeats the reference's losses.
  _train(workdir)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 13))
  np.testing.assert_allclose([losses[s] for s in range(1, 13)], [ref_losses[s] for s in range(1, 13)], rtol=1e-6)


def test_a_sigterm_during_the_last_steps_evaluation_still_stops_what_follows_training(tmp_path):
  cfg = toy.config(num_steps=2, eval_every=2)

  def eval_data():  # the last step's evaluation, where the loop has already looked for a signal
    os.kill(os.getpid(), signal.SIGTERM)
    return iter(toy.dataset(16, seed=1))

  with pytest.raises(errors.Preempted, match='SIGTERM during the last step: training is complete and saved'):
    trainer.train(cfg, str(tmp_path), toy.make_task(), toy.dataset(16), eval_data=eval_data)
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 2


def test_ctrl_c_asks_for_the_same_stop_as_sigterm_and_a_second_one_stops_at_once(tmp_path, capsys):
  """The loop's stop after a preemption is the SIGTERM test's; here, that Ctrl-C (SIGINT) asks for it."""
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  before = signal.getsignal(signal.SIGINT)
  preemption = trainer._Preemption(ckpt)  # pylint: disable=protected-access
  try:
    assert not preemption.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.reached(1) and preemption.reason == 'Ctrl-C'
    assert 'saving a checkpoint after this step' in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    preemption.close()
    ckpt.close()
  assert signal.getsignal(signal.SIGINT) is before  # the handler it replaced is back


def test_corrupt_checkpoint_is_reported_and_the_previous_one_used(reference, tmp_path, capsys):
  ref_dir, ref_losses, _ = reference
  workdir = str(tmp_path / 'w')
  shutil.copytree(ref_dir, workdir)
  damage_checkpoint_arrays(os.path.join(workdir, 'checkpoints', '12'))  # the newest one
  cfg = toy.reference_config()
  cfg.train.num_steps = 12
  trainer.train(cfg, workdir, toy.make_task(), toy.dataset(16), eval_data=lambda: iter(toy.dataset(16, seed=1)))
  out = capsys.readouterr().out
  assert 'checkpoints/12 is unreadable' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '12.corrupt'))
  losses = _losses(workdir)  # redone from step 9: same numbers
  np.testing.assert_allclose([losses[s] for s in (10, 11, 12)], [ref_losses[s] for s in (10, 11, 12)], rtol=1e-6)


def test_closed_event_loop_reports_of_a_failed_read_are_dropped_and_others_kept(tmp_path, monkeypatch):
  # What tensorstore's threads do after a failed orbax read: post to the event loop orbax already closed.
  closed = asyncio.new_event_loop()
  closed.close()

  class PostsToTheClosedLoop:
    def __del__(self):
      closed.call_soon_threadsafe(print)

  class FailsOtherwise:
    def __del__(self):
      raise ValueError('a real problem')

  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: reported.append(repr(u.exc_value)))
  checkpoint.Checkpointer(str(tmp_path)).close()  # any checkpointer installs the filter before its first read
  checkpoint.Checkpointer(str(tmp_path)).close()  # once: a second wraps nothing
  PostsToTheClosedLoop()
  FailsOtherwise()
  assert reported == ["ValueError('a real problem')"]


def test_a_json_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
  path = str(tmp_path / 'results.json')
  checkpoint.write_json(path, {'step': 1})

  def killed_while_writing(value, f, **kwargs):
    f.write('{"step": ')
    raise KeyboardInterrupt
  monkeypatch.setattr(checkpoint.json, 'dump', killed_while_writing)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.write_json(path, {'step': 2})
  with open(path) as f:
    assert json.load(f) == {'step': 1}  # what a rerun reads back to resume


def test_read_only_checkpointers_open_without_orbax_notices(reference, caplog):
  ref_dir, _, _ = reference
  with caplog.at_level(logging.WARNING):
    checkpoint.Checkpointer(ref_dir, read_only=True).close()
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_checkpoint_of_another_config_is_refused_by_parameter_name(reference, tmp_path):
  ref_dir, _, _ = reference
  workdir = str(tmp_path / 'w')
  shutil.copytree(ref_dir, workdir)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/embed_in/bias.*shape \(16,\).*\(24,\)"):
    _train(workdir, embed=24)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '12'))  # a mismatch is not mistaken for corruption


def test_a_checkpoint_of_another_process_count_or_data_layout_restores_without_its_data_state(
    reference, tmp_path, capsys):
  """grain names its state files by the saving run's process count; a run on another count is not a corrupt
  checkpoint (they were all moved aside and training started over): params and optimizer state are restored."""
  ref_dir, _, ref_params = reference
  workdir = str(tmp_path / 'w')
  shutil.copytree(ref_dir, workdir)
  for data_dir in glob.glob(os.path.join(workdir, 'checkpoints', '*', 'data')):
    state = os.path.join(data_dir, 'process_0-of-1.json')
    for i in range(2):  # as written by two processes
      shutil.copyfile(state, os.path.join(data_dir, f'process_{i}-of-2.json'))
    os.remove(state)
  capsys.readouterr()
  state = _train(workdir)
  assert 'was saved by another number of processes' in capsys.readouterr().out
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*corrupt*'))
  assert int(state.step) == 12
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), ref_params)
  # Another batch size or worker count: grain's saved position (batches per worker) means nothing there either.
  workdir = str(tmp_path / 'w2')
  shutil.copytree(ref_dir, workdir)
  cfg = toy.reference_config()
  cfg.data.worker_count = 2
  state = trainer.train(cfg, workdir, toy.make_task(), toy.dataset(16))
  assert ("was saved with data.worker_count=0 (this run: 2): the params and optimizer state are restored, the data "
          'pipeline starts from its beginning.') in capsys.readouterr().out
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), ref_params)


def test_restore_onto_one_device_and_best_checkpoint(reference, tmp_path):
  ref_dir, ref_losses, ref_params = reference
  params, step = checkpoint.restore_params(ref_dir)
  assert step == 12
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), ref_params)
  assert len(jax.tree_util.tree_leaves(params)[0].sharding.device_set) == 1
  # Best by validation loss is kept beside the last 3.
  val = {r['step']: r['val_loss'] for r in metric_logger.read_metrics(ref_dir) if 'val_loss' in r}
  _, best = checkpoint.restore_params(ref_dir, 'best')
  assert best == min(val, key=val.get) and checkpoint.restore_params(ref_dir, str(best))[1] == best
  # Training goes on from the 8-device checkpoint on a 1-device mesh.
  workdir = str(tmp_path / 'w')
  shutil.copytree(ref_dir, workdir)
  cfg = toy.reference_config()
  cfg.train.num_steps = 13
  one = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  state = trainer.train(cfg, workdir, toy.make_task(), toy.dataset(16), mesh=one)
  assert int(state.step) == 13 and len(state.params['params']['head']['kernel'].sharding.device_set) == 1
  assert checkpoint.load_config(workdir).mesh.shape == (-1, 1, 1)


def test_the_best_checkpoint_is_kept_beside_the_latest_and_loaded_by_name(tmp_path):
  workdir = str(tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  for step, val_loss in ((1, 0.5), (2, None), (3, 0.9), (4, None)):  # validation at steps 1 and 3 only
    ckpt.save(step, {'w': np.full((2,), step, np.float32)}, {'step': np.int32(step)},
              metrics=None if val_loss is None else {'val_loss': val_loss})
  ckpt.close()
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [1, 4]  # the best, the latest
  for which, step in (('best', 1), ('latest', 4), ('4', 4), (None, 4)):
    params, got = checkpoint.restore_params(workdir, which)
    assert got == step and params['w'].tolist() == [step, step], which
  # A resumed run (a new checkpointer, reading the metrics from disk) keeps it too.
  ckpt = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  ckpt.save(5, {'w': np.full((2,), 5, np.float32)}, {'step': np.int32(5)})
  ckpt.close()
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [1, 5]
  # A NaN validation loss never becomes the best, wherever it comes (NaN compares false both ways).
  ckpt = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
  ckpt.save(6, {'w': np.full((2,), 6, np.float32)}, {'step': np.int32(6)}, metrics={'val_loss': float('nan')})
  ckpt.save(7, {'w': np.full((2,), 7, np.float32)}, {'step': np.int32(7)}, metrics={'val_loss': 0.7})
  ckpt.close()
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [1, 7]
  assert checkpoint.restore_params(workdir, 'best')[1] == 1


def _snapshot(workdir):
  """{relative path: bytes} of every file below `workdir`."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def _nbp_run_config():
  """A micro class-conditional NBP model on 5-frame 16x16 clips (latents (2, 2, 2)), with a micro tokenizer."""
  cfg = config_lib.task_config('demo', 'micro')
  cfg.tokenizer = config_lib.tokenizer_config('micro')
  cfg.data.num_frames, cfg.data.resolution, cfg.data.batch_size = 5, 16, 2
  cfg.nbp.block_shape, cfg.nbp.context_frames = (1, 1, 2), 0
  cfg.train.num_steps, cfg.train.checkpoint_every, cfg.train.log_every = 2, 2, 1
  cfg.sample.num_samples = cfg.sample.batch_size = 2
  return cfg


def _train_nbp(cfg, workdir):
  task = nbp_train.make_task(cfg)
  data = (trainer_bench.random_batch(cfg, cfg.data.batch_size, seed=i) for i in range(cfg.train.num_steps))
  return trainer.train(cfg, workdir, task, data, mesh=parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1]))


@pytest.mark.slow  # ~140 s on a loaded 2-core machine
def test_refused_resume_leaves_the_workdir_unchanged_and_names_the_field(tmp_path):
  workdir = str(tmp_path / 'w')
  cfg = _nbp_run_config()
  _train_nbp(cfg, workdir)
  tok_model = tokenizer_model.make_model(cfg)
  tok_params = trainer.jit_init(lambda r: nn.unbox(tokenizer_model.init_params(tok_model, r)), jax.random.key(0))
  official.save_workdir(os.path.join(workdir, 'tokenizer'), tok_params, cfg)
  before = _snapshot(workdir)

  other = _nbp_run_config()
  other.model.num_layers = 1
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'this config has model\.num_layers=1, the checkpoint model\.num_layers=2 .*blocks'):
    _train_nbp(other, workdir)
  # The same shapes, another function (heads of 32 instead of 16 features): refused as well.
  other = _nbp_run_config()
  other.model.num_heads = 1
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r'this config has model\.num_heads=1, the checkpoint '
                     r'model\.num_heads=2 \(the same parameter shapes, computing another function\)\. Resume with'):
    _train_nbp(other, workdir)
  after = _snapshot(workdir)
  assert sorted(after) == sorted(before)  # no file added (config.json, TensorBoard events) or removed
  assert [p for p in before if before[p] != after[p]] == []
  # The saved config still describes the checkpoint: sample works from the workdir alone.
  saved = checkpoint.load_config(workdir)
  assert saved.model.num_layers == 2
  generator_lib.run(saved, workdir)
  assert glob.glob(os.path.join(workdir, 'samples', 'step_2', 'sample_0.mp4'))


def test_transient_read_error_does_not_quarantine(reference, tmp_path, monkeypatch):
  """An I/O error of the storage (EIO) stops the run naming the checkpoint and leaves it in place; only damaged
  content is moved to .corrupt."""
  ref_dir, _, _ = reference
  workdir = str(tmp_path / 'w')
  shutil.copytree(ref_dir, workdir)

  read = ocp.CheckpointManager.restore

  def failing_restore(self, step, *args, **kwargs):
    raise OSError(errno.EIO, 'Input/output error', os.path.join(workdir, 'checkpoints', str(step)))
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', failing_restore)
  with pytest.raises(checkpoint.CheckpointReadError, match=r'checkpoints/12 could not be read .*left in place'):
    _train(workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == sorted(os.listdir(os.path.join(ref_dir,
                                                                                                   'checkpoints')))

  def failing_without_a_message(self, step, *args, **kwargs):  # orbax raises bare AssertionErrors too
    if step == 12:
      raise AssertionError()
    return read(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', failing_without_a_message)
  _train(workdir)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '12.corrupt'))


def test_switching_lecam_on_is_named_when_a_tokenizer_resume_is_refused():
  """LeCam adds two saved arrays (lecam/ema_*), so a resume that switches it on or off cannot load: the refusal
  names tokenizer.lecam_weight (a change of weight alone changes no array and is never refused)."""
  c = config_lib.task_config('demo', 'micro')
  saved = c.to_dict()
  c.tokenizer.lecam_weight = 0.3
  assert checkpoint.config_differences(saved, c) == [('tokenizer.lecam_weight', 0.3, 0.0)]
  assert 'lecam_weight' not in tokenizer_load.ARCHITECTURE_FIELDS  # loading a tokenizer never builds LeCam's arrays
