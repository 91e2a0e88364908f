r"""`--mode=sample`: generate videos with a trained (or imported) NBP model and its tokenizer.

  python -m nbp_jax.main --workdir=workdirs/demo/nbp --mode=sample   # a model the demo's pipeline trained

Class-conditional models cycle through the classes; frame-prediction models (nbp.context_frames > 0) continue
held-out clips from their first frames; unconditional ones start from nothing. Writes
WORKDIR/samples/step_<step>/{sample_<i>.mp4, sample_<i>.gif, sample_grid.png} and prints the generation speed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import glob
import itertools
import os
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import image_metrics
from nbp_jax import parallel
from nbp_jax import timing
from nbp_jax.data import pipeline
from nbp_jax.data import prepare
from nbp_jax.data import video_io
from nbp_jax.nbp import generation
from nbp_jax.nbp import layout as layout_lib
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.sampling import Sampling
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.parallel import sharding as sharding_lib
from nbp_jax.tokenizer import load as tokenizer_load
from nbp_jax.tokenizer import model as tokenizer_model

_SAMPLING_FIELDS = ('temperature', 'top_k', 'top_p', 'cfg_scale', 'greedy')


@dataclasses.dataclass
class Generator:
  """A trained transformer and its tokenizer: the one way to generate (sample, eval, pipeline, training samples,
  the StableHLO export and the notebooks all call it).

    generator = Generator.load('workdirs/demo/nbp')                  # or .load(workdir, config, mesh=mesh)
    codes = generator.codes(jax.random.key(0), labels=np.arange(4))   # int32 [4, t, h, w]
    videos = generator.decode(codes)                                  # uint8 [4, T, H, W, 3]
    row = generator.generation_speed({'labels': np.arange(4)})        # steps, seconds, frames/s, tokens/s

  Attributes:
    config: the run's config (model, nbp, data and the default sampling settings in `sample`).
    spec: the transformer's static description (spec_from_config(config), or another block shape).
    params: the transformer's params, of the training layout or generation's (Generator.load converts them once:
      transformer.decode_params).
    tokenizer: the video tokenizer (None: codes only, encode/decode then fail; Generator.load always loads the run's,
      so build Generator(config, spec, params) for a transformer without one).
    tokenizer_params: its params.
    step: the checkpoint step the params come from.
    mesh: with a mesh, every batch (labels, context, videos) is split over its batch axes on the way in; the params
      are expected on it already (Generator.load(..., mesh=mesh) replicates them). None: wherever the inputs are.
  """
  config: ml_collections.ConfigDict
  spec: Spec
  params: Any
  tokenizer: tokenizer_model.Tokenizer | None = None
  tokenizer_params: Any = None
  step: int = 0
  mesh: jax.sharding.Mesh | None = None

  @classmethod
  def load(cls, workdir: str, config: ml_collections.ConfigDict | None = None, *, step: int | str | None = None,
           mesh: jax.sharding.Mesh | None = None) -> Generator:
    """The transformer of a training workdir (--mode=train or --mode=import, or a pipeline's WORKDIR/nbp) from
    WORKDIR/checkpoints and its tokenizer (WORKDIR/tokenizer or config.tokenizer.checkpoint).

    Args:
      workdir: the training workdir.
      config: the run's config; default the one saved in WORKDIR (its paths into a moved pipeline workdir found
        again), validated for sampling.
      step: the checkpoint: a step, 'latest' or 'best'; default config.sample.checkpoint.
      mesh: replicate the params on every device of the mesh and split each batch over it (data parallelism);
        default: everything on the first local device.
    """
    if config is None:
      config = checkpoint_lib.load_config(workdir)
      config_lib.validate(config, 'sample')
    spec = spec_from_config(config)
    # An architecture override of the run's config (or another run's checkpoint) is refused before the read.
    step = config.sample.get('checkpoint', 'latest') if step is None else step
    from nbp_jax.nbp import train  # pylint: disable=g-import-not-at-top  (nbp.train imports this module)
    params, step = checkpoint_lib.restore_params(workdir, step, mesh=mesh, expected=train.abstract_params(spec),
                                                 config=config)
    # Once here rather than in every generate call: generation runs its own layout (transformer.decode_params).
    params = transformer_lib.decode_params(params)
    tokenizer, tok_params, _ = tokenizer_load.load_tokenizer(config, workdir)
    if mesh is not None:
      tok_params = jax.device_put(tok_params, parallel.replicated(mesh))
    return cls(config=config, spec=spec, params=params, tokenizer=tokenizer, tokenizer_params=tok_params, step=step,
               mesh=mesh)

  def _split(self, x, dtype=None):
    """`x` as a jax.Array, its batch (leading) axis split over the mesh's batch axes when there is a mesh."""
    if self.mesh is None:
      return jnp.asarray(x, dtype)
    self._check_batch(len(x))
    x = x.astype(dtype) if dtype is not None else x
    return jax.device_put(x, parallel.batch_sharding(self.mesh, config_lib.DEFAULT_AXIS_RULES))

  def _check_batch(self, batch: int) -> None:
    n = sharding_lib.num_batch_shards(self.mesh, config_lib.DEFAULT_AXIS_RULES)
    if batch % n:
      raise errors.UserError(f'a batch of {batch} does not split over {n} devices: use a multiple of {n} samples.')

  def encode(self, videos) -> jax.Array:
    """uint8 [B, T, H, W, 3] -> int32 codes [B, t, h, w]."""
    return tokenizer_model.jit_encode(self.tokenizer_params, self._split(videos), model=self.tokenizer)

  def context_codes(self, videos) -> jax.Array:
    """The codes of the given context frames: uint8 videos [B, T, H, W, 3] (T >= the frames the context needs, e.g.
    whole clips) -> [B, t_ctx, h, w] from their first nbp.context_frames frames."""
    frames = config_lib.context_video_frames(self.config)
    size = self.config.data.resolution
    if videos.ndim != 5 or videos.shape[2:] != (size, size, 3):
      raise errors.UserError(f'videos of shape {tuple(videos.shape)} to continue: this model takes uint8 [B, T, '
                             f'{size}, {size}, 3] clips (data.resolution={size}); resize them (read_clips does).')
    if videos.shape[1] < frames:
      raise errors.UserError(f'videos of {videos.shape[1]} frames are too short to continue: this model is given '
                             f'its first {self.config.nbp.context_frames} frames (it encodes {frames}).')
    # Causal tokenizer: the first t_ctx latent frames depend only on these first video frames.
    return self.encode(videos[:, :frames])

  def codes(self, rng: jax.Array, *, labels=None, context_codes=None, batch_size: int | None = None,
            block_shape: Sequence[int] | None = None,
            sampling: Sampling | Mapping[str, Any] | None = None) -> jax.Array:
    """Generates int32 codes [B, t, h, w] (the context included).

    Args:
      rng: PRNG key.
      labels: [B] int class ids (class-conditional models).
      context_codes: [B, t_ctx, h, w] int codes of the given latent frames (frame prediction; `context_codes()`).
      batch_size: B when neither labels nor context is given (default config.sample.batch_size).
      block_shape: decode the same model with other blocks (e.g. (1, 1, 1): next-token prediction).
      sampling: a Sampling, or overrides of config.sample's temperature/top_k/top_p/cfg_scale/greedy.
    Traceable (no host round trip), so jax.export can trace it with params as inputs.
    """
    spec = self.spec if block_shape is None else self.spec.with_block_shape(block_shape)
    labels, context, batch_size = self._generate_inputs(spec, labels, context_codes, batch_size)
    z = generation.generate(spec, self.params, rng, self.sampling(sampling), labels=labels, context=context,
                            batch_size=batch_size)
    return spec.layout.seq_to_grid(z)

  def _generate_inputs(self, spec: Spec, labels, context_codes, batch_size: int | None):
    """`generate`'s (labels [B] int32, context [B, n] int32 in sequence order, batch_size) from `codes`-style
    arguments, split over the mesh; batch_size only when neither labels nor context is given."""
    context = None
    if context_codes is not None:
      _check_codes(spec, context_codes)
      context = self._split(generation.context_to_seq(spec, self._split(context_codes, jnp.int32)))
    if labels is not None:
      _check_labels(spec, labels)
      labels = self._split(np.asarray(labels) if isinstance(labels, (list, tuple)) else labels, jnp.int32)
      if context is not None and len(labels) != len(context):
        raise errors.UserError(f'{len(labels)} labels for {len(context)} context clips: give one label per clip.')
    if labels is not None or context is not None:
      return labels, context, None
    batch_size = batch_size or self.config.sample.batch_size
    if self.mesh is not None:
      self._check_batch(batch_size)
    return labels, context, batch_size

  def sampling(self, overrides: Sampling | Mapping[str, Any] | None = None) -> Sampling:
    """config.sample's sampling settings, with `overrides` (a Sampling replaces them all), checked as the config's
    are (config_lib.check_sampling); guidance is on wherever cfg_scale != 1, a Sampling's too."""
    if isinstance(overrides, Sampling):
      values = {f: getattr(overrides, f) for f in _SAMPLING_FIELDS}
      if any(isinstance(v, jax.core.Tracer) for v in values.values()):
        return overrides  # traced settings (jax.export): the caller's to check
      overrides = values
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(_SAMPLING_FIELDS))
    if unknown:
      raise errors.UserError(f'unknown sampling settings {unknown}; pick from {_SAMPLING_FIELDS}.')
    merged = ml_collections.ConfigDict({**self.config.sample.to_dict(), **overrides})
    config_lib.check_sampling(merged)
    return Sampling.from_config(merged)

  def decode(self, codes) -> np.ndarray:
    """int32 codes [B, t, h, w] -> uint8 videos [B, 1 + ft (t - 1), H, W, 3] (on the host), ft the tokenizer's
    temporal factor. Codes longer than the model's clip (a rollout) are decoded in windows of that many latent
    frames, each with `decoder_history` latent frames before it, which gives the same frames as one pass."""
    if self.mesh is None and isinstance(codes, jax.Array) and not codes.is_fully_addressable:
      # Codes on a multi-host mesh (sampled from a run's sharded params): each host decodes them whole, here.
      codes = multihost_utils.process_allgather(codes, tiled=True)
    t, window = codes.shape[1], self.spec.layout.latent_shape[0]
    if t <= window:
      return self._decode_frames(codes, 0)
    history = tokenizer_model.decoder_history(self.tokenizer.spec)
    return np.concatenate([self._decode_frames(codes[:, max(0, s - history):s + window], s - max(0, s - history))
                           for s in range(0, t, window)], axis=1)

  def _decode_frames(self, codes, skip: int) -> np.ndarray:
    """The video frames of codes[:, skip:], decoded with codes[:, :skip] as the causal decoder's history."""
    video = np.asarray(tokenizer_model.jit_decode(self.tokenizer_params, self._split(codes), model=self.tokenizer))
    ft = config_lib.temporal_factor(self.config.tokenizer)
    # Decoded alone, codes[:, 0] gives one frame (the last of its ft) and each later latent frame ft frames.
    return video[:, 0 if skip == 0 else 1 + ft * (skip - 1):]

  def rollout(self, rng: jax.Array, num_frames: int, *, labels=None, context_codes=None,
              batch_size: int | None = None, window_context: int | None = None,
              sampling: Sampling | Mapping[str, Any] | None = None) -> jax.Array:
    """int32 codes [B, 1 + (num_frames - 1) / ft, h, w] of a video of any length, by a sliding window.

    The first window is `codes(...)` (from the labels and/or context); each later one keeps its predecessor's last
    `window_context` latent frames (default config_lib.window_context_frames) as context, at positions 0.. (the
    learned positions restart with the window), and generates the rest of a clip. Every later window is the same
    jitted call (same shapes), so a long rollout compiles twice at most.
    """
    ft = config_lib.temporal_factor(self.config.tokenizer)
    if num_frames < 1 or (num_frames - 1) % ft:
      raise errors.UserError(f'num_frames={num_frames} is not 1 + a multiple of {ft} (sample.num_frames).')
    total, window = 1 + (num_frames - 1) // ft, self.spec.layout.latent_shape[0]
    keep = window_context or config_lib.window_context_frames(self.config)
    depth = self.spec.layout.block_shape[0]
    if not 0 < keep < window or keep % depth:
      raise errors.UserError(f'window_context={keep} latent frames (sample.window_context_frames) must leave room '
                             f'in a window of {window} and be whole blocks of block_shape[0]={depth}.')
    pieces = [self.codes(jax.random.fold_in(rng, 0), labels=labels, context_codes=context_codes,
                         batch_size=batch_size, sampling=sampling)]
    have = window
    while have < total:
      context = jnp.concatenate(pieces, axis=1)[:, -keep:] if len(pieces) > 1 else pieces[0][:, -keep:]
      new = self.codes(jax.random.fold_in(rng, len(pieces)), labels=labels, context_codes=context,
                       sampling=sampling)[:, keep:]
      pieces.append(new[:, :total - have])
      have += new.shape[1]
    return jnp.concatenate(pieces, axis=1)[:, :total]

  def stream_codes(self, rng: jax.Array, *, labels=None, context_codes=None, batch_size: int | None = None,
                   sampling: Sampling | Mapping[str, Any] | None = None) -> Iterator[jax.Array]:
    """Yields the codes [B, t_i, h, w] known so far (the context included) each time a layer of blocks is done:
    every block_shape[0] latent frames. The last equals `codes(rng, ...)` with the same arguments: each piece is a
    `generate` call with the rounds already done as `first_round`, so it samples with the same keys."""
    spec, layout = self.spec, self.spec.layout
    t, h, w = layout.latent_shape
    bt, bh, bw = layout.block_shape
    per_layer = (h // bh) * (w // bw)  # blocks of bt latent frames
    labels, z, batch_size = self._generate_inputs(spec, labels, context_codes, batch_size)
    if z is not None:
      yield jnp.asarray(context_codes, jnp.int32)
    rounds, sampling = 0, self.sampling(sampling)
    while z is None or z.shape[1] < layout.num_tokens:
      done = 0 if z is None else z.shape[1]
      z = generation.generate(spec, self.params, rng, sampling, labels=labels, context=z, num_blocks=per_layer,
                              batch_size=batch_size, first_round=rounds)
      rounds += layout.decode_plan(done, per_layer).num_steps
      full = jnp.zeros((z.shape[0], layout.num_tokens), jnp.int32).at[:, :z.shape[1]].set(z)
      yield layout.seq_to_grid(full)[:, :z.shape[1] // (h * w)]

  def stream(self, rng: jax.Array, **inputs) -> Iterator[np.ndarray]:
    """Yields uint8 video frames [B, n, H, W, 3] as soon as they exist: the given context's frames first, then
    the frames of each new layer of latent frames (1 + ft (t_i - 1) frames in all after piece i). Concatenated,
    they are `decode(codes(rng, **inputs))`. `inputs` as for `stream_codes`."""
    history = tokenizer_model.decoder_history(self.tokenizer.spec)
    shown = 0  # latent frames whose video frames were yielded
    for codes in self.stream_codes(rng, **inputs):
      start = max(0, shown - history)
      yield self._decode_frames(codes[:, start:], shown - start)
      shown = codes.shape[1]

  def generation_speed(self, inputs: Mapping[str, Any], *, block_shape: Sequence[int] | None = None,
                       repeats: int = 3) -> dict[str, Any]:
    """Times `codes(**inputs)` (the transformer's decoding; the tokenizer is not timed): best of `repeats` runs,
    compilation excluded (timing.best_of).

    Args:
      inputs: `codes` keyword arguments: labels and/or context_codes, or batch_size.
      block_shape: decode with other blocks (e.g. (1, 1, 1): next-token prediction); default the model's.
      repeats: timed runs.
    Returns:
      {'block': e.g. '1x1x16', 'steps': decoding steps per clip, 'seconds': per batch, 'frames_per_s',
      'tokens_per_s'}; frames and tokens are the generated ones of the whole batch (the given context not counted).
    """
    spec = self.spec if block_shape is None else self.spec.with_block_shape(block_shape)
    context, labels = inputs.get('context_codes'), inputs.get('labels')
    batch = (len(context) if context is not None else len(labels) if labels is not None else
             inputs.get('batch_size') or self.config.sample.batch_size)
    n_ctx = 0 if context is None else int(np.prod(context.shape[1:]))
    # The video frames of the given latent frames (1 + ft (t_ctx - 1)), as many as the context passed holds.
    ft = config_lib.temporal_factor(self.config.tokenizer)
    given = 0 if context is None else 1 + ft * (context.shape[1] - 1)
    rng, calls = jax.random.key(0), itertools.count()
    seconds = timing.best_of(lambda: self.codes(jax.random.fold_in(rng, next(calls)), block_shape=block_shape,
                                               **inputs), repeats)
    return {'block': layout_lib.block_name(spec.layout.block_shape),
            'steps': int(spec.layout.decode_plan(n_ctx).num_steps), 'seconds': seconds,
            'frames_per_s': batch * (self.config.data.num_frames - given) / seconds,
            'tokens_per_s': batch * (spec.layout.num_tokens - n_ctx) / seconds}


  def first_frame_seconds(self, inputs: Mapping[str, Any], *, block_shape: Sequence[int] | None = None,
                          repeats: int = 3) -> float:
    """Time to first frame: seconds until `stream_codes(**inputs)` has the codes of the first generated latent
    frames (the tokenizer's decoding of them not included), best of `repeats`, compilation excluded."""
    streamer = self if block_shape is None else dataclasses.replace(self, spec=self.spec.with_block_shape(block_shape))
    given = 1 if inputs.get('context_codes') is not None else 0  # the stream yields the context first

    def first_generated():
      pieces = streamer.stream_codes(jax.random.key(0), **inputs)
      for _ in range(given):
        next(pieces)
      return next(pieces)

    return timing.best_of(first_generated, repeats)


def sample_batches(config: ml_collections.ConfigDict, workdir: str, generator: Generator, count: int,
                   batch_size: int, batches: Sequence[int] | None = None, given: np.ndarray | None = None
                   ) -> Iterator[tuple[int, dict[str, Any]]]:
  """Conditioning for `count` samples in batches of `batch_size`: (batch index, keyword arguments of
  `Generator.codes`) with class labels cycling through the classes and/or the context codes of given frames: those
  of sample.context_videos (`given_videos`) in turn, else the held-out clips of the run's dataset in order, with
  their labels (fewer samples where that split is smaller than `count`); {'batch_size': b} for an unconditional
  model.

  `batches`: only these batches (ascending; e.g. a process's `parallel.share`); only their clips are read and encoded.
  `given`: `given_videos(config, count)` where the caller has read them already.
  """
  indices = range(-(-count // batch_size)) if batches is None else batches
  files = None
  if config.nbp.context_frames > 0:
    files = given if given is not None else given_videos(config, count)
  held_out = (pipeline.first_clips(config, workdir, count, batch_size=batch_size, batches=indices)
              if config.nbp.context_frames > 0 and files is None else None)
  for i in indices:
    start = i * batch_size
    size = min(batch_size, count - start)
    inputs: dict[str, Any] = {}
    if config.nbp.condition == 'class':
      inputs['labels'] = np.arange(start, start + size, dtype=np.int32) % config.data.num_classes
    if files is not None:
      inputs['context_codes'] = generator.context_codes(files[np.arange(start, start + size) % len(files)])
    if held_out is not None:
      clips = next(held_out, None)
      if clips is None:
        return
      inputs['context_codes'] = generator.context_codes(clips['video'])
      if 'label' in clips and config.nbp.condition == 'class':
        inputs['labels'] = clips['label'].astype(np.int32)
    yield i, (inputs or {'batch_size': size})


def _check_labels(spec: Spec, labels) -> None:
  """Refuses labels the model has no class for (the embedding's gather would clamp them to the last class, and an
  unconditional model would ignore them). Traced labels (jax.export) are the caller's to check."""
  if isinstance(labels, jax.core.Tracer):
    return
  n = spec.vocab.num_classes
  if not n:
    raise errors.UserError('this model is unconditional (nbp.condition=none): it takes no labels; pass '
                           'context_codes or batch_size instead.')
  if isinstance(labels, jax.Array) and not labels.is_fully_addressable:
    return  # spread over several hosts: the caller's to check
  values = np.asarray(labels)
  if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or values.size == 0):
    raise errors.UserError(f'labels must be a [B] array of integer class ids; got {values.dtype} {values.shape}.')
  if values.size and (values.min() < 0 or values.max() >= n):
    wrong = sorted({int(v) for v in values.ravel() if not 0 <= v < n})
    raise errors.UserError(f'labels must be class ids in [0, {n}) for this {n}-class model; got {wrong[:8]}.')


def _check_codes(spec: Spec, codes) -> None:
  """Refuses context codes outside the codebook (the model would read them as other tokens: code C is the
  begin-of-video id in the native layout) or of a non-integer dtype. Traced codes, and codes spread over several
  hosts (encoded on a multi-host mesh), are the caller's to check."""
  if isinstance(codes, jax.core.Tracer) or (isinstance(codes, jax.Array) and not codes.is_fully_addressable):
    return
  values = np.asarray(codes)
  c = spec.vocab.codebook_size
  if not np.issubdtype(values.dtype, np.integer):
    raise errors.UserError(f'context_codes must be integer codes in [0, {c}); got dtype {values.dtype}.')
  if values.size and (values.min() < 0 or values.max() >= c):
    raise errors.UserError(f'context_codes must be codes in [0, {c}) of this tokenizer; got values from '
                           f'{values.min()} to {values.max()}.')


def given_videos(config: ml_collections.ConfigDict, count: int) -> np.ndarray | None:
  """The given frames of sample.context_videos (uint8 [n, F, H, W, 3], F the video frames of nbp.context_frames'
  latent frames), or None where it is not set. Says so where `count` samples leave some of them out."""
  spec = config.sample.get('context_videos', '')
  if not spec:
    return None
  paths = video_io.video_files(spec)
  if not paths:
    raise errors.UserError(f'sample.context_videos={spec!r} names no video.')
  if count < len(paths) and parallel.is_primary():
    print(f'Note: sample.num_samples={count} continues the first {count} of the {len(paths)} videos of '
          'sample.context_videos; raise it to continue them all.')
  frames = config_lib.context_video_frames(config)
  return video_io.read_clips(paths, frames, config.data.fps, config.data.resolution)


def sample_inputs(config: ml_collections.ConfigDict, workdir: str, generator: Generator, count: int
                  ) -> dict[str, Any]:
  """Conditioning for `count` samples as one batch (`sample_batches`)."""
  return next(sample_batches(config, workdir, generator, count, count))[1]


def write_samples(videos: np.ndarray, out_dir: str, fps: float, *, num_files: int = 8, name: str = 'sample') -> str:
  """mp4 + gif for the first `num_files` videos and one PNG grid (rows = videos, columns = frames); returns the
  grid's path. Only process 0 writes (the others return the path). Earlier files of `name` there (training's samples
  of that step, an earlier sample run) are replaced, all of them: the folder never mixes two runs' samples."""
  grid = os.path.join(out_dir, f'{name}_grid.png')
  if not parallel.is_primary():
    return grid
  earlier = glob.glob(os.path.join(glob.escape(out_dir), f'{glob.escape(name)}_*'))
  if earlier:
    print(f'Note: replacing the {len(earlier)} earlier sample files in {out_dir}.')
    for path in earlier:
      os.remove(path)
  os.makedirs(out_dir, exist_ok=True)
  for i, video in enumerate(videos[:num_files]):
    video_io.write_mp4(os.path.join(out_dir, f'{name}_{i}.mp4'), video, fps)
    video_io.write_gif(os.path.join(out_dir, f'{name}_{i}.gif'), video, fps)
  video_io.write_png_grid(grid, videos[:num_files])
  return grid


def rollout_truth(config: ml_collections.ConfigDict, count: int, num_frames: int) -> dict[str, np.ndarray] | None:
  """The first `count` held-out synthetic clips at `num_frames` frames ({'video', 'label'}), regenerated by the
  project's generator (their first data.num_frames frames are the prepared clips); None for real datasets, whose
  clips are only data.num_frames long."""
  if config.data.source != 'synthetic':
    return None
  return prepare.synthetic_clips(config, count, num_frames=num_frames)


def _truth_inputs(config: ml_collections.ConfigDict, generator: Generator, truth: dict[str, np.ndarray], start: int,
                  batch: int) -> dict[str, Any]:
  """Conditioning of the rollouts `start`..`start + batch - 1` on their `rollout_truth` clips' first frames."""
  inputs: dict[str, Any] = {
      'context_codes': generator.context_codes(truth['video'][start:start + batch, :config.data.num_frames])}
  if config.nbp.condition == 'class':
    inputs['labels'] = truth['label'][start:start + batch]
  return inputs


def window_report(config: ml_collections.ConfigDict, videos: np.ndarray, truth: np.ndarray | None,
                  real_mean_colour: np.ndarray) -> list[dict[str, Any]]:
  """Quality over time of rollouts uint8 [B, N, H, W, 3]: one row per window (the first is one clip; each later
  one adds the frames of its generated latent frames): its frames, PSNR of the generated frames against `truth`
  [B, >= N, ...] where given, and the drift of its mean colour from the real clips' (`real_mean_colour` [3] in 0..255,
  the Euclidean distance in 0..255 units)."""
  ft = config_lib.temporal_factor(config.tokenizer)
  t = config_lib.latent_shape(config)[0]
  step = ft * (t - config_lib.window_context_frames(config))
  given = config.nbp.context_frames
  bounds = [(given, config.data.num_frames)]
  while bounds[-1][1] < videos.shape[1]:
    bounds.append((bounds[-1][1], min(bounds[-1][1] + step, videos.shape[1])))
  rows = []
  for w, (lo, hi) in enumerate(bounds):
    part = videos[:, lo:hi]
    row = {'window': w, 'frames': [int(lo), int(hi)],
           'mean_colour_drift': float(np.linalg.norm(part.reshape(-1, 3).mean(0) - real_mean_colour))}
    if truth is not None:
      row['psnr'] = float(np.mean(np.asarray(image_metrics.psnr(part, truth[:, lo:hi]))))
    rows.append(row)
  return rows


def _fewer_note(written: int, count: int) -> str:
  """Why fewer than sample.num_samples videos were written (frame prediction conditions each on a held-out clip)."""
  if written >= count:
    return ''
  return (f' (sample.num_samples={count}, but the held-out split has only {written} clips to condition on; '
          'each sample continues one of them)')


def run_rollout(config: ml_collections.ConfigDict, workdir: str, generator: Generator, num_frames: int) -> dict:
  """--mode=sample with sample.num_frames longer than a clip: sliding-window rollouts, their videos and the
  per-window report (WORKDIR/samples/rollout_<N>f_step_<step>/{sample_*.mp4/gif, sample_grid.png, rollout.json})."""
  count, batch = config.sample.num_samples, config.sample.batch_size
  given = given_videos(config, count) if config.nbp.context_frames > 0 else None
  truth = rollout_truth(config, count, num_frames) if config.nbp.context_frames > 0 and given is None else None
  mine = parallel.share(-(-count // batch))  # the batches are shared among the processes of a multi-host run
  if truth is None:
    batches = sample_batches(config, workdir, generator, count, batch, mine, given)
  else:
    batches = ((i, _truth_inputs(config, generator, truth, i * batch, batch)) for i in mine)
  rng = jax.random.key(config.seed)
  results = {}  # batch index -> (videos, seconds)
  for i, inputs in tqdm.tqdm(batches, desc=f'rollouts of {num_frames} frames', unit='batch', total=len(mine)):
    t0 = time.perf_counter()
    codes = jax.block_until_ready(generator.rollout(jax.random.fold_in(rng, i * batch), num_frames, **inputs))
    results[i] = (generator.decode(codes), time.perf_counter() - t0)
  results = parallel.gather(results)
  videos = np.concatenate([v for v, _ in results])
  seconds = sum(t for _, t in results)
  if truth is not None:
    reference = truth['video']
  elif given is not None:  # the colours the rollouts start from
    reference = given
  else:
    reference = next(pipeline.first_clips(config, workdir, count))['video']
  rows = window_report(config, videos, truth['video'] if truth is not None else None,
                       reference.reshape(-1, 3).mean(0))
  out_dir = os.path.join(workdir, 'samples', f'rollout_{num_frames}f_step_{generator.step}')
  grid = write_samples(videos, out_dir, config.data.fps)
  report = {'num_frames': num_frames, 'window_context_frames': config_lib.window_context_frames(config),
            'checkpoint_step': generator.step, 'num_samples': int(len(videos)),
            'seconds_per_sample': seconds / len(videos), 'windows': rows}
  if not parallel.is_primary():
    return report
  checkpoint_lib.write_json(os.path.join(out_dir, 'rollout.json'), report)
  print('window | frames | PSNR vs truth | mean-colour drift')
  for r in rows:
    psnr = f'{r["psnr"]:.2f}' if 'psnr' in r else '-'
    lo, hi = r['frames']
    print(f'{r["window"]:6d} | {lo:3d}-{hi - 1:<3d} | {psnr:>13} | {r["mean_colour_drift"]:.1f}')
  print(f'Wrote {len(videos)} rollouts of {num_frames} frames (step {generator.step}) to {out_dir}; grid: {grid}'
        + _fewer_note(len(videos), count))
  return report


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  generator = Generator.load(workdir, config)
  frames = config_lib.rollout_frames(config)
  if frames > config.data.num_frames:
    run_rollout(config, workdir, generator, frames)
    return
  count, batch = config.sample.num_samples, config.sample.batch_size
  rng = jax.random.key(config.seed)
  out_dir = os.path.join(workdir, 'samples', f'step_{generator.step}')
  videos = {}  # batch index -> videos; the batches are shared among the processes of a multi-host run
  for i, inputs in sample_batches(config, workdir, generator, count, batch, parallel.share(-(-count // batch))):
    start = i * batch
    t0 = time.perf_counter()
    codes = jax.block_until_ready(generator.codes(jax.random.fold_in(rng, start), **inputs))
    seconds = time.perf_counter() - t0
    videos[i] = generator.decode(codes)
    print(f'samples {start}..{start + codes.shape[0] - 1}: {seconds:.2f} s for the codes '
          f'({generator.spec.layout.num_tokens * codes.shape[0] / seconds:.0f} tokens/s, compile included on the '
          'first batch)')
  videos = np.concatenate(parallel.gather(videos))
  grid = write_samples(videos, out_dir, config.data.fps)
  if parallel.is_primary():
    print(f'Wrote {len(videos)} samples (step {generator.step}) to {out_dir}; grid: {grid}'
          + _fewer_note(len(videos), count))
