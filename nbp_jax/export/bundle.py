r"""--mode=export: a trained or imported workdir -> WORKDIR/export/, for serving stacks and other frameworks.

  python -m nbp_jax.main --mode=export --workdir=workdirs/demo --config.export.dtype=bfloat16

  WORKDIR/export/params.safetensors     transformer weights, flat per-layer names (safetensors_io), export.dtype;
                                        the header's metadata holds the run's config (JSON) and step
  WORKDIR/export/tokenizer.safetensors  tokenizer weights, when the workdir has a tokenizer (below)
  WORKDIR/export/generate.stablehlo     the generation function (stablehlo.py), export.stablehlo=True
  WORKDIR/export/generate.json          its signature: inputs in order (weights by file and tensor), outputs
  WORKDIR/export/run_generate.py        runs it with JAX alone: python run_generate.py --seed=0 --out=s.npz

The model, sampling settings and sizes come from WORKDIR/config.json (the run's own config); only the `export`
section is taken from the command line. The tokenizer is found as everywhere else: `tokenizer.checkpoint` of the
run's config if set (a tokenizer workdir), else WORKDIR/tokenizer (where --mode=train_tokenizer and --mode=import
write it); without one, the export holds the transformer only and the function returns codes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import ml_collections

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax.export import safetensors_io
from nbp_jax.export import stablehlo
from nbp_jax.tokenizer import model as tokenizer_model

EXPORT_SUBDIR = 'export'
TOKENIZER_SUBDIR = 'tokenizer'


def tokenizer_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """tokenizer.checkpoint if set, else WORKDIR/tokenizer."""
  return config.tokenizer.get('checkpoint', '') or os.path.join(workdir, TOKENIZER_SUBDIR)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str
                   ) -> Optional[tuple[tokenizer_model.Tokenizer, Any, ml_collections.ConfigDict]]:
  """(model, generator params, its tokenizer config) of the workdir's tokenizer, or None when there is none.

  The architecture comes from the tokenizer workdir's own config.json when it has one.
  """
  tdir = tokenizer_dir(config, workdir)
  if not os.path.isdir(os.path.join(tdir, checkpoint_lib.CHECKPOINT_DIR)):
    if config.tokenizer.get('checkpoint', ''):
      raise FileNotFoundError(f'tokenizer.checkpoint={tdir!r} holds no checkpoints/; point it at a tokenizer '
                              'workdir (from --mode=train_tokenizer or --mode=import).')
    return None
  try:
    tok = checkpoint_lib.load_config(tdir).tokenizer
  except FileNotFoundError:
    tok = config.tokenizer
  tok = tok.copy_and_resolve_references()
  tok.dtype = config.tokenizer.get('dtype', 'auto')
  params, _ = checkpoint_lib.restore_params(tdir)
  params = params['generator'] if 'generator' in params else params  # a train_tokenizer checkpoint
  return tokenizer_model.make_model(tok), params, tok


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """--mode=export (see the module docstring). Returns {what: path} of the files written."""
  ex = config.export
  run_config = checkpoint_lib.load_config(workdir)
  params, step = checkpoint_lib.restore_params(workdir)
  out = os.path.join(workdir, EXPORT_SUBDIR)
  written = {}

  meta = {'config': json.dumps(checkpoint_lib.config_to_dict(run_config)), 'step': str(step),
          'what': 'nbp transformer'}
  written['params'] = os.path.join(out, stablehlo.PARAMS_FILE)
  safetensors_io.save(params, written['params'], dtype=ex.dtype, metadata=meta)
  del params

  tok = load_tokenizer(run_config, workdir)
  if tok is not None:
    model, tparams, tok_config = tok
    written['tokenizer'] = os.path.join(out, stablehlo.TOKENIZER_FILE)
    safetensors_io.save(tparams, written['tokenizer'], dtype=ex.dtype, scanned=(),
                        metadata={'tokenizer': json.dumps(tok_config.to_dict()), 'what': 'nbp tokenizer'})
    del tparams

  if ex.stablehlo:
    batch = int(ex.batch_size) or int(run_config.sample.batch_size)
    context = int(ex.context_frames) if int(ex.context_frames) >= 0 else int(run_config.nbp.context_frames)
    # The function takes exactly the tensors of the files just written (memory-mapped, in their dtype).
    weights = safetensors_io.Reader(written['params'])
    tok_weights = None if tok is None else (tok[0], safetensors_io.Reader(written['tokenizer']))
    gen = stablehlo.build(run_config, weights, tokenizer=tok_weights, batch_size=batch, context_frames=context,
                          embed_params=bool(ex.embed_params))
    written['program'], written['signature'] = stablehlo.export(gen, out, tuple(ex.platforms))
    written['runner'] = os.path.join(out, 'run_generate.py')
    shutil.copyfile(os.path.join(os.path.dirname(__file__), 'run_generate.py'), written['runner'])

  print('Exported:\n' + '\n'.join(f'  {k:10s} {v}' for k, v in written.items()), flush=True)
  if 'runner' in written:
    print(f'Run it with JAX alone: python {written["runner"]} --seed=0 --out=samples.npz', flush=True)
  return written
