"""Convolutions that XLA:CPU runs slowly, computed as the same sums in forms it runs fast.

- A 3D convolution as the sum over its kernel's time taps of 2D convolutions of the (strided) frames: 2-4x faster
  on XLA:CPU (the tokenizer's conv_impl='2d'; the I3D network of FVD, 8 clips: 7.0 -> 4.0-4.6 s).
- A stride-1 2D convolution over frames smaller than its kernel (VGG16's last stage inside LPIPS sees 2x2 pixels
  at 32x32 frames) as one matmul over the gathered patches: XLA:CPU runs that conv 100x slower than the matmul
  (258 vs 2.4 ms for 16 frames of 512 channels).

`rewrite_slow_convs()` applies both to the flax `nn.Conv`s of a network we do not own (I3D, LPIPS) while it is traced,
on the CPU backend only (accelerators run the convolutions as they are). A leaf module: it imports nothing from
nbp_jax.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

Pads = Sequence[tuple[int, int]]


def conv3d_as_2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads: Pads) -> jax.Array:
  """x [B, T, H, W, Cin] * kernel [kt, kh, kw, Cin, Cout] with strides (st, sh, sw) and explicit (lo, hi) pads per
  axis -> [B, T', H', W', Cout]: the cross-correlation of lax.conv_general_dilated, as kt 2D convolutions."""
  kt = kernel.shape[0]
  st, sh, sw = strides
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), (0, 0), (0, 0), (0, 0)))
  b, t = x.shape[:2]
  t_out = (t - kt) // st + 1
  y = 0
  for dt in range(kt):
    frames = x[:, dt:dt + (t_out - 1) * st + 1:st]
    frames = frames.reshape((b * t_out,) + frames.shape[2:])
    y = y + jax.lax.conv_general_dilated(frames, kernel[dt], (sh, sw), (tuple(pads[1]), tuple(pads[2])),
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y.reshape((b, t_out) + y.shape[1:])


def conv2d_as_matmul(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
  """Stride-1 2D convolution x [B, H, W, Cin] * kernel [kh, kw, Cin, Cout] as one matmul over the kh*kw shifted
  copies of the padded frames (cheap where the frames are small)."""
  kh, kw = kernel.shape[:2]
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = jnp.concatenate([x[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=-1)
  return patches @ kernel.reshape(-1, kernel.shape[-1])


def _explicit_pads(padding, in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int]) -> Pads | None:
  """flax nn.Conv's `padding` as (lo, hi) per spatial axis; None for the kinds not rewritten (CIRCULAR, CAUSAL)."""
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      return None
    return jax.lax.padtype_to_pads(tuple(in_spatial), tuple(kernel), tuple(strides), padding.upper())
  if isinstance(padding, int):
    return [(padding, padding)] * len(kernel)
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  return pads if len(pads) == len(kernel) else None


def _rewrite(next_fun, args, kwargs, context):
  """flax interceptor: nn.Conv calls that XLA:CPU runs slowly -> conv3d_as_2d / conv2d_as_matmul."""
  module = context.module
  if not (isinstance(module, nn.Conv) and context.method_name == '__call__' and args and not kwargs):
    return next_fun(*args, **kwargs)
  x = args[0]
  kernel_size = tuple(module.kernel_size)
  n = len(kernel_size)
  strides = (module.strides,) * n if isinstance(module.strides, int) else tuple(module.strides or (1,) * n)
  plain = (module.feature_group_count == 1 and module.input_dilation in (None, 1)
           and module.kernel_dilation in (None, 1) and x.ndim == n + 2)
  pads = _explicit_pads(module.padding, x.shape[1:-1], kernel_size, strides) if plain else None
  if pads is None:
    return next_fun(*args, **kwargs)
  kernel = module.get_variable('params', 'kernel')
  dtype = module.dtype or jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if n == 3:
    y = conv3d_as_2d(x, kernel, strides, pads)
  elif n == 2 and strides == (1, 1) and all(s < k for s, k in zip(x.shape[1:3], kernel_size)):
    y = conv2d_as_matmul(x, kernel, pads)
  else:
    return next_fun(*args, **kwargs)
  return y + module.get_variable('params', 'bias').astype(dtype) if module.use_bias else y


@contextlib.contextmanager
def rewrite_slow_convs(enabled: bool | None = None) -> Iterator[None]:
  """Within it (while a flax network is traced), its nn.Conv calls that XLA:CPU runs slowly are computed as above.
  `enabled` defaults to whether the default backend is the CPU."""
  if enabled is None:
    enabled = jax.default_backend() == 'cpu'
  if not enabled:
    yield
    return
  with nn.intercept_methods(_rewrite):
    yield
