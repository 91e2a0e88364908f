r"""Official PyTorch checkpoint -> safetensors, run where torch is installed (needs torch and safetensors, not JAX).

  python -m nbp_jax.export.convert_torch ucf_700m.ckpt ucf_700m.safetensors       # Lightning: ckpt['state_dict']
  python -m nbp_jax.export.convert_torch magvit2_ucf.pt magvit2_ucf.safetensors   # ckpt['model_state_dict']

Keys are written exactly as in the state dict, except the `module.` prefix of DataParallel checkpoints, which is
dropped; dtypes are kept (bf16 stays bf16). Then, in the JAX environment:
`--mode=import --config.import_.checkpoint=ucf_700m.safetensors`. `--allow-pickle` is for checkpoints whose extra
entries (hyperparameters, optimizer objects) the safe loader refuses: it runs the file's pickle code, so only use it
on files you trust.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping

# Where the tensors are in the released files, tried in order.
STATE_DICT_ENTRIES = ('state_dict', 'model_state_dict', 'model', 'module')


def unwrap_state_dict(obj: Any, path: str = '<checkpoint>') -> dict[str, Any]:
  """A loaded checkpoint -> its flat {key: tensor} state dict, without a DataParallel `module.` prefix."""
  sd = obj
  if isinstance(obj, Mapping):
    for entry in STATE_DICT_ENTRIES:
      if isinstance(obj.get(entry), Mapping):
        sd = obj[entry]
        break
  if not isinstance(sd, Mapping) or not sd:
    raise ValueError(f'{path} holds no state dict (looked for {", ".join(STATE_DICT_ENTRIES)} and a flat dict of '
                     'tensors); is it an official NBP or magvit2 checkpoint?')
  tensors = {k: v for k, v in sd.items() if hasattr(v, 'shape')}
  if not tensors:
    raise ValueError(f'{path}: the state dict has no tensors.')
  if all(k.startswith('module.') for k in tensors):
    tensors = {k[len('module.'):]: v for k, v in tensors.items()}
  return tensors


def torch_load(path: str, allow_pickle: bool = False) -> dict[str, Any]:
  """torch.load on the CPU -> flat state dict of torch tensors (see unwrap_state_dict)."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except Exception as e:  # pylint: disable=broad-except
    if allow_pickle or 'weights_only' not in str(e):
      raise
    raise ValueError(f'{path} holds Python objects that the safe loader (weights_only=True) refuses: '
                     f'{str(e).splitlines()[0][:200]}. If you trust the file, allow its pickle code '
                     '(--allow-pickle here, --config.import_.allow_pickle=True for --mode=import).') from e
  return unwrap_state_dict(obj, path)


def convert(src: str, dst: str, allow_pickle: bool = False) -> int:
  """Writes the state dict of `src` to `dst` (safetensors). Returns the number of tensors."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  tensors = torch_load(src, allow_pickle)
  out, seen = {}, set()
  for k, v in tensors.items():
    v = v.detach().contiguous()
    # safetensors refuses tensors that share memory (tied or aliased weights): copy those.
    ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
    if ptr in seen:
      v = v.clone()
    seen.add(ptr)
    out[k] = v
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  save_file(out, dst + '.tmp', metadata={'source': os.path.basename(src), 'format': 'pt'})
  os.replace(dst + '.tmp', dst)
  return len(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m nbp_jax.export.convert_torch', description=__doc__.split('\n')[0])
  parser.add_argument('src', help='official .ckpt (Lightning) or magvit2_*.pt')
  parser.add_argument('dst', help='output .safetensors')
  parser.add_argument('--allow-pickle', action='store_true', help='torch.load(weights_only=False); trusted files only')
  args = parser.parse_args(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('convert_torch needs PyTorch: pip install -r requirements-torch.txt (CPU wheel), or run it in any '
          'environment that has torch and safetensors.', file=sys.stderr)
    return 2
  n = convert(args.src, args.dst, args.allow_pickle)
  print(f'Wrote {n} tensors to {args.dst}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
