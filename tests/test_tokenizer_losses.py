"""Tokenizer losses and task: gradient routing between generator and discriminator, adaptive weight, optimizers.

References are rebuilt here from the model and discriminator modules directly, not through the task's loss.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nbp_jax import config_lib
from nbp_jax.tokenizer import losses
from nbp_jax.tokenizer import model as M
from nbp_jax.tokenizer import task as T
import numerics

START = 1
# Unoptimised XLA code compiles about twice as fast; these tests run each function only a few times.
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _config(**tok):
  c = config_lib.task_config('demo', 'micro')
  c.tokenizer = config_lib.tokenizer_config('micro')
  c.data.num_frames, c.data.resolution = 5, 16
  # Fewer layers than 'micro' (no middle blocks, no width changes): what is tested does not depend on the depth,
  # and the shallower one compiles faster (this file alone: 71 -> 55 s).
  c.tokenizer.update(dict(num_mid_blocks=0, channel_multipliers=(1, 1, 1, 1)))
  c.tokenizer.update(dict(discriminator_channels=8, discriminator_layers=2, discriminator_start_step=START,
                          perceptual_weight=0.0, adversarial_weight=0.5, lecam_weight=0.3, lecam_decay=0.9,
                          dtype='float32', warmup_steps=1, num_steps=100, lr=1e-3, discriminator_lr=1e-3))
  c.tokenizer.update(tok)
  return c


@pytest.fixture(scope='module')
def setup():
  config = _config()
  task = T.make_task(config)
  params = nn.unbox(_jit(task.init_params)(jax.random.key(0, impl='rbg')))
  video = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8))
  grad_fn = _jit(jax.value_and_grad(task.loss_fn, has_aux=True), static_argnums=3)
  return config, task, params, video, grad_fn


def _batch(video, step):
  return {'video': video, 'step': jnp.full((video.shape[0],), step, jnp.int32)}


def _norm(tree):
  return float(optax.tree.norm(tree))


@pytest.fixture(scope='module')
def reference(setup):
  """Independent gradients from the plain model and discriminator calls, in one compiled function:
  L1 reconstruction and its gradient, the gradient of the adversarial term -mean(D(recon)) w.r.t. the generator,
  and the gradient of hinge + LeCam w.r.t. the discriminator (reconstruction fixed)."""
  config, _, params, video, _ = setup
  model, disc = M.make_model(config), T.make_discriminator(config)
  x = video.astype(jnp.float32) / 255
  d = lambda p, v: disc.apply({'params': p}, v * 2 - 1)
  ema = params['lecam']

  def fn(gen, dp):
    nll = lambda g: jnp.mean(jnp.abs(model.apply({'params': g}, x)[0] - x))
    adv = lambda g: -jnp.mean(d(dp, model.apply({'params': g}, x)[0]))
    recon = model.apply({'params': gen}, x)[0]

    def disc_loss(p):
      real, fake = d(p, x), d(p, recon)
      hinge = jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake))
      lecam = (jnp.mean(jax.nn.relu(real - ema['ema_fake']) ** 2)
               + jnp.mean(jax.nn.relu(ema['ema_real'] - fake) ** 2))
      return hinge + config.tokenizer.lecam_weight * lecam

    nll_value, g_nll = jax.value_and_grad(nll)(gen)
    return nll_value, g_nll, jax.grad(adv)(gen), jax.grad(disc_loss)(dp)

  return _jit(fn)(params['generator'], params['discriminator'])


def _close(actual, desired):
  """Gradient trees to 1e-4 of each leaf's norm (two fp32 computations agree to ~3e-6; tests/numerics.py)."""
  numerics.assert_trees_close(actual, desired, rtol=1e-4)


def test_before_start_only_reconstruction(setup, reference):
  _, _, params, video, grad_fn = setup
  nll, g_nll, _, _ = reference
  (loss, metrics), grads = grad_fn(params, _batch(video, START - 1), jax.random.key(0), True)
  assert float(metrics['gan_active']) == 0.0
  assert _norm(grads['discriminator']) == 0.0 and _norm(grads['lecam']) == 0.0
  np.testing.assert_allclose(float(loss), float(nll), rtol=1e-5)
  _close(grads['generator'], g_nll)
  assert _norm(grads['generator']['encoder_layers_0']) > 0  # through the quantiser into the encoder


