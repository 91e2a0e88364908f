"""The tokenizer as a `Task` for the shared trainer: generator (tokenizer) and discriminator in one loss.

Parameters: {'generator': tokenizer params, 'discriminator': PatchGAN params[, 'lecam': {'ema_real', 'ema_fake'}]}.

One scalar loss serves both networks; stop_gradient routes each term to its network:
  loss = nll(recon) + adversarial_weight * d_weight * g_loss(D_sg(recon))       -> generator only (D stopped)
         + hinge(D(sg(real)), D(sg(recon))) [+ lecam_weight * LeCam]             -> discriminator only
         [+ 0.5 * (ema - sg(mean logits))^2]                                      -> LeCam EMAs only
so d loss / d generator = generator loss and d loss / d discriminator = discriminator loss. `make_optimizer` gives
each top-level entry its own optax chain (`optax.multi_transform`); the LeCam EMAs use plain SGD with learning rate
(1 - lecam_decay), which makes the gradient step exactly ema <- decay * ema + (1 - decay) * mean(logits).

The adaptive weight d_weight (VQGAN) = ||d nll / dW|| / ||d g_loss / dW|| at the last decoder conv kernel W is
computed inside the loss with one vector-Jacobian product through that conv only (no second decoder pass); the
gradients of nll and g_loss w.r.t. the reconstruction it pulls back are kept for the training gradient
(losses.value_and_kept_grad: LPIPS and the discriminator run forward and backward once each, not twice).

Batch contract: {'video': uint8 [B, T, H, W, 3], 'step': int32 global step (a scalar, or [B] all equal)}; the
shared trainer adds 'step' (the 0-based optimizer step) to every training batch.
The GAN terms are computed only when train=True and step >= tokenizer.discriminator_start_step (`lax.cond`, so
earlier steps do not pay for the discriminator); with train=False the loss is the reconstruction objective.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nbp_jax import config_lib
from nbp_jax import image_metrics
from nbp_jax import parallel
from nbp_jax import task as task_lib
from nbp_jax import trainer
from nbp_jax.tokenizer import fsq
from nbp_jax.tokenizer import losses
from nbp_jax.tokenizer import model as tokenizer_model

_GAN_METRICS = ('g_loss', 'd_weight', 'd_loss', 'lecam_loss', 'logits_real', 'logits_fake')


def make_discriminator(config: ml_collections.ConfigDict) -> losses.PatchDiscriminator:
  """The tokenizer's GAN discriminator from config.tokenizer (its channels, layers, dtype, convolution form)."""
  tok = config.tokenizer
  dtype = config_lib.resolve_dtype(tok.get('dtype', 'float32'))
  return losses.PatchDiscriminator(tok.discriminator_channels, tok.discriminator_layers, jnp.dtype(dtype),
                                   tokenizer_model.resolve_conv_impl(tok.get('conv_impl', 'auto')))


