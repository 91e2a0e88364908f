r"""--mode=export: a trained or imported workdir -> WORKDIR/export/, for serving stacks and other frameworks.

  python -m nbp_jax.main --mode=export --workdir=workdirs/demo/nbp --config.export.dtype=bfloat16
  python -m nbp_jax.main --mode=export --workdir=workdirs/demo   # a --mode=pipeline workdir: nbp/ and ntp/ each

WORKDIR is a training workdir (it holds config.json and checkpoints/: --mode=train, --mode=import, or one model of a
--mode=pipeline run, e.g. workdirs/demo/nbp). Given a pipeline workdir, every model in it is exported to its own
WORKDIR/<model>/export/.

  WORKDIR/export/params.safetensors     transformer weights, flat per-layer names (safetensors_io), export.dtype;
                                        the header's metadata holds the run's config (JSON) and step
  WORKDIR/export/tokenizer.safetensors  tokenizer weights, when the workdir has a tokenizer (below)
  WORKDIR/export/generate.stablehlo     the generation function (stablehlo.py), export.stablehlo=True
  WORKDIR/export/generate.json          its signature: inputs in order (weights by file and tensor), outputs
  WORKDIR/export/run_generate.py        runs it with JAX alone (the command is printed at the end)
  WORKDIR/export/context_<i>.mp4        example context clips (frame prediction exports; held-out clips, else
                                        synthetic ones), so that the printed command runs as it is

The files are written to WORKDIR/export.partial/ first, which then replaces WORKDIR/export/ whole.

The model, sampling settings and sizes come from WORKDIR/config.json (the run's own config); only the `export`
section is taken from the command line. The run's 'auto' compute settings (model.dtype, tokenizer.dtype,
tokenizer.conv_impl) resolve for the platforms exported for: bfloat16 and 3D convolutions when `export.platforms`
names an accelerator (also when exporting from a CPU machine), float32 and the CPU's 2D convolutions when it names
only 'cpu' (or is empty on a CPU machine). The tokenizer is found as everywhere else: `tokenizer.checkpoint` of the
run's config if set (a tokenizer workdir), else WORKDIR/tokenizer (where --mode=train_tokenizer and --mode=import
write it); without one, the export holds the transformer only and the function returns codes.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
import shlex
import shutil
from typing import Any

import ml_collections
import numpy as np

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax.data import pipeline
from nbp_jax.data import prepare
from nbp_jax.export import safetensors_io
from nbp_jax.export import stablehlo
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.tokenizer import load as tokenizer_load


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=export (see the module docstring). Returns {what: path} of the files written ({model: that} for a
  pipeline workdir)."""
  runs = checkpoint_lib.training_workdirs(workdir)
  if not runs:
    raise checkpoint_lib.not_a_run(
        workdir, f'{workdir!r} is not a training workdir: neither it nor a sub-folder holds '
        f'{checkpoint_lib.CONFIG_FILE} and {checkpoint_lib.CHECKPOINT_DIR}/ (train first with --mode=train, '
        '--mode=pipeline or --mode=import).')
  if runs == [workdir]:
    return export_workdir(config, workdir)
  names = [os.path.basename(r) for r in runs]
  print(f'{workdir} holds {len(runs)} models ({", ".join(names)}): exporting each (pass --workdir='
        f'{runs[0]} to export one).', flush=True)
  return {name: export_workdir(config, r) for name, r in zip(names, runs)}


def compute_platform(platforms: Sequence[str]) -> str | None:
  """The platform whose 'auto' compute settings an export for `platforms` gets: an accelerator's when one is named
  (one program serves them all; bfloat16 and 3D convolutions also run on CPU), 'cpu' when only it is, None (this
  backend) for ()."""
  accelerators = [p for p in platforms if p != 'cpu']
  return accelerators[0] if accelerators else ('cpu' if platforms else None)


