r"""Import of the official NBP release (PyTorch) into an orbax workdir: `--mode=import`.

  python -m nbp_jax.main --mode=import --config=configs/ucf101_700m.py --workdir=workdirs/ucf101_700m_official \
      --config.import_.checkpoint=ucf101_700m.ckpt --config.import_.tokenizer_checkpoint=magvit2_ucf.pt \
      --config.import_.llama_tokenizer=llama2/tokenizer.model --config.import_.class_names=classInd.txt

Inputs (`config.import_`):
  checkpoint            the transformer: a Lightning `.ckpt` (read with torch when it is installed) or the
                        `.safetensors` that `python -m nbp_jax.interop.convert_torch` makes of it.
  tokenizer_checkpoint  `magvit2_*.pt` or its `.safetensors`. Without it, the tokenizer is taken from the .ckpt's
                        `first_stage_model.` entries when they are there.
  UCF-101 only: the 8 LLaMA-2 ids of each class name, from `llama_tokenizer` (sentencepiece) and `class_names`
  (classInd.txt, the label order), or precomputed in a JSON file `class_ids`.

Output: WORKDIR/config.json + WORKDIR/checkpoints/0 (the transformer) and WORKDIR/tokenizer/{config.json,
checkpoints/0} (where `--mode=sample/eval` look for the tokenizer when `tokenizer.checkpoint` is empty). The config
is the given one with `nbp.id_layout` = 'official_k600' (V = 64000) or 'official_ucf' (V = 96016) and, for UCF-101,
the 101 id rows in `nbp.class_prefix_ids`, so later modes need only `--workdir`.

Mapping (docs/design.md): Linear weight [out, in] -> Dense kernel [in, out]; Conv3d [out, in, kt, kh, kw] ->
[kt, kh, kw, in, out]; pos_emb [1, P, d] -> [P, d]; LayerNorm/GroupNorm weight -> scale; Swish beta [1, C, 1, 1, 1]
-> [C]; `transformer.uncond_embedding` -> the null-prefix param (ignored by the unconditional K600 model).
Every expected key must be present with its exact shape and no unknown key may remain: errors name the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import importlib.util
import json
import os
import re
from typing import Any

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax.data import prepare
from nbp_jax.export import safetensors_io
from nbp_jax.interop import convert_torch
from nbp_jax.nbp import layout as layout_lib
from nbp_jax.nbp import train as nbp_train
from nbp_jax.nbp.spec import Spec
from nbp_jax.nbp.spec import spec_from_config
from nbp_jax.nbp.transformer import official_name
from nbp_jax.tokenizer import model as tokenizer_model

PyTree = Any

CLASS_PROMPTS_FILE = 'class_prompts.json'
VOCAB_TO_LAYOUT = {layout_lib.OFFICIAL_CODEBOOK_SIZE: 'official_k600',
                   layout_lib.OFFICIAL_UCF_VOCAB_SIZE: 'official_ucf'}
LLAMA_VOCAB_SIZE = 32000  # text ids 16..32015 of the UCF-101 model are LLaMA-2 ids + 16
TORCH_SUFFIXES = ('.ckpt', '.pt', '.pth', '.bin')


class OfficialImportError(errors.UserError, ValueError):
  """The checkpoint does not match what the config describes; the message names the key or field and the fix."""


# ------------------------------------------------------------------------------------------------------------------
# Reading state dicts.


class StateDict(Mapping[str, np.ndarray]):
  """A checkpoint's tensors as {key: numpy array}, read lazily; `shape(key)` needs no read."""

  def __init__(self, shapes: Mapping[str, tuple[int, ...]], get: Callable[[str], np.ndarray], source: str):
    self._shapes = dict(shapes)
    self._get = get
    self.source = source

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._shapes:
      raise KeyError(key)
    x = np.asarray(self._get(key))
    return x.astype(np.float32) if safetensors_io.is_float(x.dtype) else x

  def __iter__(self):
    return iter(self._shapes)

  def __len__(self) -> int:
    return len(self._shapes)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def without_prefix(self, prefix: str) -> StateDict:
    """The entries under `prefix`, with the prefix removed."""
    keys = {k[len(prefix):]: k for k in self._shapes if k.startswith(prefix)}
    return StateDict({k: self._shapes[src] for k, src in keys.items()}, lambda k: self._get(keys[k]), self.source)


