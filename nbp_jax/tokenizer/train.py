r"""`--mode=train_tokenizer`: trains the video tokenizer with the shared trainer.

  python -m nbp_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=prepare_data
  python -m nbp_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=train_tokenizer

Reads the prepared clips of WORKDIR/data and writes everything under WORKDIR/tokenizer (or
config.tokenizer.checkpoint): checkpoints, config.json, metrics.jsonl, TensorBoard events, samples/. The
transformer's own checkpoints in WORKDIR/checkpoints are never touched. Rerunning resumes. At the end it prints the
reconstruction PSNR/SSIM over the held-out split in whole batches of tokenizer.batch_size (its last partial batch
left out; eval.json's eval_clips says how many clips; per frame of the uint8 reconstruction, as --mode=eval computes
them) and writes them to WORKDIR/tokenizer/eval.json.

Steps and batch come from config.tokenizer (num_steps, batch_size); logging, evaluation, checkpoint and sample
intervals from config.train.

config.tokenizer.pretrained names a finished tokenizer workdir to start from instead of training ('demo' = the one
bundled in nbp_jax/assets/demo_tokenizer, made by this mode with configs/demo.py). It is copied into WORKDIR/tokenizer
when that holds no checkpoint yet, only if it was trained with the same tokenizer recipe (architecture, losses,
optimizers, steps, batch) and clip settings; the run then resumes at its last step (so nothing is trained) and
evaluates it on this workdir's held-out clips.
`--config.tokenizer.pretrained=''` trains from scratch with the same recipe.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import parallel
from nbp_jax import trainer
from nbp_jax.data import builder
from nbp_jax.data import pipeline
from nbp_jax.tokenizer import load
from nbp_jax.tokenizer import task as tokenizer_task


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with the trainer's step count, batch size and accumulation taken from config.tokenizer (the
  transformer's optim.grad_accum_steps is not the tokenizer's)."""
  c = config.copy_and_resolve_references()
  c.train.num_steps = int(config.tokenizer.num_steps)
  c.data.batch_size = int(config.tokenizer.batch_size)
  c.optim.grad_accum_steps = int(config.tokenizer.get('grad_accum_steps', 1))
  return c


# What the numbers of eval.json mean; a rerun recomputes an eval.json of another version instead of reusing it.
# 2: PSNR and SSIM of the uint8 reconstruction per frame, averaged over frames, then clips (nbp_jax.image_metrics, as
# --mode=eval reports them). 1 (no version recorded): PSNR of each clip's mean squared error, float reconstruction.
EVAL_VERSION = 2

BUNDLED = {'demo': os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets',
                                 'demo_tokenizer')}
# What a pretrained tokenizer may differ in from the config that uses it: where things are and how it is computed
# or logged. Every other tokenizer field (architecture, losses, optimizers, steps, batch) is its recipe: a config
# asking for another recipe gets it trained, not the pretrained one under its name.
_NOT_RECIPE = ('checkpoint', 'pretrained', 'num_samples', 'tokenize_batch_size', 'dtype', 'conv_impl', 'remat')
_SAME_DATA = ('source', 'num_frames', 'resolution')


def pretrained_dir(config: ml_collections.ConfigDict) -> str:
  """The folder config.tokenizer.pretrained names ('' = none; 'demo' = the bundled one)."""
  name = config.tokenizer.get('pretrained', '')
  return BUNDLED.get(name, name)


