"""Parameter trees <-> one safetensors file with flat, layer-indexed names (and a lazy reader for big files).

Names are the Flax paths joined by '/', with list entries and scanned layers written as a path segment:

  flax tree                                      safetensors name
  blocks/attn/query/kernel [layers, d, d]        blocks/0/attn/query/kernel [d, d], blocks/1/..., ...
  blocks_3/mlp/fc1/kernel (scan_layers=False)    blocks/3/mlp/fc1/kernel
  encoder_layers_1/fn_2/conv/kernel              encoder_layers/1/fn/2/conv/kernel

so a file does not depend on `model.scan_layers`, and a serving stack sees one tensor per layer. Tensors keep the
Flax layouts (Dense kernels [in, out], conv kernels [kt, kh, kw, in, out]). The header's metadata records the
format and, when given, the run's config (JSON), so a file describes itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import json
import os
import re
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from nbp_jax import errors

PyTree = Any

FORMAT = 'nbp-jax'
DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}
SCANNED = ('blocks',)  # top-level subtrees whose leaves carry a leading layer axis when model.scan_layers
_LIST_ENTRY = re.compile(r'^(.+)_(\d+)$')


class SafetensorsError(errors.UserError, ValueError):
  """A file does not hold what the caller expects; the message names the tensor and the fix."""


def is_float(dtype) -> bool:
  """True for float16/32/64 and bfloat16 (numpy alone does not count bfloat16 as floating)."""
  return bool(jnp.issubdtype(dtype, jnp.floating))


def _segments(path: tuple[str, ...]) -> list[str]:
  out = []
  for part in path:
    m = _LIST_ENTRY.match(part)
    out += [m.group(1), m.group(2)] if m else [part]
  return out


def flatten(params: PyTree, scanned: tuple[str, ...] = SCANNED) -> dict[str, np.ndarray]:
  """Param tree (boxed or not, jax or numpy) -> {flat name: numpy array}, scanned layers split per layer."""
  flat = {}
  for parts, leaf in sorted(traverse_util.flatten_dict(nn.meta.unbox(params)).items()):
    x = np.asarray(jax.device_get(leaf))
    if parts[0] in scanned:
      for i in range(x.shape[0]):
        flat['/'.join(_segments((f'{parts[0]}_{i}',) + parts[1:]))] = x[i]
    else:
      flat['/'.join(_segments(parts))] = x
  return flat


def unflatten(flat: Mapping[str, Any], *, scan_layers: bool, scanned: tuple[str, ...] = SCANNED,
              stack=np.stack) -> PyTree:
  """Inverse of `flatten`: {flat name: array} -> nested dict; `scan_layers` restacks the scanned subtrees.

  `stack` is jnp.stack when the arrays are traced (inside a jitted or exported function).
  """
  arrays: dict[tuple[str, ...], Any] = {}  # path -> array
  stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  for name, x in flat.items():
    parts: list[str] = []
    for seg in name.split('/'):
      if seg.isdigit() and parts:
        parts[-1] = f'{parts[-1]}_{seg}'
      else:
        parts.append(seg)
    m = _LIST_ENTRY.match(parts[0])
    if scan_layers and m and m.group(1) in scanned:
      stacks.setdefault((m.group(1),) + tuple(parts[1:]), {})[int(m.group(2))] = x
      continue
    arrays[tuple(parts)] = x
  for parts, layers in stacks.items():
    if sorted(layers) != list(range(len(layers))):
      missing = sorted(set(range(max(layers) + 1)) - set(layers))
      raise SafetensorsError(f"layer {missing[0]} of '{parts[0]}/{{i}}/{'/'.join(parts[1:])}' is missing; the file "
                             'is incomplete (re-export it).')
    arrays[parts] = stack([layers[i] for i in range(len(layers))])
  for path in arrays:
    if any(path[:i] in arrays for i in range(1, len(path))):
      raise SafetensorsError(f"tensor {'/'.join(path)!r} nests under another tensor; the file is not an nbp-jax "
                             'export.')
  return traverse_util.unflatten_dict(arrays)


def save(params: PyTree, path: str, *, dtype: str = 'float32', metadata: Mapping[str, str] | None = None,
         scanned: tuple[str, ...] = SCANNED) -> dict[str, tuple[int, ...]]:
  """Writes `params` to `path` (atomically) in `dtype` ('float32', 'bfloat16', 'float16'). Returns {name: shape}.

  Integer leaves keep their dtype. `metadata` (str -> str) goes into the header beside {'format': 'nbp-jax'}.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise SafetensorsError(f'export.dtype={dtype!r} is unknown; pick one of {sorted(DTYPES)}.')
  flat = {k: np.ascontiguousarray(v.astype(DTYPES[dtype]) if is_float(v.dtype) else v)
          for k, v in flatten(params, scanned).items()}
  meta = {'format': FORMAT, 'dtype': dtype, **{str(k): str(v) for k, v in (metadata or {}).items()}}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  save_file(flat, tmp, metadata=meta)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # an ordinary file for other readers (the temporary file may be private)
  os.replace(tmp, path)
  return {k: tuple(v.shape) for k, v in flat.items()}


class Reader(Mapping[str, np.ndarray]):
  """A safetensors file as a read-only mapping {name: numpy array}; tensors are read when asked (memory-mapped).

  `shape(name)` needs no read, so a 3B-parameter file can be checked before anything is loaded.
  """

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    if not os.path.exists(path):
      raise errors.MissingError(f'{path} does not exist.')
    self.path = path
    try:
      self._file = safe_open(path, framework='numpy')
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError: header too large, invalid JSON, ...)
      raise SafetensorsError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}); is it damaged, '
                             'or a file of another format with a .safetensors name?') from e
    self._keys = list(self._file.keys())
    self.metadata: dict[str, str] = dict(self._file.metadata() or {})

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._keys:
      raise KeyError(name)
    return self._file.get_tensor(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file.get_slice(name).get_shape())


def load(path: str, *, scan_layers: bool | None = None, dtype: str | None = None,
         scanned: tuple[str, ...] = SCANNED) -> tuple[PyTree, dict[str, str]]:
  """Reads a file written by `save` -> (param tree of numpy arrays, header metadata).

  Args:
    scan_layers: stack the scanned layers (the layout of model.scan_layers=True); default: as the file's config
      says (model.scan_layers), else True.
    dtype: cast floating tensors to this dtype (default: keep the file's).
  """
  reader = Reader(path)
  if scan_layers is None:
    scan_layers = True
    if 'config' in reader.metadata:
      scan_layers = bool(json.loads(reader.metadata['config']).get('model', {}).get('scan_layers', True))
  flat = {}
  for name in reader:
    x = reader[name]
    if dtype is not None and is_float(x.dtype):
      x = x.astype(DTYPES[dtype])
    flat[name] = x
  return unflatten(flat, scan_layers=scan_layers, scanned=scanned), reader.metadata
