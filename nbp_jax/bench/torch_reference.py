r"""Same-machine PyTorch references: nbp-jax and a PyTorch KV-cache loop (generation), or a PyTorch training step
of the same model, one run each.

  pip install -r requirements-torch.txt
  python -m nbp_jax.bench generate_torch --config=configs/bench_cpu.py
  python -m nbp_jax.bench train_torch --config=configs/bench_cpu.py --config.data.batch_size=2 \
      --config.mesh.shape='(1,1,1)' --config.train.bench_steps=3

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

`train_torch` (`run_train`) times `bench train` (nbp-jax's trainer step), then the same model's step in PyTorch:
nbp-jax's objective (the cross-entropy of the video targets over the video codes; its loss and gradients match
nbp-jax's, tests/test_bench_torch_reference.py), gradient clipping and AdamW with the config's settings, with the
attention as a masked softmax (the official code's form; issue #16 measured that step at 19.3 s) and as torch's
fused `scaled_dot_product_attention`. Its metrics (accuracy, top-5) are not computed: the official step does not.
"""

from __future__ import annotations

import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nbp_jax import config_lib
from nbp_jax import timing
from nbp_jax import trainer
from nbp_jax.nbp import attention as attention_lib
from nbp_jax.nbp import generation
from nbp_jax.nbp import layout as layout_lib
from nbp_jax.nbp import train
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.spec import spec_from_config


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the PyTorch reference needs torch: pip install 'nbp-jax[torch]' (or -r requirements-torch.txt "
                      'in a checkout)') from e
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

  def _forward(self, x, cache, offset: int, mask, attention: str = 'explicit', dropout: float = 0.0):
    """x [B, T, d] at positions offset.. -> the final layer norm's output [B, T, d]. With a cache (per layer
    {'k', 'v'} [B, H, len, D]) writes this group's K/V at `offset` and attends to the cache up to it; with None (the
    training forward) to x's own. mask bool [T, keys] or None; attention 'explicit' (a masked softmax, as the
    official code) or 'sdpa' (torch's fused `scaled_dot_product_attention`); dropout on the embeddings and both
    residual branches, as nbp-jax's."""
    torch, m = self.torch, self.spec.model
    f = torch.nn.functional
    b, n, d = x.shape
    heads, hd = m.num_heads, m.head_dim
    drop = lambda y: f.dropout(y, dropout, training=True) if dropout else y
    x = drop(x)
    for i, layer in enumerate(self.layers):
      h = f.layer_norm(x, (d,), *layer['ln1'], eps=1e-5)
      split = lambda y: y.view(b, n, heads, hd).transpose(1, 2)
      q = split(h @ layer['q'][0] + layer['q'][1])
      k, v = split(h @ layer['k'][0] + layer['k'][1]), split(h @ layer['v'][0] + layer['v'][1])
      if cache is not None:
        w = cache[i]
        w['k'][:, :, offset:offset + n], w['v'][:, :, offset:offset + n] = k, v
        k, v = w['k'][:, :, :offset + n], w['v'][:, :, :offset + n]
      if attention == 'sdpa':
        y = f.scaled_dot_product_attention(q, k, v, attn_mask=mask)
      else:
        att = (q @ k.transpose(-2, -1)) * hd ** -0.5
        if mask is not None:
          att = att.masked_fill(~mask, float('-inf'))
        y = att.softmax(-1) @ v
      x = x + drop(y.transpose(1, 2).reshape(b, n, d) @ layer['proj'][0] + layer['proj'][1])
      h = f.layer_norm(x, (d,), *layer['ln2'], eps=1e-5)
      x = x + drop(f.gelu(h @ layer['fc1'][0] + layer['fc1'][1]) @ layer['fc2'][0] + layer['fc2'][1])
    return f.layer_norm(x, (d,), *self.ln_f, eps=1e-5)

  def parameters(self) -> list:
    """Every weight tensor (the head's video columns only: the only ones the objective uses)."""
    tensors = [self.tok_emb, self.pos_emb, *self.ln_f, self.head]
    if self.uncond is not None:
      tensors.append(self.uncond)
    for layer in self.layers:
      tensors += [t for pair in layer.values() for t in pair]
    return tensors

  def loss(self, batch: dict[str, np.ndarray], attention: str = 'explicit'):
    """nbp-jax's teacher-forced objective (`nbp.train.loss_fn`'s loss; no condition dropout) on batch {'codes'
    [B, t, h, w], 'label' [B] (class-conditional)}: the mean cross-entropy of the video targets over the video
    codes. Returns a scalar tensor."""
    torch, spec = self.torch, self.spec
    layout, vocab = spec.layout, spec.vocab
    codes = layout.grid_to_seq(jnp.asarray(batch['codes'], jnp.int32))
    ids = np.asarray(layout.input_ids(vocab.prefix_ids(batch.get('label'), codes.shape[0]), codes, vocab))
    targets = torch.from_numpy(np.asarray(layout.targets(codes)[0][:, layout.prefix_len:], np.int64))
    blocks = layout.block_ids(np.arange(ids.shape[1]))
    mask = torch.from_numpy(np.asarray(attention_lib.block_mask(blocks, blocks)))
    x = self.tok_emb[torch.from_numpy(ids.astype(np.int64))] + self.pos_emb[:ids.shape[1]]
    h = self._forward(x, None, 0, mask, attention, spec.model.dropout)[:, layout.prefix_len:]
    logits = h @ self.head
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

  def train_step(self, optim: ml_collections.ConfigDict, attention: str = 'explicit'):
    """-> step(batch) -> loss: forward, backward, gradient clipping (optim.grad_clip) and AdamW (optim's betas and
    decay on the linear maps' weights only, as nbp-jax's; a constant learning rate) on this model's weights, in
    place."""
    torch = self.torch
    params = [t.requires_grad_() for t in self.parameters()]
    embeddings = [self.tok_emb, self.pos_emb] + ([self.uncond] if self.uncond is not None else [])
    decayed = [t for t in params if t.ndim >= 2 and not any(t is e for e in embeddings)]
    groups = [{'params': decayed, 'weight_decay': float(optim.weight_decay)},
              {'params': [t for t in params if not any(t is d for d in decayed)], 'weight_decay': 0.0}]
    opt = torch.optim.AdamW(groups, lr=float(optim.lr), betas=(float(optim.b1), float(optim.b2)))

    def step(batch):
      opt.zero_grad(set_to_none=True)
      loss = self.loss(batch, attention)
      loss.backward()
      if optim.grad_clip and optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, float(optim.grad_clip))
      opt.step()
      return loss.item()
    return step

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
  params = trainer.jit_init(lambda r: train.init_params(spec, r), jax.random.key(config.seed))
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
    print(f'{name} ({layout_lib.block_name(block)}, {steps} steps): PyTorch reference {torch_s:.2f} s/clip, nbp-jax '
          f'{jax_s:.2f} s/clip: {torch_s / jax_s:.2f}x', flush=True)
  out['nbp_ratio'] = out['torch_nbp_s'] / out['jax_nbp_s']
  out['ntp_ratio'] = out['torch_ntp_s'] / out['jax_ntp_s']
  print(' '.join(f'{k}={v:.3f}' for k, v in out.items()))
  return out


