"""Teacher-forced objective: scored positions and targets vs a hand-written reference; the trainer Task."""

import math

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nbp_jax import config_lib
from nbp_jax import trainer
from nbp_jax.nbp import attention as attention_lib
from nbp_jax.nbp import train
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.nbp.transformer import Transformer
from nbp_jax.task import Task
import numerics


def _config(first_block='bov'):
  c = config_lib.task_config('demo', 'micro')  # class prefix, 4 classes, 17x32x32 clips
  c.tokenizer = config_lib.tokenizer_config('micro')  # 8x down in space: latent (5, 4, 4) (whatever the demo uses)
  c.nbp.block_shape = (1, 1, 4)
  c.tokenizer.fsq_levels = (4, 4)  # 16 codes
  c.nbp.first_block = first_block
  return c


def _batch(b=2, seed=0):
  rng = np.random.default_rng(seed)
  return {'codes': jnp.asarray(rng.integers(0, 16, (b, 5, 4, 4)), jnp.int32),
          'label': jnp.asarray(rng.integers(0, 4, (b,)), jnp.int32)}


def _reference_loss(spec, params, batch):
  """CE, accuracy and top-5 accuracy from the full forward (all positions, full vocabulary), scoring by hand:
  position q predicts z[q - P]; top-5 by sorting each row."""
  layout, vocab = spec.layout, spec.vocab
  z = np.asarray(layout.grid_to_seq(batch['codes']))
  prefix = vocab.prefix_ids(batch['label'], z.shape[0])
  ids = layout.input_ids(prefix, z, vocab)
  fwd = jax.jit(lambda p, i: Transformer(spec.model).apply({'params': p}, i, layout.block_ids(np.arange(i.shape[1]))))
  logits = np.asarray(fwd(nn.meta.unbox(params), ids))
  lo, hi = vocab.video_slice
  p, off = layout.prefix_len, layout.target_offset
  losses, hits, hits5 = [], [], []
  for q in range(p, layout.seq_len):  # the prefix outputs are skipped
    v = logits[:, q, lo:hi]
    target = z[:, q - p + off]
    logp = v - v.max(-1, keepdims=True) - np.log(np.exp(v - v.max(-1, keepdims=True)).sum(-1, keepdims=True))
    losses.append(-logp[np.arange(z.shape[0]), target])
    top5 = np.argsort(-v, axis=-1)[:, :5]
    hits.append(top5[:, 0] == target)
    hits5.append((top5 == target[:, None]).any(-1))
  return np.mean(losses), np.mean(hits), np.mean(hits5)


def test_loss_scores_video_targets_only():
  for first in ('bov', 'none'):
    spec = spec_from_config(_config(first))
    params = jax.jit(lambda r, spec=spec: train.init_params(spec, r))(jax.random.key(0))
    batch = _batch()
    loss, metrics = jax.jit(lambda p, b, spec=spec: train.loss_fn(spec, p, b, None, train=False))(params, batch)
    ref_loss, ref_accuracy, ref_top5 = _reference_loss(spec, params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics['accuracy'], ref_accuracy, atol=1e-6)
    np.testing.assert_allclose(metrics['top5_accuracy'], ref_top5, atol=1e-6)
    assert ref_accuracy < ref_top5 < 1  # the metrics are informative for this batch (16 codes, random model)
    logits, targets = jax.eval_shape(lambda p, spec=spec, batch=batch: train.logits_fn(spec, p, batch), params)
    assert logits.shape == (2, spec.layout.num_targets, 16) and targets.shape == (2, spec.layout.num_targets)


def test_condition_dropout_uses_the_null_embedding():
  spec = spec_from_config(_config())
  params = nn.meta.unbox(jax.jit(lambda r: train.init_params(spec, r))(jax.random.key(0)))
  null_rows = lambda seed: jax.random.normal(jax.random.key(seed), params['uncond_embedding'].shape)
  params['uncond_embedding'] = null_rows(0)
  batch = _batch()
  other = dict(batch, label=(batch['label'] + 1) % 4)
  loss = jax.jit(lambda p, b, drop: train.loss_fn(spec, p, b, jax.random.key(2), True, drop)[0],
                 static_argnums=2)
  # Dropout off (micro demo has model.dropout 0); cond_drop_prob ~1 drops every prefix: labels stop mattering.
  a, b, c = loss(params, batch, 0.999999), loss(params, other, 0.999999), loss(params, other, 0.0)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert abs(float(a) - float(c)) > 1e-4
  # The dropped prefix is the null embedding itself (not zeros, nor the prefix left out): the loss follows its values
  # (other values: a constant added to every feature would not do, the first LayerNorm removes it).
  other_null = dict(params, uncond_embedding=null_rows(1))
  # (An init-scale model: the prefix moves the loss by ~1e-4; rounding moves it by < 1e-6, as a == b shows.)
  assert abs(float(loss(other_null, batch, 0.999999)) - float(a)) > 1e-5


