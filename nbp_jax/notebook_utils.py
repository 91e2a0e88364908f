"""Display helpers of the Colab notebooks (notebooks/*.ipynb): what to show and how. They load and generate with
the library itself (`nbp.generator.Generator`); the library never imports this module.

  quickstart.ipynb      config_lib.task_config -> pipeline.run -> Generator.load -> codes -> decode -> show
  tpu_generate.ipynb    Generator.load(mesh=...) -> codes (batch split over the cores) -> generation_speed (NBP, NTP)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from nbp_jax import config_lib
from nbp_jax.data import pipeline
from nbp_jax.data import prepare
from nbp_jax.nbp import generator as generator_lib
from nbp_jax.nbp import layout as layout_lib


def split_summary(x: jax.Array) -> str:
  """How an array's batch (leading) axis lies on the devices, e.g. 'batch of 8 split over 8 devices (1 each)'."""
  shards = x.addressable_shards
  per = {s.data.shape[0] for s in shards}
  if len(shards) == 1:
    return f'batch of {x.shape[0]} on 1 device'
  if per == {x.shape[0]}:
    return f'batch of {x.shape[0]} replicated on {len(shards)} devices (not split)'
  return f'batch of {x.shape[0]} split over {len(shards)} devices ({"/".join(map(str, sorted(per)))} each)'


def describe(generator: generator_lib.Generator) -> str:
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
          f'{layout_lib.block_name(layout.block_shape)}; ' + ', '.join(tasks))


def class_names(config: ml_collections.ConfigDict, workdir: str | None = None) -> list[str]:
  """A name per class label (prepare.class_names: the run's dataset's, the synthetic motions', UCF-101's
  classInd.txt, else 'class <i>')."""
  return prepare.class_names(config, workdir)


def context_clips(config: ml_collections.ConfigDict, workdir: str, count: int) -> dict[str, np.ndarray]:
  """`count` real clips to continue (pipeline.example_clips), saying so when they are synthetic ones instead."""
  clips, missing = pipeline.example_clips(config, workdir, count)
  if missing:
    print(f'No dataset for this model ({missing}); continuing synthetic clips instead (prepare the real one with '
          '--mode=prepare_data to use it).')
  return clips


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
