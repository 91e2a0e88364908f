"""Video files in and out: decoding with the ffmpeg binary that imageio-ffmpeg ships, mp4/gif writing through mediapy
(with that same binary), PNG grids.

Videos are uint8 [T, H, W, 3] RGB everywhere. Decoding can resample to a frame rate (ffmpeg's `fps` filter:
frames are picked by timestamp, so a 25 fps source read at 8 fps keeps every ~3rd frame) and squash-resize to
a square, both inside ffmpeg, so full-size frames never reach Python.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess

import numpy as np

from nbp_jax import errors

VIDEO_EXTENSIONS = ('.avi', '.mp4', '.webm', '.mkv', '.mov', '.m4v', '.mpg', '.mpeg', '.flv', '.ogv')
# A decoded video whose length falls this far short of its header's duration is reported as truncated.
_TRUNCATED_FRACTION = 0.8


class VideoReadError(RuntimeError):
  """A video file could not be decoded; the message names the file and the reason."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason


def ffmpeg_exe() -> str:
  """Path of the ffmpeg binary bundled with imageio-ffmpeg (no system ffmpeg needed)."""
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  return imageio_ffmpeg.get_ffmpeg_exe()


@dataclasses.dataclass(frozen=True)
class _StreamInfo:
  duration: float | None  # seconds, from the container header: its longest stream's (the audio's, if longer)
  has_audio: bool
  input_fps: float | None
  output_size: tuple[int, int] | None  # (width, height) of the decoded frames
  output_fps: float | None


def _parse_ffmpeg_log(log: str) -> _StreamInfo:
  """Reads duration, fps and the decoded frame size from ffmpeg's `-v info` log."""
  duration = None
  m = re.search(r'Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)', log)
  if m:
    duration = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
  input_part, _, output_part = log.partition('Output #0')

  def video_stream(text):
    for line in text.splitlines():
      if 'Stream #' in line and 'Video:' in line:
        return line
    return ''

  def fps_of(line):
    m = re.search(r'(\d+(?:\.\d+)?)\s*fps', line) or re.search(r'(\d+(?:\.\d+)?)k?\s*tbr', line)
    return float(m.group(1)) if m else None

  in_line, out_line = video_stream(input_part), video_stream(output_part)
  size = None
  # Word boundaries keep codec tags such as '0x18424752' from matching.
  m = re.search(r'\b(\d{1,5})x(\d{1,5})\b', out_line)
  if m:
    size = (int(m.group(1)), int(m.group(2)))
  has_audio = any('Stream #' in line and 'Audio:' in line for line in input_part.splitlines())
  return _StreamInfo(duration=duration, has_audio=has_audio, input_fps=fps_of(in_line), output_size=size,
                     output_fps=fps_of(out_line))