def export_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Exports the one training run in `workdir` to WORKDIR/export; returns {what: path} of the files written.

  The files are written to WORKDIR/export.partial, which replaces WORKDIR/export as a whole at the end: an earlier
  export's files never mix with this one's, and a refused or failed export leaves the earlier one as it was.
  """
  ex = config.export
  run_config = checkpoint_lib.load_config(workdir)
  platform = compute_platform(tuple(ex.platforms))
  spec = spec_from_config(run_config, dtype=config_lib.resolve_dtype(run_config.model.dtype, platform))
  params, step = checkpoint_lib.restore_params(workdir, ex.get('checkpoint', 'latest'),
                                               expected=nbp_train.abstract_params(spec), config=run_config)
  out = os.path.join(workdir, checkpoint_lib.EXPORT_SUBDIR)
  staging = out + '.partial'
  shutil.rmtree(staging, ignore_errors=True)  # a killed export's
  os.makedirs(staging)
  try:
    written, command = _write_export(ex, run_config, workdir, spec, params, step, platform, staging, out)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  print('Exported:\n' + '\n'.join(f'  {k:10s} {v}' for k, v in written.items()), flush=True)
  if command:
    print(f'Run it with JAX alone: {command}', flush=True)
  return written


def _write_export(ex: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict, workdir: str, spec,
                  params: Any, step: int, platform: str | None, staging: str, out: str
                  ) -> tuple[dict[str, str], str | None]:
  """Writes the export's files into `staging`; returns ({what: its path once `staging` is `out`}, the command that
  runs the export there)."""
  written = {}
  meta = {'config': json.dumps(checkpoint_lib.config_to_dict(run_config)), 'step': str(step),
          'what': 'nbp transformer'}
  written['params'] = os.path.join(staging, stablehlo.PARAMS_FILE)
  safetensors_io.save(params, written['params'], dtype=ex.dtype, metadata=meta)
  del params

  try:
    tok = tokenizer_load.load_tokenizer(run_config, workdir, platform=platform)
  except errors.MissingError:
    if run_config.tokenizer.get('checkpoint', ''):
      raise  # a tokenizer was named and is not there
    tok = None  # none in WORKDIR/tokenizer: the export holds the transformer only
  if tok is not None:
    _, tparams, _ = tok
    tok_config = tokenizer_load.tokenizer_config(run_config, workdir)  # the architecture the weights have
    written['tokenizer'] = os.path.join(staging, stablehlo.TOKENIZER_FILE)
    safetensors_io.save(tparams, written['tokenizer'], dtype=ex.dtype, scanned=(),
                        metadata={'tokenizer': json.dumps(tok_config.to_dict()), 'what': 'nbp tokenizer'})
    del tparams

  command, example = None, {}
  if ex.stablehlo:
    batch = int(ex.batch_size) or int(run_config.sample.batch_size)
    context = int(ex.context_frames) if int(ex.context_frames) >= 0 else int(run_config.nbp.context_frames)
    # The function takes exactly the tensors of the files just written (memory-mapped, in their dtype).
    weights = safetensors_io.Reader(written['params'])
    tok_weights = None if tok is None else (tok[0], safetensors_io.Reader(written['tokenizer']))
    gen = stablehlo.build(run_config, weights, tokenizer=tok_weights, batch_size=batch, context_frames=context,
                          embed_params=bool(ex.embed_params), spec=spec)
    written['program'], written['signature'] = stablehlo.export(gen, staging, tuple(ex.platforms))
    written['runner'] = os.path.join(staging, 'run_generate.py')
    shutil.copyfile(os.path.join(os.path.dirname(__file__), 'run_generate.py'), written['runner'])
    example, command = example_command(run_config, workdir, gen, written['runner'], final_dir=out)
  written = {what: os.path.join(out, os.path.relpath(path, staging)) for what, path in written.items()}
  return {**written, **example}, command


def example_command(run_config: ml_collections.ConfigDict, workdir: str, gen: stablehlo.Generation,
                    runner: str, final_dir: str | None = None) -> tuple[dict[str, str], str]:
  """({what: path} of the example inputs written beside the runner, a command that runs the export as it is once
  the runner's folder is `final_dir` (default where it is)).

  Frame prediction needs context clips: the first held-out clips of the run's prepared data when they are there,
  else synthetic clips of the same size, written as mp4 (or .npy codes for an export without tokenizer).
  """
  inputs = {i['name']: i for i in gen.inputs if 'file' not in i}
  batch = int(gen.info['batch_size'])
  n = min(batch, 4)
  out_dir = os.path.dirname(os.path.abspath(runner))
  final_dir = os.path.abspath(final_dir or out_dir)
  written, args = {}, ['python', os.path.join(final_dir, os.path.basename(runner)), '--seed=0']
  labels = np.arange(n) % max(int(gen.info['num_classes']), 1)
  if 'context_video' in inputs:
    _, frames, res, _, _ = inputs['context_video']['shape']
    clips, clip_labels = _example_clips(run_config, workdir, n, frames, res)
    if clip_labels is not None:
      labels = clip_labels
    from nbp_jax.data import video_io  # pylint: disable=g-import-not-at-top
    for i, clip in enumerate(clips):
      video_io.write_mp4(os.path.join(out_dir, f'context_{i}.mp4'), clip[:frames], float(run_config.data.fps))
    written['context'] = ','.join(os.path.join(final_dir, f'context_{i}.mp4') for i in range(len(clips)))
    args.append(f'--context={written["context"]}')
  elif 'context_codes' in inputs:
    shape = [n] + list(inputs['context_codes']['shape'][1:])
    codes = np.random.default_rng(0).integers(0, _codebook_size(run_config), shape).astype(np.int32)
    np.save(os.path.join(out_dir, 'context_codes.npy'), codes)  # placeholder codes: pass your own clips' instead
    written['context'] = os.path.join(final_dir, 'context_codes.npy')
    args.append(f'--context={written["context"]}')
  if 'labels' in inputs:
    args.append('--labels=' + ','.join(str(int(x)) for x in labels[:n]))
  args.append('--out=samples.npz')
  if gen.outputs[-1]['name'] == 'video':
    args.append('--video=samples.mp4')
  return written, ' '.join(shlex.quote(a) for a in args)


def _codebook_size(config: ml_collections.ConfigDict) -> int:
  return int(np.prod(config.tokenizer.fsq_levels))


def _example_clips(config: ml_collections.ConfigDict, workdir: str, n: int, frames: int,
                   resolution: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(uint8 [n, >= frames, R, R, 3], labels or None): held-out clips of the run's data, else synthetic ones."""
  clips, missing = pipeline.example_clips(config, workdir, n, num_frames=frames, resolution=resolution)
  video = clips['video']
  if missing is not None:
    return video, None
  if video.shape[1] >= frames and video.shape[2:4] == (resolution, resolution):
    labels, classes = clips['label'], int(config.data.num_classes)
    ok = classes > 0 and bool(np.all((labels >= 0) & (labels < classes)))
    return video, (labels.astype(np.int32) if ok else None)
  # Held-out clips of another size than the exported function's: synthetic ones of its own size.
  return prepare.synthetic_clips(config, n, num_frames=frames, resolution=resolution)['video'], None