def test_gradient_split_after_start(setup, reference):
  config, _, params, video, grad_fn = setup
  _, g_nll, g_adv, g_disc = reference
  (_, metrics), grads = grad_fn(params, _batch(video, START), jax.random.key(0), True)
  assert float(metrics['gan_active']) == 1.0
  # Generator: nll + adversarial_weight * d_weight * (-mean D(recon)), the discriminator held fixed.
  w = config.tokenizer.adversarial_weight * float(metrics['d_weight'])
  _close(grads['generator'], jax.tree.map(lambda a, b: a + w * b, g_nll, g_adv))
  # Discriminator: hinge + LeCam only; the generator's adversarial term does not reach it.
  _close(grads['discriminator'], g_disc)
  assert _norm(g_disc) > 0 and abs(float(metrics['g_loss'])) > 0


def test_adaptive_weight_matches_full_model_gradients(setup, reference):
  config, _, params, video, grad_fn = setup
  _, g_nll, g_adv, _ = reference
  (_, metrics), _ = grad_fn(params, _batch(video, START), jax.random.key(0), True)
  last = f'decoder_layers_{len(M.decoder_layers(M.make_model(config).spec)) - 1}'
  kernel = lambda g: np.ravel(g[last]['conv']['kernel'])
  expected = np.linalg.norm(kernel(g_nll)) / (np.linalg.norm(kernel(g_adv)) + 1e-4)
  np.testing.assert_allclose(float(metrics['d_weight']), expected, rtol=1e-4)


def test_eval_loss_is_reconstruction_and_psnr_is_the_evaluations(setup, reference):
  config, task, params, video, _ = setup
  nll, _, _, _ = reference
  loss, metrics = _jit(task.loss_fn, static_argnums=3)(params, {'video': video}, jax.random.key(0), False)
  np.testing.assert_allclose(float(loss), float(nll), rtol=1e-5)  # the L1 reconstruction alone, no GAN terms
  # PSNR as --mode=eval reports it: of the uint8 clips decode() returns, per frame, averaged over frames and clips.
  x = np.asarray(video, np.float64) / 255
  model = M.make_model(config)
  recon = np.asarray(_jit(lambda g, v: model.apply({'params': g}, v)[0])(params['generator'], video / 255))
  shown = np.round(np.clip(recon, 0, 1) * 255) / 255
  want = np.mean(10 * np.log10(1 / np.mean((shown - x) ** 2, axis=(2, 3, 4))))
  np.testing.assert_allclose(float(metrics['psnr']), want, rtol=1e-4)


def test_missing_step_names_the_fix(setup):
  _, task, params, video, _ = setup
  with pytest.raises(KeyError, match="batch\\['step'\\]"):
    jax.eval_shape(lambda p: task.loss_fn(p, {'video': video}, jax.random.key(0), True), params)


def test_optimizer_holds_discriminator_until_start_and_updates_lecam_ema(setup):
  config, task, params, video, grad_fn = setup
  tx, schedule = task.make_optimizer()
  state = tx.init(params)

  @_jit
  def apply(g, s, p):  # jitted apart from the loss, which is already compiled
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def step(p, s, i):
    (_, m), g = grad_fn(p, _batch(video, i), jax.random.key(0), True)
    return *apply(g, s, p), m

  p = prev = params
  for i in range(START + 1):  # optax counts from 0 like the trainer; the discriminator's warmup starts at 0 at START
    prev = p
    p, state, _ = step(p, state, i)
  jax.tree.map(np.testing.assert_array_equal, p['discriminator'], params['discriminator'])
  assert _norm(jax.tree.map(jnp.subtract, p['generator'], params['generator'])) > 0
  # The EMAs start at 0 and take one step towards the mean discriminator logits of the real clips and of the
  # reconstructions at the last step's parameters (the discriminator still at init), computed here from the modules.
  model, disc = M.make_model(config), T.make_discriminator(config)

  @_jit
  def mean_logits(gen, dp, x):  # of the real clips and of their reconstructions
    d = lambda v: jnp.mean(disc.apply({'params': dp}, v * 2 - 1))
    return d(x), d(model.apply({'params': gen}, x)[0])

  real, fake = mean_logits(prev['generator'], params['discriminator'], video.astype(jnp.float32) / 255)
  decay = config.tokenizer.lecam_decay
  np.testing.assert_allclose(float(p['lecam']['ema_real']), (1 - decay) * float(real), rtol=1e-5)
  np.testing.assert_allclose(float(p['lecam']['ema_fake']), (1 - decay) * float(fake), rtol=1e-4)
  p2, state, _ = step(p, state, START + 1)
  assert _norm(jax.tree.map(jnp.subtract, p2['discriminator'], p['discriminator'])) > 0


