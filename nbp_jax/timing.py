"""The one wall-clock timer of JAX calls: the benchmarks (python -m nbp_jax.bench) and `Generator.generation_speed`
(the pipeline's, the study's and the notebooks' decoding speeds) all time with it."""

from __future__ import annotations

from collections.abc import Callable
import time
from typing import Any

import jax


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
