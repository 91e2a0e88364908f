"""The class-accuracy classifier and the copy-last-frame baseline, against hand-made inputs."""

import numpy as np
import pytest

from nbp_jax import image_metrics
from nbp_jax.data import synthetic
from nbp_jax.evaluation import classifier
from nbp_jax.evaluation import protocols


def test_accuracy_of_hand_made_predictions():
  labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
  assert classifier.accuracy(labels, labels) == 1.0
  assert classifier.accuracy((labels + 1) % 4, labels) == 0.0
  assert classifier.accuracy(np.array([0, 1, 2, 3, 3, 3, 3, 3]), labels) == 5 / 8
  with pytest.raises(ValueError, match='non-empty'):
    classifier.accuracy(labels[:3], labels)


def test_shuffled_labels_are_a_permutation():
  labels = np.repeat(np.arange(4), 16)
  mixed = classifier.shuffled(labels, seed=3)
  assert sorted(mixed) == sorted(labels) and not np.array_equal(mixed, labels)
  # A classifier that is always right scores about chance against shuffled labels.
  assert classifier.accuracy(labels, mixed) < 0.5


def test_copy_last_prediction_repeats_the_last_given_frame():
  rng = np.random.default_rng(0)
  videos = rng.integers(0, 256, (2, 6, 4, 4, 3), dtype=np.uint8)
  before = videos.copy()
  out = protocols.copy_last_prediction(videos, given=2)
  np.testing.assert_array_equal(out[:, :2], videos[:, :2])
  for t in range(2, 6):
    np.testing.assert_array_equal(out[:, t], videos[:, 1])
  np.testing.assert_array_equal(videos, before)  # the input untouched
  # On a still clip the baseline is perfect (PSNR at its 8-bit cap); on a changing one it is not.
  still = np.repeat(videos[:, :1], 6, axis=1)
  np.testing.assert_allclose(np.asarray(image_metrics.psnr(protocols.copy_last_prediction(still, 2)[:, 2:],
                                                           still[:, 2:])), 58.9226, atol=1e-3)
  assert np.all(np.asarray(image_metrics.psnr(out[:, 2:], videos[:, 2:])) < 20.0)
  with pytest.raises(ValueError, match='given'):
    protocols.copy_last_prediction(videos, given=6)


def _clips(count, seed0, num_classes=4):
  labels = np.arange(count) % num_classes
  videos = np.stack([synthetic.generate_video(seed0 + i, int(l), 9, 16) for i, l in enumerate(labels)])
  return videos, labels.astype(np.int32)


def test_classifier_separates_the_synthetic_classes_and_shuffled_labels_fall_to_chance():
  train_videos, train_labels = _clips(128, 0)
  test_videos, test_labels = _clips(32, 10_000)
  params = classifier.train(classifier.Clips.from_arrays(train_videos, train_labels), 4, steps=100, batch_size=16,
                            progress=False)
  predict = classifier.make_predict_fn(params, 4)
  predicted = predict(test_videos)
  assert predicted.shape == (32,) and predicted.dtype == np.int32
  assert classifier.accuracy(predicted, test_labels) >= 0.8  # the ceiling: real clips, true labels
  assert classifier.accuracy(predicted, classifier.shuffled(test_labels, 1)) <= 0.5  # the floor: ~chance (0.25)
  # A clip of one class shown as another's is scored wrong: the label, not the clip, decides.
  assert classifier.accuracy(predict(test_videos), (test_labels + 1) % 4) <= 0.1


def test_cached_classifier_trains_once_reading_only_the_batches_it_draws(tmp_path):
  videos, labels = _clips(48, 0)
  calls, read = [], []

  def clips_fn():
    calls.append(1)

    def reader(indices):
      read.extend(indices.tolist())
      return videos[indices], labels[indices]

    return classifier.Clips(len(labels), reader)

  key = {'dataset': 'synthetic_test', 'split': 'train'}
  first = classifier.cached_classifier(str(tmp_path), key, clips_fn, 4, 9, steps=5)
  second = classifier.cached_classifier(str(tmp_path), key, clips_fn, 4, 9, steps=5)
  assert len(calls) == 1
  np.testing.assert_array_equal(first(videos), second(videos))
  # One clip for the shapes, then 5 steps of 32 distinct clips of the 48: only what a step draws is read.
  assert len(read) == 1 + 5 * 32 and all(len(set(read[1 + 32 * i:33 + 32 * i])) == 32 for i in range(5))