def read_video(path: str, *, fps: float | None = None, resolution: int | None = None, threads: int = 0,
               strict: bool = True, timeout: float = 600.0) -> tuple[np.ndarray, float]:
  """Decodes a video file.

  Args:
    path: any container/codec the bundled ffmpeg reads (.avi, .mp4, .webm, .mkv, ...).
    fps: resample to this frame rate (frames per second); None keeps the file's own rate.
    resolution: squash-resize every frame to resolution x resolution (aspect ratio not kept, as in the
      UCF-101/K600 generation protocols); None keeps the file's size.
    threads: ffmpeg decoding threads (0 = ffmpeg's choice; use 1 when many files decode in parallel).
    strict: reject files in which ffmpeg finds corrupt packets or frames (a truncated AVI has no index, so its
      header duration cannot reveal the cut; the corrupt last packet does), or that decode to much less than the
      duration their header announces (only for files without audio: the header's duration is the longest
      stream's, and a soundtrack may outlast the picture). False keeps what decodes.
    timeout: seconds before giving up on one file.

  Returns:
    (video uint8 [T, H, W, 3], frames per second of the returned video).

  Raises:
    VideoReadError naming the file: missing, undecodable, no video stream, damaged or truncated (strict).
  """
  if not os.path.isfile(path):
    raise VideoReadError(path, 'no such file.')
  filters = []
  if fps is not None:
    # round=up: output frame k is the last input frame shown at time k / fps (frame 0 stays frame 0).
    filters.append(f'fps={fps:g}:round=up')
  if resolution is not None:
    # Bilinear in swscale widens its kernel when shrinking, so down-sizing is anti-aliased.
    filters.append(f'scale={int(resolution)}:{int(resolution)}:flags=bilinear')
  cmd = [ffmpeg_exe(), '-hide_banner', '-nostdin', '-nostats', '-v', 'info', '-threads', str(threads), '-i', path,
         '-map', '0:v:0', '-an', '-sn']
  if filters:
    cmd += ['-vf', ','.join(filters)]
  cmd += ['-f', 'rawvideo', '-pix_fmt', 'rgb24', 'pipe:1']
  try:
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    raise VideoReadError(path, f'decoding took longer than {timeout:g} s.') from e
  log = proc.stderr.decode('utf-8', errors='replace')
  if proc.returncode != 0:
    if "Stream map '0:v:0' matches no streams" in log:
      kinds = sorted(set(re.findall(r'Stream #\S+.*?: (\w+):', log.partition('Output #0')[0])))
      raise VideoReadError(path, f'no video stream: the file holds {" and ".join(kinds).lower() or "no streams"} '
                           'only; give a video file.')
    raise VideoReadError(path, f'ffmpeg could not decode it ({_last_error(log)}).')
  info = _parse_ffmpeg_log(log)
  size = info.output_size or ((resolution, resolution) if resolution else None)
  if size is None:
    raise VideoReadError(path, f'no video stream found ({_last_error(log)}).')
  width, height = size
  frame_bytes = width * height * 3
  num_frames = len(proc.stdout) // frame_bytes  # a partial last frame (cut-off pipe) is dropped
  if num_frames == 0:
    raise VideoReadError(path, f'no frame could be decoded ({_last_error(log)}).')
  damage = _damage(log)
  if damage and strict:
    raise VideoReadError(path, f'damaged or truncated: ffmpeg reports corrupt data ({damage}).')
  out_fps = float(fps) if fps is not None else (info.output_fps or info.input_fps or 0.0)
  if strict and info.duration and out_fps and not info.has_audio:
    expected = info.duration * out_fps
    if num_frames < _TRUNCATED_FRACTION * expected - 2:
      raise VideoReadError(path, f'truncated: decoded {num_frames} frames of the ~{expected:.0f} its header '
                           f'announces ({info.duration:.2f} s at {out_fps:g} fps).')
  video = np.frombuffer(proc.stdout, np.uint8, count=num_frames * frame_bytes)
  return video.reshape(num_frames, height, width, 3), out_fps


def video_files(spec: str) -> list[str]:
  """The videos named by `spec`: comma-separated video files and folders (a folder gives its video files, sorted,
  not those of its sub-folders). Raises MissingError naming a path that does not exist or a folder without videos."""
  files = []
  for path in (p.strip() for p in spec.split(',')):
    if not path:
      continue
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))
      if not found:
        raise errors.MissingError(f'{path} holds no video file ({", ".join(VIDEO_EXTENSIONS)}).')
      files += found
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise errors.MissingError(f'{path} does not exist: name video files or folders of them.')
  return files


def read_clips(paths: list[str], num_frames: int, fps: float, resolution: int) -> np.ndarray:
  """The first `num_frames` frames of each video at `fps`, squashed to `resolution`^2 (as prepare_data cuts clips):
  uint8 [len(paths), num_frames, resolution, resolution, 3]. Raises UserError naming a video that does not decode
  (damaged files are read as far as they decode) or is shorter than `num_frames` frames at `fps`."""
  clips = []
  for path in paths:
    try:
      video, _ = read_video(path, fps=fps, resolution=resolution, strict=False)
    except VideoReadError as e:
      raise errors.UserError(str(e)) from e
    if len(video) < num_frames:
      raise errors.UserError(f'{path} gives {len(video)} of the {num_frames} frames needed at {fps:g} fps '
                             f'({num_frames / fps:.2f} s); give a longer video.')
    clips.append(video[:num_frames])
  return np.stack(clips)


