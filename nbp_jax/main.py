r"""Command line entry point: one config, one workdir, one mode.

  python -m nbp_jax.main --config=configs/k600_3b.py --workdir=/tmp/k600 --mode=train \
      --config.optim.lr=1e-4 --config.nbp.block_shape='(1,4,4)'
  nbp-jax --config=k600:3b --workdir=/tmp/k600 --mode=train    # the installed command; a bundled config by name

--config is a config file, `file.py:ARG` for its get_config(ARG), or a bundled config by name (config_lib.config_file).
The --config.x=y overrides go through config_lib.apply_overrides (`--config.model.size=3b` chooses the 3b fields).

Each mode is one stage of the corridor (docs/design.md); this file only validates the config and dispatches. Expected
failures (`nbp_jax.errors.UserError`: a wrong field, a missing file, a stage not run yet) print one line and exit
with status 2 (`--verbose` or NBP_VERBOSE=1 shows their traceback); anything else is a bug and keeps its traceback.
Third-party INFO logs (orbax, TFDS, XLA) stay quiet unless `--verbosity` is given (e.g. `--verbosity=0` for INFO).
"""

from __future__ import annotations

import difflib
import errno
import importlib
import importlib.util
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from nbp_jax import config_lib
from nbp_jax import errors

_DEFAULT_CONFIG = config_lib.config_file('demo')


def _define_config_flag(sys_argv: list[str] | None = None):
  return config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG,
      'Config file (ml_collections; FILE.py:ARG passes ARG to its get_config) or a bundled config by name (demo, '
      'k600:3b, k600_3b); override fields with --config.section.field=value.', lock_config=True, sys_argv=sys_argv)


try:
  _CONFIG = _define_config_flag()
  _DEFAULT_CONFIG_ERROR = None
except (AttributeError, KeyError) as e:
  # Without --config, config_flags parses the default config here, at import, with the command line's overrides:
  # an unknown --config.x key fails now. cli() reports it in one line; the flag is defined without the overrides.
  _DEFAULT_CONFIG_ERROR = e
  _CONFIG = _define_config_flag(sys_argv=sys.argv[:1])
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where data, checkpoints, metrics and samples go. '
                               'Default: workdirs/<config.name>.')
_MODE = flags.DEFINE_enum('mode', 'train', config_lib.MODES, 'What to run.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the traceback of expected errors too (or set NBP_VERBOSE=1).')

# Modes that use a finished run: without --config they take the config saved in the workdir.
_USES_SAVED_CONFIG = ('sample', 'eval', 'export')
# Modes that run as one process only (file conversions; every other mode runs on several, docs/design.md).
_SINGLE_PROCESS_MODES = ('import', 'export')

# mode -> 'module:function' taking (config, workdir): one per config_lib.MODES.
STAGES = {
    'prepare_data': 'nbp_jax.data.prepare:run',
    'train_tokenizer': 'nbp_jax.tokenizer.train:run',
    'tokenize': 'nbp_jax.tokenizer.tokenize:run',
    'train': 'nbp_jax.nbp.train:run',
    'sample': 'nbp_jax.nbp.generator:run',
    'eval': 'nbp_jax.evaluation.protocols:run',
    'pipeline': 'nbp_jax.pipeline:run',
    'study': 'nbp_jax.study:run',
    'import': 'nbp_jax.interop.official:run',
    'export': 'nbp_jax.export.bundle:run',
}


def resolve_stage(mode: str):
  """Returns the callable that runs `mode`, one of config_lib.MODES (the --mode flag's choices)."""
  module_name, fn_name = STAGES[mode].split(':')
  return getattr(importlib.import_module(module_name), fn_name)


def config_from_flags(mode: str, workdir: str | None) -> ml_collections.ConfigDict:
  """--config, or for sample/eval/export with no --config the workdir's saved config; with the --config.x=y
  overrides applied by config_lib.apply_overrides (so that a size override chooses that size's fields)."""
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  saved = os.path.join(workdir or '', 'config.json')
  if mode not in _USES_SAVED_CONFIG or flags.FLAGS['config'].present or not workdir or not os.path.exists(saved):
    return config_lib.apply_overrides(_CONFIG.value, overrides)
  from nbp_jax import checkpoint  # pylint: disable=g-import-not-at-top
  logging.info('Using the config saved in %s', saved)
  return config_lib.apply_overrides(checkpoint.load_config(workdir), overrides)