def _torch_to_numpy(t) -> np.ndarray:
  t = t.detach().cpu()
  return (t.float() if t.is_floating_point() else t).numpy()


def read_state_dict(path: str, *, allow_pickle: bool = False) -> StateDict:
  """An official checkpoint (.ckpt / .pt, or a .safetensors made by convert_torch) -> StateDict.

  The Lightning `state_dict` / magvit2 `model_state_dict` entry is unwrapped and a `module.` prefix dropped.
  """
  if not path:
    raise OfficialImportError('no checkpoint given: pass --config.import_.checkpoint=/path/to/model.ckpt '
                              '(or .safetensors) and/or --config.import_.tokenizer_checkpoint=/path/magvit2.pt.')
  if not os.path.exists(path):
    raise errors.MissingError(f'{path} does not exist; check --config.import_.checkpoint / tokenizer_checkpoint.')
  if path.endswith('.safetensors'):
    reader = safetensors_io.Reader(path)
    keys = {k: k for k in reader}
    if keys and all(k.startswith('module.') for k in keys):
      keys = {k[len('module.'):]: k for k in keys}
    return StateDict({k: reader.shape(src) for k, src in keys.items()}, lambda k: reader[keys[k]], path)
  if not path.endswith(TORCH_SUFFIXES):
    raise OfficialImportError(f'{path}: unknown checkpoint format; pass an official .ckpt / .pt file or a '
                              '.safetensors made by `python -m nbp_jax.interop.convert_torch`.')
  if importlib.util.find_spec('torch') is None:
    stem = os.path.splitext(path)[0]
    raise OfficialImportError(
        f'reading {path} needs PyTorch, which is not installed here. Either install the CPU wheel '
        "(pip install 'nbp-jax[torch]', or -r requirements-torch.txt in a checkout), or convert the file where torch "
        f'is installed: `python -m nbp_jax.interop.convert_torch {path} {stem}.safetensors`, then pass the '
        '.safetensors file.'
    ) from None
  try:
    tensors = convert_torch.torch_load(path, allow_pickle)
  except ValueError as e:
    raise OfficialImportError(str(e).replace('--allow-pickle here, ', '')) from e
  return StateDict({k: tuple(v.shape) for k, v in tensors.items()}, lambda k: _torch_to_numpy(tensors[k]), path)


# ------------------------------------------------------------------------------------------------------------------
# Matching expected keys and shapes.


def _match(sd: StateDict, expected: Mapping[str, tuple[int, ...]], what: str, fix: str,
           ignore: Sequence[str] = ()) -> None:
  """Raises OfficialImportError naming the first missing, unexpected or mis-shaped key."""
  present = {k for k in sd if not k.startswith(tuple(ignore))}
  missing = sorted(set(expected) - present, key=_natural)
  if missing:
    k = missing[0]
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise OfficialImportError(f'{sd.source}: {what} key {k!r} (shape {list(expected[k])}) is missing{more}. {fix}')
  extra = sorted(present - set(expected), key=_natural)
  if extra:
    k = extra[0]
    more = f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''
    raise OfficialImportError(f'{sd.source}: unexpected {what} key {k!r} (shape {list(sd.shape(k))}){more}; this '
                              f'config has no such parameter. {fix}')
  for k in sorted(expected, key=_natural):
    if tuple(sd.shape(k)) != tuple(expected[k]):
      raise OfficialImportError(f'{sd.source}: {what} key {k!r} has shape {list(sd.shape(k))} but this config '
                                f'expects {list(expected[k])}. {fix}')