def _damage(log: str) -> str | None:
  """The first line where ffmpeg says it read corrupt packets or produced frames with concealed errors."""
  for line in log.splitlines():
    if re.search(r'corrupt (decoded frame|input packet)|Packet corrupt', line):
      return _clean(line)
  return None


def _clean(line: str) -> str:
  """'[avi @ 0x2b08afc0] Packet corrupt ...' -> 'avi: Packet corrupt ...', at most 300 characters."""
  return re.sub(r'\[([^\]@]*?)\s*@\s*0x[0-9a-f]+\]\s*', r'\1: ', line.strip())[:300]


def _last_error(log: str) -> str:
  """The most telling line of an ffmpeg log, for error messages."""
  lines = [l.strip() for l in log.splitlines() if l.strip()]
  bad = [l for l in lines if re.search(r'error|invalid|not found|could not|unknown|moov atom|failed|no such',
                                       l, re.IGNORECASE)]
  return _clean((bad or lines or ['no ffmpeg output'])[-1])


def _check_video(video: np.ndarray, name: str) -> np.ndarray:
  video = np.asarray(video)
  if video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f'{name}: expected a video uint8 [T, H, W, 3], got shape {video.shape}.')
  if video.dtype != np.uint8:
    raise ValueError(f'{name}: expected uint8 pixels in 0..255, got {video.dtype} '
                     '(convert with np.clip(x * 255, 0, 255).astype(np.uint8)).')
  return video


def _makedirs_for(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


def _mediapy():
  """mediapy, pointed at the bundled ffmpeg (the binary `read_video` decodes with; no system ffmpeg needed)."""
  import mediapy  # pylint: disable=g-import-not-at-top
  mediapy.set_ffmpeg(ffmpeg_exe())
  return mediapy


def write_mp4(path: str, video: np.ndarray, fps: float, *, crf: int = 18) -> None:
  """Writes uint8 [T, H, W, 3] as H.264 mp4 (yuv420p, playable everywhere; odd sizes padded by one black pixel)."""
  video = _check_video(video, path)
  _makedirs_for(path)
  _, h, w, _ = video.shape
  video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))  # yuv420p subsamples chroma 2x2
  _mediapy().write_video(path, video, fps=fps, codec='h264', crf=crf, encoded_format='yuv420p',
                         ffmpeg_args=['-movflags', '+faststart'])


def write_gif(path: str, video: np.ndarray, fps: float) -> None:
  """Writes uint8 [T, H, W, 3] as a looping GIF (`path` ends in .gif)."""
  video = _check_video(video, path)
  _makedirs_for(path)
  _mediapy().write_video(path, video, fps=fps, codec='gif')


def video_grid(videos: np.ndarray, *, gap: int = 2, gap_value: int = 255) -> np.ndarray:
  """uint8 [N, T, H, W, 3] -> one image uint8 [N*H + (N-1)*gap, T*W + (T-1)*gap, 3]: rows = videos,
  columns = frames."""
  videos = np.asarray(videos)
  if videos.ndim == 4:
    videos = videos[None]
  if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
    raise ValueError(f'expected videos uint8 [N, T, H, W, 3], got {videos.dtype} {videos.shape}.')
  n, t, h, w, _ = videos.shape
  grid = np.full((n * h + (n - 1) * gap, t * w + (t - 1) * gap, 3), gap_value, np.uint8)
  for i in range(n):
    for j in range(t):
      grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = videos[i, j]
  return grid


def write_png_grid(path: str, videos: np.ndarray, *, gap: int = 2) -> None:
  """Writes uint8 [N, T, H, W, 3] (or one [T, H, W, 3]) as a PNG: rows = videos, columns = frames."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = video_grid(videos, gap=gap)
  _makedirs_for(path)
  Image.fromarray(grid).save(path, format='PNG')
