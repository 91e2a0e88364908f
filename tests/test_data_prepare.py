"""--mode=prepare_data on tiny fake UCF-101 and Kinetics folders written here (good, corrupt, too short)."""

import csv
import json
import os
import shutil
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
from PIL import Image
import pytest

from nbp_jax import config_lib
from nbp_jax import errors
from nbp_jax.data import builder
from nbp_jax.data import prepare
from nbp_jax.data import synthetic
from nbp_jax.data import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, RES, FPS = 9, 32, 8


def _write_video(path, seed, label, num_frames, fps=25):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  frames = synthetic.generate_video(seed, label, num_frames, (48, 64))
  codec = 'mpeg4' if path.endswith('.avi') else 'libx264'
  imageio.mimwrite(path, list(frames), fps=fps, codec=codec, macro_block_size=16)
  return frames


def _write_garbage(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(1).bytes(6000))


def _prepare_cli(raw_dir, workdir, source, *extra):
  return subprocess.run(
      [sys.executable, '-m', 'nbp_jax.main', '--config=configs/demo.py', f'--config.data.source={source}',
       f'--config.data.raw_dir={raw_dir}', f'--workdir={workdir}', '--mode=prepare_data',
       f'--config.data.resolution={RES}', f'--config.data.num_frames={FRAMES}', f'--config.data.fps={FPS}',
       '--config.data.prepare_workers=2', *extra],
      cwd=REPO, capture_output=True, text=True, timeout=300)


def _config(source, **data):
  c = config_lib.task_config('demo', 'micro')
  c.data.update(dict(source=source, resolution=RES, num_frames=FRAMES, fps=FPS, **data))
  return c


def _records(location, split):
  source = builder.data_source(location, split)
  return [source[i] for i in range(len(source))]


def _resized_first_frame(frames):
  return np.asarray(Image.fromarray(frames[0]).resize((RES, RES), Image.BILINEAR), np.float32)


@pytest.fixture(scope='module')
def ucf_run(tmp_path_factory):
  """UCF-style folder: two good .avi, one corrupt .avi, official-style split lists in ucfTrainTestlist/."""
  raw = str(tmp_path_factory.mktemp('UCF-101'))
  good_train = _write_video(os.path.join(raw, 'BounceBall', 'v_BounceBall_g01_c01.avi'), 1, 0, 40)
  good_test = _write_video(os.path.join(raw, 'SpinSquare', 'v_SpinSquare_g02_c01.avi'), 2, 1, 40)
  _write_garbage(os.path.join(raw, 'SpinSquare', 'v_SpinSquare_g03_c01.avi'))
  lists = os.path.join(raw, 'ucfTrainTestlist')
  os.makedirs(lists)
  with open(os.path.join(lists, 'classInd.txt'), 'w') as f:
    f.write('1 BounceBall\n2 SpinSquare\n')
  with open(os.path.join(lists, 'trainlist01.txt'), 'w') as f:
    f.write('BounceBall/v_BounceBall_g01_c01.avi 1\nSpinSquare/v_SpinSquare_g03_c01.avi 2\n')
  with open(os.path.join(lists, 'testlist01.txt'), 'w') as f:
    f.write('SpinSquare/v_SpinSquare_g02_c01.avi\n')
  workdir = str(tmp_path_factory.mktemp('ucf_work'))
  # 40 frames at 25 fps = 1.6 s -> 13 frames at 8 fps -> clips starting at frames 0 and 4.
  out = _prepare_cli(raw, workdir, 'ucf101', '--config.data.clips_per_video=2')
  location = builder.video_location(_config('ucf101', clips_per_video=2), workdir)
  return dict(raw=raw, workdir=workdir, out=out, location=location, good_train=good_train, good_test=good_test)


