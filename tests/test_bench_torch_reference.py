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
