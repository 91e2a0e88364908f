"""Deterministic synthetic videos: coloured shapes and textures moving in class-specific ways.

Each class is one motion family (bouncing ball, rotating square, drifting stripes, ...) with a fixed variation
(direction, speed); the seed draws everything else (colours, background, start positions, phases). Drawing is
vectorised numpy over the whole clip ([T, H, W] masks with anti-aliased edges), so any length and resolution is
cheap. Geometry lives in normalised coordinates (the frame is [0, 1]^2) and speeds in units per frame, so a
clip looks the same at 16 px and at 256 px.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Motion families; class `label` uses family `label % len(MOTIONS)` and variation `label // len(MOTIONS)`.
MOTIONS = (
    'bouncing_ball',  # a disc bouncing off the walls
    'rotating_square',  # a striped square spinning about a fixed centre
    'drifting_stripes',  # a full-frame stripe texture sliding across the frame
    'pulsing_disc',  # a disc growing and shrinking at a fixed place
    'orbiting_dots',  # three dots circling the centre
    'colour_cycling',  # a still diamond whose colour cycles through hues
    'expanding_rings',  # concentric rings moving outward from a point
    'sliding_bar',  # a long bar sweeping back and forth across the frame
)


@dataclasses.dataclass(frozen=True)
class _Variation:
  """What distinguishes two classes of the same motion family."""
  sign: float  # +1 / -1: direction of rotation or travel (or horizontal vs vertical for translations)
  speed: float  # multiplies the family's speed


def motion_name(label: int) -> str:
  """Human-readable class name, e.g. 'rotating_square' or 'rotating_square/reversed/x1.5'."""
  family, var = _family_and_variation(label)
  name = MOTIONS[family]
  if var.sign < 0:
    name += '/reversed'
  if var.speed != 1.0:
    name += f'/x{var.speed:g}'
  return name


def _family_and_variation(label: int) -> tuple[int, _Variation]:
  if label < 0:
    raise ValueError(f'label={label} must be >= 0.')
  family, v = label % len(MOTIONS), label // len(MOTIONS)
  return family, _Variation(sign=-1.0 if v % 2 else 1.0, speed=1.0 + 0.5 * (v // 2))


def generate_video(seed: int, label: int, num_frames: int, resolution: int | tuple[int, int]) -> np.ndarray:
  """One synthetic clip.

  Args:
    seed: non-negative int; the same (seed, label, num_frames, resolution) always gives the same bytes.
    label: class id >= 0; picks the motion family and its variation (see MOTIONS).
    num_frames: T >= 1.
    resolution: S (square) or (H, W) in pixels.

  Returns:
    uint8 [T, H, W, 3] in 0..255.
  """
  h, w = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
  if num_frames < 1 or h < 1 or w < 1:
    raise ValueError(f'num_frames={num_frames} and resolution={resolution} must be positive.')
  if seed < 0:
    raise ValueError(f'seed={seed} must be >= 0.')
  family, var = _family_and_variation(label)
  rng = np.random.default_rng([seed, label])
  canvas = _Canvas(num_frames, h, w)
  video = _background(rng, canvas)
  draw = _FAMILIES[family]
  for alpha, colour in draw(rng, canvas, var):
    # alpha [T, H, W] in [0, 1]; colour [3] or [T, H, W, 3] in [0, 1].
    video = video + alpha[..., None] * (colour - video)
  return np.clip(np.round(video * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Drawing helpers.


@dataclasses.dataclass(frozen=True)
class _Canvas:
  """Pixel-centre coordinates: x, y [1, H, W] in [0, 1] (x right, y down), t [T, 1, 1] frame index."""
  num_frames: int
  height: int
  width: int

  @property
  def x(self) -> np.ndarray:
    return ((np.arange(self.width, dtype=np.float32) + 0.5) / self.width)[None, None, :]

  @property
  def y(self) -> np.ndarray:
    return ((np.arange(self.height, dtype=np.float32) + 0.5) / self.height)[None, :, None]

  @property
  def t(self) -> np.ndarray:
    return np.arange(self.num_frames, dtype=np.float32)[:, None, None]

  @property
  def pixel(self) -> float:
    """Size of one pixel in normalised units (the width of the anti-aliased edge)."""
    return 1.0 / min(self.height, self.width)


def _coverage(signed_distance: np.ndarray, canvas: _Canvas) -> np.ndarray:
  """Anti-aliased inside-ness of a shape from its signed distance (negative inside) -> [0, 1]."""
  return np.clip(0.5 - signed_distance / canvas.pixel, 0.0, 1.0).astype(np.float32)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
  """A saturated, light colour (so shapes stand out from the darker backgrounds)."""
  return _hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0))


def _hsv_to_rgb(hue, sat, val) -> np.ndarray:
  """Vectorised HSV -> RGB; inputs broadcast, output [..., 3] float32 in [0, 1]."""
  hue, sat, val = np.broadcast_arrays(*(np.asarray(v, np.float32) for v in (hue, sat, val)))
  k = (np.array([5.0, 3.0, 1.0], np.float32) + hue[..., None] * 6.0) % 6.0
  return (val[..., None] - val[..., None] * sat[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(
      np.float32)


def _reflect(z: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Position of a point moving freely along z, bounced between lo and hi (a triangle wave)."""
  span = hi - lo
  m = np.mod(z - lo, 2.0 * span)
  return lo + np.where(m > span, 2.0 * span - m, m)


