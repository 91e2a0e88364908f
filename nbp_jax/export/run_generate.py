r"""Runs an exported generation function with JAX alone (no nbp_jax, no Flax): copied into WORKDIR/export/.

  python WORKDIR/export/run_generate.py --seed=0 --labels=0,1,2,3 --out=samples.npz
  python WORKDIR/export/run_generate.py --seed=0 --context=frames.npy --out=samples.npz   # frame prediction

Reads generate.json (the signature) and generate.stablehlo beside it, the weights from the safetensors files the
signature names, calls the function once and writes its outputs (codes int32 [B, t, h, w], and video uint8
[B, T, H, W, 3] when the export includes the tokenizer) to an .npz file.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import jax
import ml_dtypes  # ships with jax
import numpy as np

_DTYPES = {'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16, 'F64': np.float64, 'I32': np.int32,
           'I64': np.int64, 'U8': np.uint8, 'U32': np.uint32, 'BOOL': np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a safetensors file (format: u64 header size, JSON header, raw little-endian data)."""
  with open(path, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(size))
  data = np.memmap(path, np.uint8, mode='r', offset=8 + size)  # read on demand, not copied up front
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    start, end = info['data_offsets']
    out[name] = data[start:end].view(_DTYPES[info['dtype']]).reshape(info['shape'])
  return out


def load(export_dir: str):
  """(signature dict, deserialized jax.export.Exported, weights list in the order of the inputs)."""
  with open(os.path.join(export_dir, 'generate.json')) as f:
    sig = json.load(f)
  with open(os.path.join(export_dir, sig['program']), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  files = {}
  weights = []
  for spec in sig['inputs']:
    if 'file' in spec:
      if spec['file'] not in files:
        files[spec['file']] = read_safetensors(os.path.join(export_dir, spec['file']))
      weights.append(files[spec['file']][spec['tensor']])
  return sig, exported, weights


def make_inputs(sig: dict, seed: int, labels=None, context=None) -> list:
  """The non-weight inputs, checked against the signature."""
  args = []
  for spec in sig['inputs']:
    if 'file' in spec:
      continue
    name, shape, dtype = spec['name'], tuple(spec['shape']), np.dtype(spec['dtype'])
    if name == 'key':
      x = np.array([0, seed], np.uint32)  # = jax.random.PRNGKey(seed) (threefry)
    elif name == 'labels':
      x = np.arange(shape[0]) % sig['num_classes'] if labels is None else np.asarray(labels)
    elif name.startswith('context'):
      if context is None:
        raise SystemExit(f'this export predicts frames: pass --context with {name} {list(shape)} {dtype}.')
      x = np.asarray(context)
    else:
      raise SystemExit(f'unknown input {name!r} in generate.json.')
    if tuple(x.shape) != shape:
      raise SystemExit(f'{name} must have shape {list(shape)}; got {list(x.shape)}.')
    args.append(x.astype(dtype))
  return args


def generate(export_dir: str, seed: int = 0, labels=None, context=None) -> dict[str, np.ndarray]:
  """Loads and runs the export; returns {output name: array}."""
  sig, exported, weights = load(export_dir)
  outs = exported.call(*make_inputs(sig, seed, labels, context), *weights)
  return {o['name']: np.asarray(x) for o, x in zip(sig['outputs'], outs)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description='Run an nbp-jax StableHLO export with JAX alone.')
  parser.add_argument('--dir', default=os.path.dirname(os.path.abspath(__file__)), help='the export folder')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--labels', default=None, help='comma-separated class ids, one per sample')
  parser.add_argument('--context', default=None, help='.npy of context frames (uint8) or codes (int32)')
  parser.add_argument('--out', default='samples.npz')
  args = parser.parse_args(argv)
  labels = None if args.labels is None else [int(x) for x in args.labels.split(',')]
  context = None if args.context is None else np.load(args.context)
  outs = generate(args.dir, args.seed, labels, context)
  np.savez(args.out, **outs)
  print(f'Wrote {", ".join(f"{k} {list(v.shape)}" for k, v in outs.items())} to {args.out}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
