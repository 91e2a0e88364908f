"""Mesh, logical-axis shardings and multi-host detection, on 8 fake CPU devices (tests/conftest.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp_jax import errors
from nbp_jax import parallel
from nbp_jax import trainer
from nbp_jax.parallel import distributed
from nbp_jax.parallel import mesh as mesh_lib
from nbp_jax.parallel import sharding as sharding_lib
import numerics
import trainer_toy as toy


def test_mesh_shape_fills_the_rest_and_names_the_field():
  assert mesh_lib.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert mesh_lib.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r'mesh.shape=\(3, -1, 1\)'):
    mesh_lib.resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match='mesh.shape'):
    mesh_lib.resolve_mesh_shape((2, 2, 1), 8)
  mesh = parallel.create_mesh((2, 4, 1))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_from_json_and_uneven_dims():
  rules = sharding_lib.normalize_rules([['batch', ['data', 'fsdp']], ['embed', 'fsdp'], ['kv', None]])
  assert rules == (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('kv', None))
  mesh = parallel.create_mesh((1, 8, 1))
  # 3 input channels cannot be split 8 ways: that dimension is replicated instead of failing.
  spec = sharding_lib.fit_spec(jax.sharding.PartitionSpec('fsdp', None), (3, 16), mesh)
  assert spec == jax.sharding.PartitionSpec(None, None)


def test_params_left_unsplit_by_odd_dimensions_are_warned_about_once(caplog):
  mesh = parallel.create_mesh((1, 8, 1))
  rules = (('embed', 'fsdp'), ('mlp', None))

  def leaf(shape, names):
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)

  # A 3-channel input (odd, 1% of the bytes) beside weights that split: no warning.
  small = {'conv_in': leaf((3, 64), ('embed', 'mlp')), 'dense': leaf((64, 4096), ('embed', 'mlp'))}
  with caplog.at_level('WARNING'):
    sharding_lib.logical_shardings(small, mesh, rules)
  assert not [r for r in caplog.records if r.levelname == 'WARNING']
  # An embedding width of 60 over 8 FSDP shards: most bytes stay whole on every device, one warning names them.
  odd = {'conv_in': leaf((3, 64), ('embed', 'mlp')), 'dense': leaf((60, 4096), ('embed', 'mlp'))}
  with caplog.at_level('WARNING'):
    shardings = sharding_lib.logical_shardings(odd, mesh, rules)
  assert shardings['dense'].spec == jax.sharding.PartitionSpec(None, None)
  (warning,) = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert warning.startswith('2 of the params') and "['dense'] (60, 4096)" in warning and 'mesh.shape' in warning


def _two_steps(mesh, batches, **task_kw):
  """Losses, the gradient of each step (recorded by an SGD optimizer, see tests/numerics.py), final params, state."""
  cfg = toy.config(mesh=mesh.devices.shape)
  task = dataclasses.replace(toy.make_task(**task_kw), make_optimizer=numerics.sgd_recording_gradients)
  setup = trainer.make_setup(cfg, task, mesh)
  state = trainer.init_state(cfg, task, setup)
  step = trainer.make_train_step(task, setup)
  losses, grads = [], []
  for b in batches:
    state, m = step(state, sharding_lib.make_global_batch(b, setup.batch_sharding))
    losses.append(float(m['loss']))
    grads.append(jax.device_get(numerics.first_gradient(state.opt_state)))
  return losses, grads, jax.device_get(state.params), state


def test_meshes_give_the_same_loss_as_one_device_and_fsdp_splits_params():
  """Same losses, gradients and params on every mesh; FSDP holds ~1/fsdp of the params and momentum per device.

  Gradients to 1e-4 of each leaf's norm (tests/numerics.py): fp32 sums in another order agree to ~3e-7 here.
  """
  it = iter(toy.dataset(16))
  batches = [next(it) for _ in range(2)]
  ref_losses, ref_grads, ref_params, _ = _two_steps(parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1]),
                                                    batches)
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    losses, grads, params, state = _two_steps(parallel.create_mesh(shape), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(shape))
    for i in range(2):
      numerics.assert_trees_close(grads[i], ref_grads[i], rtol=1e-4, err_msg=f'{shape} gradients of step {i + 1}')
    numerics.assert_trees_close(params, ref_params, rtol=1e-5, err_msg=f'{shape} params')
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    per_device = sharding_lib.per_device_bytes(state.params)
    opt_per_device = sharding_lib.per_device_bytes(state.opt_state)
    shards = shape[1] * (shape[2] if shape == (2, 2, 2) else 1)  # embed->fsdp, mlp/vocab->tensor
    if shape[1] > 1:
      # Every parameter with an 'embed' axis is split over fsdp (and 'mlp'/'vocab' over tensor): each device
      # holds ~1/fsdp or less (a little more for the few unsplit biases).
      for dev, nbytes in per_device.items():
        assert total / shards * 0.95 <= nbytes <= total / shape[1] * 1.2, (shape, dev, nbytes, total)
      # The momentum is sharded like the params.
      for dev, nbytes in opt_per_device.items():
        assert nbytes <= total / shape[1] * 1.2 + 64, (shape, dev, nbytes)
      kernel = state.params['params']['mlp_in']['kernel']
      assert kernel.addressable_shards[0].data.size == kernel.size // shards
    else:
      assert all(n == total for n in per_device.values())


def test_adam_moments_are_sharded_like_the_params():
  cfg = toy.config(mesh=(2, 2, 2))
  setup = trainer.make_setup(cfg, toy.make_task(), parallel.create_mesh((2, 2, 2)))
  params = setup.state_shardings.params
  adam = [s for s in jax.tree_util.tree_leaves(setup.state_shardings.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
          if hasattr(s, 'mu')]
  assert len(adam) == 1
  for moment in (adam[0].mu, adam[0].nu):
    jax.tree_util.tree_map(lambda m, p: np.testing.assert_equal(m.spec, p.spec), moment, params)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree_util.tree_leaves(params))


def test_dropout_does_not_depend_on_the_mesh():
  # One key per step, folded from the state's key; with partitionable threefry (the default) each device draws
  # its own slice of the same global random array, so shards get different masks and the result is the mesh's
  # business only, not the model's.
  assert jax.config.jax_threefry_partitionable
  batches = [next(iter(toy.dataset(16)))]
  one, _, _, _ = _two_steps(parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1]), batches, dropout=0.5)
  many, _, _, _ = _two_steps(parallel.create_mesh((2, 2, 2)), batches, dropout=0.5)
  np.testing.assert_allclose(many, one, rtol=1e-5)
  # ... and dropout is on in these steps (the same step without it has another loss).
  off, _, _, _ = _two_steps(parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1]), batches, dropout=0.0)
  assert abs(off[0] - one[0]) > 1e-3 * abs(off[0])


def test_distributed_detection_from_environment():
  want = distributed._wants_distributed  # pylint: disable=protected-access
  assert want({}) is None
  assert want({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert 'SLURM' in want({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'})
  assert 'JAX_COORDINATOR_ADDRESS' in want({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'})
  assert want({'NBP_DISTRIBUTED': '1'}) == 'NBP_DISTRIBUTED=1'
  assert want({'NBP_DISTRIBUTED': '0', 'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}) is None
  assert not parallel.initialize_distributed({})  # single process: nothing to do
  assert parallel.is_primary()


def test_a_failed_distributed_start_is_a_user_error_naming_the_way_out(monkeypatch):
  def unreachable(**kwargs):
    raise RuntimeError(f'DEADLINE_EXCEEDED: no coordinator at {kwargs["coordinator_address"]}')

  monkeypatch.setattr(jax.distributed, 'initialize', unreachable)
  with pytest.raises(errors.UserError, match=r'no coordinator at 10.0.0.1:1234.*or set NBP_DISTRIBUTED=0'):
    parallel.initialize_distributed({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '2',
                                     'JAX_PROCESS_ID': '1'})
