"""Tokenizer training losses: L1/L2 reconstruction, LPIPS perceptual, a 3D PatchGAN with hinge loss, LeCam.

Videos are [B, T, H, W, 3] float in [0, 1] unless stated; the discriminator and LPIPS see [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nbp_jax.tokenizer.model import Conv3d

Dtype = Any


# ------------------------------------------------------------------------------------------------------------------
# Reconstruction.


def recon_loss(recon: jax.Array, target: jax.Array, kind: str = 'l1') -> jax.Array:
  """Mean absolute ('l1') or squared ('l2') error over all pixels: scalar."""
  diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == 'l1':
    return jnp.mean(jnp.abs(diff))
  if kind == 'l2':
    return jnp.mean(jnp.square(diff))
  raise ValueError(f"tokenizer.recon_loss={kind!r} is unknown; pick 'l1' or 'l2'.")


# ------------------------------------------------------------------------------------------------------------------
# LPIPS (VGG16) perceptual loss.


def perceptual_loss(lpips_fn, recon: jax.Array, target: jax.Array) -> jax.Array:
  """Mean LPIPS (lpips_fn = nbp_jax.image_metrics.make_lpips()) over every frame of every clip: scalar."""
  flat = lambda v: v.reshape((-1,) + v.shape[-3:]).astype(jnp.float32)
  return jnp.mean(lpips_fn(flat(recon), flat(target)))


# ------------------------------------------------------------------------------------------------------------------
# 3D PatchGAN discriminator.


def _same_pad(x: jax.Array, kernel: Sequence[int], strides: Sequence[int]) -> jax.Array:
  """Zero padding of T, H, W so that a VALID conv gives ceil(n / stride) outputs (as padding='SAME')."""
  pads = [(0, 0)]
  for n, k, s in zip(x.shape[1:4], kernel, strides):
    total = max((-(-n // s) - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  return jnp.pad(x, pads + [(0, 0)])


class PatchDiscriminator(nn.Module):
  """PatchGAN over space-time: [B, T, H, W, 3] in [-1, 1] -> patch logits [B, t', h', w'].

  Conv (3,4,4) stride (1,2,2) -> LeakyReLU; then num_layers convs (stride 2 in T, H, W but the last) with GroupNorm
  and LeakyReLU; a 1-channel conv. GroupNorm instead of the original BatchNorm keeps the model stateless. Convs go
  through tokenizer.model.Conv3d, so conv_impl='2d' speeds the discriminator up on CPU as well.
  """
  channels: int = 64
  num_layers: int = 3
  dtype: Dtype = jnp.float32
  conv_impl: str = '3d'

  @nn.compact
  def __call__(self, x):
    kernel = (3, 4, 4)

    def conv(features, strides=(1, 1, 1), narrow=False):
      layer = Conv3d(features, kernel, strides, self.conv_impl, narrow_output=narrow, dtype=self.dtype)
      return lambda v: layer(_same_pad(v, kernel, strides))

    norm = lambda c: nn.GroupNorm(num_groups=math.gcd(c, 32), epsilon=1e-5, dtype=self.dtype,
                                  scale_init=nn.with_logical_partitioning(nn.initializers.ones, (None,)),
                                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
    x = x.astype(self.dtype)
    x = nn.leaky_relu(conv(self.channels, (1, 2, 2))(x), 0.2)
    for i in range(1, self.num_layers + 1):
      c = self.channels * min(2 ** i, 8)
      x = conv(c, (2, 2, 2) if i < self.num_layers else (1, 1, 1))(x)
      x = nn.leaky_relu(norm(c)(x), 0.2)
    return conv(1, narrow=True)(x)[..., 0].astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss: mean(relu(1 - real)) + mean(relu(1 + fake))."""
  return jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator adversarial loss for the hinge GAN: -mean(fake)."""
  return -jnp.mean(logits_fake)


def lecam_loss(logits_real, logits_fake, ema_real, ema_fake) -> jax.Array:
  """LeCam regulariser (Tseng et al. 2021): mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)."""
  return (jnp.mean(jnp.square(jax.nn.relu(logits_real - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - logits_fake))))


def adaptive_weight(grad_nll: jax.Array, grad_adv: jax.Array, max_weight: float = 1e4) -> jax.Array:
  """VQGAN's generator weight ||d nll / dW|| / (||d g_loss / dW|| + 1e-4) at the last decoder layer W, no gradient."""
  w = jnp.linalg.norm(grad_nll.ravel()) / (jnp.linalg.norm(grad_adv.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _value_aux_grad(fn, x, consts):
  (value, aux), grad = jax.value_and_grad(fn, has_aux=True)(x, *consts)
  return value, aux, grad


def _value_aux_grad_fwd(fn, x, consts):
  out = _value_aux_grad(fn, x, consts)
  return out, (out[2], consts)


def _value_aux_grad_bwd(fn, residuals, cotangents):
  del fn
  grad, consts = residuals
  return cotangents[0] * grad, jax.tree.map(jnp.zeros_like, consts)


_value_aux_grad.defvjp(_value_aux_grad_fwd, _value_aux_grad_bwd)


def value_and_kept_grad(fn: Callable[..., tuple[jax.Array, Any]], x: jax.Array, *consts: Any
                        ) -> tuple[jax.Array, Any, jax.Array]:
  """(value, aux, d value / d x) of `fn(x, *consts) -> (scalar, aux)` from one forward and one backward pass.

  The adaptive GAN weight needs the gradients of nll and g_loss w.r.t. the reconstruction, and the training
  gradient needs the same pullbacks again: differentiating `value` reuses the kept gradient (cotangent x grad)
  instead of a second forward and backward through LPIPS or the discriminator. `consts` (targets, a frozen
  discriminator's params) get no gradient; aux and the returned gradient carry none.
  """
  value, aux, grad = _value_aux_grad(fn, x, consts)
  return value, jax.lax.stop_gradient(aux), jax.lax.stop_gradient(grad)