def test_ucf_good_clips_written_corrupt_reported_exit_0(ucf_run):
  out, location = ucf_run['out'], ucf_run['location']
  assert out.returncode == 0, out.stderr[-3000:]
  train, test = _records(location, 'train'), _records(location, 'test')
  assert len(train) == 2 and len(test) == 2  # two clips from each good video
  for record in train + test:
    assert record['video'].shape == (FRAMES, RES, RES, 3) and record['video'].dtype == np.uint8
  assert {int(r['label']) for r in train} == {0} and {int(r['label']) for r in test} == {1}
  # The clip starting at frame 0 shows the source's first frame (decoded, resized), not some other video.
  for records, source in ((train, ucf_run['good_train']), (test, ucf_run['good_test'])):
    errors = [np.abs(r['video'][0].astype(np.float32) - _resized_first_frame(source)).mean() for r in records]
    assert min(errors) < 12, errors
  report = prepare.read_report(location.path)
  assert [(split, name) for split, name, _ in report] == [('train', 'SpinSquare/v_SpinSquare_g03_c01.avi')]
  assert 'could not decode' in report[0][2]
  assert 'skipped     1 video(s)' in out.stdout and prepare.REPORT_NAME in out.stdout
  assert 'train' in out.stdout and 'test' in out.stdout


def test_rerun_reuses_the_dataset(ucf_run):
  out = _prepare_cli(ucf_run['raw'], ucf_run['workdir'], 'ucf101', '--config.data.clips_per_video=2')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Reusing the prepared dataset' in out.stdout
  assert 'ucf101 train' not in out.stderr  # no decoding progress bar: nothing was decoded again


def test_class_index_files(tmp_path):
  numbered = tmp_path / 'classInd.txt'
  numbered.write_text('2 ApplyLipstick\n10 Archery\n1 ApplyEyeMakeup\n\n')
  assert prepare.read_class_index(str(numbered)) == ['ApplyEyeMakeup', 'ApplyLipstick', 'Archery']
  with_bom = tmp_path / 'bom.txt'
  with_bom.write_bytes('\ufeff# class list\n1 Walk\n2 Run\n'.encode('utf-8'))  # a byte-order mark, a comment
  assert prepare.read_class_index(str(with_bom)) == ['Walk', 'Run']
  one_per_line = tmp_path / 'names.txt'
  one_per_line.write_text('Walk\nJump High\n')
  assert prepare.read_class_index(str(one_per_line)) == ['Walk', 'Jump High']
  mixed = tmp_path / 'mixed.txt'
  mixed.write_text('1 Walk\nRun\n')
  with pytest.raises(prepare.PrepareError, match=r"mixed\.txt: line 'Run' is not \"<number> <class name>\""):
    prepare.read_class_index(str(mixed))
  deep = tmp_path / 'a' / 'b' / 'c' / 'd' / 'ucfTrainTestlist'
  deep.mkdir(parents=True)
  (deep / 'classInd.txt').write_text('1 Walk\n')
  assert prepare.find_class_index(str(tmp_path / 'a')) == str(deep / 'classInd.txt')  # any depth
  assert prepare.find_class_index(str(tmp_path)) == str(numbered)  # the shallowest
  assert prepare.find_class_index(str(tmp_path / 'nothing here')) is None


def _touch(root, *relative):
  for name in relative:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, 'w').close()