def _natural(key: str):
  return [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', key)]


def _abstract(init_fn) -> PyTree:
  return nn.unbox(jax.eval_shape(init_fn, jax.random.key(0)))


# ------------------------------------------------------------------------------------------------------------------
# The transformer.


def checkpoint_sizes(sd: StateDict) -> dict[str, int]:
  """Transformer sizes read from the shapes: vocab_size, emb_dim, num_layers, mlp_ratio, max_positions."""
  for k in ('transformer.tok_emb.weight', 'transformer.pos_emb', 'transformer.blocks.0.mlp.0.weight'):
    if k not in sd:
      hint = (' It looks like a tokenizer: pass it as --config.import_.tokenizer_checkpoint.'
              if 'encoder_layers.0.conv.weight' in sd else '')
      raise OfficialImportError(f'{sd.source} has no {k!r}: it is not an official NBP transformer checkpoint.{hint}')
  vocab, d = sd.shape('transformer.tok_emb.weight')
  layers = {int(m.group(1)) for k in sd for m in [re.match(r'transformer\.blocks\.(\d+)\.', k)] if m}
  return dict(vocab_size=vocab, emb_dim=d, num_layers=max(layers) + 1,
              mlp_ratio=sd.shape('transformer.blocks.0.mlp.0.weight')[0] // d,
              max_positions=sd.shape('transformer.pos_emb')[1])


def configure(config: ml_collections.ConfigDict, sd: StateDict) -> ml_collections.ConfigDict:
  """A copy of `config` with nbp.id_layout set from the checkpoint; errors name the config field that disagrees."""
  sizes = checkpoint_sizes(sd)
  id_layout = VOCAB_TO_LAYOUT.get(sizes['vocab_size'])
  if id_layout is None:
    raise OfficialImportError(
        f"{sd.source}: 'transformer.tok_emb.weight' has {sizes['vocab_size']} rows; the released models have "
        f'{layout_lib.OFFICIAL_CODEBOOK_SIZE} (K600) or {layout_lib.OFFICIAL_UCF_VOCAB_SIZE} (UCF-101).')
  task = 'k600' if id_layout == 'official_k600' else 'ucf101'
  preset = [n for n, s in config_lib.MODEL_SIZES.items()
            if (s['num_layers'], s['emb_dim']) == (sizes['num_layers'], sizes['emb_dim'])]
  use = f'--config=configs/{task}_{preset[0]}.py' if preset else 'the matching --config.model.* values'
  source = {'num_layers': "the number of 'transformer.blocks.{i}'",
            'emb_dim': "'transformer.tok_emb.weight'", 'mlp_ratio': "'transformer.blocks.0.mlp.0.weight'",
            'max_positions': "'transformer.pos_emb'"}
  for field, where in source.items():
    if int(config.model[field]) != sizes[field]:
      raise OfficialImportError(f'model.{field}={config.model[field]} in the config, but the checkpoint has '
                                f'{sizes[field]} (from {where}): use {use} or --config.model.{field}={sizes[field]}.')
  if preset and config_lib.MODEL_SIZES[preset[0]]['num_heads'] != config.model.num_heads:
    # Heads cannot be read from shapes; the paper's sizes fix them.
    logging.warning('model.num_heads=%d, but the released %s model has %d heads; the import goes on with %d.',
                    config.model.num_heads, preset[0], config_lib.MODEL_SIZES[preset[0]]['num_heads'],
                    config.model.num_heads)
  wanted = (('nbp.condition', 'none'), ('nbp.first_block', 'none')) if task == 'k600' else (
      ('nbp.condition', 'class'), ('nbp.first_block', 'hybrid'))
  for field, value in wanted:
    section, name = field.split('.')
    if config[section][name] != value:
      raise OfficialImportError(f'{sd.source} is the released {task} model (vocabulary {sizes["vocab_size"]}), '
                                f'which needs {field}={value!r}; the config has {config[section][name]!r}. Use '
                                f'--config=configs/{task}_{preset[0] if preset else "700m"}.py.')
  config = ml_collections.ConfigDict(config.to_dict())
  config.nbp.id_layout = id_layout
  return config


def transformer_expected(spec: Spec) -> dict[str, tuple[int, ...]]:
  """{official key: PyTorch shape} of every parameter of `spec`'s transformer."""
  expected = {}
  for path, leaf in traverse_util.flatten_dict(_abstract(lambda r: nbp_train.init_params(spec, r))).items():
    shape = tuple(leaf.shape)
    name = official_name(path)
    if '{i}' in name:
      layers, shape = shape[0], shape[1:]
    if path[-1] == 'kernel':
      shape = shape[::-1]
    elif path[0] == 'pos_emb':
      shape = (1,) + shape
    if '{i}' in name:
      expected.update({name.format(i=i): shape for i in range(layers)})
    else:
      expected[name] = shape
  return expected


def transformer_params(sd: StateDict, spec: Spec, ignore_prefixes: Sequence[str] = ('first_stage_model.',)
                       ) -> PyTree:
  """Official transformer state dict -> params tree (numpy float32) of `spec` (scanned or not, as spec says)."""
  expected = transformer_expected(spec)
  ignore = list(ignore_prefixes)
  if not spec.model.prefix_len:
    ignore.append('transformer.uncond_embedding')  # untrained buffer; the unconditional model has no prefix
  _match(sd, expected, 'transformer', 'The checkpoint and the config describe different models: use the config of '
         'the released size and task (configs/{ucf101,k600}_{700m,1b,3b}.py); keys of other modules can be skipped '
         'with --config.import_.ignore_prefixes.', ignore)

  def convert(path, key):
    x = sd[key]
    if path[-1] == 'kernel':
      return np.ascontiguousarray(x.T)
    if path[0] == 'pos_emb':
      return x[0]
    return x

  flat = {}
  for path in traverse_util.flatten_dict(_abstract(lambda r: nbp_train.init_params(spec, r))):
    name = official_name(path)
    if '{i}' in name:
      flat[path] = np.stack([convert(path, name.format(i=i)) for i in range(spec.model.num_layers)])
    else:
      flat[path] = convert(path, name)
  return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------------------------------------------
# The tokenizer.

_TOKENIZER_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'beta': 'beta'}