def run_train(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The training step of nbp-jax (`bench train`: the trainer's own step) and of the PyTorch reference on the same
  model, batch and optimizer settings, one run: explicit masked-softmax attention (the official code's form) and
  torch's fused `scaled_dot_product_attention`. Each: `train.bench_warmup` steps, then the median of
  `train.bench_steps`. Last line: `jax_step_s=.. torch_explicit_step_s=.. torch_sdpa_step_s=.. explicit_ratio=..
  sdpa_ratio=..` (ratio = torch / jax s/step)."""
  from nbp_jax.bench import train as train_bench  # pylint: disable=g-import-not-at-top

  torch = _torch()
  if jax.process_count() > 1 or config.optim.grad_accum_steps != 1:
    raise ValueError('the PyTorch training reference runs one process without gradient accumulation '
                     '(--config.optim.grad_accum_steps=1).')
  jax_s = train_bench.run(config)['step_s']
  spec = spec_from_config(config)
  steps, warmup = int(config.train.get('bench_steps', 10)), int(config.train.get('bench_warmup', 2))
  batch = train_bench.random_batch(config, int(config.data.batch_size))
  print(f'PyTorch {torch.__version__} ({torch.get_num_threads()} threads), the same model and batch '
        f'({int(config.data.batch_size)} x {spec.layout.seq_len} positions, {spec.model.dtype})', flush=True)
  out = {'jax_step_s': jax_s}
  params = trainer.jit_init(lambda r: train.init_params(spec, r), jax.random.key(config.seed))
  for attention in ('explicit', 'sdpa'):
    # A reference of its own for each (TorchReference copies the weights): its training updates them in place.
    step = TorchReference(spec, params).train_step(config.optim, attention)
    times = timing.timings(lambda step=step: step(batch), steps, warmup=warmup)
    out[f'torch_{attention}_step_s'] = statistics.median(times)
    print(f'PyTorch, {attention} attention: {out[f"torch_{attention}_step_s"]:.2f} s/step (min {min(times):.2f}); '
          f'nbp-jax {jax_s:.2f} s/step: {out[f"torch_{attention}_step_s"] / jax_s:.2f}x', flush=True)
  out['explicit_ratio'] = out['torch_explicit_step_s'] / jax_s
  out['sdpa_ratio'] = out['torch_sdpa_step_s'] / jax_s
  print(' '.join(f'{k}={v:.3f}' for k, v in out.items()))
  return out