def test_listings_keep_every_video_and_its_own_class(tmp_path):
  """Listing only (nothing decoded): the same file name in several class folders, classes differing only in case,
  paths with spaces, labels of several words."""
  own = str(tmp_path / 'own')
  _touch(own, 'cat/clip0.mp4', 'cat/clip1.mp4', 'dog/clip0.mp4', 'dog/clip1.mp4', 'bird/clip0.mp4')
  listing = prepare.list_ucf101(own)  # no classInd.txt: one class per folder
  got = sorted((e.name, listing.class_names[e.label]) for e in listing.splits['train'])
  assert got == [(f'{c}/clip{i}.mp4', c) for c, i in (('bird', 0), ('cat', 0), ('cat', 1), ('dog', 0), ('dog', 1))]

  ucf = str(tmp_path / 'ucf')
  _touch(ucf, 'Drumming/v_Drumming_g01_c01.avi', 'drumming/v_drumming_g01_c01.avi', 'drumming/v_drumming_g02_c01.avi',
         'applyeyemakeup/v_ApplyEyeMakeup_g01_c01.avi', 'Baby Crawling/v_Baby Crawling_g01_c01.avi')
  _touch(ucf, 'lists/deep/er/still/ucfTrainTestlist/placeholder')
  lists = os.path.join(ucf, 'lists', 'deep', 'er', 'still', 'ucfTrainTestlist')
  with open(os.path.join(lists, 'classInd.txt'), 'w', encoding='utf-8-sig') as f:
    f.write('1 ApplyEyeMakeup\n2 Baby Crawling\n3 Drumming\n4 drumming\n')
  with open(os.path.join(lists, 'trainlist01.txt'), 'w') as f:
    f.write('Drumming/v_Drumming_g01_c01.avi 3\ndrumming/v_drumming_g01_c01.avi 4\n'
            'applyeyemakeup/v_ApplyEyeMakeup_g01_c01.avi 1\nBaby Crawling/v_Baby Crawling_g01_c01.avi 2\n')
  with open(os.path.join(lists, 'testlist01.txt'), 'w') as f:
    f.write('drumming/v_drumming_g02_c01.avi\n')
  listing = prepare.list_ucf101(ucf)
  assert not listing.problems
  assert [(e.name, e.label) for e in listing.splits['train']] == [
      ('Drumming/v_Drumming_g01_c01.avi', 2), ('drumming/v_drumming_g01_c01.avi', 3),
      ('applyeyemakeup/v_ApplyEyeMakeup_g01_c01.avi', 0), ('Baby Crawling/v_Baby Crawling_g01_c01.avi', 1)]
  assert [(e.name, e.label) for e in listing.splits['test']] == [('drumming/v_drumming_g02_c01.avi', 3)]

  k600 = str(tmp_path / 'k600')
  _touch(k600, 'clips/my dog video.mp4', 'clips/b.mp4')
  with open(os.path.join(k600, 'trainlist.txt'), 'w') as f:
    f.write('clips/my dog video.mp4 walking the dog\nclips/b.mp4 playing guitar\n')
  listing = prepare.list_k600(k600)
  assert not listing.problems and listing.class_names == ['playing guitar', 'walking the dog']
  assert [(e.name, e.label) for e in listing.splits['train']] == [('clips/my dog video.mp4', 1), ('clips/b.mp4', 0)]
  assert not listing.notes


def test_listings_report_what_they_leave_out(tmp_path):
  """A video no list names is noted; a list's class number beyond classInd.txt is a problem, not a label; a link
  to a folder above is walked once."""
  ucf = str(tmp_path / 'ucf')
  _touch(ucf, 'Apply/v_Apply_g01_c01.avi', 'Apply/v_Apply_g02_c01.avi', 'Zumba/v_Zumba_g01_c01.avi')
  with open(os.path.join(ucf, 'classInd.txt'), 'w') as f:
    f.write('1 Apply\n2 Brush\n')
  with open(os.path.join(ucf, 'trainlist01.txt'), 'w') as f:
    f.write('Apply/v_Apply_g01_c01.avi 1\nZumba/v_Zumba_g01_c01.avi 7\n')
  os.symlink('..', os.path.join(ucf, 'Apply', 'up'))
  listing = prepare.list_ucf101(ucf)
  assert [(e.name, e.label) for e in listing.splits['train']] == [('Apply/v_Apply_g01_c01.avi', 0)]
  assert listing.problems == [('train', 'Zumba/v_Zumba_g01_c01.avi', "class of 'Zumba/v_Zumba_g01_c01.avi' not in "
                                                                     'classInd.txt')]
  # Zumba's video is listed (with a bad class), so only g02 is unlisted.
  (note,) = [n for n in listing.notes if 'no split list' in n]
  assert note.startswith('1 video(s) below data.raw_dir are in no split list') and 'Apply/v_Apply_g02_c01.avi' in note

  folders = str(tmp_path / 'folders')
  _touch(folders, 'A/clip.avi')
  os.symlink('..', os.path.join(folders, 'A', 'up'))
  assert [e.name for e in prepare.list_ucf101(folders).splits['train']] == ['A/clip.avi']


