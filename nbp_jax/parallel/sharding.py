"""Logical axis names -> mesh shardings for params, optimizer state and batches.

Models name every parameter axis (`nn.with_logical_partitioning(init, ('embed', 'mlp'))`); `config.mesh.axis_rules`
maps those names to mesh axes. Changing the parallelism is a config change, not a code change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from nbp_jax import config_lib

PyTree = Any
Rules = tuple[tuple[str, Any], ...]


def normalize_rules(rules: Sequence[Sequence[Any]]) -> Rules:
  """Rules as hashable tuples: ('batch', ['data', 'fsdp']) (as read back from JSON) -> ('batch', ('data', 'fsdp'))."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'mesh.axis_rules entry {rule!r} must be (logical_name, mesh_axis | (mesh_axes...) | None).')
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes) if len(axes) != 1 else axes[0]
    out.append((str(name), axes))
  return tuple(out)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A whole copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def _axis_size(mesh: jax.sharding.Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh, name: str = '') -> P:
  """Drops mesh axes from dimensions they do not divide (that dimension is then replicated), so odd sizes such
  as a 3-channel conv input never make sharding fail; logs what it dropped."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, axes in zip(shape, entries[:len(shape)]):
    if axes is not None and dim % _axis_size(mesh, axes):
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
      kept = []
      for a in axes_t:  # keep the longest prefix of mesh axes that still divides the dimension
        if dim % (_axis_size(mesh, tuple(kept + [a]))) == 0:
          kept.append(a)
        else:
          break
      logging.info('%s: dimension of size %d is not divisible by mesh axes %s; sharding it over %s only.',
                   name or 'array', dim, axes_t, tuple(kept) or 'nothing')
      axes = None if not kept else (kept[0] if len(kept) == 1 else tuple(kept))
    out.append(axes)
  return P(*out)


# logical_shardings warns when at least this share of the params' bytes lose a mesh axis to an odd dimension:
# every device then holds those whole, which at scale is the difference between fitting in memory and not.
UNSHARDED_WARNING_SHARE = 0.05


def logical_shardings(abstract: PyTree, mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]]) -> PyTree:
  """NamedShardings for the *unboxed* version of `abstract`, a tree whose leaves may be `nn.LogicallyPartitioned`.

  Unnamed leaves are replicated. `abstract` holds ShapeDtypeStructs (from `jax.eval_shape`) or arrays. Where mesh
  axes do not divide a dimension (fit_spec) and the leaves concerned are UNSHARDED_WARNING_SHARE or more of all
  bytes, one warning names the largest and the mesh axes to change.
  """
  rules = normalize_rules(rules)
  specs = nn.get_partition_spec(abstract)  # logical names per leaf; P() for unboxed leaves
  values = nn.unbox(abstract)
  total_bytes, unsplit = 0, []  # unsplit: (bytes, name, shape, wanted spec) of leaves fit_spec changed

  def one(path, spec, value):
    nonlocal total_bytes
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else P()
    fitted = fit_spec(mesh_spec, value.shape, mesh, jax.tree_util.keystr(path))
    size = math.prod(value.shape) * np.dtype(value.dtype).itemsize
    total_bytes += size
    if _mesh_ways(mesh, fitted) < _mesh_ways(mesh, mesh_spec):
      unsplit.append((size, jax.tree_util.keystr(path), tuple(value.shape), mesh_spec))
    return NamedSharding(mesh, fitted)

  out = jax.tree_util.tree_map_with_path(
      lambda path, spec, value: one(path, spec, value), specs, values, is_leaf=lambda x: isinstance(x, P))
  unsplit_bytes = sum(u[0] for u in unsplit)
  if total_bytes and unsplit_bytes >= UNSHARDED_WARNING_SHARE * total_bytes:
    size, name, shape, spec = max(unsplit)
    logging.warning(
        '%d of the params (%.0f%% of their %.1f MiB) are split over fewer devices than mesh.axis_rules ask, because '
        'the mesh axes do not divide their dimensions; the largest is %s %s (wanted %s on mesh %s). Pick mesh.shape '
        'sizes that divide the model dimensions (heads, embed, mlp, vocab) to shard them.', len(unsplit),
        100 * unsplit_bytes / total_bytes, total_bytes / 2**20, name, shape, spec, dict(mesh.shape))
  return out


def _mesh_ways(mesh: jax.sharding.Mesh, spec: P) -> int:
  """Over how many devices a PartitionSpec splits an array on `mesh`."""
  return math.prod(_axis_size(mesh, axes) for axes in spec)


def match_shardings(tree: PyTree, params: PyTree, param_shardings: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Shardings for a tree that embeds copies of `params` (optimizer moments, accumulated gradients, EMA).

  A leaf whose key path ends with a parameter's key path and has that parameter's shape gets that parameter's
  sharding (so FSDP shards Adam's mu/nu like the weights); anything else (step counts, scalars) is replicated.
  This works for any optax chain (masked, multi_transform, MultiSteps) without knowing its state classes.
  """
  table: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}
  for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(param_shardings)):
    table[tuple(path)] = (tuple(p.shape), s)

  def one(path, leaf):
    shape = tuple(np.shape(leaf))
    path = tuple(path)
    for k in range(len(path) + 1):
      hit = table.get(path[k:])
      if hit is not None and hit[0] == shape and (k < len(path) or not path):
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_axes(rules: Sequence[Sequence[Any]]) -> Any:
  """Mesh axes that split the batch (the 'batch' logical rule, default ('data', 'fsdp'))."""
  for name, axes in normalize_rules(rules):
    if name == 'batch':
      return axes
  return ('data', 'fsdp')


