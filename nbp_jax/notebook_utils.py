"""What the Colab notebooks (notebooks/*.ipynb) call, so that the notebooks stay thin and this logic is tested.
`decode_speed` also times the models of --mode=pipeline.

  quickstart.ipynb      demo_config -> pipeline.run -> load_generator -> generate -> show_videos
  tpu_generate.ipynb    data_mesh -> load_generator(mesh=...) -> generate (batch split over the cores)
                        -> decode_speed (NBP vs NTP, same model)
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import parallel
from nbp_jax.nbp import decode
from nbp_jax.nbp import sample as sample_lib
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.tokenizer import load as tokenizer_load

# The micro pipeline of the tests (tests/conftest.py TINY_PIPELINE_FLAGS, the same fields and values; a test checks
# that they agree): 9 frames at 16x16 -> 3x4x4 codes, blocks of 1x1x2, two training steps per stage.
TINY_OVERRIDES: dict[str, Any] = {
    'data.num_frames': 9, 'data.resolution': 16,
    'data.synthetic.num_train': 8, 'data.synthetic.num_val': 4, 'data.batch_size': 4,
    'tokenizer.channels': 8, 'tokenizer.discriminator_channels': 8, 'tokenizer.pretrained': '',
    'tokenizer.num_steps': 2, 'tokenizer.batch_size': 4, 'tokenizer.num_samples': 2,
    'model.num_layers': 1, 'model.num_heads': 2, 'model.emb_dim': 32,
    'nbp.block_shape': (1, 1, 2), 'nbp.context_frames': 5,
    'train.num_steps': 2, 'train.log_every': 1, 'train.eval_every': 2,
    'train.checkpoint_every': 2, 'train.num_eval_batches': 1,
    'sample.num_samples': 4, 'sample.batch_size': 4,
    'eval.num_samples': 4, 'eval.batch_size': 4, 'eval.fvd_num_frames': 9,
    'eval.num_video_files': 2, 'eval.classifier_steps': 5,
}

# Saved paths that point into a pipeline workdir; relocated when the workdir was moved or copied (Drive, /content).
_RELOCATABLE = (('data.dir', 'data'), ('data.tokenized_dir', 'tokens'), ('tokenizer.checkpoint', 'tokenizer'))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted fields (`{'model.num_layers': 2}`) like `--config.model.num_layers=2`; unknown fields are errors."""
  for path, value in overrides.items():
    *parents, name = path.split('.')
    node = config
    for i, p in enumerate(parents):
      if p not in node:
        raise KeyError(f'config has no field {".".join(parents[:i + 1])!r} (from override {path!r}).')
      node = node[p]
    if name not in node:
      raise KeyError(f'config has no field {path!r}; see nbp_jax/config_lib.py for the fields.')
    node[name] = tuple(value) if isinstance(value, list) else value
  return config


def demo_config(tiny: bool = False, overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """configs/demo.py (task_config('demo', 'tiny')), at the tests' micro size when `tiny`, plus `overrides`;
  validated for --mode=pipeline. The same config as `--config=configs/demo.py --config.x=y ...`."""
  config = config_lib.task_config('demo', 'tiny')
  if tiny:
    apply_overrides(config, TINY_OVERRIDES)
  apply_overrides(config, overrides or {})
  config_lib.validate(config, 'pipeline')
  return config


def model_workdir(workdir: str, variant: str = 'nbp') -> str:
  """The training workdir inside WORKDIR: WORKDIR itself (--mode=train or --mode=import) or WORKDIR/<variant>
  (--mode=pipeline or the quickstart). Errors say what to run first."""
  workdir = os.path.expanduser(str(workdir))
  for candidate in (os.path.join(workdir, variant), workdir):
    if os.path.exists(os.path.join(candidate, checkpoint_lib.CONFIG_FILE)):
      return candidate
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'WORKDIR={workdir!r} does not exist: run the quickstart notebook (or '
                            '`python -m nbp_jax.main --mode=pipeline`) or `--mode=import` first, then set WORKDIR to '
                            'its workdir.')
  raise FileNotFoundError(f'WORKDIR={workdir!r} holds no trained model (no config.json in it or in {variant}/): run '
                          'the quickstart notebook or `--mode=import` first, or set WORKDIR to a finished workdir.')