def test_hinge_and_lecam_values():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.5])
  np.testing.assert_allclose(float(losses.hinge_d_loss(real, fake)), (0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
  np.testing.assert_allclose(float(losses.hinge_g_loss(fake)), -(-2.0 + 0.0 + 1.5) / 3)
  # relu(real + 0.5) = (2.5, 1, 0); relu(0.25 - fake) = (2.25, 0.25, 0).
  np.testing.assert_allclose(float(losses.lecam_loss(real, fake, 0.25, -0.5)),
                             (2.5 ** 2 + 1.0) / 3 + (2.25 ** 2 + 0.25 ** 2) / 3, rtol=1e-6)


def test_the_discriminator_optimizer_starts_with_the_gan_as_a_fresh_adam():
  """No discriminator updates before tokenizer.discriminator_start_step; the first one after is a first Adam step
  (bias-corrected moments of one gradient: lr * g / |g| per weight, plus decay), not one whose bias correction
  was spent counting idle steps."""
  start, lr, decay = 20, 1e-2, 1e-4
  config = _config(discriminator_start_step=start, warmup_steps=0, discriminator_lr=lr, weight_decay=decay,
                   grad_clip=1e9, b1=0.5, b2=0.9)
  optimizer, _ = T.make_optimizer_fn(config)()
  update = jax.jit(optimizer.update)
  params = {'generator': {'kernel': jnp.ones((3,))}, 'discriminator': {'kernel': jnp.ones((3,))}}
  grads = {'generator': {'kernel': jnp.zeros((3,))}, 'discriminator': {'kernel': jnp.asarray([0.5, -2.0, 0.25])}}
  state = optimizer.init(params)
  for step in range(start):
    idle = {'generator': grads['generator'], 'discriminator': {'kernel': jnp.zeros((3,))}}  # the loss's gate
    updates, state = update(idle, state, params)
    assert _norm(updates['discriminator']) == 0.0, step
  updates, state = update(grads, state, params)
  g = np.asarray(grads['discriminator']['kernel'])
  first_adam = -lr * (g / (np.abs(g) + 1e-8) + decay * 1.0)  # cosine at its step 0: the full lr
  np.testing.assert_allclose(np.asarray(updates['discriminator']['kernel']), first_adam, rtol=1e-5)


def test_value_and_kept_grad_reuses_its_gradient_for_the_training_gradient():
  rng = np.random.default_rng(0)
  r, t = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  fn = lambda r, t: (jnp.sum(jnp.sin(r) * t) ** 2, jnp.mean(r))
  value, aux, grad = losses.value_and_kept_grad(fn, r, t)
  want_value, want_grad = jax.value_and_grad(lambda r: fn(r, t)[0])(r)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6)
  np.testing.assert_allclose(aux, jnp.mean(r), rtol=1e-6)

  # As the adaptive weight uses it: the value in the loss, the gradient's norm as a constant factor.
  def loss(r, t, kept):
    if kept:
      v, _, g = losses.value_and_kept_grad(fn, r, t)
    else:  # the plain form: the value, and the gradient from a second pass
      v, g = fn(r, t)[0], jax.lax.stop_gradient(jax.grad(lambda r: fn(r, t)[0])(r))
    return 3.0 * v * jnp.linalg.norm(g) + jnp.sum(r ** 2)

  grad_of = lambda kept: jax.grad(functools.partial(loss, kept=kept))
  np.testing.assert_allclose(grad_of(True)(r, t), grad_of(False)(r, t), rtol=1e-5)
  # The constants get no gradient through it.
  assert not np.any(jax.grad(lambda t: losses.value_and_kept_grad(fn, r, t)[0])(t))
  # One forward and one backward pass of fn: sin once, its derivative cos once (the plain form: sin 3 times).
  count = lambda kept, op: str(jax.make_jaxpr(grad_of(kept))(r, t)).count(f' {op} ')
  assert (count(True, 'sin'), count(True, 'cos')) == (1, 1) and count(False, 'sin') > 1
