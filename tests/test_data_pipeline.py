"""Grain pipelines over the array_record datasets: seeded, resumable, sharded per host, generic over features."""

import hashlib

import numpy as np
import pytest

from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax.data import builder
from nbp_jax.data import pipeline
from nbp_jax.data import prepare
from nbp_jax.data import synthetic
from nbp_jax.nbp import train as nbp_train

NUM_TRAIN, NUM_VAL, BATCH = 24, 10, 4


def _config():
  c = config_lib.task_config('demo', 'micro')
  c.data.num_frames = 5
  c.data.resolution = 16
  c.data.batch_size = BATCH
  c.data.synthetic.num_train = NUM_TRAIN
  c.data.synthetic.num_val = NUM_VAL
  c.data.synthetic.num_classes = 3
  return c


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pipeline'))
  config = _config()
  prepare.prepare_synthetic(config, builder.video_location(config, workdir))
  return workdir


def _digest(video):
  return hashlib.sha1(np.ascontiguousarray(video).tobytes()).hexdigest()


def _all_records(workdir, split):
  """{digest of video: label} straight from the data source, bypassing the pipeline."""
  source = builder.data_source(builder.video_location(_config(), workdir), split)
  return {_digest(source[i]['video']): int(source[i]['label']) for i in range(len(source))}


def _batches(workdir, seed, n, **kwargs):
  it = pipeline.make_iterator(pipeline.make_dataset(_config(), workdir, 'train', seed=seed, shard_index=0,
                                                    shard_count=1, **kwargs))
  return [next(it) for _ in range(n)]


def test_batches_have_the_contract_shapes_and_real_records(workdir):
  records = _all_records(workdir, 'train')
  for batch in _batches(workdir, seed=0, n=2):
    assert set(batch) == {'video', 'label'}
    assert batch['video'].shape == (BATCH, 5, 16, 16, 3) and batch['video'].dtype == np.uint8
    assert batch['label'].shape == (BATCH,) and batch['label'].dtype == np.int32
    for video, label in zip(batch['video'], batch['label']):
      assert records[_digest(video)] == label


def test_same_seed_same_bytes_other_seed_other_bytes(workdir):
  def as_bytes(batches):
    return b''.join(b['video'].tobytes() + b['label'].tobytes() for b in batches)

  first, again, other = (as_bytes(_batches(workdir, seed=s, n=2)) for s in (0, 0, 1))
  assert first == again
  assert first != other


def test_synthetic_dataset_is_the_generator_output(workdir):
  """Stored clips are exactly synthetic.generate_video(...) for the per-example seed the builder documents."""
  config = _config()
  source = builder.data_source(builder.video_location(config, workdir), 'validation')
  stored = {_digest(source[i]['video']) for i in range(len(source))}
  s = config.data.synthetic
  expected = set()
  for i in range(NUM_VAL):
    seed = int(np.random.SeedSequence([s.seed, 1, i]).generate_state(1)[0])
    expected.add(_digest(synthetic.generate_video(seed, i % s.num_classes, 5, 16)))
  assert stored == expected


def test_restored_iterator_continues_where_it_stopped(workdir):
  # 8 batches of 4 cross the end of the 24-clip epoch (6 batches), so the restore also covers the reshuffle.
  reference = _batches(workdir, seed=3, n=8)
  it = pipeline.make_iterator(pipeline.make_dataset(_config(), workdir, 'train', seed=3, shard_index=0,
                                                    shard_count=1))
  for _ in range(3):
    next(it)
  state = it.get_state()
  next(it)  # the live iterator moves on; the saved state must not
  restored = pipeline.make_iterator(pipeline.make_dataset(_config(), workdir, 'train', seed=3, shard_index=0,
                                                          shard_count=1))
  restored.set_state(state)
  for expected in reference[3:]:
    got = next(restored)
    np.testing.assert_array_equal(got['video'], expected['video'])
    np.testing.assert_array_equal(got['label'], expected['label'])