def tokenizer_key(path: tuple[str, ...]) -> str:
  """Flax tokenizer param path -> official key: ('encoder_layers_1', 'fn_2', 'conv', 'kernel') ->
  'encoder_layers.1.fn.2.conv.weight'."""
  parts = [re.sub(r'_(\d+)$', r'.\1', p) for p in path[:-1]]
  return '.'.join(parts + [_TOKENIZER_LEAF[path[-1]]])


def _tokenizer_torch_shape(path, shape) -> tuple[int, ...]:
  if path[-1] == 'kernel':  # [kt, kh, kw, in, out] -> [out, in, kt, kh, kw]
    return (shape[4], shape[3]) + tuple(shape[:3])
  if path[-1] == 'beta':
    return (1, shape[0], 1, 1, 1)
  return tuple(shape)


def tokenizer_params(sd: StateDict, model: tokenizer_model.Tokenizer) -> PyTree:
  """magvit2 state dict (keys without `module.`) -> generator params (numpy float32) of `model`."""
  abstract = traverse_util.flatten_dict(_abstract(lambda r: tokenizer_model.init_params(model, r)))
  expected = {tokenizer_key(p): _tokenizer_torch_shape(p, l.shape) for p, l in abstract.items()}
  _match(sd, expected, 'tokenizer', "The config's tokenizer.* sizes do not describe this checkpoint; the release's "
         "tokenizer needs config_lib.TOKENIZER_SIZES['official'] (the default of the ucf101/k600 configs).")
  flat = {}
  for path in abstract:
    x = sd[tokenizer_key(path)]
    if path[-1] == 'kernel':
      x = np.ascontiguousarray(x.transpose(2, 3, 4, 1, 0))
    elif path[-1] == 'beta':
      x = x.reshape(-1)
    flat[path] = x
  return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------------------------------------------
# UCF-101 class prompts.


def class_prompt(folder_name: str) -> str:
  """'ApplyEyeMakeup' -> 'apply eye makeup' (split at capitals, lower-cased), as the release builds its prompts."""
  return re.sub(r'(?<!^)(?=[A-Z])', ' ', folder_name.strip()).lower()


def tokenize_prompts(prompts: Sequence[str], model_path: str, length: int = layout_lib.OFFICIAL_UCF_PREFIX_LEN
                     ) -> list[list[int]]:
  """LLaMA-2 SentencePiece ids with BOS, padded with EOS or truncated to `length` (unshifted ids)."""
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise OfficialImportError("the UCF-101 class prompts need the sentencepiece package (pip install "
                              "'nbp-jax[torch]'), or pass precomputed ids with --config.import_.class_ids=ids.json."
                              ) from None
  if not os.path.exists(model_path):
    raise errors.MissingError(f'import_.llama_tokenizer={model_path!r} does not exist; pass the LLaMA-2 '
                              'tokenizer.model.')
  sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
  rows = []
  for text in prompts:
    ids = ([sp.bos_id()] + list(sp.encode(text)))[:length]
    rows.append(ids + [sp.eos_id()] * (length - len(ids)))
  return rows


