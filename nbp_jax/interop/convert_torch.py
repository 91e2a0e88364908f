r"""Official PyTorch checkpoint -> safetensors, run where torch is installed (needs torch and safetensors, not JAX).

  python -m nbp_jax.interop.convert_torch ucf_700m.ckpt ucf_700m.safetensors       # Lightning: ckpt['state_dict']
  python -m nbp_jax.interop.convert_torch magvit2_ucf.pt magvit2_ucf.safetensors   # ckpt['model_state_dict']

Keys are written exactly as in the state dict, except the `module.` prefix of DataParallel checkpoints, which is
dropped; dtypes are kept (bf16 stays bf16). Then, in the JAX environment:
`--mode=import --config.import_.checkpoint=ucf_700m.safetensors`.

Files are read with torch's weights-only unpickler, which builds tensors and plain containers and nothing that can
run code. On top of what it allows by default, SAFE_GLOBALS lets through the few plain-data classes a Lightning
checkpoint holds besides tensors (its `hyper_parameters` are an `argparse.Namespace`, or Lightning's
`AttributeDict`, read here as a plain dict without importing Lightning). A file that asks for anything else is
refused with what it asked for; `--allow-pickle` (`import_.allow_pickle=True`) runs the file's pickle code instead,
for checkpoints you trust that hold other objects. A file that asks for a function that runs code (os.system, eval,
...) is no checkpoint and is refused either way.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
import importlib.util
import os
import re
import sys
from typing import Any

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


# Plain-data classes of Lightning checkpoints, allowed beside torch's defaults: (what is built, name in the pickle).
# Lightning's AttributeDict (a dict with attribute access) is read as a plain dict.
SAFE_GLOBALS = (
    (argparse.Namespace, 'argparse.Namespace'),
    (dict, 'pytorch_lightning.utilities.parsing.AttributeDict'),
    (dict, 'lightning_fabric.utilities.data.AttributeDict'),
    (dict, 'lightning.fabric.utilities.data.AttributeDict'),
)

# Globals that only serve to run code when a pickle is loaded; no checkpoint holds them.
_CODE_GLOBALS = re.compile(
    r'^(os|posix|nt|subprocess|sys|shutil|socket|pty|runpy|importlib|ctypes|code|pickle|marshal|webbrowser|'
    r'multiprocessing)\.|^builtins\.(eval|exec|compile|__import__|open|getattr|setattr|delattr|globals|locals|'
    r'breakpoint|input)$|^types\.(FunctionType|CodeType)$|^operator\.(attrgetter|methodcaller)$')


class UnsafeCheckpointError(ValueError):
  """The file is not a checkpoint the safe loader can read; the message says what was found."""


def _looks_like_torch(path: str) -> bool:
  """A torch.save file: a zip archive (torch >= 1.6) or a pickle (the legacy format)."""
  with open(path, 'rb') as f:
    head = f.read(4)
  return head == b'PK\x03\x04' or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _refusal(path: str, error: Exception) -> UnsafeCheckpointError:
  """An honest message for a file the weights-only unpickler refused."""
  text = str(error)
  wanted = re.findall(r'GLOBAL ([\w.]+)', text)
  if wanted:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      wanted = list(dict.fromkeys(torch.serialization.get_unsafe_globals_in_checkpoint(path))) or wanted
    except Exception:  # pylint: disable=broad-except  (legacy files: the global of the error is enough)
      pass
    code = [g for g in wanted if _CODE_GLOBALS.search(g)]
    if code:
      return UnsafeCheckpointError(
          f'{path} is not a checkpoint: its pickle calls {code[0]}, which runs code when the file is loaded. It '
          'was refused and nothing in it was run; do not load it with pickles allowed.')
    return UnsafeCheckpointError(
        f'{path} holds Python objects of {", ".join(wanted[:5])}, which the safe loader does not build (it allows '
        f'tensors, plain containers and {", ".join(sorted({n for _, n in SAFE_GLOBALS}))}). If you trust the '
        "file's origin, allow its pickle code (--allow-pickle here, --config.import_.allow_pickle=True for "
        '--mode=import), or convert it to .safetensors where it was made.')
  lines = [l.strip() for l in text.split('WeightsUnpickler error:')[-1].splitlines() if l.strip()]
  reason = (lines or [type(error).__name__])[0][:200]
  return UnsafeCheckpointError(f'{path} is not a torch checkpoint, or it is damaged: torch cannot read it ({reason}).')


def torch_load(path: str, allow_pickle: bool = False) -> dict[str, Any]:
  """torch.load on the CPU -> flat state dict of torch tensors (see unwrap_state_dict).

  Weights-only unless `allow_pickle`; raises UnsafeCheckpointError naming what a refused file asked for.
  """
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist.')
  if not _looks_like_torch(path):
    with open(path, 'rb') as f:
      head = f.read(8)
    raise UnsafeCheckpointError(f'{path} is not a torch checkpoint: it is neither a zip archive nor a pickle '
                                f'(it starts with bytes {head.hex(" ")}).')
  if allow_pickle:
    obj = torch.load(path, map_location='cpu', weights_only=False)
  else:
    try:
      with torch.serialization.safe_globals([g if n == f'{g.__module__}.{g.__qualname__}' else (g, n)
                                             for g, n in SAFE_GLOBALS]):
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  (torch raises UnpicklingError, RuntimeError, EOFError)
      raise _refusal(path, e) from e
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
  parser = argparse.ArgumentParser(prog='python -m nbp_jax.interop.convert_torch', description=__doc__.split('\n')[0])
  parser.add_argument('src', help='official .ckpt (Lightning) or magvit2_*.pt')
  parser.add_argument('dst', help='output .safetensors')
  parser.add_argument('--allow-pickle', action='store_true', help='torch.load(weights_only=False); trusted files only')
  args = parser.parse_args(argv)
  if importlib.util.find_spec('torch') is None:
    print("convert_torch needs PyTorch: pip install 'nbp-jax[torch]' (in a checkout: pip install -r "
          'requirements-torch.txt, the CPU wheel), or run it in any environment that has torch and safetensors.',
          file=sys.stderr)
    return 2
  try:
    n = convert(args.src, args.dst, args.allow_pickle)
  except (UnsafeCheckpointError, ValueError, FileNotFoundError) as e:
    print(f'Error: {e}', file=sys.stderr)
    return 2
  print(f'Wrote {n} tensors to {args.dst}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
