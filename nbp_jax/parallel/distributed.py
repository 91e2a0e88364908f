"""Multi-host start-up: `jax.distributed.initialize()` when the environment says this is one of several processes.

Call `initialize_distributed()` first thing in a process, before any JAX computation. Recognised environments:
  JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID)   any cluster, set by hand or by launch/*.sh
  SLURM with SLURM_NTASKS > 1                                     launch/slurm_gpu.sbatch (srun, one task per GPU)
  NBP_DISTRIBUTED=1                                               TPU pod slices (launch/tpu_pod.sh): JAX reads the
                                                                  coordinator from the TPU VM metadata
NBP_DISTRIBUTED=0 turns all of this off (e.g. a single-host debug run inside a SLURM allocation).
"""

from __future__ import annotations

from collections.abc import Mapping
import os

from absl import logging
import jax


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
    raise RuntimeError(
        f'jax.distributed.initialize failed ({reason}): {e}. Check that every process sees the same '
        'coordinator address and port, or set NBP_DISTRIBUTED=0 for a single-process run.') from e
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def is_primary() -> bool:
  """True on the one process that writes logs, metrics and samples (checkpoints are written by all)."""
  return jax.process_index() == 0
