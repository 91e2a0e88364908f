"""Synthetic videos (deterministic, distinct motion per class) and video file I/O."""

import subprocess

import numpy as np
from PIL import Image
import pytest

from nbp_jax.data import synthetic
from nbp_jax.data import video_io


@pytest.mark.parametrize('num_frames,resolution', [(17, 32), (5, 16), (1, 24), (9, (20, 36))])
def test_shape_dtype_and_determinism(num_frames, resolution):
  for label in range(len(synthetic.MOTIONS) + 2):
    a = synthetic.generate_video(7, label, num_frames, resolution)
    b = synthetic.generate_video(7, label, num_frames, resolution)
    h, w = (resolution, resolution) if np.isscalar(resolution) else resolution
    assert a.shape == (num_frames, h, w, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()


def test_seeds_and_labels_give_different_videos():
  base = synthetic.generate_video(0, 0, 9, 32)
  assert not np.array_equal(base, synthetic.generate_video(1, 0, 9, 32))
  assert not np.array_equal(base, synthetic.generate_video(0, 1, 9, 32))
  # Variations of one family are distinct classes too.
  assert synthetic.motion_name(1) != synthetic.motion_name(1 + len(synthetic.MOTIONS))


def test_frames_change_over_time():
  for label in range(2 * len(synthetic.MOTIONS)):
    for seed in range(3):
      video = synthetic.generate_video(seed, label, 17, 32).astype(np.int32)
      step = np.abs(np.diff(video, axis=0)).max(axis=(1, 2, 3))  # [T-1] largest pixel change per frame
      assert (step > 20).all(), (synthetic.motion_name(label), seed, step)


def _motion_statistics(video):
  """Simple, generator-agnostic motion features of a clip."""
  v = video.astype(np.float32)
  moving = np.abs(np.diff(v, axis=0)).sum(-1) > 30  # [T-1, H, W] pixels that changed
  _, h, w = moving.shape
  ys, xs = np.mgrid[0:h, 0:w] / h
  count = moving.sum((1, 2)) + 1e-6
  cx, cy = (moving * xs).sum((1, 2)) / count, (moving * ys).sum((1, 2)) / count
  centroid_motion = np.sqrt(cx.var() + cy.var())  # does the changing region travel?
  spread = np.sqrt((((xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2) * moving).sum((1, 2)) / count)
  mean_colour_change = np.abs(np.diff(v.mean((1, 2)), axis=0)).mean() / 50
  persistent = (moving.mean(0) >= 0.75).sum() / max(moving.any(0).sum(), 1)  # same pixels change every frame
  return np.array([moving.mean(), centroid_motion, spread.mean(), mean_colour_change, persistent])


def test_classes_differ_in_motion():
  """A nearest-class-mean classifier on simple motion statistics tells the motion families apart."""
  num_classes, seeds = len(synthetic.MOTIONS), 10
  feats = np.array([[_motion_statistics(synthetic.generate_video(s, c, 17, 32)) for s in range(seeds)]
                    for c in range(num_classes)])  # [C, S, F]
  train, held_out = feats[:, :5], feats[:, 5:]
  means = train.mean(1)
  scale = train.reshape(-1, feats.shape[-1]).std(0) + 1e-6
  dist = (((held_out[:, :, None, :] - means[None, None]) / scale) ** 2).sum(-1)  # [C, S, C]
  accuracy = (dist.argmin(-1) == np.arange(num_classes)[:, None]).mean()
  assert accuracy >= 0.9, accuracy


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match='label'):
    synthetic.generate_video(0, -1, 4, 8)
  with pytest.raises(ValueError, match='num_frames'):
    synthetic.generate_video(0, 0, 0, 8)


def test_mp4_round_trip(tmp_path):
  video = synthetic.generate_video(3, 0, 12, (24, 40))
  path = str(tmp_path / 'sub' / 'clip.mp4')
  video_io.write_mp4(path, video, fps=6)
  back, fps = video_io.read_video(path)
  assert back.shape == video.shape and back.dtype == np.uint8 and fps == 6
  assert np.abs(back.astype(np.int32) - video).mean() < 12  # lossy codec, same picture
  # Resampling keeps the frame shown at each new time step k / fps: frames 0, 2, 4, ... of the 6 fps file.
  half, fps = video_io.read_video(path, fps=3)
  assert fps == 3
  np.testing.assert_array_equal(half, back[::2])
  # 25 fps -> 8 fps: frame k is the last source frame at or before k / 8 s, i.e. floor(k * 25 / 8).
  fast = str(tmp_path / 'fast.mp4')
  video_io.write_mp4(fast, synthetic.generate_video(4, 2, 30, 32), fps=25)
  full, _ = video_io.read_video(fast)
  resampled, _ = video_io.read_video(fast, fps=8)
  np.testing.assert_array_equal(resampled, full[[k * 25 // 8 for k in range(len(resampled))]])
  assert len(resampled) in (9, 10)  # 1.2 s at 8 fps
  small, _ = video_io.read_video(path, fps=3, resolution=16)
  assert small.shape == (6, 16, 16, 3)


def test_gif_and_png_grid(tmp_path):
  videos = np.stack([synthetic.generate_video(s, s, 5, (12, 20)) for s in range(3)])  # [3, 5, 12, 20, 3]
  gif = str(tmp_path / 'a.gif')
  video_io.write_gif(gif, videos[0], fps=5)
  with Image.open(gif) as im:
    assert im.size == (20, 12) and im.n_frames == 5
  png = str(tmp_path / 'grid.png')
  video_io.write_png_grid(png, videos)
  with Image.open(png) as im:
    assert im.size == (5 * 20 + 4 * 2, 3 * 12 + 2 * 2)
    grid = np.asarray(im.convert('RGB'))
  # Row 1, column 2 holds video 1's frame 2.
  np.testing.assert_array_equal(grid[14:26, 44:64], videos[1, 2])


def test_unreadable_files_raise_naming_the_file(tmp_path):
  garbage = tmp_path / 'garbage.avi'
  garbage.write_bytes(np.random.default_rng(0).bytes(4000))
  with pytest.raises(video_io.VideoReadError, match='garbage.avi'):
    video_io.read_video(str(garbage))
  with pytest.raises(video_io.VideoReadError, match='no such file'):
    video_io.read_video(str(tmp_path / 'missing.mp4'))
  # A file with sound only (an .m4a renamed, a music track) says so, not an ffmpeg option error.
  audio = tmp_path / 'song.mp4'
  subprocess.run([video_io.ffmpeg_exe(), '-v', 'error', '-f', 'lavfi', '-i', 'sine=d=0.2', str(audio)], check=True)
  with pytest.raises(video_io.VideoReadError, match=r'song.mp4: no video stream: the file holds audio only'):
    video_io.read_video(str(audio))


def test_truncated_file_is_rejected(tmp_path):
  path = str(tmp_path / 'full.mp4')
  video_io.write_mp4(path, synthetic.generate_video(0, 0, 60, 32), fps=25)
  data = open(path, 'rb').read()
  cut = tmp_path / 'cut.mp4'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(video_io.VideoReadError, match='cut.mp4'):
    video_io.read_video(str(cut))
  # strict=False keeps what decodes (read_clips' first frames of a damaged file).
  frames, _ = video_io.read_video(str(cut), strict=False)
  assert 0 < len(frames) < 60


def test_a_soundtrack_longer_than_the_picture_is_not_a_truncation(tmp_path):
  # 2.4 s of picture and 5 s of sound: the container's duration (5 s) is the sound's.
  silent, path = str(tmp_path / 'silent.mp4'), str(tmp_path / 'with_sound.mp4')
  video = synthetic.generate_video(0, 0, 60, 32)
  video_io.write_mp4(silent, video, fps=25)
  subprocess.run([video_io.ffmpeg_exe(), '-v', 'error', '-i', silent, '-f', 'lavfi', '-i', 'sine=d=5', '-map', '0:v',
                  '-map', '1:a', '-c:v', 'copy', path], check=True)
  frames, _ = video_io.read_video(path)
  np.testing.assert_array_equal(frames, video_io.read_video(silent)[0])