def make_loss_fn(config: ml_collections.ConfigDict, model: tokenizer_model.Tokenizer,
                 disc: losses.PatchDiscriminator):
  """(params, batch, rng, train) -> (scalar loss, metrics); see the module docstring for the contract."""
  tok = config.tokenizer
  lpips_fn = image_metrics.make_lpips() if tok.perceptual_weight > 0 else None
  use_lecam = tok.lecam_weight > 0
  last = f'decoder_layers_{len(tokenizer_model.decoder_layers(model.spec)) - 1}'

  def nll_fn(recon, target):
    rec = losses.recon_loss(recon, target, tok.recon_loss)
    per = losses.perceptual_loss(lpips_fn, recon, target) if lpips_fn is not None else jnp.zeros(())
    return tok.recon_weight * rec + tok.perceptual_weight * per, (rec, per)

  def loss_fn(params, batch, rng, train):
    del rng  # nothing stochastic
    if 'video' not in batch:
      raise KeyError(f"the tokenizer loss needs batch['video'] (uint8 [B, T, H, W, 3]); got keys {sorted(batch)}.")
    x = image_metrics.to_unit(batch['video'])
    gen = params['generator']
    apply = lambda method, *args, p=gen: model.apply({'params': p}, *args, method=method)
    z = apply(tokenizer_model.Tokenizer.encode_latents, x)
    codes, _ = fsq.quantize(z, model.spec.fsq_levels)
    features = apply(tokenizer_model.Tokenizer.decode_features, codes)
    recon = apply(tokenizer_model.Tokenizer.decode_head, features)
    if train and tok.adaptive_weight:  # its d nll / d recon, from the pass that also serves the training gradient
      nll, (rec, per), g_nll = losses.value_and_kept_grad(nll_fn, recon, x)
    else:
      nll, (rec, per) = nll_fn(recon, x)
    # PSNR/SSIM of the uint8 clip decode() returns, the one --mode=eval scores: the same numbers for the same clips.
    shown = tokenizer_model.to_uint8(recon)
    metrics = {'recon_loss': rec, 'perceptual_loss': per, 'nll': nll,
               'psnr': jnp.mean(image_metrics.psnr(shown, x))}
    if not train:
      if min(x.shape[2:4]) >= image_metrics.SSIM_WINDOW:
        metrics['ssim'] = jnp.mean(image_metrics.ssim(shown, x))
      return nll, metrics
    if 'step' not in batch:
      raise KeyError("the tokenizer loss needs batch['step'] (int32 optimizer step) to start the discriminator at "
                     'tokenizer.discriminator_start_step; nbp_jax.trainer adds it, other loops must too.')

    d_apply = lambda p, v: disc.apply({'params': p}, v * 2.0 - 1.0)

    def gan_terms(_):
      d_params = params['discriminator']
      d_frozen = jax.lax.stop_gradient(d_params)
      if tok.adaptive_weight:
        # Gradients of nll and g_loss w.r.t. the last conv kernel: d loss / d recon, pulled back through that conv.
        g_loss, _, g_adv = losses.value_and_kept_grad(
            lambda r, d: (losses.hinge_g_loss(d_apply(d, r)), ()), recon, d_frozen)
        feats = jax.lax.stop_gradient(features)
        head = lambda p_last: apply(tokenizer_model.Tokenizer.decode_head, feats, p={**gen, last: p_last})
        _, pullback = jax.vjp(head, jax.lax.stop_gradient(gen[last]))
        kernel = lambda g: nn.unbox(pullback(g)[0])['conv']['kernel']
        d_weight = losses.adaptive_weight(kernel(g_nll), kernel(g_adv))
      else:
        g_loss = losses.hinge_g_loss(d_apply(d_frozen, recon))
        d_weight = jnp.ones(())
      logits_real = d_apply(d_params, jax.lax.stop_gradient(x))
      logits_fake = d_apply(d_params, jax.lax.stop_gradient(recon))
      d_loss = losses.hinge_d_loss(logits_real, logits_fake)
      mean_real, mean_fake = jnp.mean(logits_real), jnp.mean(logits_fake)
      extra = jnp.zeros(())
      lecam = jnp.zeros(())
      if use_lecam:
        ema = params['lecam']
        lecam = losses.lecam_loss(logits_real, logits_fake, jax.lax.stop_gradient(ema['ema_real']),
                                  jax.lax.stop_gradient(ema['ema_fake']))
        extra = (0.5 * jnp.square(ema['ema_real'] - jax.lax.stop_gradient(mean_real))
                 + 0.5 * jnp.square(ema['ema_fake'] - jax.lax.stop_gradient(mean_fake)))
      total = (tok.adversarial_weight * d_weight * g_loss + d_loss + tok.lecam_weight * lecam + extra)
      return total, dict(zip(_GAN_METRICS, (g_loss, d_weight, d_loss, lecam, mean_real, mean_fake)))

    def no_gan(_):
      return jnp.zeros(()), {k: jnp.zeros(()) for k in _GAN_METRICS}

    # A scalar, or one entry per example (so the step can travel through the data pipeline's batch sharding).
    active = jnp.max(jnp.asarray(batch['step'])) >= tok.discriminator_start_step
    gan_total, gan_metrics = jax.lax.cond(active, gan_terms, no_gan, None)
    metrics.update(gan_metrics)
    metrics['gan_active'] = active.astype(jnp.float32)
    return nll + gan_total, metrics

  return loss_fn


def make_optimizer_fn(config: ml_collections.ConfigDict):
  """() -> (optax.multi_transform, the generator's schedule): AdamW per network (own lr, warmup + cosine, clipping;
  weight decay on kernels as the trainer's; the discriminator's from tokenizer.discriminator_start_step on), SGD for
  the LeCam EMAs."""
  tok = config.tokenizer

  def chain(schedule):
    return optax.chain(optax.clip_by_global_norm(tok.grad_clip),
                       optax.adamw(schedule, b1=tok.b1, b2=tok.b2, weight_decay=tok.weight_decay,
                                   mask=trainer.weight_decay_mask))

  def make():
    g_schedule = trainer.learning_rate_schedule(tok.lr, tok.warmup_steps, tok.num_steps)
    start = max(int(tok.discriminator_start_step), 0)
    if start >= tok.num_steps:  # the GAN never starts: no discriminator updates (no weight decay either)
      discriminator = chain(optax.constant_schedule(0.0))
    else:
      discriminator = chain(trainer.learning_rate_schedule(tok.discriminator_lr, tok.warmup_steps,
                                                           max(tok.num_steps - start, 1)))
    if 0 < start < tok.num_steps:
      # Zero updates until the GAN starts, and Adam's moments, bias correction and schedule counted from there,
      # as an optimizer created at the start step: stepping it through the idle steps on zero gradients left the
      # bias correction spent, and the first real updates were (1 - b1) / sqrt(1 - b2) times Adam's.
      discriminator = optax.transforms.conditionally_mask(discriminator, lambda count: count >= start)
    transforms = {'generator': chain(g_schedule), 'discriminator': discriminator}
    if tok.lecam_weight > 0:
      transforms['lecam'] = optax.sgd(1.0 - tok.lecam_decay)
    # Labels as a prefix tree ({'generator': 'generator', ...}): works for boxed and unboxed parameters alike.
    return optax.multi_transform(transforms, lambda params: {k: k for k in params}), g_schedule

  return make


