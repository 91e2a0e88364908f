"""The whole generation as one serialized StableHLO program (`jax.export`), runnable without the model code.

One function at a fixed batch and fixed shapes: (tokenizer encode of the context frames) -> prefill -> block
decoding loop -> (tokenizer decode). Positional inputs, in this order (generate.json lists them with shapes):

  key       uint32 [2]               threefry key [0, seed] (= jax.random.PRNGKey(seed))
  labels    int32 [B]                class ids (class-conditional models only)
  context   uint8 [B, F, H, W, 3]    the F given frames (frame prediction, export with a tokenizer), or
            int32 [B, t_ctx, h, w]   the given latent frames as codes (frame prediction without a tokenizer)
  weights   every tensor of params.safetensors, then of tokenizer.safetensors, in the listed order, in the files'
            dtype (cast to float32 inside); absent when export.embed_params bakes them into the program

Outputs: codes int32 [B, t, h, w] (context included) and, with a tokenizer, video uint8 [B, T, H, W, 3].
Sampling settings (temperature, top-k, top-p, CFG) are fixed at export time. In a fresh process:

  exported = jax.export.deserialize(open('generate.stablehlo', 'rb').read())
  codes, video = exported.call(key, labels, *weights)

(WORKDIR/export/run_generate.py does exactly that, reading the weights with numpy alone.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax.export import safetensors_io
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.tokenizer import model as tokenizer_model

PROGRAM_FILE = 'generate.stablehlo'
SIGNATURE_FILE = 'generate.json'
PARAMS_FILE = 'params.safetensors'
TOKENIZER_FILE = 'tokenizer.safetensors'
FORMAT = 'nbp-jax generate v1'


class ExportError(errors.UserError, ValueError):
  """The generation cannot be exported as configured; the message names the field and the fix."""


@dataclasses.dataclass
class Generation:
  """A generation function with positional array inputs, ready for jax.jit / jax.export.

  Attributes:
    fn: (key, [labels], [context], *weights) -> (codes, [video]).
    inputs: one dict per input: name, shape, dtype (+ file and tensor for weights).
    outputs: one dict per output: name, shape, dtype.
    weights: the weight arrays to pass after the other inputs (empty when embedded).
    info: extra signature fields (sampling, steps, shapes).
  """
  fn: Callable[..., tuple[jax.Array, ...]]
  inputs: list[dict[str, Any]]
  outputs: list[dict[str, Any]]
  weights: list[np.ndarray]
  info: dict[str, Any]

  def abstract_inputs(self) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(tuple(i['shape']), np.dtype(i['dtype'])) for i in self.inputs]


def _spec_entry(name: str, shape, dtype, **extra) -> dict[str, Any]:
  return dict(name=name, shape=[int(s) for s in shape], dtype=str(np.dtype(dtype)), **extra)


def build(config: ml_collections.ConfigDict, params: Mapping[str, np.ndarray], *,
          tokenizer: tuple[tokenizer_model.Tokenizer, Mapping[str, np.ndarray]] | None = None,
          batch_size: int, context_frames: int, embed_params: bool = False, spec: Spec | None = None
          ) -> Generation:
  """The generation of `config` as a Generation.

  Args:
    config: the run's config (model, nbp, data, sample sections).
    params: flat transformer weights {name: array} as in params.safetensors (safetensors_io.flatten).
    tokenizer: (model, flat tokenizer weights) to decode videos (and encode context frames); None = codes only.
    batch_size: B, fixed.
    context_frames: video frames given (frame prediction); 0 = generate the whole clip.
    embed_params: bake the weights into the function instead of taking them as inputs.
    spec: overrides spec_from_config(config).
  """
  spec = spec or spec_from_config(config)
  layout, vocab = spec.layout, spec.vocab
  sampling = Sampling.from_config(config.sample)
  t, h, w = layout.latent_shape
  ft = config_lib.temporal_factor(config.tokenizer)
  t_ctx = 0 if context_frames <= 0 else 1 + (context_frames - 1) // ft
  cond = vocab.prefix_len > 0
  if t_ctx and (context_frames - 1) % ft:
    raise ExportError(f'export.context_frames={context_frames} is not 1 + a multiple of {ft}: the tokenizer '
                      f'encodes 1 + {ft}k frames; use e.g. {1 + ft}.')
  if t_ctx % layout.block_shape[0]:
    bt = layout.block_shape[0]
    raise ExportError(f'export.context_frames={context_frames} gives {t_ctx} latent frames, not whole layers of '
                      f'blocks {bt} latent frames deep; give a multiple of {bt} latent frames (e.g. '
                      f'--config.export.context_frames={1 + ft * (bt - 1)}).')
  if t_ctx >= t:
    raise ExportError(f'export.context_frames={context_frames} gives the whole clip ({t} latent frames): nothing is '
                      f'left to generate; give fewer frames (at most {1 + ft * (t - 2)}).')
  plan = layout.decode_plan(t_ctx * h * w)  # raises (naming the fix) when the start is impossible

  inputs = [_spec_entry('key', (2,), np.uint32)]
  if cond:
    inputs.append(_spec_entry('labels', (batch_size,), np.int32))
  if t_ctx and tokenizer is not None:
    res = config.data.resolution
    inputs.append(_spec_entry('context_video', (batch_size, context_frames, res, res, 3), np.uint8))
  elif t_ctx:
    inputs.append(_spec_entry('context_codes', (batch_size, t_ctx, h, w), np.int32))
  num_data = len(inputs)

  t_names = sorted(params)
  k_names = sorted(tokenizer[1]) if tokenizer is not None else []
  t_arrays = [np.asarray(params[n]) for n in t_names]
  _check_weights(dict(zip(t_names, t_arrays)), spec)
  k_arrays = [np.asarray(tokenizer[1][n]) for n in k_names] if tokenizer is not None else []
  if not embed_params:
    inputs += [_spec_entry(f'params/{n}', a.shape, a.dtype, file=PARAMS_FILE, tensor=n)
               for n, a in zip(t_names, t_arrays)]
    inputs += [_spec_entry(f'tokenizer/{n}', a.shape, a.dtype, file=TOKENIZER_FILE, tensor=n)
               for n, a in zip(k_names, k_arrays)]
  scan = spec.model.scan_layers

  def as_tree(names, arrays, scan_layers):
    arrays = [jnp.asarray(a, jnp.float32) if safetensors_io.is_float(a.dtype) else jnp.asarray(a) for a in arrays]
    return safetensors_io.unflatten(dict(zip(names, arrays)), scan_layers=scan_layers, stack=jnp.stack)

  def fn(*args):
    data, weights = args[:num_data], args[num_data:]
    if embed_params:
      weights = t_arrays + k_arrays
    tparams = as_tree(t_names, weights[:len(t_names)], scan)
    kparams = as_tree(k_names, weights[len(t_names):], False) if tokenizer is not None else None
    generator = generator_lib.Generator(config, spec, tparams, tokenizer=None if tokenizer is None else tokenizer[0],
                                        tokenizer_params=kparams)
    key, rest = data[0], list(data[1:])
    labels = rest.pop(0) if cond else None
    context = None
    if t_ctx:
      context = rest.pop(0)
      if tokenizer is not None:
        context = generator.encode(context)  # the F given frames -> [B, t_ctx, h, w]
    codes = generator.codes(key, labels=labels, context_codes=context, batch_size=batch_size, sampling=sampling)
    if tokenizer is None:
      return (codes,)
    # Generator.decode returns host arrays; here the decode is traced into the program.
    return codes, tokenizer_model.decode(kparams, codes, tokenizer[0])

  outputs = [_spec_entry('codes', (batch_size, t, h, w), np.int32)]
  if tokenizer is not None:
    num_frames = 1 + (t - 1) * ft
    fs = config_lib.spatial_factor(config.tokenizer)
    outputs.append(_spec_entry('video', (batch_size, num_frames, h * fs, w * fs, 3), np.uint8))
  info = dict(
      batch_size=batch_size, latent_shape=list(layout.latent_shape), block_shape=list(layout.block_shape),
      context_frames=max(context_frames, 0), context_tokens=plan.num_context, num_steps=plan.num_steps,
      num_classes=vocab.num_classes, id_layout=config.nbp.get('id_layout', 'native'), fps=float(config.data.fps),
      sampling=dict(temperature=float(sampling.temperature), top_k=int(sampling.top_k), top_p=float(sampling.top_p),
                    cfg_scale=float(sampling.cfg_scale), greedy=bool(sampling.greedy)),
      embedded_params=bool(embed_params), compute_dtype=jnp.dtype(spec.model.dtype).name,
      tokenizer_compute=None if tokenizer is None else dict(dtype=jnp.dtype(tokenizer[0].dtype).name,
                                                            conv_impl=tokenizer[0].conv_impl))
  return Generation(fn=fn, inputs=inputs, outputs=outputs, weights=[] if embed_params else t_arrays + k_arrays,
                    info=info)


def _check_weights(weights: Mapping[str, np.ndarray], spec: Spec) -> None:
  """Raises ExportError naming the first weight whose name or shape is not what `spec`'s model has (tracing the
  generator with them would fail deep inside a layer instead)."""
  shapes = {n: jax.ShapeDtypeStruct(a.shape, a.dtype) for n, a in weights.items()}
  stack = lambda layers: jax.ShapeDtypeStruct((len(layers),) + layers[0].shape, layers[0].dtype)
  given = safetensors_io.unflatten(shapes, scan_layers=spec.model.scan_layers, stack=stack)
  detail = checkpoint_lib.shape_mismatch(given, nbp_train.abstract_params(spec), 'weight', 'the weights')
  if detail is not None:
    raise ExportError(f'{detail} The weights were made by another config: build with the config they were trained '
                      'with (WORKDIR/config.json, or the export\'s config.json).')


def export(gen: Generation, out_dir: str, platforms: Sequence[str] = ()) -> tuple[str, str]:
  """Serializes `gen` to OUT_DIR/generate.stablehlo and its signature to OUT_DIR/generate.json.

  Args:
    platforms: lowering targets, e.g. ('cpu', 'cuda', 'tpu'); () = the current backend.
  Returns:
    (program path, signature path).
  """
  if importlib.util.find_spec('flatbuffers') is None:
    raise ExportError('jax.export serialization needs the flatbuffers package: pip install flatbuffers '
                      '(or set --config.export.stablehlo=False).') from None
  exported = jax.export.export(jax.jit(gen.fn), platforms=tuple(platforms) or None)(*gen.abstract_inputs())
  os.makedirs(out_dir, exist_ok=True)
  program = os.path.join(out_dir, PROGRAM_FILE)
  with open(program + '.tmp', 'wb') as f:
    f.write(exported.serialize())
  os.replace(program + '.tmp', program)
  signature = dict(format=FORMAT, program=PROGRAM_FILE, platforms=list(exported.platforms),
                   jax_version=jax.__version__, inputs=gen.inputs, outputs=gen.outputs, **gen.info)
  sig_path = os.path.join(out_dir, SIGNATURE_FILE)
  checkpoint_lib.write_json(sig_path, signature, indent=1)
  return program, sig_path