def test_make_task_trains():
  config = _config()
  task = train.make_task(config)
  assert isinstance(task, Task) and task.name == 'nbp'
  assert task.tokens_per_example == 80
  params = task.init_params(jax.random.key(0))
  assert isinstance(params['head']['kernel'], nn.LogicallyPartitioned)
  params = nn.meta.unbox(params)
  opt = optax.adam(3e-3)
  state = opt.init(params)
  batch = _batch(4)

  @jax.jit
  def step(params, state, rng):
    (loss, _), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, rng, True)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(30):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses


def _dot_flops(jaxpr) -> int:
  """FLOPs (2 per multiply-add) of the dot_generals a jaxpr runs, into every sub-jaxpr, scans times their length."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
    inner = [_dot_flops(j) for j in jax_core.jaxprs_in_params(eqn.params)]
    if inner:
      total += (max(inner) if eqn.primitive.name == 'cond' else sum(inner)) * eqn.params.get('length', 1)
  return total


@pytest.mark.parametrize('levels,scan_layers', [((4, 4), True), ((8, 8, 8), False)])
def test_flops_per_example_is_three_forwards_of_the_matmuls_with_half_the_attention(levels, scan_layers):
  """The MFU's numerator: forward + backward = 3 forwards of the matmuls the model runs (counted from its jaxpr;
  16 and 512 codes, so the head is ~1% and ~30% of them), with attention's two products counted over the half of
  the (query, key) pairs that the block-causal mask leaves visible (the forward computes them over all pairs)."""
  config = _config()
  config.tokenizer.fsq_levels = levels
  config.model.scan_layers = scan_layers
  spec = spec_from_config(config)
  params = nn.meta.unbox(jax.eval_shape(lambda r: train.init_params(spec, r), jax.random.key(0)))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), _batch())
  forward = jax.make_jaxpr(lambda p, b: train.loss_fn(spec, p, b, None, train=False)[0])(params, batch)
  m, s = spec.model, spec.layout.seq_len
  all_pairs_attention = m.num_layers * 2 * (2 * s * s * m.emb_dim)  # q.k and p.v over s x s pairs
  np.testing.assert_allclose(train.flops_per_example(spec),
                             3 * (_dot_flops(forward.jaxpr) - all_pairs_attention / 2), rtol=1e-9)
  assert train.make_task(config).flops_per_example == train.flops_per_example(spec)


def test_remat_gives_the_same_gradients_and_keeps_attention_chunked(monkeypatch):
  """Rematerialised layers: the same gradients, and the block ids stay static inside them, so attention still
  takes its chunked path (traced ids would fall back to the whole [T, T] mask, and on TPU off the splash kernel)."""
  monkeypatch.setattr(attention_lib, 'XLA_QUERY_CHUNK', 16)  # the micro clip's 84 positions: chunks of 16
  chunked_calls = []
  real = attention_lib.chunked_attention
  monkeypatch.setattr(attention_lib, 'chunked_attention', lambda *a, **k: chunked_calls.append(1) or real(*a, **k))
  config = _config()
  config.model.dropout = 0.1
  grads = []
  for remat in (False, True):
    config.model.remat = remat
    spec = spec_from_config(config)
    params = jax.jit(lambda r, spec=spec: train.init_params(spec, r))(jax.random.key(0))
    loss = lambda p, spec=spec: train.loss_fn(spec, p, _batch(), jax.random.key(1), True, 0.5)[0]
    chunked_calls.clear()
    grads.append(jax.jit(jax.grad(loss))(params))
    assert chunked_calls, f'remat={remat}: attention did not take its chunked path'
  numerics.assert_trees_close(grads[1], grads[0], rtol=1e-4)  # measured ~3e-7 (tests/numerics.py)
  # Traced block ids cannot stay static inside the rematerialised layers: a clear error, not a silent fallback.
  seq_len = spec.layout.seq_len
  forward = lambda p, block_ids: Transformer(spec.model).apply({'params': nn.meta.unbox(p)},
                                                               jnp.zeros((1, seq_len), jnp.int32), block_ids)
  with pytest.raises(ValueError, match='model.remat needs block ids known at trace time'):
    jax.jit(forward)(params, jnp.asarray(spec.layout.block_ids(np.arange(seq_len))))


def test_logical_axis_names_shard_on_a_2x2x2_mesh():
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 8:
    pytest.skip(f'needs 8 devices, has {jax.device_count()} (tests/conftest.py asks XLA for 8 CPU devices unless '
                'XLA_FLAGS already sets a count)')
  spec = spec_from_config(_config())
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), config_lib.MESH_AXES)
  abstract = jax.eval_shape(lambda: train.init_params(spec, jax.random.key(0)))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, config_lib.DEFAULT_AXIS_RULES)
  params = jax.jit(lambda r: nn.meta.unbox(train.init_params(spec, r)), out_shardings=shardings)(jax.random.key(0))
  assert params['head']['kernel'].sharding.spec == PartitionSpec('fsdp', 'tensor')
  batch = jax.device_put(_batch(8), NamedSharding(mesh, PartitionSpec(('data', 'fsdp'))))
  loss = jax.jit(lambda p, b: train.loss_fn(spec, p, b, None, False)[0])
  np.testing.assert_allclose(loss(params, batch), loss(jax.device_get(params), jax.device_get(batch)), rtol=1e-5)


def test_train_benchmark_reports_mfu_against_the_measured_cpu_peak(capsys):
  from nbp_jax.bench import train as train_bench  # pylint: disable=g-import-not-at-top
  config = _config()
  config.data.batch_size = 8
  config.train.bench_steps, config.train.bench_warmup = 2, 1
  result = train_bench.run(config)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  # CPU has no datasheet peak: the MFU is against this machine's measured matmul rate, so it is a finite fraction.
  assert last.endswith('peak_source=measured') and ' mfu=nan' not in last
  assert 0 < result['mfu'] < 1
  np.testing.assert_allclose(result['achieved_flops'], train.flops_per_example(spec_from_config(config)) * 8
                             / result['step_s'], rtol=1e-6)


def test_grid_pos_emb_init_encodes_each_position_s_grid_place():
  c = _config()
  c.nbp.block_shape = (1, 4, 4)  # frame blocks: a position and the one a block later are one latent frame apart
  c.model.pos_emb_init = 'grid'
  spec = spec_from_config(c)
  layout = spec.layout
  pos = np.asarray(nn.meta.unbox(trainer.jit_init(lambda r: train.init_params(spec, r), jax.random.key(0)))['pos_emb'])
  release = _config()
  release.model.pos_emb_init = 'zeros'
  release_spec = spec_from_config(release)
  zeros = np.asarray(nn.meta.unbox(trainer.jit_init(lambda r: train.init_params(release_spec, r),
                                                    jax.random.key(0)))['pos_emb'])
  assert pos.shape == zeros.shape and not zeros.any()  # the same parameter; the release's init is zeros
  used = pos[:layout.seq_len]
  np.testing.assert_array_equal(used[:layout.prefix_len], 0.0)  # the class prefix has no grid place
  np.testing.assert_array_equal(pos[layout.seq_len:], 0.0)
  video = used[layout.prefix_len:]
  np.testing.assert_allclose(np.sqrt(np.mean(video[:, :video.shape[1] // 6 * 6] ** 2)), 0.02, rtol=0.25)
  # Distinct grid places get distinct rows; by hand: position q (t, h, w) vs the one a frame later (t + 1, h, w)
  # differ only in the t columns (the first d // 6 sin/cos pairs).
  d6 = c.model.emb_dim // 6
  assert len({tuple(np.round(r, 7)) for r in video}) == len(video)
  frame = 16
  np.testing.assert_allclose(video[:frame, 2 * d6:], video[frame:2 * frame, 2 * d6:], atol=1e-7)
  assert not np.allclose(video[:frame, :2 * d6], video[frame:2 * frame, :2 * d6])
