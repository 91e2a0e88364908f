"""Test setup: 8 fake CPU devices (for the sharding tests) and XLA's optimisation level must be set before jax is
imported."""

import os

# The tests' programs are micro models that run a few times each: the suite's time is mostly XLA:CPU compiling them,
# and LLVM at -O1 instead of XLA's default -O3 compiles them 5-20% faster (the tiny pipeline's tokenizer train step,
# three pairs of runs: 24.1 / 14.3 / 16.8 s at -O3, 19.3 / 13.3 / 13.9 s at -O1).
# The same HLO is compiled; only its machine code is less optimised. Every process a test starts gets the same
# level (TEST_XLA_FLAGS), so results compared across processes come from the same code. Benchmarks and the demo run
# at XLA's defaults; an XLA_FLAGS of your own that sets a level is kept in this process.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=1'

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
if '--xla_backend_optimization_level' not in _flags:
  _flags += ' ' + TEST_XLA_FLAGS
os.environ['XLA_FLAGS'] = _flags.strip()

import fcntl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from nbp_jax.configs import smoke as smoke_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The whole pipeline at micro size: configs/smoke.py (the demo's recipe, narrower), as --config.x=y flags on the
# demo's config, so that tests can change or add flags (the study's, the notebook's overrides of the demo).
def _flag(field, value):
  return f'--config.{field}=' + (f'({",".join(map(str, value))})' if isinstance(value, tuple) else str(value))


TINY_PIPELINE_FLAGS = ('--config=configs/demo.py', *(_flag(k, v) for k, v in smoke_config.OVERRIDES.items()))


def run_main(*args, timeout=900):
  """`python -m nbp_jax.main ARGS` on one CPU device (what a laptop user has); returns the CompletedProcess."""
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'nbp_jax.main', *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=env)


def run_processes(command: list[str], num_processes: int = 2, timeout: float = 600) -> list[tuple[int, str, str]]:
  """`command` (e.g. [python, -m, nbp_jax.main, ...]) as the `num_processes` processes of one multi-host JAX run on
  this machine (jax.distributed through localhost, one CPU device each, gloo collectives); returns (returncode,
  stdout, stderr) per process. Once one fails the others are stopped (they would wait for it at a collective)."""
  import socket  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
             JAX_NUM_PROCESSES=str(num_processes))
  with tempfile.TemporaryDirectory() as logs:
    outputs = [(open(os.path.join(logs, f'{i}.out'), 'w+'), open(os.path.join(logs, f'{i}.err'), 'w+'))
               for i in range(num_processes)]
    procs = [subprocess.Popen(command, cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=out, stderr=err,
                              text=True) for i, (out, err) in enumerate(outputs)]
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        for p in procs:
          p.kill()
        break
      time.sleep(0.2)
    results = []
    for p, (out, err) in zip(procs, outputs):
      p.wait()
      out.seek(0)
      err.seek(0)
      results.append((p.returncode, out.read(), err.read()))
      out.close()
      err.close()
  return results


def damage_checkpoint_arrays(checkpoint_dir, item='params'):
  """Overwrites the array data of one item of an orbax checkpoint (its files below the item's folder; the
  metadata beside them stays), as a disk that filled up after the commit marker would leave it."""
  item_dir = os.path.join(checkpoint_dir, item)
  for root, _, files in os.walk(item_dir):
    for name in files:
      if root != item_dir:
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')


def _run_folder(tmp_path_factory):
  """The test run's temporary folder, shared by its pytest-xdist workers (each worker's basetemp is a folder in it)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """The test processes and every process they start (`run_main`, the notebooks' kernels, the export's fresh
  process) share JAX's persistent compilation cache in the run's folder: a micro program that several of them run
  (the tiny pipeline's tokenizer, I3D, LPIPS, decode loops) compiles once per test run instead of once per process,
  and in a test process a program that tests jit anew with the same HLO (a helper's `jax.jit(init)` called by every
  test of a file) compiles once (tests/test_nbp_transformer.py alone: 70 -> 42 s). Each run starts empty."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  path = str(_run_folder(tmp_path_factory) / 'jax_compilation_cache')
  # Any size limit makes the cache lock its files (filelock), so the two workers' processes can write it at once.
  max_size = 16 << 30
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(max_size)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_compilation_cache_max_size', max_size)
  compilation_cache.reset_cache()  # in case something compiled before this fixture, with no cache set


@pytest.fixture(scope='session')
def tiny_pipeline(tmp_path_factory):
  """A workdir where `--mode=pipeline` finished at micro size, built once per test run: under pytest-xdist the
  first worker to ask builds it under a file lock in the run's shared temporary folder and the others wait for it.
  Tests must not change it (copy what they change)."""
  folder = _run_folder(tmp_path_factory) / 'tiny_pipeline'
  folder.mkdir(exist_ok=True)
  workdir, built = folder / 'demo', folder / 'built'
  with open(folder / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not built.exists():
      out = run_main(*TINY_PIPELINE_FLAGS, f'--workdir={workdir}', '--mode=pipeline')
      assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
      built.touch()
  return workdir


# Markers ([tool.pytest.ini_options] in pyproject.toml). The tests of the shared end-to-end fixture are `slow`; `gpu`
# and `tpu` tests are skipped where JAX has no such device (JAX_PLATFORMS is cpu above unless set: run them with
# JAX_PLATFORMS=cuda,cpu or tpu,cpu, e.g. `pytest -m gpu`).


def _has_devices(platform: str) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return bool(jax.devices(platform))
  except RuntimeError:  # no such backend, or not in JAX_PLATFORMS
    return False


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items):
  for item in items:
    if 'tiny_pipeline' in item.fixturenames:
      item.add_marker(pytest.mark.slow)
  for platform in ('gpu', 'tpu'):
    marked = [item for item in items if item.get_closest_marker(platform)]
    if marked and not _has_devices(platform):
      skip = pytest.mark.skip(reason=f'needs a {platform.upper()}; JAX_PLATFORMS={os.environ["JAX_PLATFORMS"]}')
      for item in marked:
        item.add_marker(skip)
