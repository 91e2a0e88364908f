r"""Runs an exported generation function with JAX alone (no nbp_jax, no Flax): copied into WORKDIR/export/.

  python WORKDIR/export/run_generate.py --seed=0 --labels=0,1,2,3 --out=samples.npz --video=samples.mp4
  python WORKDIR/export/run_generate.py --seed=0 --context=clip.mp4 --out=samples.npz   # frame prediction

Reads generate.json (the signature) and generate.stablehlo beside it, the weights from the safetensors files the
signature names, calls the function once and writes its outputs (codes int32 [N, t, h, w], and video uint8
[N, T, H, W, 3] when the export includes the tokenizer) to an .npz file, and with --video the N videos side by side
as one mp4. The function has a fixed batch B: N = the number of labels or context clips given (at most B; they are
padded to B and the extra outputs dropped), else B. Context: a video file (.mp4, or anything ffmpeg reads; needs the
imageio-ffmpeg package) holding at least the export's context frames at its resolution, several files separated by
commas, or a .npy of uint8 frames [N, F, H, W, 3] (or int32 codes [N, t, h, w] for an export without tokenizer).
Make one from any video with `ffmpeg -i in.mp4 -vf scale=W:H -frames:v F clip.mp4` (generate.json has F, H, W).
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


def read_video(path: str) -> np.ndarray:
  """uint8 [T, H, W, 3] frames of a video file, decoded with the ffmpeg of imageio-ffmpeg."""
  try:
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit(f'reading {path} needs the imageio-ffmpeg package (pip install imageio-ffmpeg); or pass the '
                     'frames as a .npy file.') from None
  if not os.path.isfile(path):
    raise SystemExit(f'--context {path} does not exist.')
  reader = imageio_ffmpeg.read_frames(path)
  meta = next(reader)
  w, h = meta['size']
  frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
  if not frames:
    raise SystemExit(f'--context {path} holds no frames.')
  return np.stack(frames)


def write_video(path: str, videos: np.ndarray, fps: float = 8.0) -> None:
  """uint8 [N, T, H, W, 3] -> one mp4 with the N videos side by side (needs imageio-ffmpeg)."""
  try:
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit('--video needs the imageio-ffmpeg package (pip install imageio-ffmpeg); the .npz has the '
                     "videos as the array 'video'.") from None
  row = np.concatenate(list(videos), axis=2)  # [T, H, N * W, 3]
  t, h, w, _ = row.shape
  row = np.pad(row, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))  # yuv420p wants even sizes
  writer = imageio_ffmpeg.write_frames(path, (row.shape[2], row.shape[1]), fps=fps, macro_block_size=1,
                                       output_params=['-crf', '18'])
  writer.send(None)
  for frame in row:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


def load_context(arg: str, spec: dict) -> np.ndarray:
  """--context (.npy, or video files separated by commas) -> [N, ...] in the shape of the signature's input."""
  want = tuple(spec['shape'][1:])
  if arg.endswith('.npy'):
    x = np.load(arg)
    if x.ndim == len(want):
      x = x[None]  # one clip
  elif len(want) != 4:
    raise SystemExit(f'this export takes context codes {list(want)}, not video; pass a .npy of int32 codes.')
  else:
    clips = [read_video(p)[:want[0]] for p in arg.split(',')]
    if len({c.shape for c in clips}) > 1:
      raise SystemExit(f'the --context videos differ in shape: {[list(c.shape) for c in clips]}.')
    x = np.stack(clips)
  if x.ndim == len(want) + 1 and x.shape[1] > want[0] and x.shape[2:] == want[1:]:
    x = x[:, :want[0]]  # a longer clip: its first frames are the context
  if tuple(x.shape[1:]) != want:
    hint = ''
    if len(want) == 4:
      hint = (f' Make one with `ffmpeg -i in.mp4 -vf scale={want[2]}:{want[1]} -frames:v {want[0]} clip.mp4`.')
    raise SystemExit(f'--context {arg} has clips of shape {list(x.shape[1:])}; this export takes {list(want)} '
                     f'(frames x height x width x channels for video).{hint}')
  return x