def read_class_ids(path: str, class_names: Sequence[str] | None = None) -> list[list[int]]:
  """A JSON of prompt ids: a list of rows in label order, {'class_prefix_ids': rows} (as written to
  WORKDIR/class_prompts.json), or {class folder name: row} (ordered by `class_names`)."""
  if not os.path.isfile(path):
    raise errors.MissingError(f'import_.class_ids={path!r} does not exist; pass the JSON of class prompt ids (e.g. '
                              'an earlier import\'s WORKDIR/class_prompts.json).')
  try:
    with open(path) as f:
      data = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise OfficialImportError(f'import_.class_ids={path!r} is not JSON ({e}); pass the JSON of class prompt ids.'
                              ) from None
  if isinstance(data, dict) and 'class_prefix_ids' in data:
    data = data['class_prefix_ids']
  if isinstance(data, dict):
    if class_names is None:
      raise OfficialImportError(f'{path} maps class names to ids; give the label order with '
                                '--config.import_.class_names=classInd.txt (or store a list of rows).')
    missing = [n for n in class_names if n not in data]
    if missing:
      raise OfficialImportError(f'{path} has no ids for class {missing[0]!r}.')
    data = [data[n] for n in class_names]
  return [[int(i) for i in row] for row in data]


def class_names(config: ml_collections.ConfigDict) -> list[str] | None:
  """Class folder names in label order: import_.class_names, else data.raw_dir's classInd.txt, else None."""
  imp = config.import_
  if imp.class_names and not os.path.isfile(imp.class_names):
    raise errors.MissingError(f'import_.class_names={imp.class_names!r} does not exist; pass UCF-101\'s '
                              'ucfTrainTestlist/classInd.txt (or a file of one class folder name per line).')
  path = imp.class_names or (prepare.find_class_index(config.data.raw_dir) if config.data.raw_dir else None)
  return prepare.read_class_index(path) if path else None


def class_prefix_ids(config: ml_collections.ConfigDict) -> list[list[int]]:
  """Rows of 8 unshifted LLaMA-2 ids, one per class in label order (see the module docstring for the sources)."""
  imp, n = config.import_, config.data.num_classes
  names = class_names(config)
  if imp.class_ids:
    rows = read_class_ids(imp.class_ids, names)
  elif imp.llama_tokenizer:
    if names is None:
      raise OfficialImportError('the UCF-101 class prompts need the class names in label order: pass '
                                '--config.import_.class_names=/path/ucfTrainTestlist/classInd.txt (or set '
                                'data.raw_dir to the UCF-101 folder that holds it).')
    rows = tokenize_prompts([class_prompt(c) for c in names], imp.llama_tokenizer)
  else:
    raise OfficialImportError('the UCF-101 model is conditioned on the LLaMA-2 ids of the class names: pass '
                              '--config.import_.llama_tokenizer=/path/llama2/tokenizer.model (with '
                              '--config.import_.class_names=classInd.txt), or precomputed ids with '
                              '--config.import_.class_ids=ids.json.')
  if len(rows) != n:
    raise OfficialImportError(f'{len(rows)} class prompts for data.num_classes={n}; give one row per class.')
  for c, row in enumerate(rows):
    if len(row) != layout_lib.OFFICIAL_UCF_PREFIX_LEN or not all(0 <= i < LLAMA_VOCAB_SIZE for i in row):
      raise OfficialImportError(f'class {c} prompt ids {row} must be {layout_lib.OFFICIAL_UCF_PREFIX_LEN} LLaMA-2 ids '
                                f'in [0, {LLAMA_VOCAB_SIZE}) (unshifted: the +16 text offset is applied later).')
  return rows


# ------------------------------------------------------------------------------------------------------------------
# Writing workdirs.


def refuse_a_used_workdir(workdir: str) -> None:
  """Raises OfficialImportError when WORKDIR/checkpoints already holds a checkpoint (an import writes step 0)."""
  if not os.path.isdir(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)):
    return
  ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    if ckpt.all_steps():
      raise OfficialImportError(f'{ckpt.directory} already holds checkpoints {ckpt.all_steps()}; import into a '
                                'fresh --workdir (or delete it first).')
  finally:
    ckpt.close()


def save_workdir(workdir: str, params: PyTree, config: ml_collections.ConfigDict) -> str:
  """Params as checkpoint 0 of WORKDIR/checkpoints (what `checkpoint.restore_params` reads) + WORKDIR/config.json."""
  refuse_a_used_workdir(workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep_best=False, async_save=False)
  try:
    ckpt.save(0, params, {'step': np.zeros((), np.int32)}, config=config)
  finally:
    ckpt.close()
  checkpoint_lib.write_config(workdir, config)
  return ckpt.step_dir(0)


