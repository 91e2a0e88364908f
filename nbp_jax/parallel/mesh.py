"""The device mesh: axes ('data', 'fsdp', 'tensor') with sizes from `config.mesh.shape` (-1 = the rest)."""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
from jax.experimental import mesh_utils
import numpy as np

from nbp_jax import config_lib


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills the one -1 in `shape` so that the sizes multiply to `num_devices`; ConfigErrors name mesh.shape."""
  shape = tuple(int(s) for s in shape)
  if sum(1 for s in shape if s == -1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise config_lib.ConfigError(f'mesh.shape={shape}: give positive sizes with at most one -1 ("the remaining '
                                 'devices").')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise config_lib.ConfigError(f'mesh.shape={shape} needs a multiple of {known} devices, but there are '
                                   f'{num_devices}; change --config.mesh.shape.')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise config_lib.ConfigError(f'mesh.shape={shape} uses {math.prod(shape)} devices, but there are {num_devices}; '
                                 f'use -1 for one axis (e.g. (-1, 1, 1)) or set the sizes to multiply to '
                                 f'{num_devices}.')
  return shape


def create_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = config_lib.MESH_AXES,
                devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all devices of all processes), axes of Auto type.

  Auto axes (not jax.make_mesh's Explicit default) so that jit in/out shardings and `with_sharding_constraint`
  drive the partitioner, as the model code expects.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  try:
    # Topology-aware order on TPU/GPU (neighbours on the fast interconnect share the inner axes).
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.sharding.Mesh(device_array, tuple(axis_names), axis_types=auto)


def mesh_from_config(config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The config's mesh (mesh.shape over config_lib.MESH_AXES) on `devices` (default: all devices of all processes)."""
  return create_mesh(tuple(config.mesh.shape), config_lib.MESH_AXES, devices)
