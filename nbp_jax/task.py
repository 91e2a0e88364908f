"""The contract between a model stage (transformer, tokenizer) and the shared trainer.

A stage builds a `Task` from the config; `nbp_jax.trainer` trains any `Task` with the same loop, sharding,
checkpointing and logging. Nothing here depends on a particular model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax
import optax

PyTree = Any
Batch = Mapping[str, jax.Array]
# (params, batch, rng, train) -> (scalar loss, {metric name: scalar}).
LossFn = Callable[[PyTree, Batch, jax.Array, bool], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Task:
  """What the trainer needs to train one model.

  Attributes:
    name: short name used in logs and checkpoint metadata ('nbp', 'tokenizer').
    init_params: rng -> params. Leaves may be boxed with flax logical axis names
      (`nn.LogicallyPartitioned`); the trainer turns those names into mesh shardings by the config's rules.
    loss_fn: pure, jittable; `train=False` disables dropout and anything stochastic that is not sampling.
    make_optimizer: optional override of the default optax chain built from `config.optim` (e.g. the tokenizer's
      separate generator/discriminator optimizers via `optax.multi_transform`): () -> (optimizer, the learning-rate
      schedule the trainer logs as `learning_rate`, or None).
    flops_per_example: training FLOPs (forward + backward) for one example, for the MFU estimate; 0 = unknown.
    tokens_per_example: tokens one example contributes to the loss, for tokens/s; 0 = unknown.
    prepare_batch: optional jittable map from the data pipeline's batch to the loss's batch (e.g. encode
      video to codes on the fly); identity when None.
    write_samples: optional host-side callback (params, step, workdir) that writes sample videos/grids.
    function_fields: config fields that change what the params compute without changing their shapes: a resume
      whose config differs from the checkpoint's in one of them is refused (checkpoint.FUNCTION_FIELDS).
    batch_fields: the config fields of the global batch and its accumulation, as the trainer's errors name them.
    stability_fields: what to change after a non-finite loss, as the trainer's error says it.
  """
  name: str
  init_params: Callable[[jax.Array], PyTree]
  loss_fn: LossFn
  make_optimizer: Callable[[], tuple[optax.GradientTransformation, optax.Schedule | None]] | None = None
  flops_per_example: float = 0.0
  tokens_per_example: int = 0
  prepare_batch: Callable[[Batch], Batch] | None = None
  write_samples: Callable[[PyTree, int, str], None] | None = None
  function_fields: tuple[str, ...] = ()
  batch_fields: tuple[str, str] = ('data.batch_size', 'optim.grad_accum_steps')
  stability_fields: str = 'lower optim.lr, raise optim.warmup_steps or lower optim.grad_clip'
