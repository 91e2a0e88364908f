"""The corridor stays a corridor: each stage imports only itself and earlier stages (docs/design.md).

Read from the source (every `import`, also inside functions), not by importing, so a lazy import cannot hide an
edge and the test needs none of the optional dependencies.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'nbp_jax'

# Stage order of docs/design.md; a module may import modules of its own stage or an earlier one.
STAGES = ('infrastructure', 'data', 'tokenizer', 'nbp', 'evaluation', 'export', 'interop', 'top')
INFRASTRUCTURE = {'errors', 'config_lib', 'configs', 'checkpoint', 'metric_logger', 'image_metrics', 'cpu_convolutions',
                  'parallel', 'task', 'timing', 'trainer'}
TOP = {'pipeline', 'study', 'bench', 'notebook_utils', 'main', '__init__'}


def stage_of(module: str) -> str:
  """'nbp_jax.tokenizer.model' -> 'tokenizer'; a top-level module by the tables above."""
  first = module.split('.')[1] if module.count('.') else '__init__'
  if first in INFRASTRUCTURE:
    return 'infrastructure'
  if first in TOP:
    return 'top'
  if first in STAGES:
    return first
  raise AssertionError(f'{module}: not placed in a stage; add it to tests/test_corridor.py and docs/design.md')


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' and len(parts) > 2 else parts)


def _is_module(name: str) -> bool:
  path = PACKAGE.parent / name.replace('.', '/')
  return path.with_suffix('.py').exists() or path.is_dir()


def project_imports(source: str, module: str, is_package: bool = False) -> set[str]:
  """Every nbp_jax module that `source` (the text of `module`) imports: absolute or relative, at any depth;
  `from a import b` counts a, and b when b is a module."""
  package = module if is_package else module.rsplit('.', 1)[0]
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith('nbp_jax')}
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split('.')[:len(package.split('.')) - node.level + 1]
        source_module = '.'.join(base + ([node.module] if node.module else []))
      else:
        source_module = node.module or ''
      if source_module.startswith('nbp_jax'):
        found.add(source_module)
        found |= {f'{source_module}.{a.name}' for a in node.names if _is_module(f'{source_module}.{a.name}')}
  return found - {'nbp_jax'}


def imports_of(path: pathlib.Path) -> set[str]:
  return project_imports(path.read_text(), module_name(path), path.name == '__init__.py')


MODULES = sorted(PACKAGE.rglob('*.py'))


def test_every_module_has_a_stage():
  assert MODULES
  for path in MODULES:
    stage_of(module_name(path))


@pytest.mark.parametrize('path', MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_later_stage(path):
  here = STAGES.index(stage_of(module_name(path)))
  later = {m: stage_of(m) for m in imports_of(path) if STAGES.index(stage_of(m)) > here}
  assert not later, f'{module_name(path)} ({STAGES[here]}) imports later stages: {later}'


def test_the_reader_finds_lazy_relative_and_from_imports():
  # The checker itself, on hand-written text placed as nbp_jax/tokenizer/model.py.
  source = ('import os\n'
            'from nbp_jax import errors\n'
            'def f():\n'
            '  from nbp_jax.evaluation import fvd\n'
            '  from ..nbp import layout\n'
            '  from . import fsq\n')
  assert project_imports(source, 'nbp_jax.tokenizer.model') == {
      'nbp_jax.errors', 'nbp_jax.evaluation', 'nbp_jax.evaluation.fvd', 'nbp_jax.nbp', 'nbp_jax.nbp.layout',
      'nbp_jax.tokenizer', 'nbp_jax.tokenizer.fsq'}
  assert stage_of('nbp_jax.evaluation.fvd') == 'evaluation' and stage_of('nbp_jax.errors') == 'infrastructure'