def test_class_names_sources_in_order(ucf_run, tmp_path):
  config = _config('ucf101', clips_per_video=2, num_classes=2)
  prepared = ['BounceBall', 'SpinSquare']
  assert prepare.class_names(config, ucf_run['workdir']) == prepared  # the dataset's record of its labels
  renamed = tmp_path / 'renamed.txt'
  renamed.write_text('Bounce\nSpin\n')
  config.import_.class_names = str(renamed)
  assert prepare.class_names(config, ucf_run['workdir']) == prepared  # the dataset's names come first
  assert prepare.class_names(config, str(tmp_path)) == ['Bounce', 'Spin']  # no dataset there: the given file
  config.import_.class_names = ''
  config.data.raw_dir = ucf_run['raw']
  assert prepare.class_names(config) == prepared  # raw_dir's classInd.txt
  config.data.num_classes = 3  # no source with three names
  assert prepare.class_names(config, ucf_run['workdir']) == ['class 0', 'class 1', 'class 2']
  synthetic_config = _config('synthetic', num_classes=3)
  assert prepare.class_names(synthetic_config) == [synthetic.motion_name(label) for label in range(3)]


def test_a_dataset_of_another_folder_is_not_reused(ucf_run, tmp_path, capsys):
  config = _config('ucf101', clips_per_video=2, raw_dir=str(tmp_path))
  with pytest.raises(prepare.PrepareError, match=r'was prepared from .*UCF-101.*, not data\.raw_dir='):
    prepare.run(config, ucf_run['workdir'])
  # The folder it was prepared from has moved away since: the dataset is taken as this folder's.
  workdir = str(tmp_path / 'moved')
  shutil.copytree(ucf_run['workdir'], workdir)
  metadata_path = os.path.join(builder.video_location(config, workdir).path, 'metadata.json')
  with open(metadata_path) as f:
    metadata = json.load(f)
  with open(metadata_path, 'w') as f:
    json.dump({**metadata, 'raw_dir': str(tmp_path / 'gone')}, f)
  capsys.readouterr()
  prepare.run(config, workdir)
  out = capsys.readouterr().out
  assert 'which is no longer there' in out and 'Reusing the prepared dataset' in out


