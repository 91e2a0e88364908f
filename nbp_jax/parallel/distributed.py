"""Multi-host runs: start-up, and the few ways the processes of one run share work.

Call `initialize_distributed()` first thing in a process, before any JAX computation. Recognised environments:
  JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID)   any cluster, set by hand or by launch/*.sh
  SLURM with SLURM_NTASKS > 1                                     launch/slurm_gpu.sbatch (srun, one task per GPU)
  NBP_DISTRIBUTED=1                                               TPU pod slices (launch/tpu_pod.sh): JAX reads the
                                                                  coordinator from the TPU VM metadata
NBP_DISTRIBUTED=0 turns all of this off (e.g. a single-host debug run inside a SLURM allocation).

After start-up every process runs the same program. Training is one SPMD program over the global mesh (jit does the
communication). Work that is not (preparing data, evaluating, writing sample files) uses:
  on_primary(fn, what)    process 0 runs fn (writes a dataset, installs a file), the others wait and learn whether
                          it succeeded
  sync(name)              a barrier
  share(n) / gather(d)    a loop of n independent items (sampling batches): each process computes its share on its
                          own devices, `gather` hands every process all the results in order, so the outcome is the
                          single-process one whatever the number of processes
Only process 0 writes logs, metrics, samples and reports (`is_primary`); checkpoints are written by all (orbax).
Every process must see the same files: the workdir (and data folders) on storage all of them share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import os
import pickle
from typing import Any, TypeVar

from absl import logging
import jax
import numpy as np

from nbp_jax import errors

T = TypeVar('T')


def _wants_distributed(env: Mapping[str, str]) -> str | None:
  """Returns why this process should join a distributed run, or None."""
  flag = env.get('NBP_DISTRIBUTED', '')
  if flag == '0':
    return None
  if flag == '1':
    return 'NBP_DISTRIBUTED=1'
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return f'JAX_COORDINATOR_ADDRESS={env["JAX_COORDINATOR_ADDRESS"]}'
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_JOB_ID' in env:
    return f'SLURM job {env["SLURM_JOB_ID"]} with {env["SLURM_NTASKS"]} tasks'
  if env.get('MEGASCALE_COORDINATOR_ADDRESS') or ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    return 'a multi-host TPU slice'
  return None


class DistributedInitError(errors.UserError, RuntimeError):
  """jax.distributed could not start (a wrong coordinator address, a process that never came)."""


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Joins the distributed run if the environment asks for one; returns True if this is a multi-process run.

  Idempotent: a second call (or a run where the caller already initialised JAX) does nothing.
  """
  env = os.environ if env is None else env
  reason = _wants_distributed(env)
  if reason is None:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if env.get('JAX_COORDINATOR_ADDRESS'):
    kwargs['coordinator_address'] = env['JAX_COORDINATOR_ADDRESS']
    if env.get('JAX_NUM_PROCESSES'):
      kwargs['num_processes'] = int(env['JAX_NUM_PROCESSES'])
    if env.get('JAX_PROCESS_ID'):
      kwargs['process_id'] = int(env['JAX_PROCESS_ID'])
  logging.info('jax.distributed.initialize(%s) because of %s', kwargs, reason)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedInitError(
        f'jax.distributed.initialize failed ({reason}): {e}. Check that every process sees the same '
        'coordinator address and port, or set NBP_DISTRIBUTED=0 for a single-process run.') from e
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def is_primary() -> bool:
  """True on the one process that writes logs, metrics and samples (checkpoints are written by all)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process has reached the barrier `name` (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def on_primary(fn: Callable[[], Any], what: str) -> None:
  """Runs fn() on process 0 only; every process returns when it has finished.

  Where it failed, process 0 raises its exception and the others a UserError that points at process 0's log (a
  plain barrier would leave them waiting for ever).
  """
  if jax.process_count() == 1:
    fn()
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error = None
  if is_primary():
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
  if error is not None:
    raise error
  if int(failed):
    raise errors.UserError(f'{what} failed on process 0; its log says why.')


def share(num: int) -> range:
  """The items of a loop of `num` that this process computes: process_index, + process_count, ... (all of them in
  a single-process run)."""
  return range(jax.process_index(), num, jax.process_count())


def gather(results: dict[int, T]) -> list[T]:
  """Every process's {item index: result} of its `share`, merged: [result of item 0, 1, ...] on every process.

  The results are any picklable values (numpy arrays, dicts of them), pickled and exchanged through the devices'
  collectives (an all-gather of their sizes, then one of their bytes); keep them small (features, metrics, the few
  videos on show), not whole datasets.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    data = np.frombuffer(pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    results = {}
    for row, size in zip(everyone, sizes):
      results.update(pickle.loads(row[:size].tobytes()))
  if sorted(results) != list(range(len(results))):
    raise ValueError(f'gather: the processes computed items {sorted(results)}, not 0..{len(results) - 1}.')
  return [results[i] for i in range(len(results))]
