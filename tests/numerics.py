"""Comparing two float computations of one quantity (a helper for the tests; holds no tests).

Elementwise `rtol`/`atol` only suits results whose every element has the size of the whole. Two code paths that
differ in summation order (another kernel, mesh, micro-batching, CPU) agree to a few fp32 ulps *of the terms they
sum*, so an element that is a near-cancelling sum (a small gradient entry, a logit near zero) can differ by far more
than its own size, on one machine and not on another. These helpers bound the error by the scale of the result:

  assert_close         max |a - b| <= rtol * max |b|                 (one array: activations, logits)
  assert_trees_close   ||a - b|| <= rtol * max(||b||, floor * ||B||)  per leaf, 2-norms; ||B|| = the whole tree's

`rtol` is then a statement about the computation (fp32 eps = 1.2e-7 times the length of the sums, a few orders of
magnitude at most), not about one machine, and stays far below what a real bug moves (a wrong mask or scale changes
results by 1e-2 and more of their scale).

Optimizers: Adam divides by sqrt(v) + eps, so an entry whose gradient is pure rounding noise (~1e-9) still moves by
~lr with a random sign; params after an Adam step amplify noise to the learning rate. Compare gradients, or params
after an SGD step (`sgd_recording_gradients`), instead.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax

FP32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def assert_close(actual, desired, rtol: float, err_msg: str = '') -> None:
  """max |actual - desired| <= rtol * max |desired| (the error relative to the result's scale)."""
  a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert a.shape == d.shape, f'{err_msg}: shape {a.shape} vs {d.shape}'
  assert np.isfinite(a).all() == np.isfinite(d).all(), f'{err_msg}: non-finite values differ'
  err, scale = float(np.abs(a - d).max(initial=0.0)), float(np.abs(d).max(initial=0.0))
  assert err <= rtol * scale, (f'{err_msg}: max |error| {err:.3g} = {err / max(scale, 1e-300):.3g} x max |reference| '
                               f'{scale:.3g}, above rtol {rtol:g}')


def _norm(x) -> float:
  return float(np.linalg.norm(np.asarray(x, np.float64).ravel()))


def tree_rel_errors(actual, desired, floor: float = 1e-3) -> dict[str, float]:
  """{leaf path: ||a - b|| / max(||b||, floor * ||B||)} for two trees of the same structure."""
  paths = jax.tree_util.tree_leaves_with_path(desired)
  leaves_a = jax.tree_util.tree_leaves(actual)
  assert len(leaves_a) == len(paths), 'the trees differ in structure'
  total = math.sqrt(sum(_norm(d) ** 2 for _, d in paths))
  out = {}
  for (path, d), a in zip(paths, leaves_a):
    assert np.shape(a) == np.shape(d), (jax.tree_util.keystr(path), np.shape(a), np.shape(d))
    out[jax.tree_util.keystr(path)] = _norm(np.asarray(a, np.float64) - np.asarray(d, np.float64)) / max(
        _norm(d), floor * total, 1e-300)
  return out


def assert_trees_close(actual, desired, rtol: float, floor: float = 1e-3, err_msg: str = '') -> None:
  """Per leaf ||a - b|| <= rtol * max(||b||, floor * ||B||): a leaf far smaller than the tree (a gradient that is
  nearly zero) is held to the tree's scale, not to its own."""
  errors = tree_rel_errors(actual, desired, floor)
  worst = max(errors, key=errors.get)
  assert errors[worst] <= rtol, f'{err_msg}: leaf {worst} differs by {errors[worst]:.3g} of its norm (rtol {rtol:g})'


def sgd_recording_gradients(learning_rate: float = 0.1) -> tuple[optax.GradientTransformation, None]:
  """SGD with momentum 0.9, as Task.make_optimizer gives it (no schedule): after the first step its state
  (`opt_state[0].trace`) is that step's gradient, and the parameters moved by -lr times it; no division that
  amplifies rounding noise."""
  return optax.sgd(learning_rate, momentum=0.9), None


def first_gradient(opt_state):
  """The gradient recorded by `sgd_recording_gradients` after one step (its momentum trace)."""
  return opt_state[0].trace
