r"""A same-machine PyTorch reference for the generation benchmark: nbp-jax and a PyTorch KV-cache loop, one run.

  pip install -r requirements-torch.txt
  python -m nbp_jax.bench generate_torch --config=configs/bench_cpu.py

The official PyTorch release cannot be installed here, so issue #16's official figures (15.3 s NBP, 77.0 s NTP per
K600 clip) come from another machine. This module writes the loop the paper describes from `docs/design.md`
alone (not the official code): a minGPT-style model of the config's sizes (pre-LN blocks, separate q/k/v/proj with
bias, exact GELU, learned absolute positions, untied bias-free head), fp32, with a preallocated KV cache; a prefill
of the given frames, then one forward of L new tokens per step attending to the cache, and per-position top-k /
top-p sampling over the video codes as the released scripts sample. Greedy decoding with the same weights gives
the same codes as nbp-jax (tests/test_bench_torch_reference.py), so both loops do the same work.

It times both loops on the same random weights, NBP (the config's block) and NTP (1x1x1), batch
sample.batch_size, best of `repeats`, and prints one line per loop and the ratios. Last line:
`torch_nbp_s=.. torch_ntp_s=.. jax_nbp_s=.. jax_ntp_s=.. nbp_ratio=.. ntp_ratio=..` (ratio = torch / jax s/clip).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbp_jax import config_lib
from nbp_jax import timing
from nbp_jax.nbp import generation
from nbp_jax.nbp import train
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.spec import spec_from_config


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('the PyTorch reference needs torch: pip install -r requirements-torch.txt') from e
  return torch


class TorchReference:
  """The reference model (weights copied from unrolled nbp-jax params) and its KV-cache generation loop."""

  def __init__(self, spec: Spec, params, threads: int | None = None):
    torch = _torch()
    self.torch, self.spec = torch, spec
    if threads:
      torch.set_num_threads(threads)
    p = jax.tree_util.tree_map(np.asarray, transformer_lib.unstack_layers(nn.meta.unbox(params)))
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # a writable copy
    self.tok_emb, self.pos_emb = t(p['tok_emb']['embedding']), t(p['pos_emb'])
    self.uncond = t(p['uncond_embedding']) if 'uncond_embedding' in p else None
    self.layers = []
    i = 0
    while f'blocks_{i}' in p:
      b = p[f'blocks_{i}']
      lin = lambda m: (t(m['kernel']), t(m['bias']))
      self.layers.append(dict(ln1=(t(b['ln1']['scale']), t(b['ln1']['bias'])),
                              ln2=(t(b['ln2']['scale']), t(b['ln2']['bias'])),
                              q=lin(b['attn']['query']), k=lin(b['attn']['key']), v=lin(b['attn']['value']),
                              proj=lin(b['attn']['proj']), fc1=lin(b['mlp']['fc1']), fc2=lin(b['mlp']['fc2'])))
      i += 1
    lo, hi = spec.vocab.video_slice
    self.ln_f = (t(p['ln_f']['scale']), t(p['ln_f']['bias']))
    self.head = t(p['head']['kernel'][:, lo:hi])  # only the video columns are sampled

  def _forward(self, x, cache, offset: int, mask):
    """x [B, T, d] at positions offset..; writes K/V into cache[layer] [B, H, len, D]; mask [T, offset+T] or None."""
    torch, m = self.torch, self.spec.model
    f = torch.nn.functional
    b, n, d = x.shape
    heads, hd = m.num_heads, m.head_dim
    for layer, w in zip(self.layers, cache):
      h = f.layer_norm(x, (d,), *layer['ln1'], eps=1e-5)
      split = lambda y: y.view(b, n, heads, hd).transpose(1, 2)
      q = split(h @ layer['q'][0] + layer['q'][1])
      w['k'][:, :, offset:offset + n] = split(h @ layer['k'][0] + layer['k'][1])
      w['v'][:, :, offset:offset + n] = split(h @ layer['v'][0] + layer['v'][1])
      k, v = w['k'][:, :, :offset + n], w['v'][:, :, :offset + n]
      att = (q @ k.transpose(-2, -1)) * hd ** -0.5
      if mask is not None:
        att = att.masked_fill(~mask, float('-inf'))
      y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
      x = x + (y @ layer['proj'][0] + layer['proj'][1])
      h = f.layer_norm(x, (d,), *layer['ln2'], eps=1e-5)
      x = x + (f.gelu(h @ layer['fc1'][0] + layer['fc1'][1]) @ layer['fc2'][0] + layer['fc2'][1])
    return f.layer_norm(x, (d,), *self.ln_f, eps=1e-5)

  def _sample(self, logits, generator, greedy: bool, top_k: int, top_p: float):
    """logits [B, L, C] -> codes [B, L]: top-k, then top-p (nucleus) per position, then a draw."""
    torch = self.torch
    if greedy:
      return logits.argmax(-1)
    if top_k and top_k < logits.shape[-1]:
      kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
      logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
      sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
      cum = sorted_logits.softmax(-1).cumsum(-1)
      drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
      sorted_logits = sorted_logits.masked_fill(drop, float('-inf'))
      logits = torch.full_like(logits, float('-inf')).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])

  def generate(self, context: np.ndarray, labels: np.ndarray | None = None, *, block_len: int, greedy: bool = False,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """context [B, n] codes in sequence order (whole blocks) -> [B, N] codes; blocks of `block_len` tokens in raster
    order (rows and frames; the first block must be given: the 'none' start of the K600 preset, or a prefix)."""
    torch, spec = self.torch, self.spec
    layout, vocab, m = spec.layout, spec.vocab, spec.model
    if layout.first_block != 'none' or layout.prefix_len:
      raise ValueError("the PyTorch reference runs the K600 frame-prediction layout (nbp.first_block='none', no "
                       'class prefix).')
    b, n_ctx = context.shape
    total = layout.num_tokens
    seq = torch.zeros((b, total), dtype=torch.long)
    seq[:, :n_ctx] = torch.from_numpy(np.asarray(context, np.int64))
    cache = [dict(k=torch.zeros(b, m.num_heads, total, m.head_dim), v=torch.zeros(b, m.num_heads, total, m.head_dim))
             for _ in self.layers]
    gen = torch.Generator().manual_seed(seed)
    embed = lambda ids, offset: self.tok_emb[ids + vocab.video_offset] + self.pos_emb[offset:offset + ids.shape[1]]
    with torch.inference_mode():
      # Prefill: input position q holds z_q and predicts z_{q+L}; blocks of L are bidirectional, causal across.
      pos = np.arange(n_ctx)
      mask = torch.from_numpy((pos[None, :] // block_len) <= (pos[:, None] // block_len))
      h = self._forward(embed(seq[:, :n_ctx], 0), cache, 0, mask)
      new = self._sample(h[:, -block_len:] @ self.head, gen, greedy, top_k, top_p)
      filled = n_ctx
      while True:
        seq[:, filled:filled + block_len] = new
        filled += block_len
        if filled >= total:
          break
        # The L tokens just sampled, at input positions filled-L..filled-1: they see the cache and each other.
        h = self._forward(embed(new, filled - block_len), cache, filled - block_len, None)
        new = self._sample(h @ self.head, gen, greedy, top_k, top_p)
    return seq.numpy()


def run(config: ml_collections.ConfigDict, repeats: int = 2) -> dict[str, float]:
  """Times the PyTorch reference and nbp-jax on the same weights; prints per-loop lines and the ratios."""
  from nbp_jax.nbp import generator as generator_lib  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, 'sample')
  torch = _torch()
  spec = spec_from_config(config)
  layout = spec.layout
  b = config.sample.batch_size
  t, h, w = layout.latent_shape
  n_ctx = config_lib.context_latent_frames(config) * h * w
  params = jax.jit(lambda r: train.init_params(spec, r))(jax.random.key(config.seed))
  reference = TorchReference(spec, params)  # unboxes and unstacks its own copy
  generator = generator_lib.Generator(config, spec, transformer_lib.decode_params(params))  # as Generator.load
  sampling = generator.sampling()
  context = np.asarray(jax.random.randint(jax.random.key(1), (b, n_ctx), 0, spec.vocab.codebook_size))
  print(f'PyTorch {torch.__version__} ({torch.get_num_threads()} threads) vs nbp-jax, {spec.num_params / 1e6:.0f}M '
        f'params, batch {b}, {n_ctx} context tokens, {layout.num_tokens - n_ctx} generated; sampling top-k '
        f'{sampling.top_k}, top-p {sampling.top_p}', flush=True)
  out = {}
  ctx = jnp.asarray(context)
  for name, block in (('nbp', layout.block_shape), ('ntp', (1, 1, 1))):
    s = spec.with_block_shape(block)
    torch_s = timing.best_of(lambda s=s: reference.generate(context, block_len=s.layout.block_len,
                                                            top_k=sampling.top_k, top_p=sampling.top_p), repeats)
    jax_s = timing.best_of(lambda s=s: generation.generate(s, generator.params, jax.random.key(0), sampling,
                                                           context=ctx), repeats)
    steps = s.layout.decode_plan(n_ctx).num_steps
    out[f'torch_{name}_s'], out[f'jax_{name}_s'] = torch_s, jax_s
    print(f'{name} ({"x".join(map(str, block))}, {steps} steps): PyTorch reference {torch_s:.2f} s/clip, nbp-jax '
          f'{jax_s:.2f} s/clip: {torch_s / jax_s:.2f}x', flush=True)
  out['nbp_ratio'] = out['torch_nbp_s'] / out['jax_nbp_s']
  out['ntp_ratio'] = out['torch_ntp_s'] / out['jax_ntp_s']
  print(' '.join(f'{k}={v:.3f}' for k, v in out.items()))
  return out

