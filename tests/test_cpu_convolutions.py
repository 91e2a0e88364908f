"""The CPU rewrites of slow convolutions against lax.conv_general_dilated, and the flax interceptor on a network."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp_jax import cpu_convolutions


def _lax_conv(x, kernel, strides, padding):
  n = kernel.ndim - 2
  dims = ('NDHWC', 'DHWIO', 'NDHWC') if n == 3 else ('NHWC', 'HWIO', 'NHWC')
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dims,
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('kernel_shape,strides,padding', [
    ((3, 3, 3), (1, 1, 1), 'SAME'),
    ((3, 3, 3), (2, 2, 2), 'SAME'),
    ((7, 7, 7), (2, 2, 2), 'SAME'),
    ((1, 1, 1), (1, 1, 1), 'VALID'),
    ((3, 1, 1), (1, 2, 2), 'VALID'),
    ((2, 3, 3), (1, 1, 1), [(1, 0), (1, 1), (0, 2)]),
])
def test_conv3d_as_2d_equals_the_3d_convolution(kernel_shape, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 10, 11, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(kernel_shape + (3, 4)), jnp.float32)
  pads = padding if not isinstance(padding, str) else jax.lax.padtype_to_pads(x.shape[1:4], kernel_shape, strides,
                                                                              padding)
  expected = _lax_conv(x, kernel, strides, padding)
  got = cpu_convolutions.conv3d_as_2d(x, kernel, strides, pads)
  assert got.shape == expected.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size', [1, 2, 5])
def test_conv2d_as_matmul_equals_the_convolution(size):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, size, size, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 5)), jnp.float32)
  expected = _lax_conv(x, kernel, (1, 1), 'SAME')
  got = cpu_convolutions.conv2d_as_matmul(x, kernel, [(1, 1), (1, 1)])
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)


class _Net(nn.Module):
  """3D convs (SAME, strided, 1x1x1) and 2D convs on frames smaller than the kernel and larger than it."""

  @nn.compact
  def __call__(self, video):
    y = nn.relu(nn.Conv(6, (3, 3, 3), strides=(2, 2, 2), padding='SAME')(video))
    y = nn.Conv(4, (1, 1, 1), padding='SAME', use_bias=False)(y)
    frames = y.reshape((-1,) + y.shape[2:])  # [B*T, 3, 3, 4]
    big = nn.Conv(5, (3, 3), padding=(1, 1))(frames)
    tiny = nn.Conv(5, (5, 5), padding=2)(big)  # 3x3 frames, 5x5 kernel: rewritten
    return nn.Conv(2, (3, 3), padding='SAME')(nn.max_pool(tiny, (2, 2), (2, 2)))  # 1x1 frames: rewritten


def _conv_ranks(fn, *args):
  """Spatial ranks of the convolutions in fn's jaxpr (nested jaxprs included)."""
  ranks = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        ranks.append(eqn.invars[1].aval.ndim - 2)
      for value in eqn.params.values():
        inner = getattr(value, 'jaxpr', value)
        if hasattr(inner, 'eqns'):
          walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return ranks


def test_rewrite_slow_convs_keeps_a_network_s_outputs_and_removes_the_slow_forms():
  net = _Net()
  video = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 6, 6, 3)), jnp.float32)
  params = net.init(jax.random.key(0), video)

  def apply(enabled):
    def fn(p, v):
      with cpu_convolutions.rewrite_slow_convs(enabled):
        return net.apply(p, v)
    return fn

  with jax.default_matmul_precision('highest'):
    plain = np.asarray(jax.jit(apply(False))(params, video))
    rewritten = np.asarray(jax.jit(apply(True))(params, video))
  np.testing.assert_allclose(rewritten, plain, rtol=1e-4, atol=1e-5)
  assert sorted(_conv_ranks(apply(False), params, video)) == [2, 2, 2, 3, 3]
  # The 3D convs became 2D ones (3 time taps + 1), the convs on frames smaller than their kernel became matmuls.
  assert sorted(_conv_ranks(apply(True), params, video)) == [2, 2, 2, 2, 2]