def load_config(model_dir: str) -> ml_collections.ConfigDict:
  """The config saved in a training workdir, with paths into a moved/copied pipeline workdir relocated."""
  config = checkpoint_lib.load_config(model_dir)
  root = os.path.dirname(os.path.abspath(model_dir))
  for path, sub in _RELOCATABLE:
    section, name = path.split('.')
    saved = config[section].get(name, '')
    here = os.path.join(root, sub)
    if saved and not os.path.exists(saved) and os.path.exists(here):
      config[section][name] = here
  return config


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A data-parallel mesh over all devices (axes data x fsdp x tensor = n x 1 x 1)."""
  return parallel.create_mesh((-1, 1, 1), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return parallel.batch_sharding(mesh, config_lib.DEFAULT_AXIS_RULES)


def shard_batch(x, mesh: Optional[jax.sharding.Mesh]):
  """Splits the leading (batch) axis over the mesh's devices; None or no mesh: unchanged."""
  if x is None or mesh is None:
    return x
  n = mesh.devices.size
  if len(x) % n:
    raise ValueError(f'a batch of {len(x)} does not split over {n} devices: use a multiple of {n} samples '
                     '(the notebook\'s SAMPLES_PER_DEVICE x the device count).')
  return jax.device_put(x, batch_sharding(mesh))


def split_summary(x: jax.Array) -> str:
  """How an array's batch (leading) axis lies on the devices, e.g. 'batch of 8 split over 8 devices (1 each)'."""
  shards = x.addressable_shards
  per = {s.data.shape[0] for s in shards}
  if len(shards) == 1:
    return f'batch of {x.shape[0]} on 1 device'
  if per == {x.shape[0]}:
    return f'batch of {x.shape[0]} replicated on {len(shards)} devices (not split)'
  return f'batch of {x.shape[0]} split over {len(shards)} devices ({"/".join(map(str, sorted(per)))} each)'


def load_generator(workdir: str, *, variant: str = 'nbp', mesh: Optional[jax.sharding.Mesh] = None,
                   step: Optional[int] = None) -> sample_lib.Generator:
  """The model of WORKDIR (a pipeline, training or imported workdir) and its tokenizer, with the config saved there.

  With `mesh`, the transformer's params are restored straight onto every device (replicated) and so are the
  tokenizer's, ready for data-parallel generation (`generate(..., mesh=mesh)`).
  """
  model_dir = model_workdir(workdir, variant)
  config = load_config(model_dir)
  config_lib.validate(config, 'sample')
  if mesh is None:
    return sample_lib.load_generator(config, model_dir, step)
  tokenizer, tok_params, _ = tokenizer_load.load_tokenizer(config, model_dir)
  params, step = checkpoint_lib.restore_params(model_dir, step, mesh=mesh)
  return sample_lib.Generator(config=config, spec=spec_from_config(config), params=params, step=step,
                              tokenizer=tokenizer,
                              tokenizer_params=jax.device_put(tok_params, parallel.replicated(mesh)))


def describe(generator: sample_lib.Generator) -> str:
  """One line about the model: size, grid, block, steps per clip for each task it can do."""
  c, spec = generator.config, generator.spec
  layout = spec.layout
  n_ctx = config_lib.context_latent_frames(c) * layout.latent_shape[1] * layout.latent_shape[2]
  tasks = []
  if c.nbp.condition == 'class':
    tasks.append(f'class-conditional ({c.data.num_classes} classes, {layout.decode_plan(0).num_steps} steps)')
  if c.nbp.context_frames > 0:
    tasks.append(f'frame prediction ({c.nbp.context_frames} frames given, {layout.decode_plan(n_ctx).num_steps} '
                 'steps)')
  if not tasks:
    tasks.append(f'unconditional ({layout.decode_plan(0).num_steps} steps)')
  return (f'{c.name} at step {generator.step}: {spec.num_params / 1e6:.2f}M params, {c.data.num_frames} frames at '
          f'{c.data.resolution}px -> codes {"x".join(map(str, layout.latent_shape))}, blocks '
          f'{"x".join(map(str, layout.block_shape))}; ' + ', '.join(tasks))


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """A name per class label (synthetic motions, the UCF-101 folder names an import stored, else 'class <i>')."""
  n = config.data.num_classes
  if config.data.source == 'synthetic':
    from nbp_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return [synthetic.motion_name(i) for i in range(n)]
  try:
    from nbp_jax.export import official  # pylint: disable=g-import-not-at-top
    names = official.class_names(config) if 'import_' in config else None
  except (ImportError, OSError, ValueError):
    names = None
  return list(names) if names and len(names) == n else [f'class {i}' for i in range(n)]