def test_epochs_are_reshuffled_and_complete(workdir):
  batches = _batches(workdir, seed=0, n=2 * NUM_TRAIN // BATCH)
  digests = [_digest(v) for b in batches for v in b['video']]
  epoch1, epoch2 = digests[:NUM_TRAIN], digests[NUM_TRAIN:]
  assert set(epoch1) == set(epoch2) == set(_all_records(workdir, 'train'))
  assert epoch1 != epoch2


@pytest.mark.parametrize('split,num_epochs', [('validation', 1), ('train', None)])
def test_host_shards_are_disjoint_and_cover_the_data(workdir, split, num_epochs):
  records = _all_records(workdir, split)
  per_host = len(records) // 2
  shards = []
  for index in range(2):
    ds = pipeline.make_dataset(_config(), workdir, split, seed=5, shard_index=index, shard_count=2, batch_size=2,
                               shuffle=True, num_epochs=num_epochs)
    it = pipeline.make_iterator(ds)
    # One epoch's worth of this host's examples (per-host batch 1).
    shards.append([_digest(next(it)['video'][0]) for _ in range(per_host)])
  first, second = set(shards[0]), set(shards[1])
  assert len(first) == len(shards[0]) and len(second) == len(shards[1])
  assert not first & second
  assert first | second == set(records)


def test_one_pass_gives_every_host_as_many_batches(workdir):
  """A collective per batch (the trainer's evaluation) needs as many batches on every host: 10 held-out clips over
  3 hosts are 3 + 3 + 3 in batches of 1 (host 0 had a fourth), 1 + 1 + 1 in batches of 2 (host 0 had two)."""
  for per_host, want in ((1, 3), (2, 1)):
    counts = [len(pipeline.make_dataset(_config(), workdir, 'validation', seed=0, shard_index=i, shard_count=3,
                                        batch_size=3 * per_host)) for i in range(3)]
    assert counts == [want] * 3, (per_host, counts)
  # Several passes the same way: 2 x 10 clips are 6 batches of 1 per host (host 0 had a seventh), 3 of 2 (it had 4).
  for per_host, want in ((1, 6), (2, 3)):
    counts = [len(pipeline.make_dataset(_config(), workdir, 'validation', seed=0, shard_index=i, shard_count=3,
                                        batch_size=3 * per_host, num_epochs=2)) for i in range(3)]
    assert counts == [want] * 3, (per_host, counts)


def test_generic_features_for_pre_tokenized_datasets(tmp_path):
  """The same pipeline reads a dataset of other features (the tokenizer stage's codes)."""
  location = builder.Location(str(tmp_path / 'tokens'), 'codes_test')
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 64000, size=(6, 2, 3, 3)).astype(np.int16)

  def records():
    for i in range(6):
      yield f'{i}', {'codes': codes[i], 'label': i % 2}

  builder.build(location, {'codes': ((2, 3, 3), np.int16), 'label': ((), np.int32)}, {'train': records})
  ds = pipeline.make_dataset(_config(), str(tmp_path), 'train', seed=0, shard_index=0, shard_count=1, batch_size=3,
                             num_epochs=1, location=location)
  batches = list(pipeline.make_iterator(ds))
  assert len(batches) == 2
  assert batches[0]['codes'].dtype == np.int16 and batches[0]['codes'].shape == (3, 2, 3, 3)
  assert batches[0]['label'].dtype == np.int32
  got = sorted(b.tobytes() for batch in batches for b in batch['codes'])
  assert got == sorted(c.tobytes() for c in codes)


def test_eval_split_and_num_examples(workdir):
  config = _config()
  assert pipeline.eval_split(config, workdir) == 'validation'
  assert pipeline.num_examples(config, workdir, 'train') == NUM_TRAIN
  batch = next(pipeline.make_iterator(pipeline.make_dataset(config, workdir, 'eval', seed=0, shard_index=0,
                                                            shard_count=1)))
  assert batch['video'].shape[0] == BATCH