def batch_sharding(mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]]) -> NamedSharding:
  """Sharding of every batch leaf: leading (example) dimension split over the batch mesh axes."""
  return NamedSharding(mesh, P(batch_axes(rules)))


def num_batch_shards(mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]]) -> int:
  """How many ways the rules split the batch over the mesh (the global batch must be a multiple)."""
  return _axis_size(mesh, batch_axes(rules))


@functools.lru_cache(maxsize=64)  # make_global_batch asks at every step, for the same sharding
def process_data_shard(sharding: NamedSharding) -> tuple[int, int]:
  """(index, count): this process feeds part `index` of `count` equal parts of every global batch, the rows its
  devices hold under `sharding`. Processes whose devices hold the same rows get the same index: where a batch
  axis stays within hosts and another axis (e.g. 'tensor') spans them, each host loads the same examples, not a
  share of its own (the data pipeline's `shard_index` / `shard_count`)."""
  spec = sharding.spec[0] if len(sharding.spec) else None
  shards = _axis_size(sharding.mesh, spec)
  rows = sharding.devices_indices_map((shards,))  # device -> the batch shards it holds, as a slice of one row each
  held = sorted({i for d in sharding.addressable_devices for i in range(*rows[d][0].indices(shards))})
  n, first = len(held), held[0]
  if held != list(range(first, first + n)) or first % n or shards % n:
    raise config_lib.ConfigError(
        f'this process\'s devices hold batch shards {held} of {shards}, not one contiguous part of the batch (mesh '
        f'{dict(sharding.mesh.shape)}, batch over {spec}); order the mesh so that each host\'s devices are '
        'neighbours on the batch axes (mesh.shape).')
  return first // n, shards // n


def make_global_batch(local_batch: Mapping[str, Any], sharding: NamedSharding) -> PyTree:
  """This host's part of the batch (numpy, leading dim = global batch / process_data_shard's count) -> global
  jax.Arrays."""
  _, count = process_data_shard(sharding)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (len(x) * count, *np.shape(x)[1:])),
      dict(local_batch))


def per_device_bytes(tree: PyTree) -> dict[jax.Device, int]:
  """Bytes of `tree` held by each local device (to check that FSDP really splits the parameters)."""
  out: dict[jax.Device, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