def convert_tokenizer(sd: StateDict, config: ml_collections.ConfigDict) -> PyTree:
  """magvit2 state dict -> tokenizer params of config.tokenizer (numpy float32)."""
  tok = config.tokenizer.copy_and_resolve_references()
  tok.dtype = 'float32'
  return tokenizer_params(sd, tokenizer_model.make_model(tok))


def convert_transformer(sd: StateDict, config: ml_collections.ConfigDict) -> tuple[PyTree, ml_collections.ConfigDict]:
  """Official transformer state dict -> (params, the config to save: id layout and, for UCF-101, class prompts)."""
  config = configure(config, sd)
  if config.nbp.id_layout == 'official_ucf':
    config.nbp.class_prefix_ids = tuple(tuple(r) for r in class_prefix_ids(config))
  spec = spec_from_config(config, dtype='float32')
  return transformer_params(sd, spec, tuple(config.import_.ignore_prefixes)), config


def _write_class_prompts(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/class_prompts.json: names, prompts and ids, to inspect or reuse as import_.class_ids."""
  names = class_names(config)
  if names is not None and len(names) != len(config.nbp.class_prefix_ids):
    names = None
  checkpoint_lib.write_json(os.path.join(workdir, CLASS_PROMPTS_FILE),
                            {'class_names': names, 'prompts': [class_prompt(c) for c in names] if names else None,
                             'class_prefix_ids': [list(r) for r in config.nbp.class_prefix_ids]}, indent=1)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """--mode=import: see the module docstring. Everything is converted and checked before anything is written."""
  imp = config.import_
  if not imp.checkpoint and not imp.tokenizer_checkpoint:
    read_state_dict('')  # raises the "no checkpoint given" error
  config = ml_collections.ConfigDict(config.to_dict())
  sd = read_state_dict(imp.checkpoint, allow_pickle=imp.allow_pickle) if imp.checkpoint else None
  if sd is not None and 'transformer.tok_emb.weight' not in sd and 'encoder_layers.0.conv.weight' in sd:
    raise OfficialImportError(f'{imp.checkpoint} is a tokenizer checkpoint: pass it as '
                              '--config.import_.tokenizer_checkpoint.')
  params, saved = convert_transformer(sd, config) if sd is not None else (None, None)

  tok_params = None
  if imp.tokenizer_checkpoint:
    tok_params = convert_tokenizer(read_state_dict(imp.tokenizer_checkpoint, allow_pickle=imp.allow_pickle), config)
  elif sd is not None and 'first_stage_model.encoder_layers.0.conv.weight' in sd:
    try:  # the frozen tokenizer inside the Lightning checkpoint
      tok_params = convert_tokenizer(sd.without_prefix('first_stage_model.'), config)
    except OfficialImportError as e:
      print(f'Skipped the tokenizer inside {imp.checkpoint}: {e} Pass '
            '--config.import_.tokenizer_checkpoint=magvit2_*.pt to import it.', flush=True)

  written = []
  tdir = os.path.join(workdir, checkpoint_lib.TOKENIZER_SUBDIR)
  for target, what in ((tdir, tok_params), (workdir, params)):  # both checked before either is written
    if what is not None:
      refuse_a_used_workdir(target)
  if tok_params is not None:
    save_workdir(tdir, tok_params, config)
    written.append(f'tokenizer   {tdir}')
    del tok_params
  if params is not None:
    save_workdir(workdir, params, saved)
    if saved.nbp.id_layout == 'official_ucf':
      _write_class_prompts(workdir, saved)
    written.append(f'transformer {workdir} ({saved.nbp.id_layout}, {saved.model.num_layers} layers, '
                   f'd={saved.model.emb_dim})')
  print('Imported:\n  ' + '\n  '.join(written), flush=True)
  if params is not None:
    if len(written) == 1 and not config.tokenizer.checkpoint:
      print('No tokenizer imported: sampling needs one to decode videos. Add '
            '--config.import_.tokenizer_checkpoint=magvit2_*.pt (or set tokenizer.checkpoint).', flush=True)
    # A frame-prediction model continues given frames: a folder of videos, as an import has no dataset.
    frames = ' --config.sample.context_videos=YOUR_VIDEOS/' if saved.nbp.context_frames > 0 else ''
    print(f'Next: python -m nbp_jax.main --mode=sample --workdir={workdir}{frames}   (or --mode=eval / '
          '--mode=export)', flush=True)
