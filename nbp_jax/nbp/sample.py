r"""`--mode=sample`: generate videos with a trained (or imported) NBP model and its tokenizer.

  python -m nbp_jax.main --config=configs/demo.py --workdir=workdirs/demo --mode=sample

Class-conditional models cycle through the classes; frame-prediction models (nbp.context_frames > 0) continue
held-out clips from their first frames; unconditional ones start from nothing. Writes
WORKDIR/samples/step_<step>/{sample_<i>.mp4, sample_<i>.gif, grid.png} and prints the generation speed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax.data import pipeline
from nbp_jax.data import video_io
from nbp_jax.nbp import decode
from nbp_jax.nbp.spec import Spec, spec_from_config
from nbp_jax.tokenizer import load as tokenizer_load
from nbp_jax.tokenizer import model as tokenizer_model


@dataclasses.dataclass
class Generator:
  """A trained transformer and its tokenizer, ready to turn labels/context clips into videos."""
  config: ml_collections.ConfigDict
  spec: Spec
  params: Any
  step: int
  tokenizer: tokenizer_model.Tokenizer
  tokenizer_params: Any

  @functools.cached_property
  def _encode(self):
    return jax.jit(functools.partial(tokenizer_model.encode, model=self.tokenizer))

  @functools.cached_property
  def _decode(self):
    return jax.jit(functools.partial(tokenizer_model.decode, model=self.tokenizer))

  def encode(self, videos: np.ndarray) -> jax.Array:
    """uint8 [B, T, H, W, 3] -> int32 codes [B, t, h, w]."""
    return self._encode(self.tokenizer_params, jnp.asarray(videos))

  def decode(self, codes: jax.Array) -> np.ndarray:
    """int32 codes [B, t, h, w] -> uint8 [B, T, H, W, 3]."""
    return np.asarray(self._decode(self.tokenizer_params, codes))

  def context_codes(self, videos: np.ndarray) -> jax.Array:
    """The codes of the given context frames: [B, t_ctx, h, w] from the first nbp.context_frames frames."""
    t_ctx = config_lib.context_latent_frames(self.config)
    # Causal tokenizer: the first t_ctx latent frames depend only on the first context_frames video frames.
    return self.encode(videos)[:, :t_ctx]

  def codes(self, rng: jax.Array, *, labels: Optional[np.ndarray] = None, context_codes: Optional[jax.Array] = None,
            batch_size: Optional[int] = None, block_shape: Optional[Sequence[int]] = None) -> jax.Array:
    """int32 codes [B, t, h, w]; `block_shape` decodes the same model with other blocks (e.g. (1, 1, 1) = NTP)."""
    spec = self.spec if block_shape is None else self.spec.with_block_shape(block_shape)
    return decode.sample_codes(self.config, self.params, rng, labels=labels, context_codes=context_codes,
                               batch_size=batch_size, spec=spec)


def load_generator(config: ml_collections.ConfigDict, workdir: str, step: Optional[int] = None) -> Generator:
  """Restores the transformer from WORKDIR/checkpoints and the tokenizer (WORKDIR/tokenizer or
  config.tokenizer.checkpoint) onto the first local device."""
  params, step = checkpoint_lib.restore_params(workdir, step)  # first: "train first" is the apt error of an empty one
  model, tok_params, _ = tokenizer_load.load_tokenizer(config, workdir)
  return Generator(config=config, spec=spec_from_config(config), params=params, step=step, tokenizer=model,
                   tokenizer_params=tok_params)


def held_out_videos(config: ml_collections.ConfigDict, workdir: str, count: int, *, split: str = 'eval',
                    seed: int = 0) -> dict[str, np.ndarray]:
  """The first `count` clips (and labels) of a split, in a fixed order: {'video': uint8 [N, T, H, W, 3], ...}."""
  ds = pipeline.make_dataset(config, workdir, split, seed=seed, shard_index=0, shard_count=1, batch_size=count,
                             shuffle=False, drop_remainder=False, num_epochs=1)
  batch = ds[0]
  return {k: np.asarray(v)[:count] for k, v in batch.items()}


def sample_inputs(config: ml_collections.ConfigDict, workdir: str, generator: Generator, count: int
                  ) -> dict[str, Any]:
  """Conditioning for `count` samples: class labels cycling through the classes and/or held-out context codes."""
  inputs: dict[str, Any] = {}
  if config.nbp.condition == 'class':
    inputs['labels'] = np.arange(count, dtype=np.int32) % config.data.num_classes
  if config.nbp.context_frames > 0:
    held_out = held_out_videos(config, workdir, count)
    inputs['context_codes'] = generator.context_codes(held_out['video'])
    if 'label' in held_out and config.nbp.condition == 'class':
      inputs['labels'] = held_out['label'].astype(np.int32)
  if not inputs:
    inputs['batch_size'] = count
  return inputs


def write_samples(videos: np.ndarray, out_dir: str, fps: float, *, num_files: int = 8, name: str = 'sample') -> str:
  """mp4 + gif for the first `num_files` videos and one PNG grid (rows = videos, columns = frames)."""
  os.makedirs(out_dir, exist_ok=True)
  for i, video in enumerate(videos[:num_files]):
    video_io.write_mp4(os.path.join(out_dir, f'{name}_{i}.mp4'), video, fps)
    video_io.write_gif(os.path.join(out_dir, f'{name}_{i}.gif'), video, fps)
  grid = os.path.join(out_dir, f'{name}_grid.png')
  video_io.write_png_grid(grid, videos[:num_files])
  return grid


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  generator = load_generator(config, workdir)
  count = config.sample.num_samples
  inputs = sample_inputs(config, workdir, generator, count)
  rng = jax.random.key(config.seed)
  out_dir = os.path.join(workdir, 'samples', f'step_{generator.step}')
  batch = config.sample.batch_size
  videos = []
  for start in range(0, count, batch):
    chunk = {k: (v[start:start + batch] if k != 'batch_size' else min(batch, count - start)) for k, v in inputs.items()}
    t0 = time.perf_counter()
    codes = jax.block_until_ready(generator.codes(jax.random.fold_in(rng, start), **chunk))
    seconds = time.perf_counter() - t0
    videos.append(generator.decode(codes))
    print(f'samples {start}..{start + codes.shape[0] - 1}: {seconds:.2f} s for the codes '
          f'({generator.spec.layout.num_tokens * codes.shape[0] / seconds:.0f} tokens/s, compile included on the '
          'first batch)')
  videos = np.concatenate(videos)
  grid = write_samples(videos, out_dir, config.data.fps)
  print(f'Wrote {len(videos)} samples (step {generator.step}) to {out_dir}; grid: {grid}')