def _background(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
  """Static dark gradient plus a faint sinusoidal texture: [T, H, W, 3] float32."""
  c0 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.4))
  c1 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.4))
  angle = rng.uniform(0.0, 2.0 * np.pi)
  ramp = 0.5 + (canvas.x - 0.5) * np.cos(angle) + (canvas.y - 0.5) * np.sin(angle)  # [1, H, W]
  image = c0 + np.clip(ramp, 0.0, 1.0)[..., None] * (c1 - c0)
  texture = np.zeros_like(ramp)
  for _ in range(3):
    fx, fy = rng.uniform(-6.0, 6.0, size=2)
    texture = texture + np.sin(2 * np.pi * (fx * canvas.x + fy * canvas.y) + rng.uniform(0, 2 * np.pi))
  image = image * (1.0 + 0.08 * texture[..., None])
  return np.broadcast_to(image, (canvas.num_frames, canvas.height, canvas.width, 3)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Motion families: (rng, canvas, variation) -> list of (alpha [T, H, W], colour [3] or [T, H, W, 3]).


def _bouncing_ball(rng, canvas, var):
  r = rng.uniform(0.12, 0.17)
  # Even variations travel mostly horizontally, odd ones mostly vertically.
  angle = rng.uniform(-0.5, 0.5) + (0.0 if var.sign > 0 else np.pi / 2) + rng.integers(2) * np.pi
  speed = rng.uniform(0.05, 0.07) * var.speed
  x0, y0 = rng.uniform(r, 1 - r, size=2)
  cx = _reflect(x0 + speed * np.cos(angle) * canvas.t, r, 1 - r)
  cy = _reflect(y0 + speed * np.sin(angle) * canvas.t, r, 1 - r)
  dist = np.sqrt((canvas.x - cx) ** 2 + (canvas.y - cy) ** 2)
  return [(_coverage(dist - r, canvas), _bright_colour(rng))]


def _rotating_square(rng, canvas, var):
  half = rng.uniform(0.18, 0.26)
  cx, cy = 0.5 + rng.uniform(-0.08, 0.08, size=2)
  theta = rng.uniform(0, np.pi / 2) + var.sign * var.speed * rng.uniform(0.12, 0.18) * canvas.t
  dx, dy = canvas.x - cx, canvas.y - cy
  u = dx * np.cos(theta) + dy * np.sin(theta)  # coordinates in the square's own frame
  v = -dx * np.sin(theta) + dy * np.cos(theta)
  alpha = _coverage(np.maximum(np.abs(u), np.abs(v)) - half, canvas)
  # Stripes fixed to the square make its rotation visible inside, not only at the corners.
  colour = _bright_colour(rng)
  shade = 0.75 + 0.25 * np.sign(np.sin(2 * np.pi * 1.5 * u / half))
  return [(alpha, colour * shade[..., None])]


def _drifting_stripes(rng, canvas, var):
  angle = rng.uniform(0, 2 * np.pi)
  freq = rng.uniform(2.5, 4.0)  # stripes per frame width
  speed = var.sign * var.speed * rng.uniform(0.025, 0.04)  # frame widths per frame
  phase = (canvas.x * np.cos(angle) + canvas.y * np.sin(angle) - speed * canvas.t) * freq
  wave = np.sin(2 * np.pi * phase)
  # A soft square wave: crisp stripes whose edges stay anti-aliased.
  alpha = np.clip(0.5 + wave / (2 * np.pi * freq * canvas.pixel), 0.0, 1.0) * 0.85
  return [(alpha.astype(np.float32), _bright_colour(rng))]


def _pulsing_disc(rng, canvas, var):
  cx, cy = 0.5 + rng.uniform(-0.1, 0.1, size=2)
  # A whole number of frames from smallest to largest, with the turning points on frames: the radius then
  # changes by the same step between every two frames (never a near-still pair at a turn).
  half_period = max(2, int(round(rng.integers(5, 8) / var.speed)))
  offset = rng.integers(0, 2 * half_period)
  r = 0.08 + 0.22 * _reflect((offset + var.sign * canvas.t) / half_period, 0.0, 1.0)
  dist = np.sqrt((canvas.x - cx) ** 2 + (canvas.y - cy) ** 2)
  return [(_coverage(dist - r, canvas), _bright_colour(rng))]


def _orbiting_dots(rng, canvas, var):
  cx, cy = 0.5 + rng.uniform(-0.05, 0.05, size=2)
  radius = rng.uniform(0.25, 0.3)
  r = rng.uniform(0.07, 0.09)
  omega = var.sign * var.speed * rng.uniform(0.25, 0.35)
  phase0 = rng.uniform(0, 2 * np.pi)
  layers = []
  for k in range(3):
    phi = phase0 + 2 * np.pi * k / 3 + omega * canvas.t
    dist = np.sqrt((canvas.x - cx - radius * np.cos(phi)) ** 2 + (canvas.y - cy - radius * np.sin(phi)) ** 2)
    layers.append((_coverage(dist - r, canvas), _bright_colour(rng)))
  return layers


def _colour_cycling(rng, canvas, var):
  cx, cy = 0.5 + rng.uniform(-0.1, 0.1, size=2)
  half = rng.uniform(0.22, 0.3)
  alpha = _coverage(np.abs(canvas.x - cx) + np.abs(canvas.y - cy) - half, canvas)
  alpha = np.broadcast_to(alpha, (canvas.num_frames, canvas.height, canvas.width))
  hue = rng.uniform() + var.sign * var.speed * 0.08 * canvas.t[:, 0, 0]  # [T]
  colour = _hsv_to_rgb(hue % 1.0, 0.9, 0.95)[:, None, None, :]
  return [(alpha, colour)]


def _expanding_rings(rng, canvas, var):
  cx, cy = rng.uniform(0.3, 0.7, size=2)
  spacing = rng.uniform(0.14, 0.2)
  speed = var.sign * var.speed * rng.uniform(0.02, 0.03)
  dist = np.sqrt((canvas.x - cx) ** 2 + (canvas.y - cy) ** 2)
  ring = np.abs(np.mod(dist - speed * canvas.t, spacing) - spacing / 2)  # distance to the ring centre line
  return [(_coverage(ring - spacing * 0.22, canvas) * 0.9, _bright_colour(rng))]


def _sliding_bar(rng, canvas, var):
  half = rng.uniform(0.05, 0.07)
  speed = var.speed * rng.uniform(0.06, 0.08)
  pos = _reflect(rng.uniform(half, 1 - half) + speed * canvas.t, half, 1 - half)
  # Even variations sweep a vertical bar left-right, odd ones a horizontal bar up-down.
  coord = canvas.x if var.sign > 0 else canvas.y
  alpha = _coverage(np.abs(coord - pos) - half, canvas)
  alpha = np.broadcast_to(alpha, (canvas.num_frames, canvas.height, canvas.width))
  return [(alpha, _bright_colour(rng))]


_FAMILIES = (_bouncing_ball, _rotating_square, _drifting_stripes, _pulsing_disc, _orbiting_dots, _colour_cycling,
             _expanding_rings, _sliding_bar)
assert len(_FAMILIES) == len(MOTIONS)
