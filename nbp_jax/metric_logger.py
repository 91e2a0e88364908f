"""Metrics to TensorBoard (event files in WORKDIR: scalars, sample images, the config as text) and scalars to
WORKDIR/metrics.jsonl; MFU bookkeeping.

Only process 0 writes; on other processes the writer is a no-op, so callers need no `if process_index == 0`.
"""

from __future__ import annotations

from collections.abc import Mapping
import glob
import json
import math
import os

import jax
import numpy as np

from nbp_jax import parallel

METRICS_FILE = 'metrics.jsonl'

# Dense bf16 peak FLOP/s per JAX device, by `jax.Device.device_kind` prefix (vendor data sheets; a TPU chip is one
# device, except v2 and v3, whose two TensorCores are a device each: half the chip's 45 and 123 TFLOP/s).
PEAK_FLOPS = (
    ('TPU v2', 22.5e12),
    ('TPU v3', 61.5e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),
    ('TPU v6e', 918e12),
    ('TPU7x', 2307e12),
    ('NVIDIA H100', 989e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA H800', 989e12),
    ('NVIDIA GH200', 989e12),
    ('NVIDIA B200', 2250e12),
    ('NVIDIA A100', 312e12),
    ('NVIDIA A800', 312e12),
    ('NVIDIA L4', 121e12),
    ('NVIDIA A10', 125e12),
)


def peak_flops_per_device(device: jax.Device | None = None, override_tflops: float = 0.0) -> float:
  """Peak FLOP/s of one device; 0.0 when unknown (CPU), in which case no MFU is reported."""
  if override_tflops:
    return float(override_tflops) * 1e12
  device = device or jax.devices()[0]
  kind = getattr(device, 'device_kind', '')
  for prefix, flops in PEAK_FLOPS:
    if kind.startswith(prefix):
      return flops
  return 0.0


def mfu(flops_per_example: float, examples_per_s: float, num_devices: int, peak_per_device: float) -> float:
  """Model FLOPs utilisation in [0, 1]; NaN when the task's FLOPs or the device's peak is unknown."""
  if flops_per_example <= 0 or peak_per_device <= 0:
    return math.nan
  return flops_per_example * examples_per_s / (num_devices * peak_per_device)


class MetricWriter:
  """TensorBoard + metrics.jsonl writer (one JSON object per logged step, always with 'step').

  The TensorBoard event file is opened at the first write, so a run that logs nothing (a finished run rerun, a
  refused resume) leaves no empty event file behind. `purge_step`: a resumed run's first step; TensorBoard then hides
  the events of earlier files from that step on (written after the checkpoint it resumed from), so no step shows twice.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, purge_step: int | None = None):
    self.enabled = parallel.is_primary() if enabled is None else enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    self.purge_step = purge_step
    self._tb = None

  def _tensorboard(self):
    if self._tb is None:
      os.makedirs(self.workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=self.workdir, flush_secs=30, purge_step=self.purge_step)
    return self._tb

  def truncate_after(self, step: int) -> None:
    """Drops metrics.jsonl lines of steps > `step` (written after the checkpoint a resumed run restarts from),
    so the file reads as one uninterrupted run."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line)['step'] <= step:
            kept.append(line if line.endswith('\n') else line + '\n')
        except (ValueError, KeyError):
          continue  # a line cut short by a kill
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    tb = self._tensorboard()
    for k, v in clean.items():
      if math.isfinite(v):
        tb.add_scalar(k, v, step)
    record = {'step': int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
    os.makedirs(self.workdir, exist_ok=True)
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """One image uint8 [H, W, 3] (e.g. a sample grid) to TensorBoard's images tab; not to metrics.jsonl."""
    if not self.enabled:
      return
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f'{tag}: expected an image uint8 [H, W, 3], got {image.dtype} {image.shape}.')
    self._tensorboard().add_image(tag, image, step, dataformats='HWC')

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Text to TensorBoard's text tab, shown verbatim (as a markdown code block: every line indented 4 spaces)."""
    if not self.enabled:
      return
    self._tensorboard().add_text(tag, '\n'.join('    ' + line for line in text.splitlines()), step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def has_events(workdir: str) -> bool:
  """True when WORKDIR holds TensorBoard event files (of an earlier run in that workdir)."""
  return bool(glob.glob(os.path.join(workdir, 'events.out.tfevents.*')))


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl (for tests and notebooks)."""
  out = []
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    for line in f:
      if line.strip():
        out.append(json.loads(line))
  return out