def make_inputs(sig: dict, seed: int, labels=None, context=None) -> tuple[list, int]:
  """The non-weight inputs, checked against the signature, and N: how many of the B outputs were asked for.

  Fewer labels or context clips than the batch B are padded to B (repeating them); the caller keeps the first N.
  """
  specs = [spec for spec in sig['inputs'] if 'file' not in spec]
  if labels is not None and not any(spec['name'] == 'labels' for spec in specs):
    raise SystemExit('this export is not class-conditional: it takes no labels; drop --labels.')
  if not -2 ** 63 <= seed < 2 ** 63:
    raise SystemExit(f'--seed={seed} must fit in 64 bits (as jax.random.PRNGKey takes it).')
  b = int(sig['batch_size'])
  given = [len(x) for x in (labels, context) if x is not None]
  n = max(given) if given else b
  if any(g not in (1, n) for g in given):
    raise SystemExit(f'{given[0]} labels but {given[1]} context clips: give as many of each (or one of either).')
  if n > b:
    raise SystemExit(f'this export generates {b} samples per call; pass at most {b} labels or clips (or export '
                     'with a larger --config.export.batch_size).')
  pad = lambda x: np.asarray(x)[np.arange(b) % len(x)]
  args = []
  for spec in specs:
    name, shape, dtype = spec['name'], tuple(spec['shape']), np.dtype(spec['dtype'])
    if name == 'key':
      # = jax.random.PRNGKey(seed) (threefry, 64-bit types off, as nbp-jax runs): the seed's low 32 bits.
      x = np.array([0, seed % 2 ** 32], np.uint32)
    elif name == 'labels':
      x = np.arange(shape[0]) % sig['num_classes'] if labels is None else pad(labels)
      if np.any((x < 0) | (x >= sig['num_classes'])):
        raise SystemExit(f'labels must be class ids in [0, {sig["num_classes"]}); got {sorted(set(x.tolist()))}.')
    elif name.startswith('context'):
      if context is None:
        kind = 'a video file (.mp4) or a .npy of uint8 frames' if name == 'context_video' else 'a .npy of int32 codes'
        raise SystemExit(f'this export predicts frames: pass --context with {kind}, clips of {list(shape[1:])}.')
      x = pad(context)
      if name == 'context_video' and x.dtype != np.uint8:
        raise SystemExit(f'context frames must be uint8 in 0..255; got {x.dtype} (frames in [0, 1]: multiply by 255, '
                         'round and cast to uint8).')
      if name == 'context_codes' and x.dtype.kind not in 'iu':
        raise SystemExit(f'context codes must be integers; got {x.dtype}.')
    else:
      raise SystemExit(f'unknown input {name!r} in generate.json.')
    if tuple(x.shape) != shape:
      raise SystemExit(f'{name} must have shape {list(shape)}; got {list(x.shape)}.')
    args.append(x.astype(dtype))
  return args, n


def generate(export_dir: str, seed: int = 0, labels=None, context=None) -> dict[str, np.ndarray]:
  """Loads and runs the export; returns {output name: array} with one entry per label / context clip given."""
  sig, exported, weights = load(export_dir)
  inputs, n = make_inputs(sig, seed, labels, context)
  outs = exported.call(*inputs, *weights)
  return {o['name']: np.asarray(x)[:n] for o, x in zip(sig['outputs'], outs)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description='Run an nbp-jax StableHLO export with JAX alone.')
  parser.add_argument('--dir', default=os.path.dirname(os.path.abspath(__file__)), help='the export folder')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--labels', default=None, help='comma-separated class ids, one per sample')
  parser.add_argument('--context', default=None, help='video file(s) (.mp4, comma-separated) or .npy of context '
                      'frames uint8 [N, F, H, W, 3] (codes int32 [N, t, h, w] for an export without tokenizer)')
  parser.add_argument('--out', default='samples.npz')
  parser.add_argument('--video', default=None, help='also write the videos side by side to this mp4')
  args = parser.parse_args(argv)
  with open(os.path.join(args.dir, 'generate.json')) as f:
    sig = json.load(f)
  try:
    labels = None if args.labels is None else [int(x) for x in args.labels.split(',')]
  except ValueError:
    raise SystemExit(f'--labels={args.labels} must be comma-separated class ids, e.g. --labels=0,1,2.') from None
  context = None
  if args.context is not None:
    spec = [s for s in sig['inputs'] if s['name'].startswith('context')]
    if not spec:
      raise SystemExit('this export takes no context; drop --context.')
    context = load_context(args.context, spec[0])
  outs = generate(args.dir, args.seed, labels, context)
  np.savez(args.out, **outs)
  print(f'Wrote {", ".join(f"{k} {list(v.shape)}" for k, v in outs.items())} to {args.out}.')
  if args.video:
    if 'video' not in outs:
      raise SystemExit('this export returns codes only (it has no tokenizer): no --video.')
    write_video(args.video, outs['video'], fps=float(sig.get('fps', 8.0)))
    print(f'Wrote {len(outs["video"])} videos side by side to {args.video}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
