"""The one wall-clock timer of JAX calls: the benchmarks (python -m nbp_jax.bench) and `Generator.generation_speed`
(the pipeline's, the study's and the notebooks' decoding speeds) all time with it."""

from __future__ import annotations

from collections.abc import Callable
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp


def timings(fn: Callable[[], Any], repeats: int, *, warmup: int = 1) -> list[float]:
  """Wall seconds of each of `repeats` calls of `fn()`, after `warmup` untimed calls (compilation); every call is
  waited for (jax.block_until_ready of what it returns)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - t0)
  return seconds


def best_of(fn: Callable[[], Any], repeats: int = 3, *, warmup: int = 1) -> float:
  """The fastest of `repeats` timed calls of `fn()` (seconds), compilation excluded: the run least disturbed by
  other processes."""
  return min(timings(fn, repeats, warmup=warmup))


def matmul_peak_flops(dtype: str = 'float32', n: int = 2048, repeats: int = 5) -> float:
  """This machine's measured dense matmul FLOP/s on the default device: an [n, n] x [n, n] product in `dtype`,
  median of `repeats`. Stands in for the datasheet peak where there is none (CPU), so a CPU "MFU" exists."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  return 2 * n ** 3 / statistics.median(timings(lambda: matmul(a, b), repeats))
