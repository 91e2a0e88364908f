"""Tokenizer model: shapes, causality, building blocks against naive references, official parameter layout."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax import trainer
from nbp_jax.tokenizer import model as M
import numerics


@pytest.fixture(scope='module')
def micro():
  model = M.make_model(config_lib.tokenizer_config('micro'))
  return model, trainer.jit_init(lambda r: M.init_params(model, r), jax.random.key(0))


def _random_video(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def _naive_causal_conv(x, kernel, bias, stride):
  """Loops over output positions; replicate padding by clamping input indices (no np.pad)."""
  b, t, h, w, _ = x.shape
  kt, kh, kw, _, cout = kernel.shape
  st, sh, sw = stride
  pt, ph, pw = 2 * (kt // 2), kh // 2, kw // 2
  t_out, h_out, w_out = (t + pt - kt) // st + 1, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
  out = np.zeros((b, t_out, h_out, w_out, cout), np.float64)
  clamp = lambda i, n: min(max(i, 0), n - 1)
  for to in range(t_out):
    for ho in range(h_out):
      for wo in range(w_out):
        acc = np.array(bias, np.float64)[None].repeat(b, 0)
        for dt in range(kt):
          for dh in range(kh):
            for dw in range(kw):
              ti, hi, wi = clamp(to * st + dt - pt, t), clamp(ho * sh + dh - ph, h), clamp(wo * sw + dw - pw, w)
              acc = acc + x[:, ti, hi, wi, :].astype(np.float64) @ kernel[dt, dh, dw].astype(np.float64)
        out[:, to, ho, wo] = acc
  return out


@pytest.mark.parametrize('impl', ['3d', '2d'])
@pytest.mark.parametrize('stride,kernel', [((1, 1, 1), 3), ((1, 2, 2), 3), ((2, 2, 2), 3), ((1, 1, 1), 1)])
def test_causal_conv_matches_naive_reference(stride, kernel, impl):
  x = np.random.default_rng(0).normal(size=(2, 5, 6, 6, 2)).astype(np.float32)
  conv = M.CausalConv3d(3, kernel, stride, impl=impl)
  params = conv.init(jax.random.key(1), x)
  p = nn.unbox(params)['params']['conv']
  bias = np.random.default_rng(2).normal(size=3).astype(np.float32)  # a non-zero bias is checked too
  params = {'params': {'conv': {'kernel': p['kernel'], 'bias': jnp.asarray(bias)}}}
  out = np.asarray(conv.apply(params, x))
  ref = _naive_causal_conv(x, np.asarray(p['kernel']), bias, stride)
  assert out.shape == ref.shape
  numerics.assert_close(out, ref, 1e-5)  # float64 reference; fp32 is ~2e-7 of the scale off


@pytest.mark.parametrize('factors', [(2, 2, 2), (1, 2, 2), (2, 1, 3)])
def test_depth_to_space_matches_naive_loop(factors):
  ft, fh, fw = factors
  c = 2
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 2, ft * fh * fw * c)).astype(np.float32)
  out = np.asarray(M.depth_to_space(jnp.asarray(x), factors))
  b, t, h, w, _ = x.shape
  full = np.zeros((b, t * ft, h * fh, w * fw, c), np.float32)
  for ti in range(t):
    for hi in range(h):
      for wi in range(w):
        for dt in range(ft):
          for dh in range(fh):
            for dw in range(fw):
              for ci in range(c):
                # The block factors are the outermost channel dims (official view(b, ft, fh, fw, c, t, h, w)).
                channel = ((dt * fh + dh) * fw + dw) * c + ci
                full[:, ti * ft + dt, hi * fh + dh, wi * fw + dw, ci] = x[:, ti, hi, wi, channel]
  np.testing.assert_array_equal(out, full[:, ft - 1:])
  assert out.shape[1] == t * ft - (ft - 1)


def test_official_parameter_count_and_layout():
  model = M.make_model(config_lib.tokenizer_config('official'))
  params = nn.unbox(jax.eval_shape(lambda r: M.init_params(model, r), jax.random.key(0)))
  counts = M.param_counts(params)
  assert counts == {'encoder': 144_886_790, 'decoder': 225_485_315, 'total': 370_372_105, 'tensors': 434}
  enc = {int(k.rsplit('_', 1)[1]) for k in params if k.startswith('encoder_layers_')}
  dec = {int(k.rsplit('_', 1)[1]) for k in params if k.startswith('decoder_layers_')}
  assert enc == set(range(27))
  assert dec == set(range(30)) - {10, 16, 22}  # depth-to-space keeps its index but has no parameters
  shape = lambda path: functools.reduce(lambda d, k: d[k], path.split('/'), params).shape
  assert shape('encoder_layers_0/conv/kernel') == (3, 3, 3, 3, 128)
  assert shape('encoder_layers_6/residual_fn_0/conv/kernel') == (1, 1, 1, 128, 256)
  assert shape('encoder_layers_16/fn_1/beta') == (256,)
  assert shape('encoder_layers_16/fn_3/scale') == (512,)
  assert shape('encoder_layers_24/scale') == (512,)
  assert shape('encoder_layers_26/kernel') == (1, 1, 1, 512, 6)
  assert shape('decoder_layers_9/conv/kernel') == (3, 3, 3, 512, 4096)
  assert shape('decoder_layers_21/conv/kernel') == (3, 3, 3, 256, 1024)
  assert shape('decoder_layers_23/residual_fn_0/conv/kernel') == (1, 1, 1, 256, 128)
  assert shape('decoder_layers_29/conv/kernel') == (3, 3, 3, 128, 3)
  # The analytic count from the layer lists agrees (the importer and FLOP estimate use those lists).
  layers = M.encoder_layers(model.spec) + M.decoder_layers(model.spec)
  assert sum(M.layer_param_count(l)[0] for l in layers) == 370_372_105


def test_official_shapes_abstract():
  model = M.make_model(config_lib.tokenizer_config('official'))
  params = jax.eval_shape(lambda r: M.init_params(model, r), jax.random.key(0))
  video = jax.ShapeDtypeStruct((2, 17, 128, 128, 3), jnp.uint8)
  codes = jax.eval_shape(lambda p, v: M.encode(p, v, model), params, video)
  assert codes.shape == (2, 5, 16, 16) and codes.dtype == jnp.int32
  out = jax.eval_shape(lambda p, c: M.decode(p, c, model), params, codes)
  assert out.shape == (2, 17, 128, 128, 3) and out.dtype == jnp.uint8


def test_shapes_17x128(micro):
  model, params = micro
  codes = jax.jit(M.encode, static_argnums=2)(params, _random_video((1, 17, 128, 128, 3)), model)
  assert codes.shape == (1, 5, 16, 16) and codes.dtype == jnp.int32
  assert 0 <= int(codes.min()) and int(codes.max()) < 64_000
  video = jax.jit(M.decode, static_argnums=2)(params, codes, model)
  assert video.shape == (1, 17, 128, 128, 3) and video.dtype == jnp.uint8


def test_single_image(micro):
  model, params = micro
  codes = jax.jit(M.encode, static_argnums=2)(params, _random_video((2, 1, 128, 128, 3)), model)
  assert codes.shape == (2, 1, 16, 16)
  assert 0 <= int(codes.min()) and int(codes.max()) < 64_000
  video = jax.eval_shape(functools.partial(M.decode, model=model), params, codes)
  assert video.shape == (2, 1, 128, 128, 3)


def test_bad_shape_names_the_fix(micro):
  model, params = micro
  with pytest.raises(ValueError, match='1 \\+ 4k frames'):
    M.encode(params, _random_video((1, 16, 16, 16, 3)), model)


def test_encoder_and_decoder_are_causal(micro):
  model, params = micro
  latents = jax.jit(functools.partial(model.apply, method=M.Tokenizer.encode_latents))
  base = _random_video((1, 17, 16, 16, 3), seed=1).astype(jnp.float32) / 255
  z0 = np.asarray(latents({'params': params}, base))
  for k in (1, 4, 5, 12, 16):
    changed = base.at[:, k].set(jnp.asarray(np.random.default_rng(k).random((1, 16, 16, 3)), jnp.float32))
    z1 = np.asarray(latents({'params': params}, changed))
    ends = np.array([0] + [4 * j for j in range(1, 5)])  # last video frame covered by each latent frame
    before = ends < k
    np.testing.assert_array_equal(z1[:, before], z0[:, before], err_msg=f'changing frame {k} leaked backwards')
    assert np.abs(z1[:, ~before] - z0[:, ~before]).max() > 0, f'changing frame {k} changed nothing'
  # Decoder: changing latent frame j changes no video frame before its first frame 1 + 4(j - 1).
  decode = jax.jit(functools.partial(model.apply, method=M.Tokenizer.decode_latents))
  codes = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (1, 5, 2, 2, 6)), jnp.float32)
  v0 = np.asarray(decode({'params': params}, codes))
  for j in (1, 3):
    v1 = np.asarray(decode({'params': params}, codes.at[:, j].multiply(-1.0)))
    first = 1 + 4 * (j - 1)
    np.testing.assert_array_equal(v1[:, :first], v0[:, :first])
    assert np.abs(v1[:, first:] - v0[:, first:]).max() > 0


def test_gradient_reaches_encoder_through_quantiser(micro):
  """Straight-through rounding passes gradients from the codes into every encoder layer (the full
  encoder-decoder gradient is checked in test_tokenizer_losses)."""
  model, params = micro
  video = _random_video((1, 5, 8, 8, 3), seed=2).astype(jnp.float32) / 255
  weights = jnp.asarray(np.random.default_rng(3).normal(size=(1, 2, 1, 1, 6)), jnp.float32)

  def loss(p):
    codes, _ = model.apply({'params': p}, model.apply({'params': p}, video, method=M.Tokenizer.encode_latents),
                           method=M.Tokenizer.quantize)
    return jnp.sum(codes * weights)

  grads = nn.unbox(jax.jit(jax.grad(loss))(params))
  for name in ('encoder_layers_0', 'encoder_layers_1', f'encoder_layers_{len(M.encoder_layers(model.spec)) - 1}'):
    norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads[name]))
    assert norm > 0, f'no gradient reached {name}'


def test_remat_and_conv_impl_keep_the_parameter_tree():
  spec = M.TokenizerSpec.from_config(config_lib.tokenizer_config('micro'))
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nn.unbox(jax.eval_shape(lambda r: M.init_params(m, r),
                                                                              jax.random.key(0))))
  base = shapes(M.Tokenizer(spec))
  assert shapes(M.Tokenizer(spec, remat=True)) == base
  assert shapes(M.Tokenizer(spec, conv_impl='2d')) == base


def test_demo_recipe_layers_and_norm_free_params():
  # tokenizer_config('demo'): 2 down-samplings (4x in space and time), no residual units at full resolution, no norm.
  spec = M.TokenizerSpec(channels=16, channel_multipliers=(1, 1, 2), temporal_downsample=(True, True),
                         num_res_blocks=(0, 1, 1), num_mid_blocks=1, norm='none', fsq_levels=(8, 5, 5, 5))
  kinds = [layer.kind for layer in M.encoder_layers(spec)]
  # conv in, (no res), down, res, down, res, mid res, norm, swish, proj: hand-written from the stage counts.
  assert kinds == ['conv', 'conv', 'res', 'conv', 'res', 'res', 'norm', 'swish', 'proj']
  assert [layer.kind for layer in M.decoder_layers(spec)] == [
      'conv', 'res', 'res', 'conv', 'd2s', 'res', 'conv', 'd2s', 'norm', 'swish', 'conv']
  model = M.Tokenizer(spec, conv_impl='2d')
  video = jnp.zeros((1, 17, 32, 32, 3))
  variables = trainer.jit_init(lambda r: model.init(r, video), jax.random.key(0))
  names = {'/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(
      variables)}
  assert not any(n.endswith('scale') for n in names)  # no GroupNorm parameters anywhere
  recon, codes = jax.jit(model.apply)(variables, video)
  assert recon.shape == video.shape and codes.shape == (1, 5, 8, 8) and int(codes.max()) < 1000
  with pytest.raises(ValueError, match='one count per stage'):
    M.encoder_layers(M.TokenizerSpec(num_res_blocks=(1, 1)))