def class_labels(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
  """int32 [count] labels cycling through the classes (0, 1, ..., n-1, 0, ...)."""
  if config.nbp.condition != 'class':
    raise ValueError(f'{config.name} is not class-conditional (nbp.condition={config.nbp.condition!r}).')
  return np.arange(count, dtype=np.int32) % config.data.num_classes


def frame_prediction_inputs(generator: sample_lib.Generator, clips: Mapping[str, np.ndarray],
                            mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
  """`generate` arguments that continue `clips` (from `context_clips`): the codes of their first
  nbp.context_frames frames, and their labels for a class-conditional model; split over `mesh` if given."""
  if generator.config.nbp.context_frames <= 0:
    raise ValueError(f'{generator.config.name} does not do frame prediction (nbp.context_frames=0).')
  inputs = {'context_codes': generator.context_codes(shard_batch(np.asarray(clips['video']), mesh))}
  if generator.config.nbp.condition == 'class':
    inputs['labels'] = shard_batch(np.asarray(clips['label'], np.int32), mesh)
  return inputs


def context_clips(config: ml_collections.ConfigDict, workdir: str, count: int, *, variant: str = 'nbp'
                  ) -> dict[str, np.ndarray]:
  """`count` real clips to continue: the held-out split of the model's dataset, repeated to fill the batch; if the
  workdir has no dataset (e.g. an imported model), synthetic clips (out of distribution, but they run anywhere)."""
  model_dir = model_workdir(workdir, variant)
  try:
    clips = sample_lib.held_out_videos(config, model_dir, count)
  except (FileNotFoundError, ValueError) as e:
    from nbp_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    print(f'No dataset for this model ({e}); continuing synthetic clips instead (prepare the real one with '
          '--mode=prepare_data to use it).')
    labels = np.arange(count) % max(config.data.num_classes, 1)
    videos = np.stack([synthetic.generate_video(i, int(l), config.data.num_frames, config.data.resolution)
                       for i, l in enumerate(labels)])
    return {'video': videos, 'label': labels.astype(np.int32)}
  index = np.arange(count) % len(clips['video'])
  return {k: v[index] for k, v in clips.items()}


def generate(generator: sample_lib.Generator, rng: jax.Array, *, labels=None, context_codes=None,
             batch_size: Optional[int] = None, block_shape: Optional[Sequence[int]] = None,
             mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """int32 codes [B, t, h, w] (the context included), like `Generator.codes`; with `mesh` the batch is split over
  the devices (labels/context sharded on their batch axis, params as loaded: replicated)."""
  if mesh is None:
    return generator.codes(rng, labels=labels, context_codes=context_codes, batch_size=batch_size,
                           block_shape=block_shape)
  spec = generator.spec if block_shape is None else generator.spec.with_block_shape(block_shape)
  if labels is not None:
    labels = shard_batch(labels if isinstance(labels, jax.Array) else np.asarray(labels, np.int32), mesh)
  context = None
  if context_codes is not None:
    context = shard_batch(decode.context_to_seq(spec, shard_batch(context_codes, mesh)), mesh)
  if labels is None and context is None:
    batch_size = batch_size or generator.config.sample.batch_size
    shard_batch(np.zeros(batch_size), mesh)  # checks that the batch splits over the devices
  else:
    batch_size = None
  z = decode.generate(spec, generator.params, rng, Sampling.from_config(generator.config.sample), labels=labels,
                      context=context, batch_size=batch_size)
  return spec.layout.seq_to_grid(z)


def decode_speed(generator: sample_lib.Generator, inputs: Mapping[str, Any], *,
                 block_shapes: Mapping[str, Optional[Sequence[int]]] = None,
                 mesh: Optional[jax.sharding.Mesh] = None, repeats: int = 3) -> dict[str, dict[str, float]]:
  """Times code generation (compile excluded, best of `repeats`) of the same model with several block shapes.

  Args:
    generator: the model.
    inputs: `generate` keyword arguments: labels and/or context_codes (or batch_size).
    block_shapes: name -> block shape; default {'NBP': the model's, 'NTP': (1, 1, 1)}.
    mesh: split the batch over its devices.
    repeats: timed runs per block shape.
  Returns:
    name -> {'block', 'steps', 'seconds', 'frames_per_s', 'tokens_per_s'}; frames are generated video frames
    (the given context frames are not counted).
  """
  block_shapes = block_shapes or {'NBP': None, 'NTP': (1, 1, 1)}
  c = generator.config
  context = inputs.get('context_codes')
  labels = inputs.get('labels')
  batch = len(context) if context is not None else len(labels) if labels is not None else inputs['batch_size']
  given = c.nbp.context_frames if context is not None else 0
  inputs = {k: (shard_batch(v, mesh) if k != 'batch_size' else v) for k, v in inputs.items()}
  rng = jax.random.key(0)
  rows = {}
  for name, block in block_shapes.items():
    spec = generator.spec if block is None else generator.spec.with_block_shape(block)
    n_ctx = 0 if context is None else int(np.prod(context.shape[1:]))
    run = lambda i, block=block: generate(generator, jax.random.fold_in(rng, i), block_shape=block, mesh=mesh,  # noqa
                                          **inputs)
    jax.block_until_ready(run(0))  # compile
    best = float('inf')
    for i in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(run(i + 1))
      best = min(best, time.perf_counter() - t0)
    rows[name] = {'block': 'x'.join(map(str, spec.layout.block_shape)),
                  'steps': int(spec.layout.decode_plan(n_ctx).num_steps), 'seconds': best,
                  'frames_per_s': batch * (c.data.num_frames - given) / best,
                  'tokens_per_s': batch * (spec.layout.num_tokens - n_ctx) / best}
  return rows


def speed_report(rows: Mapping[str, Mapping[str, float]], *, baseline: str = 'NTP') -> str:
  """One line per block shape, then the speed-up of each over `baseline` (e.g. 'speed-up NBP/NTP: 3.1x')."""
  lines = [f'{name}: block {r["block"]}, {r["steps"]} steps per clip, {r["seconds"] * 1e3:.1f} ms per batch, '
           f'{r["frames_per_s"]:.1f} frames/s ({r["tokens_per_s"]:.0f} tokens/s)' for name, r in rows.items()]
  if baseline in rows:
    base = rows[baseline]
    for name, r in rows.items():
      if name != baseline:
        lines.append(f'speed-up {name}/{baseline}: {r["frames_per_s"] / base["frames_per_s"]:.2f}x '
                     f'({base["steps"] / r["steps"]:.1f}x fewer steps)')
  return '\n'.join(lines)


def side_by_side(*videos: np.ndarray, gap: int = 2) -> np.ndarray:
  """[B, T, H, W, 3] videos of equal shape -> [B, T, H, n*W + gaps, 3], white between (real | generated)."""
  b, t, h, _, ch = videos[0].shape
  white = np.full((b, t, h, gap, ch), 255, np.uint8)
  parts = []
  for i, v in enumerate(videos):
    parts += ([white] if i else []) + [np.asarray(v, np.uint8)]
  return np.concatenate(parts, axis=3)


def setup_mediapy() -> None:
  """mediapy encodes the inline videos with ffmpeg: use the one bundled with imageio-ffmpeg if none is on PATH."""
  import shutil  # pylint: disable=g-import-not-at-top
  import mediapy  # pylint: disable=g-import-not-at-top
  if shutil.which('ffmpeg') is None:
    from nbp_jax.data import video_io  # pylint: disable=g-import-not-at-top
    mediapy.set_ffmpeg(video_io.ffmpeg_exe())


def display_height(config: ml_collections.ConfigDict, minimum: int = 128) -> int:
  """Height to show the clips at: tiny demo clips are upscaled (nearest) so they can be seen."""
  r = config.data.resolution
  return r * max(1, -(-minimum // r))
