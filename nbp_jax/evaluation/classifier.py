"""A small video classifier trained on the real clips: class accuracy of class-conditional samples.

FVD says whether samples look like the data; it does not say whether a sample of class c shows class c. This
classifier, trained once on the real train clips of the prepared dataset, answers that: the accuracy of its
predictions on samples generated for label c, beside two references measured with the same classifier:
  - real held-out clips with their true labels (the ceiling: what a perfect generator would score);
  - the same real clips with shuffled labels (the floor: what a generator that ignores the label would score).

The network sees the clip squashed to 32x32 with its frames stacked as channels, plus the frame differences (so
motion, not only appearance, separates classes): [B, T, H, W, 3] uint8 -> logits [B, num_classes]. It is trained
with AdamW for eval.classifier_steps steps and cached in STATS_DIR/eval_classifier/ (keyed by dataset, split,
classes and steps), so every model evaluated on the same data is scored by the same classifier.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import hashlib
import json
import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from nbp_jax import checkpoint as checkpoint_lib
from nbp_jax import parallel
from nbp_jax import trainer

_INPUT_SIZE = 32


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of predicted class ids [N] that equal `labels` [N]."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape or predictions.ndim != 1 or not len(labels):
    raise ValueError(f'accuracy needs two non-empty [N] arrays; got {predictions.shape} and {labels.shape}.')
  return float(np.mean(predictions == labels))


def shuffled(labels: np.ndarray, seed: int = 0) -> np.ndarray:
  """The labels in a random order (the floor: a generator that ignores the label scores about this)."""
  return np.random.default_rng(seed).permutation(np.asarray(labels))


class VideoClassifier(nn.Module):
  """[B, T, H, W, 3] float in [0, 1] -> logits [B, num_classes]."""
  num_classes: int
  width: int = 32

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    b, t, h, w, c = video.shape
    if (h, w) != (_INPUT_SIZE, _INPUT_SIZE):
      video = jax.image.resize(video, (b, t, _INPUT_SIZE, _INPUT_SIZE, c), 'linear')
    diffs = video[:, 1:] - video[:, :-1]
    stack = lambda v: jnp.moveaxis(v, 1, -2).reshape(b, _INPUT_SIZE, _INPUT_SIZE, -1)  # frames -> channels
    x = jnp.concatenate([stack(video - 0.5), 4.0 * stack(diffs)], axis=-1)
    for i, features in enumerate((self.width, 2 * self.width, 2 * self.width)):
      x = nn.relu(nn.Conv(features, (3, 3), strides=(2, 2), name=f'conv_{i}')(x))
    return nn.Dense(self.num_classes, name='head')(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class Clips:
  """Labelled clips read a batch at a time, so that training never holds a whole split (UCF-101's is ~8 GB).

  count: how many clips; read: indices [n] int -> (uint8 clips [n, T, H, W, 3], int labels [n]).
  """
  count: int
  read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

  @classmethod
  def from_arrays(cls, videos: np.ndarray, labels: np.ndarray) -> Clips:
    videos, labels = np.asarray(videos), np.asarray(labels, np.int32)
    if len(videos) != len(labels):
      raise ValueError(f'classifier clips need as many labels as clips; got {len(videos)} clips, {len(labels)} '
                       'labels.')
    return cls(len(labels), lambda idx: (videos[idx], labels[idx]))


def train(clips: Clips, num_classes: int, *, steps: int, batch_size: int = 32, lr: float = 5e-3, seed: int = 0,
          progress: bool = True):
  """Trains a VideoClassifier on `clips` (batches drawn without replacement, each step on its own); returns its
  params."""
  if not clips.count:
    raise ValueError('classifier.train needs at least one clip.')
  model = VideoClassifier(num_classes)
  first, _ = clips.read(np.zeros((1,), np.int64))
  dummy = jnp.zeros(first.shape, jnp.float32)
  params = trainer.jit_init(lambda r: model.init(r, dummy)['params'], jax.random.key(seed))
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), max(steps, 2)),
                    weight_decay=1e-4)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({'params': p}, x.astype(jnp.float32) / 255.0)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  order = np.random.default_rng(seed)
  batch_size = min(batch_size, clips.count)
  for _ in tqdm(range(steps), desc='eval classifier', leave=False, disable=not progress):
    videos, labels = clips.read(order.choice(clips.count, batch_size, replace=False))
    params, opt_state, _ = step(params, opt_state, jnp.asarray(videos), jnp.asarray(labels, jnp.int32))
  return params


def make_predict_fn(params, num_classes: int, batch_size: int = 64) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 clips [N, T, H, W, 3] -> predicted class ids [N] int32."""
  model = VideoClassifier(num_classes)
  logits_fn = jax.jit(lambda p, x: model.apply({'params': p}, x.astype(jnp.float32) / 255.0))

  def predict(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    out = [np.argmax(np.asarray(logits_fn(params, jnp.asarray(videos[i:i + batch_size]))), -1)
           for i in range(0, len(videos), batch_size)]
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)

  return predict


# The classifier's architecture and training recipe: raise it when either changes, so that no cached classifier of
# the old one is reused (its params could load into the new tree, or fail to).
CLASSIFIER_VERSION = 1


def cached_classifier(cache_dir: str, key: dict, clips_fn: Callable[[], Clips], num_classes: int, num_frames: int,
                      steps: int) -> Callable[[np.ndarray], np.ndarray]:
  """The predict function of the classifier described by `key`, trained on `clips_fn()` once and cached.

  key: what identifies the training data (dataset name, split, clip count); classes, frames and steps are added.
  clips_fn: () -> the training Clips (of num_frames frames); called only when nothing is cached.
  """
  key = {**key, 'num_classes': int(num_classes), 'num_frames': int(num_frames), 'steps': int(steps),
         'version': CLASSIFIER_VERSION}
  digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.join(cache_dir, 'eval_classifier', f'{digest}.msgpack')
  if os.path.exists(path):
    # Only the tree's structure is needed to restore: shapes, without running the initialisers op by op.
    dummy = jax.ShapeDtypeStruct((1, num_frames, _INPUT_SIZE, _INPUT_SIZE, 3), jnp.float32)
    template = jax.eval_shape(VideoClassifier(num_classes).init, jax.random.key(0), dummy)
    with open(path, 'rb') as f:
      params = flax.serialization.from_bytes(template['params'], f.read())
  else:
    params = train(clips_fn(), num_classes, steps=steps)
    if parallel.is_primary():
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + '.tmp'
      with open(tmp, 'wb') as f:
        f.write(flax.serialization.to_bytes(jax.device_get(params)))
      checkpoint_lib.write_json(os.path.join(os.path.dirname(path), f'{digest}.json'), key)
      os.replace(tmp, path)
  return make_predict_fn(params, num_classes)