def _verbose() -> bool:
  """--verbose or NBP_VERBOSE=1; while flags are still being parsed, --verbose as written on the command line."""
  if os.environ.get('NBP_VERBOSE', '') not in ('', '0'):
    return True
  if flags.FLAGS.is_parsed():
    return _VERBOSE.value
  return any(arg in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1') for arg in sys.argv[1:])


# Libraries whose INFO and WARNING lines are bookkeeping (orbax's option dumps and read-only notes, TFDS's "Load
# dataset info", grain's worker notes); their errors still show.
_CHATTY = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/etils/')


class _QuietLibraries(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.ERROR or not any(m in record.pathname for m in _CHATTY)


def quiet_logs() -> None:
  """Third-party logs off unless --verbosity was given: INFO everywhere, and the warnings of orbax, TFDS and grain;
  XLA's C++ log (its slow-compile alarm is an ERROR line). Must run before jax is imported."""
  if flags.FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def _fail(error: BaseException) -> None:
  """Prints an expected error as one line on stderr and exits with status 2 (re-raises it with --verbose)."""
  if _verbose():
    raise error
  prefix = 'Config error' if isinstance(error, config_lib.ConfigError) else 'Error'
  print(f'{prefix}: {" ".join(str(error).splitlines())}', file=sys.stderr, flush=True)
  sys.exit(2)


def _remove_empty_dirs(root: str) -> None:
  """Removes `root` and the folders below it that hold no file (what a failed command created and left empty)."""
  for path, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
    try:
      os.rmdir(path)
    except OSError:
      pass  # not empty


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(errors.UserError(f'unexpected argument(s) {" ".join(argv[1:])!r}: flags are written --mode=train, '
                           '--workdir=W, --config=FILE, --config.section.field=value (see --help).'))
  quiet_logs()
  from nbp_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  try:
    multi_process = distributed.initialize_distributed()  # multi-host: before any other JAX use (no-op on one host)
  except errors.UserError as e:
    _fail(e)
  mode = _MODE.value
  if multi_process and mode in _SINGLE_PROCESS_MODES:
    _fail(errors.UserError(f'--mode={mode} converts files on one process, and this is one of several '
                           '(JAX_COORDINATOR_ADDRESS, SLURM or NBP_DISTRIBUTED says so): run it once, on one host, '
                           'with NBP_DISTRIBUTED=0.'))
  try:
    config = config_from_flags(mode, _WORKDIR.value)
    config_lib.validate(config, mode)
    from nbp_jax.nbp import spec as spec_lib  # pylint: disable=g-import-not-at-top  (jax, after quiet_logs)
    spec_lib.check_layouts(config, mode)
    if mode == 'export':  # it rebuilds the run from its own config.json: any other override would be ignored
      ignored = [k for k in config_flags.get_override_values(flags.FLAGS['config']) if not k.startswith('export.')]
      if ignored:
        raise config_lib.ConfigError(
            f'--mode=export takes only --config.export.* fields; {", ".join("--config." + k for k in ignored)} '
            "would be ignored (the model, sampling and sizes are the run's, from its config.json): drop them.")
      if flags.FLAGS['config'].present:
        given = config_flags.get_config_filename(flags.FLAGS['config'])
        print(f'Note: --mode=export rebuilds each run from its own config.json; of --config={given} only the '
              'export section is used.', flush=True)
  except errors.UserError as e:
    _fail(e)
  workdir = os.path.join('workdirs', config.name) if _WORKDIR.value is None else _WORKDIR.value
  if mode in _USES_SAVED_CONFIG and workdir and not os.path.isdir(workdir):
    _fail(errors.MissingError(f'--workdir={workdir} does not exist: --mode={mode} reads a finished run there; check '
                              'the path (a typo?) or train first (--mode=train, or --mode=pipeline).'))
  first_new = _prepare_workdir(workdir)
  stage = resolve_stage(mode)
  logging.info('mode=%s workdir=%s config=%s', mode, workdir, config.name)
  try:
    stage(config, workdir)
  except BaseException as e:
    if first_new:
      _remove_empty_dirs(first_new)  # a failed command leaves no empty new folders behind
    if isinstance(e, errors.UserError):
      _fail(e)
    if isinstance(e, errors.Preempted):  # the trainer said where it saved
      sys.exit(e.exit_status)
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      _fail(errors.UserError(f'{e.strerror}: {e.filename or workdir} (--workdir={workdir}); free space or give a '
                             'folder this user can write.'))
    if isinstance(e, KeyboardInterrupt) and not _verbose():  # training saves and stops by itself; the rest stops here
      print(f'Interrupted (--mode={mode}); the same command starts it again (reusing what earlier runs finished).',
            file=sys.stderr, flush=True)
      sys.exit(130)
    raise


# What the storage refused (no write permission, a read-only or full disk): the user's to fix, not a bug.
_STORAGE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _prepare_workdir(workdir: str) -> str | None:
  """Creates `workdir` if needed; returns the topmost folder this created (None if it existed), or fails in one
  line when it cannot be a workdir (empty, a file, not creatable, not writable)."""
  if not workdir:
    _fail(errors.UserError('--workdir is empty: give the folder the run reads and writes (e.g. --workdir=workdirs/x).'))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(errors.UserError(f'--workdir={workdir} is a file, not a folder: give a folder (a new one is created).'))
  first_new, parent = None, os.path.abspath(workdir)
  while not os.path.exists(parent):
    first_new, parent = parent, os.path.dirname(parent)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    _fail(errors.UserError(f'--workdir={workdir} cannot be created ({e.strerror}: {e.filename}); give a folder '
                           'under one this user can write.'))
  if not os.access(workdir, os.W_OK):
    _fail(errors.UserError(f'--workdir={workdir} is not writable by this user: give a folder it can write.'))
  return first_new


# ----------------------------------------------------------------------------------------------------------------
# Flag parsing: --config may name a bundled config; an unknown --config.x key is named with the nearest valid ones.


def _config_path(argv: list[str]) -> str:
  i = config_lib.config_flag_index(argv)
  if i is None:
    return _DEFAULT_CONFIG
  return argv[i].removeprefix('--config=')


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  arg = None
  if not os.path.exists(path) and ':' in path:
    path, arg = path.split(':', 1)
  spec = importlib.util.spec_from_file_location('_nbp_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def _field_paths(node: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  out = []
  for key in node.keys():
    path = f'{prefix}{key}'
    out.append(path)
    if hasattr(node[key], 'keys'):
      out += _field_paths(node[key], path + '.')
  return out


def unknown_config_key(argv: list[str]) -> str | None:
  """'--config.a.b: ... nearest: ...' for the first override whose field the config lacks, or None."""
  try:
    config = _load_config_file(_config_path(argv))
  except Exception:  # pylint: disable=broad-except  (the config file's own error is reported by the flag parser)
    return None
  paths = _field_paths(config)
  for arg in argv:
    if not arg.startswith(('--config.', '--noconfig.')):
      continue
    key = arg.split('=', 1)[0].split('config.', 1)[1]
    if key in paths:
      continue
    parent, _, last = key.rpartition('.')
    while parent and parent not in paths:
      parent = parent.rpartition('.')[0]
    siblings = [p for p in paths if p.rpartition('.')[0] == parent]
    name = lambda p: p.rpartition('.')[2]
    near = [p for p in siblings if name(p) in difflib.get_close_matches(last, [name(q) for q in siblings], cutoff=0.6)]
    near += [p for p in paths if p not in near and name(p) in
             difflib.get_close_matches(last, [name(q) for q in paths], cutoff=0.8)]
    hint = (f'nearest valid: {", ".join(near[:3])}' if near else
            f'valid fields{" of " + parent if parent else ""}: {", ".join(siblings)}')
    return f'--config.{key}: the config has no field {key!r}; {hint}.'
  return None


_HELP_FLAGS = ('--help', '-help', '-?', '--helpshort', '-helpshort', '--helpfull', '-helpfull')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with --config a bundled config by name too, and a wrong --config (no such file, an
  unknown size in `k600.py:5b`) or an unknown --config.x key reported in one line (exit 2) instead of a traceback."""
  try:
    argv = config_lib.last_overrides_only(config_lib.with_config_file(argv))
  except config_lib.ConfigError as e:
    _fail(e)
  if _DEFAULT_CONFIG_ERROR is not None:
    _fail(config_lib.ConfigError(
        unknown_config_key(argv) or f'a --config override failed: {_DEFAULT_CONFIG_ERROR}'))
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    # absl ends --help (and -?, --helpshort, --helpfull) with status 1: asking for help is not a failure.
    if e.code == 1 and any(arg.split('=')[0] in _HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)
    raise
  except (AttributeError, KeyError) as e:
    _fail(config_lib.ConfigError(unknown_config_key(argv) or f'a --config override failed: {e}'))
  except flags.Error as e:
    message = str(e).splitlines()[0]
    if not message.startswith('flag --config='):  # a flag's value (--mode, --config.x=y) or an unknown flag
      _flag_error(e, message)
    try:  # the config file's own expected error (config_flags wraps it in a traceback)
      _load_config_file(_config_path(argv))
    except errors.UserError as user_error:
      _fail(config_lib.ConfigError(str(user_error)))
    except TypeError as type_error:
      path = _config_path(argv)
      if ':' in path and 'positional argument' in str(type_error):
        _fail(config_lib.ConfigError(f'--config={path}: {path.split(":")[0]} takes no argument (its get_config() '
                                     f'has none); drop ":{path.split(":", 1)[1]}".'))
    raise


def _flag_error(error: flags.Error, message: str) -> None:
  """`_fail` for a wrong flag: an unknown one, a --mode that is not a mode, a --config.x=y value of the wrong
  type."""
  if isinstance(error, flags.UnrecognizedFlagError):
    message += ('; the flags are --config, --workdir, --mode and --verbose, and config fields are set as '
                '--config.section.field=value (--helpfull lists every flag)')
  elif message.startswith('flag --mode='):
    given = message.split('=', 1)[1].split(':', 1)[0]
    near = difflib.get_close_matches(given, config_lib.MODES, n=1)
    message = (f'--mode={given} is not a mode{f"; did you mean --mode={near[0]}?" if near else "."} The modes: '
               f'{", ".join(config_lib.MODES)}.')
  _fail(errors.UserError(message))


def cli() -> None:
  """The `nbp-jax` command (pyproject.toml): the same as `python -m nbp_jax.main`."""
  if sys.modules['__main__'] is not sys.modules[__name__]:
    # The installed script: absl's --help prints __main__'s docstring and the flags defined in sys.argv[0], which
    # are this module's only under `python -m`; without this `nbp-jax --help` printed neither.
    sys.modules['__main__'].__doc__ = __doc__
    for flag in flags.FLAGS.get_key_flags_for_module(__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