def make_task(config: ml_collections.ConfigDict, sample_videos: np.ndarray | None = None) -> task_lib.Task:
  """The tokenizer training task for `nbp_jax.trainer`.

  Args:
    config: full config; uses config.tokenizer (architecture, losses, optimizers) and config.data (clip shape).
    sample_videos: optional held-out uint8 clips [N, T, H, W, 3]; when given, `write_samples` writes their
      reconstructions side by side (mp4 per clip and a PNG grid) to WORKDIR/samples/tokenizer_{step}/.
  """
  tok = config.tokenizer
  model = tokenizer_model.make_model(config)
  disc = make_discriminator(config)
  spec = model.spec

  def init_params(rng):
    g_rng, d_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, 1 + spec.temporal_factor, spec.spatial_factor, spec.spatial_factor, 3), jnp.float32)
    params = {'generator': tokenizer_model.init_params(model, g_rng),
              'discriminator': disc.init(d_rng, dummy)['params']}
    if tok.lecam_weight > 0:
      params['lecam'] = {'ema_real': jnp.zeros((), jnp.float32), 'ema_fake': jnp.zeros((), jnp.float32)}
    return params

  num_frames, resolution = config.data.num_frames, config.data.resolution
  write_samples = None
  if sample_videos is not None:
    write_samples = make_sample_writer(model, np.asarray(sample_videos), fps=config.data.fps)
  return task_lib.Task(
      name='tokenizer',
      init_params=init_params,
      loss_fn=make_loss_fn(config, model, disc),
      make_optimizer=make_optimizer_fn(config),
      # Convolutions of encoder + decoder, forward and backward (x3); discriminator and LPIPS not counted.
      flops_per_example=3.0 * tokenizer_model.conv_flops(spec, num_frames, resolution),
      tokens_per_example=math.prod(config_lib.latent_shape(config)),
      write_samples=write_samples,
      batch_fields=('tokenizer.batch_size', 'tokenizer.grad_accum_steps'),
      stability_fields=('lower tokenizer.lr (and tokenizer.discriminator_lr once the GAN has started), raise '
                        'tokenizer.warmup_steps or lower tokenizer.grad_clip'))


def make_sample_writer(model: tokenizer_model.Tokenizer, videos: np.ndarray, fps: float):
  """(params, step, workdir) -> folder: an original | reconstruction mp4 per held-out clip and a PNG grid.

  Called on every process (the trainer's contract); parameters are gathered to each host, process 0 writes.
  """
  recon_fn = jax.jit(lambda p, v: tokenizer_model.decode(p, tokenizer_model.encode(p, v, model), model))

  def write(params, step, workdir):
    import os  # pylint: disable=g-import-not-at-top

    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    from nbp_jax.data import video_io  # pylint: disable=g-import-not-at-top
    gen = params['generator'] if 'generator' in params else params
    if jax.process_count() > 1:  # sharded across hosts: every host takes a full local copy
      gen = multihost_utils.process_allgather(gen, tiled=True)
    gen = jax.device_put(gen, jax.local_devices()[0])
    recon = np.asarray(recon_fn(gen, jnp.asarray(videos)))
    out = os.path.join(workdir, 'samples', f'tokenizer_{step:07d}')
    if not parallel.is_primary():
      return out
    os.makedirs(out, exist_ok=True)
    pairs = np.concatenate([videos, recon], axis=3)  # side by side along W
    for i, clip in enumerate(pairs):
      video_io.write_mp4(os.path.join(out, f'recon_{i:02d}.mp4'), clip, fps)
    # Grid rows: clip 0, its reconstruction, clip 1, ...; columns: frames.
    rows = np.stack([videos, recon], axis=1).reshape((-1,) + videos.shape[1:])
    video_io.write_png_grid(os.path.join(out, 'grid.png'), rows)
    return out

  return write
