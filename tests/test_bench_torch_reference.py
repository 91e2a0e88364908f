"""The PyTorch reference loop of `bench generate_torch` against nbp-jax: same weights, same greedy codes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax.nbp import generation
from nbp_jax.nbp import sampling as sampling_lib
from nbp_jax.nbp import train
from nbp_jax.nbp import transformer as transformer_lib
from nbp_jax.nbp.spec import spec_from_config

torch = pytest.importorskip('torch')
from nbp_jax.bench import torch_reference  # noqa: E402  (after the skip: it needs torch)


def _spec():
  c = config_lib.task_config('k600', 'micro')  # unconditional, first block never predicted: the K600 layout
  c.tokenizer = config_lib.tokenizer_config('micro')
  c.tokenizer.fsq_levels = (4, 4, 4)  # 64 codes
  c.data.num_frames = 9  # 3 latent frames of 4x4 at 32x32
  c.data.resolution = 32
  c.nbp.context_frames = 1
  c.nbp.block_shape = (1, 1, 4)
  c.model.dropout = 0.0
  return spec_from_config(c)


def test_torch_reference_generates_the_same_greedy_codes_as_nbp_jax():
  spec = _spec()
  # Larger weights than the init's, so that greedy choices are not near-ties that rounding could flip.
  params = transformer_lib.unstack_layers(jax.tree_util.tree_map(
      lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype),
      nn.meta.unbox(train.init_params(spec, jax.random.key(0)))))
  reference = torch_reference.TorchReference(spec, params, threads=1)
  rng = np.random.default_rng(0)
  context = rng.integers(0, spec.vocab.codebook_size, (2, 16)).astype(np.int32)  # the first latent frame
  for block in ((1, 1, 4), (1, 1, 1), (1, 4, 4)):
    s = spec.with_block_shape(block)
    ours = np.asarray(generation.generate(s, params, jax.random.key(0), sampling_lib.Sampling(greedy=True),
                                          context=jnp.asarray(context)))
    theirs = reference.generate(context, block_len=int(np.prod(block)), greedy=True)
    np.testing.assert_array_equal(theirs[:, :16], context)
    np.testing.assert_array_equal(theirs, ours)
    assert len(np.unique(ours[:, 16:])) > 4  # not a degenerate constant continuation


def test_torch_reference_sampling_keeps_the_top_k_and_nucleus():
  spec = _spec()
  params = transformer_lib.unstack_layers(nn.meta.unbox(train.init_params(spec, jax.random.key(1))))
  reference = torch_reference.TorchReference(spec, params, threads=1)
  # Position 0 favours code 3, then 5; top-k 1 can only draw 3, top-p 0.5 too (3 holds more than half the mass).
  logits = torch.full((1, 2, 8), -5.0)
  logits[0, :, 3], logits[0, :, 5] = 4.0, 3.0
  gen = torch.Generator().manual_seed(0)
  for _ in range(20):
    assert reference._sample(logits, gen, False, 1, 1.0).tolist() == [[3, 3]]  # pylint: disable=protected-access
    assert reference._sample(logits, gen, False, 0, 0.5).tolist() == [[3, 3]]  # pylint: disable=protected-access
  draws = {tuple(reference._sample(logits, gen, False, 2, 1.0)[0].tolist()) for _ in range(50)}  # pylint: disable=protected-access
  assert draws <= {(3, 3), (3, 5), (5, 3), (5, 5)} and len(draws) > 1


@pytest.mark.parametrize('attention', ['explicit', 'sdpa'])
def test_torch_training_reference_has_nbp_jax_loss_and_gradients(attention):
  spec = _spec()
  params = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype),
                                  nn.meta.unbox(train.init_params(spec, jax.random.key(0))))
  rng = np.random.default_rng(0)
  batch = {'codes': rng.integers(0, spec.vocab.codebook_size, (2, *spec.layout.latent_shape)).astype(np.int32)}
  loss, grads = jax.value_and_grad(lambda p: train.loss_fn(spec, p, batch, jax.random.key(0), train=False)[0])(params)
  grads = transformer_lib.unstack_layers(grads)
  reference = torch_reference.TorchReference(spec, params, threads=1)
  for t in reference.parameters():
    t.requires_grad_()
  torch_loss = reference.loss(batch, attention)
  torch_loss.backward()
  np.testing.assert_allclose(torch_loss.item(), float(loss), rtol=1e-5)
  lo, hi = spec.vocab.video_slice
  close = lambda t, g: np.testing.assert_allclose(t.grad.numpy(), np.asarray(g), rtol=1e-3, atol=1e-6)
  close(reference.head, grads['head']['kernel'][:, lo:hi])
  close(reference.tok_emb, grads['tok_emb']['embedding'])
  close(reference.pos_emb, grads['pos_emb'])
  last = len(reference.layers) - 1
  close(reference.layers[0]['q'][0], grads['blocks_0']['attn']['query']['kernel'])
  close(reference.layers[last]['fc1'][1], grads[f'blocks_{last}']['mlp']['fc1']['bias'])
  close(reference.layers[last]['ln1'][0], grads[f'blocks_{last}']['ln1']['scale'])


def test_torch_training_reference_step_learns_and_the_benchmark_prints_its_line(capsys):
  config = config_lib.task_config('k600', 'micro')
  config.tokenizer = config_lib.tokenizer_config('micro')
  config.tokenizer.fsq_levels = (4, 4, 4)  # 64 codes
  config.data.batch_size = 8  # the default mesh: the test process's 8 CPU devices
  config.train.bench_steps, config.train.bench_warmup = 1, 1
  spec = spec_from_config(config)
  optim = config.optim.copy_and_resolve_references()
  optim.lr = 1e-2
  step = torch_reference.TorchReference(spec, train.init_params(spec, jax.random.key(0)), threads=1).train_step(optim)
  rng = np.random.default_rng(0)
  batch = {'codes': rng.integers(0, spec.vocab.codebook_size, (2, *spec.layout.latent_shape)).astype(np.int32)}
  losses = [step(batch) for _ in range(4)]
  assert losses[-1] < losses[0]  # the same batch: AdamW steps on the weights take its loss down
  result = torch_reference.run_train(config)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith('jax_step_s=') and ' torch_explicit_step_s=' in last and ' sdpa_ratio=' in last
  assert result['jax_step_s'] > 0 and result['torch_sdpa_step_s'] > 0