def test_k600_csv_folder(tmp_path):
  raw = str(tmp_path / 'k600')
  good = {}
  rows = [('juggling', 'AAAAAAAAAAA', 10, 20, 'train'), ('abseiling', 'BBBBBBBBBBB', 0, 10, 'train'),
          ('juggling', 'CCCCCCCCCCC', 5, 15, 'train'), ('abseiling', 'DDDDDDDDDDD', 3, 13, 'train'),
          ('abseiling', 'MISSINGMISS', 0, 10, 'train'), ('juggling', 'EEEEEEEEEEE', 1, 11, 'val')]
  def clip_path(split, label, yid, start, end):
    return os.path.join(raw, split, label, f'{yid}_{start:06d}_{end:06d}.mp4')
  for i, (label, yid, start, end, split) in enumerate(rows[:2] + rows[-1:]):
    good[yid] = _write_video(clip_path(split, label, yid, start, end), 10 + i, i, 30)
  truncated = clip_path('train', *rows[2][:4])
  # moov atom first (faststart), so the cut file still opens and decodes part-way: a truncation, not garbage.
  video_io.write_mp4(truncated, synthetic.generate_video(20, 0, 60, (48, 64)), fps=25)
  data = open(truncated, 'rb').read()
  open(truncated, 'wb').write(data[:len(data) // 2])
  _write_video(clip_path('train', *rows[3][:4]), 21, 0, 8)  # 0.32 s: 3 frames at 8 fps, a clip needs 9
  for name, part in (('train.csv', rows[:5]), ('validate.csv', rows[5:])):
    with open(os.path.join(raw, name), 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['label', 'youtube_id', 'time_start', 'time_end', 'split'])
      w.writerows(part)
  workdir = str(tmp_path / 'work')
  out = _prepare_cli(raw, workdir, 'k600')
  assert out.returncode == 0, out.stderr[-3000:]
  location = builder.video_location(_config('k600'), workdir)
  train, val = _records(location, 'train'), _records(location, 'validation')
  assert len(train) == 2 and len(val) == 1
  # Classes are the sorted label names: abseiling = 0, juggling = 1.
  assert sorted(int(r['label']) for r in train) == [0, 1] and int(val[0]['label']) == 1
  error = np.abs(val[0]['video'][0].astype(np.float32) - _resized_first_frame(good['EEEEEEEEEEE'])).mean()
  assert error < 12
  reasons = {os.path.basename(name): reason for _, name, reason in prepare.read_report(location.path)}
  assert set(reasons) == {'CCCCCCCCCCC_000005_000015.mp4', 'DDDDDDDDDDD_000003_000013.mp4',
                          'MISSINGMISS_000000_000010'}
  assert 'truncated' in reasons['CCCCCCCCCCC_000005_000015.mp4']
  assert 'too short' in reasons['DDDDDDDDDDD_000003_000013.mp4']
  assert 'not found' in reasons['MISSINGMISS_000000_000010'] or 'no file' in reasons['MISSINGMISS_000000_000010']


def test_k600_list_files(tmp_path, capsys):
  raw = str(tmp_path / 'clips_folder')
  for name, seed in (('a.mp4', 1), ('b.webm.mp4', 2), ('c.mp4', 3)):
    _write_video(os.path.join(raw, 'videos', name), seed, 0, 30)
  with open(os.path.join(raw, 'trainlist.txt'), 'w') as f:
    f.write('videos/a.mp4 3\nvideos/b.webm.mp4 5\n')
  with open(os.path.join(raw, 'testlist.txt'), 'w') as f:
    f.write('videos/c.mp4 1\n')
  config = _config('k600', raw_dir=raw)
  workdir = str(tmp_path / 'work')
  prepare.run(config, workdir)
  location = builder.video_location(config, workdir)
  assert sorted(int(r['label']) for r in _records(location, 'train')) == [3, 5]
  assert [int(r['label']) for r in _records(location, 'test')] == [1]
  assert prepare.read_report(location.path) == []
  assert 'train' in capsys.readouterr().out


def test_k600_without_csv_or_list_says_what_to_add(tmp_path):
  raw = str(tmp_path / 'bare')
  _write_video(os.path.join(raw, 'x.mp4'), 0, 0, 10)
  with pytest.raises(prepare.PrepareError, match='CSV'):
    prepare.prepare_videos(_config('k600', raw_dir=raw), builder.video_location(_config('k600'), str(tmp_path)))


def test_a_folder_without_videos_is_refused_leaving_nothing(tmp_path):
  raw, workdir = tmp_path / 'empty', tmp_path / 'work'
  (raw / 'SomeClass').mkdir(parents=True)
  with pytest.raises(prepare.PrepareError, match=r"no video found in data.raw_dir=.* for source 'ucf101'; check"):
    prepare.prepare_videos(_config('ucf101', raw_dir=str(raw)), builder.video_location(_config('ucf101'), str(workdir)))
  assert not workdir.exists()


def test_given_videos_are_the_first_frames_of_files_and_folders_resampled_and_resized(tmp_path):
  """sample.context_videos' reading (video_io.video_files / read_clips): a folder gives its video files sorted (no
  other files, no sub-folders); each clip is a video's first frames at the asked rate, squashed to the asked size."""
  folder = tmp_path / 'mine'
  sources = {name: _write_video(str(folder / name), seed, 0, 30) for seed, name in ((1, 'b.mp4'), (2, 'a.avi'))}
  _write_video(str(folder / 'sub' / 'c.mp4'), 3, 2, 30)
  (folder / 'notes.txt').write_text('not a video')
  sources['one.mp4'] = _write_video(str(tmp_path / 'one.mp4'), 4, 0, 30)  # bouncing balls: no frame repeats
  files = video_io.video_files(f'{folder}, {tmp_path / "one.mp4"}')
  assert files == [str(folder / 'a.avi'), str(folder / 'b.mp4'), str(tmp_path / 'one.mp4')]
  clips = video_io.read_clips(files, 5, FPS, RES)
  assert clips.shape == (3, 5, RES, RES, 3) and clips.dtype == np.uint8
  def error(frame, source_frame):
    resized = Image.fromarray(source_frame).resize((RES, RES), Image.BILINEAR)
    return np.abs(frame.astype(np.float32) - np.asarray(resized, np.float32)).mean()

  for path, clip in zip(files, clips):
    source = sources[os.path.basename(path)]
    for k in range(5):  # frame k at 8 of 25 fps: the source's frame at k / 8 s, not its k-th
      at_time = min(error(clip[k], source[int(round_at(k * 25 / FPS))]) for round_at in (np.floor, np.ceil))
      assert at_time < 12 and (k == 0 or at_time < error(clip[k], source[k])), (path, k)

  with pytest.raises(errors.MissingError, match='nope.mp4 does not exist'):
    video_io.video_files(str(tmp_path / 'nope.mp4'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(errors.MissingError, match='empty holds no video file'):
    video_io.video_files(str(tmp_path / 'empty'))
  _write_video(str(tmp_path / 'short.mp4'), 5, 0, 6)  # 0.24 s
  with pytest.raises(errors.UserError, match=r'short\.mp4 gives \d of the 5 frames needed at 8 fps'):
    video_io.read_clips([str(tmp_path / 'short.mp4')], 5, FPS, RES)
  _write_garbage(str(tmp_path / 'garbage.mp4'))
  with pytest.raises(errors.UserError, match=r'garbage\.mp4: ffmpeg could not decode it'):
    video_io.read_clips([str(tmp_path / 'garbage.mp4')], 5, FPS, RES)


@pytest.mark.parametrize('video_frames,clips,expected', [
    (13, 2, [0, 4]), (9, 3, [0]), (8, 1, []), (27, 0, [0, 9, 18]), (20, 1, [0]), (30, 3, [0, 10, 21])])
def test_clip_starts(video_frames, clips, expected):
  assert prepare.clip_starts(video_frames, 9, clips) == expected


def test_split_with_only_bad_videos_is_left_out_not_fatal(tmp_path, capsys):
  raw = str(tmp_path / 'ucf')
  _write_video(os.path.join(raw, 'Walk', 'v_Walk_g01_c01.avi'), 1, 0, 40)
  _write_garbage(os.path.join(raw, 'Walk', 'v_Walk_g02_c01.avi'))
  with open(os.path.join(raw, 'classInd.txt'), 'w') as f:
    f.write('1 Walk\n')
  with open(os.path.join(raw, 'trainlist01.txt'), 'w') as f:
    f.write('Walk/v_Walk_g01_c01.avi 1\n')
  with open(os.path.join(raw, 'testlist01.txt'), 'w') as f:
    f.write('Walk/v_Walk_g02_c01.avi\n')
  config = _config('ucf101', raw_dir=raw)
  prepare.run(config, str(tmp_path / 'work'))
  location = builder.video_location(config, str(tmp_path / 'work'))
  assert list(builder.load_info(location).splits) == ['train']
  assert len(_records(location, 'train')) == 1
  assert [(s, n) for s, n, _ in prepare.read_report(location.path)] == [('test', 'Walk/v_Walk_g02_c01.avi')]
  assert "split 'test'" in capsys.readouterr().out
