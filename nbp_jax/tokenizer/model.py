"""The official NBP video tokenizer (MAGVIT-v2-style causal 3D CNN + FSQ) in Flax linen, channels-last NTHWC.

Layer lists follow the release one index per entry (docs/design.md), and the parameter tree mirrors its state dict
so that the import of `magvit2_*.pt` is a rename plus a transpose:

  torch                                   flax (this module)
  encoder_layers.{i}.conv.weight          encoder_layers_{i}/conv/kernel   [out,in,kt,kh,kw] -> [kt,kh,kw,in,out]
  encoder_layers.{i}.fn.0.weight / bias   encoder_layers_{i}/fn_0/scale / bias          (GroupNorm)
  encoder_layers.{i}.fn.1.beta            encoder_layers_{i}/fn_1/beta      [1,C,1,1,1] -> [C]
  encoder_layers.{i}.fn.2.conv.weight     encoder_layers_{i}/fn_2/conv/kernel
  encoder_layers.{i}.residual_fn.0.conv.* encoder_layers_{i}/residual_fn_0/conv/*
  encoder_layers.26.weight / bias         encoder_layers_26/kernel / bias (plain 1x1x1 conv, no causal padding)
  decoder_layers.{i}...                   decoder_layers_{i}/...   (depth-to-space entries keep their index, no params)

Shapes: video [B, T, H, W, 3] in [0, 1] with T = 1 + 4k and H, W divisible by 8 -> latents [B, 1 + k, H/8, W/8, 6]
-> codes [B, 1 + k, H/8, W/8] int32 in [0, 64000) -> video [B, T, H, W, 3].
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nbp_jax import config_lib
from nbp_jax import cpu_convolutions
from nbp_jax import image_metrics
from nbp_jax.tokenizer import fsq

Dtype = Any
# PyTorch's GroupNorm default; parity with the released weights needs it (flax defaults to 1e-6).
_GN_EPS = 1e-5


# ------------------------------------------------------------------------------------------------------------------
# Layer lists (data, so that param counts, FLOPs and the importer can read them without building the model).


@dataclasses.dataclass(frozen=True)
class Layer:
  """One entry of an encoder/decoder layer list.

  kind: 'conv' (causal conv, kernel k, stride), 'res' (residual unit), 'norm' (GroupNorm per frame), 'swish'
    (Swish with learnable beta), 'proj' (plain 1x1x1 conv), 'd2s' (depth-to-space by `factors`, no params).
  """
  kind: str
  cin: int
  cout: int
  kernel: int = 3
  stride: tuple[int, int, int] = (1, 1, 1)
  factors: tuple[int, int, int] = (1, 1, 1)


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """Hashable architecture hyperparameters (from `config.tokenizer`); see config_lib.tokenizer_config."""
  channels: int = 128
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
  num_res_blocks: int | tuple[int, ...] = 4  # per stage, or one count for every stage
  num_mid_blocks: int = 4
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  num_groups: int = 32
  kernel_size: int = 3
  fsq_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
  # 'group' (GroupNorm per frame, the release) or 'none' (no normalisation layers: the CPU demo's recipe, which leaves
  # the mean-colour plateau where the released one does not; docs/tokenizer_recipes.md).
  norm: str = 'group'

  @classmethod
  def from_config(cls, tok: ml_collections.ConfigDict) -> TokenizerSpec:
    blocks = tok.num_res_blocks
    blocks = int(blocks) if isinstance(blocks, int) else tuple(int(b) for b in blocks)
    return cls(channels=int(tok.channels), channel_multipliers=tuple(int(m) for m in tok.channel_multipliers),
               num_res_blocks=blocks, num_mid_blocks=int(tok.num_mid_blocks),
               temporal_downsample=tuple(bool(t) for t in tok.temporal_downsample),
               num_groups=int(tok.num_groups), kernel_size=int(tok.kernel_size),
               fsq_levels=tuple(int(v) for v in tok.fsq_levels), norm=str(tok.get('norm', 'group')))

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** len(self.temporal_downsample)

  @property
  def latent_dim(self) -> int:
    return len(self.fsq_levels)

  def res_blocks(self, stage: int) -> int:
    """Residual units of encoder stage `stage` (and of the decoder stage that mirrors it)."""
    if isinstance(self.num_res_blocks, int):
      return self.num_res_blocks
    if len(self.num_res_blocks) != len(self.channel_multipliers):
      raise ValueError(f'tokenizer.num_res_blocks={self.num_res_blocks} needs one count per stage '
                       f'(tokenizer.channel_multipliers={self.channel_multipliers}), or a single int.')
    return self.num_res_blocks[stage]


def encoder_layers(spec: TokenizerSpec) -> list[Layer]:
  """Official: conv 3->128; 4 res; down (1,2,2); res 128->256 + 3 res; down (2,2,2); 4 res; down (2,2,2);
  res 256->512 + 3 res; 4 mid res; GroupNorm; Swish; 1x1x1 conv 512->6 (indices 0..26)."""
  if len(spec.channel_multipliers) != len(spec.temporal_downsample) + 1:
    raise ValueError(f'tokenizer.channel_multipliers {spec.channel_multipliers} needs one more entry than '
                     f'tokenizer.temporal_downsample {spec.temporal_downsample}.')
  k = spec.kernel_size
  width = spec.channels * spec.channel_multipliers[0]
  layers = [Layer('conv', 3, width, k)]
  for s, mult in enumerate(spec.channel_multipliers):
    for _ in range(spec.res_blocks(s)):
      layers.append(Layer('res', width, spec.channels * mult, k))
      width = spec.channels * mult
    if s < len(spec.temporal_downsample):
      layers.append(Layer('conv', width, width, k, stride=(2 if spec.temporal_downsample[s] else 1, 2, 2)))
  layers += [Layer('res', width, width, k)] * spec.num_mid_blocks
  layers += [Layer('norm', width, width), Layer('swish', width, width), Layer('proj', width, spec.latent_dim, 1)]
  return layers


def decoder_layers(spec: TokenizerSpec) -> list[Layer]:
  """Official: conv 6->512; 8 res; conv 512->4096 + d2s (2,2,2); res 512->256 + 3 res; conv 256->2048 + d2s (2,2,2);
  4 res; conv 256->1024 + d2s (1,2,2); res 256->128 + 3 res; GroupNorm; Swish; conv 128->3 (indices 0..29)."""
  k = spec.kernel_size
  width = spec.channels * spec.channel_multipliers[-1]
  layers = [Layer('conv', spec.latent_dim, width, k)]
  layers += [Layer('res', width, width, k)] * spec.num_mid_blocks
  for s in reversed(range(len(spec.channel_multipliers))):
    for _ in range(spec.res_blocks(s)):
      layers.append(Layer('res', width, spec.channels * spec.channel_multipliers[s], k))
      width = spec.channels * spec.channel_multipliers[s]
    if s > 0:
      factors = (2 if spec.temporal_downsample[s - 1] else 1, 2, 2)
      layers.append(Layer('conv', width, width * math.prod(factors), k))
      layers.append(Layer('d2s', width * math.prod(factors), width, factors=factors))
  layers += [Layer('norm', width, width), Layer('swish', width, width), Layer('conv', width, 3, k)]
  return layers


def decoder_history(spec: TokenizerSpec) -> int:
  """Latent frames before latent frame f that the causal decoder's frames of f depend on (its temporal receptive
  field, rounded up, plus one for the frames inside a latent frame): decoding codes[:, f - history:] gives the frames
  of f and later exactly as decoding the whole clip does (replicate padding only reaches frames before that)."""
  reach, frames_per_latent = 0.0, 1
  for layer in decoder_layers(spec):
    if layer.kind == 'conv':
      reach += (layer.kernel - 1) / frames_per_latent
    elif layer.kind == 'res':
      reach += 2 * (layer.kernel - 1) / frames_per_latent  # two causal convs; the shortcut is 1x1x1
    elif layer.kind == 'd2s':
      frames_per_latent *= layer.factors[0]
  return math.ceil(reach) + 1


def layer_param_count(layer: Layer) -> tuple[int, int]:
  """(parameters, tensors) of one layer, counted as the official state dict does."""
  conv = lambda cin, cout, kk: cin * cout * kk ** 3 + cout
  if layer.kind in ('conv', 'proj'):
    return conv(layer.cin, layer.cout, layer.kernel), 2
  if layer.kind == 'norm':
    return 2 * layer.cin, 2
  if layer.kind == 'swish':
    return layer.cin, 1
  if layer.kind == 'res':
    n = 3 * layer.cin + conv(layer.cin, layer.cout, layer.kernel) + 3 * layer.cout + conv(layer.cout, layer.cout,
                                                                                           layer.kernel)
    if layer.cin != layer.cout:
      return n + conv(layer.cin, layer.cout, 1), 12
    return n, 10
  return 0, 0


def conv_flops(spec: TokenizerSpec, num_frames: int, resolution: int) -> float:
  """Forward multiply-add FLOPs (x2) of the encoder plus decoder for one clip; convolutions only."""
  t, s = num_frames, resolution
  total = 0.0
  for layer in encoder_layers(spec):
    if layer.kind == 'conv':
      t, s = (t - 1) // layer.stride[0] + 1, s // layer.stride[1]
    n = t * s * s
    if layer.kind in ('conv', 'proj'):
      total += 2 * n * layer.cin * layer.cout * layer.kernel ** 3
    elif layer.kind == 'res':
      total += 2 * n * layer.kernel ** 3 * (layer.cin * layer.cout + layer.cout ** 2) + 2 * n * layer.cin * layer.cout
  for layer in decoder_layers(spec):
    n = t * s * s
    if layer.kind == 'conv':
      total += 2 * n * layer.cin * layer.cout * layer.kernel ** 3
    elif layer.kind == 'res':
      total += 2 * n * layer.kernel ** 3 * (layer.cin * layer.cout + layer.cout ** 2) + 2 * n * layer.cin * layer.cout
    elif layer.kind == 'd2s':
      ft, fh, _ = layer.factors
      t, s = t * ft - (ft - 1), s * fh
  return total


# ------------------------------------------------------------------------------------------------------------------
# Building blocks.


def _kernel_init(out_axis: str | None):
  # The 5-D conv kernel [kt, kh, kw, in, out]; wide outputs may be FSDP-sharded, narrow ones (3, 6, 1) never are.
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, 'conv_in', out_axis))


def _vector_init(init):
  return nn.with_logical_partitioning(init, (None,))


def causal_pad(x: jax.Array, kernel: Sequence[int]) -> jax.Array:
  """Replicate padding [B, T, H, W, C]: k//2 on each side of H and W, 2*(k//2) frames in front of T only."""
  kt, kh, kw = kernel
  return jnp.pad(x, ((0, 0), (2 * (kt // 2), 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode='edge')


class Conv3d(nn.Module):
  """VALID 3D conv with params `kernel` [kt, kh, kw, in, out] and `bias` [out].

  impl '3d': one 3D convolution (cuDNN/TPU). impl '2d': the sum over the kt time taps of 2D convolutions of the
  (strided) frames; the same numbers, and 2-4x faster on XLA:CPU, whose 3D convolutions are slow.
  """
  features: int
  kernel_size: tuple[int, int, int]
  strides: tuple[int, int, int] = (1, 1, 1)
  impl: str = '3d'
  narrow_output: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', _kernel_init(None if self.narrow_output else 'conv_out'),
                        tuple(self.kernel_size) + (x.shape[-1], self.features))
    bias = self.param('bias', _vector_init(nn.initializers.zeros), (self.features,))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.impl == '3d':
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, 'VALID',
                                       dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
    elif self.impl == '2d':
      y = cpu_convolutions.conv3d_as_2d(x, kernel, self.strides, ((0, 0),) * 3)
    else:
      raise ValueError(f"tokenizer.conv_impl={self.impl!r} is unknown; pick 'auto', '3d' or '2d'.")
    return y + bias.astype(self.dtype)


class CausalConv3d(nn.Module):
  """Causal 3D conv: [B, T, H, W, Cin] -> [B, (T-1)//st + 1, H//sh, W//sw, features]. Params under `conv`."""
  features: int
  kernel: int = 3
  stride: tuple[int, int, int] = (1, 1, 1)
  narrow_output: bool = False
  impl: str = '3d'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = (self.kernel,) * 3
    x = causal_pad(x, k)
    return Conv3d(self.features, k, self.stride, self.impl, self.narrow_output, self.dtype, name='conv')(x)


class FrameGroupNorm(nn.Module):
  """GroupNorm applied to each frame separately (statistics over H, W and the channels of a group), in float32."""
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'tokenizer.num_groups={self.num_groups} does not divide width {c}; '
                       'change tokenizer.num_groups.')
    scale = self.param('scale', _vector_init(nn.initializers.ones), (c,))
    bias = self.param('bias', _vector_init(nn.initializers.zeros), (c,))
    y = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    mean = jnp.mean(y, axis=(2, 3, 5), keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=(2, 3, 5), keepdims=True)
    y = ((y - mean) * jax.lax.rsqrt(var + _GN_EPS)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


class SwishBeta(nn.Module):
  """x * sigmoid(beta * x) with a learnable per-channel beta (init 1)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    beta = self.param('beta', _vector_init(nn.initializers.ones), (x.shape[-1],))
    x = x.astype(self.dtype)
    return x * jax.nn.sigmoid(beta.astype(self.dtype) * x)


class Identity(nn.Module):
  """Stands where a normalisation layer would be when tokenizer.norm='none' (no params; indices stay the release's)."""

  def __call__(self, x):
    return x


def make_norm(spec: TokenizerSpec, dtype: Dtype) -> nn.Module:
  """The normalisation layer tokenizer.norm names."""
  if spec.norm == 'group':
    return FrameGroupNorm(spec.num_groups, dtype)
  if spec.norm == 'none':
    return Identity()
  raise ValueError(f"tokenizer.norm={spec.norm!r} is unknown; pick 'group' (the release) or 'none'.")


class ResidualUnit(nn.Module):
  """GN -> Swish -> causal conv -> GN -> Swish -> causal conv, plus a 1x1x1 causal conv shortcut if widths differ."""
  cin: int
  cout: int
  kernel: int = 3
  spec: TokenizerSpec = TokenizerSpec()
  impl: str = '3d'
  dtype: Dtype = jnp.float32

  def setup(self):
    # Lists name their entries fn_0..fn_5 and residual_fn_0, as `fn.{j}` / `residual_fn.0` in the release.
    conv = lambda k: CausalConv3d(self.cout, k, impl=self.impl, dtype=self.dtype)
    norm = lambda: make_norm(self.spec, self.dtype)
    self.fn = [norm(), SwishBeta(self.dtype), conv(self.kernel), norm(), SwishBeta(self.dtype), conv(self.kernel)]
    self.residual_fn = [conv(1)] if self.cin != self.cout else []

  def __call__(self, x):
    h = x
    for layer in self.fn:
      h = layer(h)
    for layer in self.residual_fn:
      x = layer(x)
    return h + x.astype(h.dtype)


def depth_to_space(x: jax.Array, factors: Sequence[int]) -> jax.Array:
  """[B, T, H, W, ft*fh*fw*C] -> [B, T*ft - (ft-1), H*fh, W*fw, C].

  The block factors are the outermost channel dims (channel = ((dt*fh + dh)*fw + dw)*C + c), as the release's
  `view(b, ft, fh, fw, c, t, h, w)`; the first ft-1 output frames are dropped so the first frame stays alone.
  """
  b, t, h, w, cc = x.shape
  ft, fh, fw = factors
  c = cc // (ft * fh * fw)
  x = x.reshape(b, t, h, w, ft, fh, fw, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t * ft, h * fh, w * fw, c)
  return x[:, ft - 1:]


class DepthToSpace(nn.Module):
  """depth_to_space as a layer of the decoder's plan: channels to (t, h, w) factors."""
  factors: tuple[int, int, int]

  def __call__(self, x):
    return depth_to_space(x, self.factors)


def _build(layer: Layer, spec: TokenizerSpec, dtype: Dtype, impl: str, remat: bool, *, last: bool) -> nn.Module:
  if layer.kind == 'conv':
    return CausalConv3d(layer.cout, layer.kernel, layer.stride, narrow_output=last, impl=impl, dtype=dtype)
  if layer.kind == 'res':
    # Rematerialised units keep only their input for the backward pass; the parameter tree is unchanged.
    unit = nn.remat(ResidualUnit) if remat else ResidualUnit
    return unit(layer.cin, layer.cout, layer.kernel, spec, impl, dtype)
  if layer.kind == 'norm':
    return make_norm(spec, dtype)
  if layer.kind == 'swish':
    return SwishBeta(dtype)
  if layer.kind == 'proj':
    return nn.Conv(layer.cout, (1, 1, 1), padding='VALID', dtype=dtype, kernel_init=_kernel_init(None),
                   bias_init=_vector_init(nn.initializers.zeros))
  if layer.kind == 'd2s':
    return DepthToSpace(layer.factors)
  raise ValueError(f'unknown layer kind {layer.kind!r}')


# ------------------------------------------------------------------------------------------------------------------
# The tokenizer.


class Tokenizer(nn.Module):
  """Encoder + FSQ + decoder. Methods take float video in [0, 1] / float codes; see `encode`/`decode` for uint8."""
  spec: TokenizerSpec = TokenizerSpec()
  dtype: Dtype = jnp.float32
  conv_impl: str = '3d'  # '3d' or '2d' (see Conv3d); the parameters are the same
  remat: bool = False  # recompute residual units in the backward pass (less activation memory)

  def setup(self):
    enc, dec = encoder_layers(self.spec), decoder_layers(self.spec)
    build = lambda l, last: _build(l, self.spec, self.dtype, self.conv_impl, self.remat, last=last)
    # Lists name their entries encoder_layers_{i} / decoder_layers_{i}: the release's indices.
    self.encoder_layers = [build(l, i == len(enc) - 1) for i, l in enumerate(enc)]
    self.decoder_layers = [build(l, i == len(dec) - 1) for i, l in enumerate(dec)]

  def encode_latents(self, video: jax.Array) -> jax.Array:
    """[B, T, H, W, 3] float in [0, 1] -> pre-quantisation latents [B, t, h, w, D] float32."""
    _check_video_shape(video.shape, self.spec)
    x = video.astype(self.dtype)
    for layer in self.encoder_layers:
      x = layer(x)
    return x.astype(jnp.float32)

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latents [..., D] -> (codes [..., D] with straight-through gradient, indices [...] int32)."""
    return fsq.quantize(z, self.spec.fsq_levels)

  def decode_features(self, codes: jax.Array) -> jax.Array:
    """Float codes [B, t, h, w, D] -> input of the last decoder conv [B, T, H, W, C] (for the adaptive GAN weight)."""
    x = codes.astype(self.dtype)
    for layer in self.decoder_layers[:-1]:
      x = layer(x)
    return x

  def decode_head(self, features: jax.Array) -> jax.Array:
    """Last decoder conv: [B, T, H, W, C] -> unclipped video [B, T, H, W, 3] float32."""
    return self.decoder_layers[-1](features).astype(jnp.float32)

  def decode_latents(self, codes: jax.Array) -> jax.Array:
    """Float codes [B, t, h, w, D] -> unclipped video [B, T, H, W, 3] float32 (clip to [0, 1] for display)."""
    return self.decode_head(self.decode_features(codes))

  def __call__(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Video [B, T, H, W, 3] in [0, 1] -> (unclipped reconstruction, indices [B, t, h, w])."""
    codes, indices = self.quantize(self.encode_latents(video))
    return self.decode_latents(codes), indices


def _check_video_shape(shape, spec: TokenizerSpec) -> None:
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f'the tokenizer takes video [B, T, H, W, 3]; got shape {tuple(shape)}.')
  ft, fs = spec.temporal_factor, spec.spatial_factor
  _, t, h, w, _ = shape
  if (t - 1) % ft or h % fs or w % fs:
    raise ValueError(f'video of {t} frames at {h}x{w}: the tokenizer needs 1 + {ft}k frames and H, W divisible by '
                     f'{fs} (e.g. 17 frames at 128x128); crop or pad the clip.')


def resolve_conv_impl(name: str, platform: str | None = None) -> str:
  """'auto' -> '2d' on CPU (XLA:CPU 3D convolutions are slow), '3d' on accelerators."""
  if name != 'auto':
    return name
  return '2d' if (platform or jax.default_backend()) == 'cpu' else '3d'


def make_model(config: ml_collections.ConfigDict, platform: str | None = None) -> Tokenizer:
  """The tokenizer of `config` (a full config or its `tokenizer` section); compute dtype from tokenizer.dtype.
  Its 'auto' settings (dtype, conv_impl) resolve for `platform` ('cpu', 'cuda', 'tpu'; None = this backend)."""
  tok = config.tokenizer if 'tokenizer' in config else config
  dtype = config_lib.resolve_dtype(tok.get('dtype', 'float32'), platform)
  return Tokenizer(TokenizerSpec.from_config(tok), jnp.dtype(dtype),
                   resolve_conv_impl(tok.get('conv_impl', 'auto'), platform), bool(tok.get('remat', False)))


def _as_model(model_or_config) -> Tokenizer:
  return model_or_config if isinstance(model_or_config, Tokenizer) else make_model(model_or_config)


def _variables(params):
  return params if 'params' in params else {'params': params}


def init_params(model: Tokenizer, rng: jax.Array) -> Any:
  """Parameters (boxed with logical axis names) from a minimal dummy clip; shapes do not depend on clip size."""
  fs = model.spec.spatial_factor
  video = jnp.zeros((1, 1, fs, fs, 3), jnp.float32)
  return model.init(rng, video)['params']


def encode(params, video: jax.Array, model) -> jax.Array:
  """uint8 video [B, T, H, W, 3] -> int32 codes [B, 1 + (T-1)/4, H/8, W/8]. Jittable (`model` static)."""
  model = _as_model(model)
  z = model.apply(_variables(params), image_metrics.to_unit(video), method=Tokenizer.encode_latents)
  return fsq.quantize(z, model.spec.fsq_levels)[1]


def decode(params, codes: jax.Array, model) -> jax.Array:
  """int codes [B, t, h, w] -> uint8 video [B, 1 + 4(t-1), 8h, 8w, 3] (output clipped to [0, 1]). Jittable."""
  model = _as_model(model)
  latents = fsq.codes_from_indices(codes, model.spec.fsq_levels)
  video = model.apply(_variables(params), latents, method=Tokenizer.decode_latents)
  return to_uint8(video)


# encode / decode jitted once per tokenizer architecture (`model` is hashable and static): the one compiled pair
# that the generator and the tests call, sharing one compilation cache.
jit_encode = jax.jit(encode, static_argnames='model')
jit_decode = jax.jit(decode, static_argnames='model')


def to_uint8(video: jax.Array) -> jax.Array:
  """Float video in [0, 1] (values outside are clipped) -> uint8 [0, 255]."""
  return jnp.round(jnp.clip(video, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def param_counts(params) -> dict[str, int]:
  """{'encoder', 'decoder', 'total', 'tensors'} of a (possibly boxed or abstract) tokenizer parameter tree."""
  params = nn.unbox(params)
  counts = {'encoder': 0, 'decoder': 0, 'tensors': 0}
  for name, sub in params.items():
    leaves = jax.tree.leaves(sub)
    counts['encoder' if name.startswith('encoder') else 'decoder'] += sum(math.prod(l.shape) for l in leaves)
    counts['tensors'] += len(leaves)
  counts['total'] = counts['encoder'] + counts['decoder']
  return counts