def test_errors_name_the_fix(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='prepare_data'):
    pipeline.make_dataset(_config(), str(tmp_path), 'train', seed=0, shard_index=0, shard_count=1)
  # Each is a UserError (one line from `nbp_jax.main`, no traceback) naming the field the batch size came from.
  with pytest.raises(errors.UserError, match=r'data\.batch_size=\d+ is not divisible by the 3 hosts'):
    pipeline.make_dataset(_config(), workdir, 'train', seed=0, shard_index=0, shard_count=3)
  with pytest.raises(errors.UserError, match=r'tokenizer\.batch_size=\d+ is not divisible'):
    pipeline.make_dataset(_config(), workdir, 'train', seed=0, shard_index=0, shard_count=3,
                          batch_field='tokenizer.batch_size')
  with pytest.raises(errors.UserError, match=r'fewer than one batch of 64; lower tokenizer\.batch_size'):
    pipeline.make_dataset(_config(), workdir, 'validation', seed=0, shard_index=0, shard_count=1, batch_size=64,
                          batch_field='tokenizer.batch_size')
  with pytest.raises(errors.UserError, match="'nope'"):
    pipeline.make_dataset(_config(), workdir, 'nope', seed=0, shard_index=0, shard_count=1)
  # A dataset without held-out clips (a folder without split lists) names the way out, which evaluates in one pass.
  config = _config()
  config.data.synthetic.num_val = 0
  prepare.prepare_synthetic(config, builder.video_location(config, str(tmp_path / 'train_only')))
  with pytest.raises(errors.MissingError, match=r"has no validation or test split \(it has \['train'\]\).*"
                                                 r'--config\.data\.eval_split=train'):
    pipeline.make_dataset(config, str(tmp_path / 'train_only'), 'eval', seed=0, shard_index=0, shard_count=1)
  config.data.eval_split = 'train'
  once = pipeline.make_dataset(config, str(tmp_path / 'train_only'), 'eval', seed=0, shard_index=0, shard_count=1)
  first = next(iter(once))['video']
  assert len(once) == NUM_TRAIN // BATCH and _digest(first[0]) == _digest(
      builder.data_source(builder.video_location(config, str(tmp_path / 'train_only')), 'train')[0]['video'])
  # A class-conditional model of 4 classes is not trained on the 3 classes' dataset (labels would be clamped).
  config = _config()
  config.data.num_classes, config.nbp.condition = 4, 'class'
  with pytest.raises(config_lib.ConfigError, match=r'data\.num_classes=4 but the dataset at .* has 3 classes'):
    nbp_train.run(config, workdir)
  # Nor on clips without labels (-1: the gather would clamp them to the last class).
  config.data.num_classes = 3
  for name, metadata, which in (('unlabeled', {'class_names': []}, 'its videos have'),
                                ('some', {'class_names': ['a', 'b', 'c'], 'unlabeled_videos': {'train': 2}},
                                 '2 of its training videos have')):
    location = builder.video_location(config, str(tmp_path / name))
    builder.build(location, builder.video_features(5, 16), {'train': lambda: iter([('0', {
        'video': np.zeros((5, 16, 16, 3), np.uint8), 'label': -1})])}, metadata=metadata)
    with pytest.raises(config_lib.ConfigError, match=f'needs a label for every training clip, but {which} no class'):
      nbp_train.run(config, str(tmp_path / name))


def test_first_clips_in_record_order_or_a_seeded_repeating_shuffle(workdir):
  config = _config()
  source = builder.data_source(builder.video_location(config, workdir), 'validation')
  in_order = [_digest(source[i]['video']) for i in range(NUM_VAL)]
  (first,) = list(pipeline.first_clips(config, workdir, 3))  # the held-out split, one batch
  assert [_digest(v) for v in first['video']] == in_order[:3]
  assert [int(l) for l in first['label']] == [int(source[i]['label']) for i in range(3)]
  # Unshuffled: one epoch at most.
  assert [len(b['video']) for b in pipeline.first_clips(config, workdir, NUM_VAL + 2)] == [NUM_VAL]

  def shuffled(seed):
    batches = list(pipeline.first_clips(config, workdir, 2 * NUM_VAL + 3, split='validation', batch_size=BATCH,
                                        shuffle=True, seed=seed))
    return [len(b['video']) for b in batches], [_digest(v) for b in batches for v in b['video']]

  sizes, order = shuffled(7)
  assert sizes == [4, 4, 4, 4, 4, 3]
  # Every epoch is the whole split in a new order; the same seed gives the same clips, another seed others.
  assert sorted(order[:NUM_VAL]) == sorted(order[NUM_VAL:2 * NUM_VAL]) == sorted(in_order)
  assert order[:NUM_VAL] != order[NUM_VAL:2 * NUM_VAL] and order[:NUM_VAL] != in_order
  assert shuffled(7)[1] == order and shuffled(8)[1] != order


def test_example_clips_without_a_dataset_are_the_held_out_synthetic_clips(workdir, tmp_path):
  config = _config()
  clips, missing = pipeline.example_clips(config, str(tmp_path), 3)  # nothing prepared there
  assert missing and 'prepare_data' in missing
  held_out = _all_records(workdir, 'validation')  # the split's clips, in TFDS's (hashed) record order
  assert [held_out.get(_digest(video)) for video in clips['video']] == [int(label) for label in clips['label']]
  config.data.num_classes = 2  # a model of fewer classes: the motions' labels in its range
  clips, _ = pipeline.example_clips(config, str(tmp_path), 3, num_frames=7, resolution=8)
  assert clips['video'].shape == (3, 7, 8, 8, 3) and clips['label'].max() < 2