def install_pretrained(config: ml_collections.ConfigDict, tdir: str) -> bool:
  """Copies config.tokenizer.pretrained into `tdir` if `tdir` has no checkpoint yet; True if it did."""
  source = pretrained_dir(config)
  if not source or os.path.isdir(os.path.join(tdir, checkpoint_lib.CHECKPOINT_DIR)):
    return False
  if not os.path.isdir(os.path.join(source, checkpoint_lib.CHECKPOINT_DIR)):
    raise config_lib.ConfigError(
        f'tokenizer.pretrained={config.tokenizer.pretrained!r}: {source} holds no tokenizer checkpoint; point it at '
        "a finished --mode=train_tokenizer workdir, or set --config.tokenizer.pretrained='' to train one.")
  saved = checkpoint_lib.load_config(source)
  # Fields newer than the saved config are not compared (they were at their defaults when it was trained).
  differ = [f'tokenizer.{k}' for k in config.tokenizer if k not in _NOT_RECIPE and k in saved.tokenizer
            and _norm(saved.tokenizer[k]) != _norm(config.tokenizer[k])]
  differ += [f'data.{k}' for k in _SAME_DATA if _norm(saved.data.get(k)) != _norm(config.data.get(k))]
  if differ:
    raise config_lib.ConfigError(
        f'tokenizer.pretrained={config.tokenizer.pretrained!r} was trained with other settings ({", ".join(differ)} '
        f"differ: {', '.join(f'{k}={_norm(_get(saved, k))!r}' for k in differ)}); "
        "set --config.tokenizer.pretrained='' to train a tokenizer for this config.")
  os.makedirs(tdir, exist_ok=True)
  shutil.copytree(os.path.join(source, checkpoint_lib.CHECKPOINT_DIR),
                  os.path.join(tdir, checkpoint_lib.CHECKPOINT_DIR))
  shutil.copy(os.path.join(source, checkpoint_lib.CONFIG_FILE), os.path.join(tdir, checkpoint_lib.CONFIG_FILE))
  print(f'Starting from the pretrained tokenizer {source} (tokenizer.pretrained={config.tokenizer.pretrained!r}; '
        "--config.tokenizer.pretrained='' trains one from scratch).", flush=True)
  return True


def _norm(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def _get(config, dotted: str):
  section, field = dotted.split('.')
  return config[section].get(field)


def previous_evaluation(path: str, step: int, eval_clips: int, dataset_id: str | None) -> dict[str, float] | None:
  """The held-out result in `path` (eval.json) if it scored this step on as many clips of the same preparation of
  the dataset (builder.dataset_id) with these metrics (EVAL_VERSION); else None (evaluate again)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  same = (result.get('step'), result.get('eval_clips'), result.get('dataset_id'), result.get('metrics_version'))
  return result if same == (step, eval_clips, dataset_id, EVAL_VERSION) else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  # The data first: without it nothing is written (not even the pretrained tokenizer's copy).
  builder.require_prepared(builder.video_location(config, workdir))
  tdir = load.tokenizer_workdir(config, workdir)
  parallel.on_primary(lambda: install_pretrained(config, tdir), 'installing the pretrained tokenizer')
  tconfig = training_config(config)
  num_samples = tconfig.tokenizer.num_samples
  samples = next(pipeline.first_clips(tconfig, workdir, num_samples))['video'] if num_samples else None
  task = tokenizer_task.make_task(tconfig, sample_videos=samples)
  train_data = pipeline.make_iterator(
      pipeline.make_dataset(tconfig, workdir, 'train', seed=tconfig.seed, batch_field=task.batch_fields[0]),
      worker_count=tconfig.data.worker_count)
  # Re-iterated from the start at every eval.
  eval_data = pipeline.make_dataset(tconfig, workdir, 'eval', seed=0, batch_field=task.batch_fields[0])
  state = trainer.train(tconfig, tdir, task, train_data, eval_data)
  step = int(jax.device_get(state.step))
  eval_path = os.path.join(tdir, 'eval.json')
  num_clips = pipeline.num_examples(tconfig, workdir, pipeline.eval_split(tconfig, workdir))
  eval_clips = num_clips - num_clips % tconfig.data.batch_size
  dataset_id = builder.dataset_id(builder.video_location(tconfig, workdir))
  result = previous_evaluation(eval_path, step, eval_clips, dataset_id)
  if result is not None:  # a rerun of a finished tokenizer: its evaluation on these clips is done
    print(f'tokenizer at step {step}: held-out psnr={result["psnr"]:.4g} (evaluated before, {eval_path})', flush=True)
    return result

  # The held-out split's whole batches, once, with the trained parameters.
  setup = trainer.make_setup(tconfig, task)
  metrics = trainer.evaluate(trainer.make_eval_step(task, setup), state.params, eval_data, setup, num_batches=0)
  result = {k[len('val_'):]: v for k, v in metrics.items() if k in ('val_psnr', 'val_ssim', 'val_recon_loss')}
  result.update(step=step, eval_clips=eval_clips, dataset_id=dataset_id, metrics_version=EVAL_VERSION)
  out = None
  if task.write_samples is not None:
    out = task.write_samples(state.params, step, tdir)
  if parallel.is_primary():
    checkpoint_lib.write_json(eval_path, result)
    scores = ' '.join(f'{k}={v:.4g}' for k, v in result.items() if k not in ('step', 'dataset_id', 'metrics_version'))
    print(f'tokenizer at step {step}: held-out {scores}', flush=True)
    if out:
      print(f'reconstructions (original | reconstruction): {out}', flush=True)
  return result
