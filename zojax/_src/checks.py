"""Argument checks shared by the estimators: bad input fails early and clearly."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from zojax._src import parallel


def check_scalar_objective(obj_fn: Callable[[Any], jax.Array], params) -> None:
  """Raises a clear error unless ``obj_fn(params)`` is a real scalar."""
  out = jax.eval_shape(obj_fn, params)
  shape = getattr(out, 'shape', None)
  if shape != ():
    raise ValueError(
        'obj_fn must return a scalar objective value; it returned '
        f'{"shape " + str(shape) if shape is not None else type(out).__name__}.'
        ' Reduce it (e.g. take the mean over the batch) inside obj_fn.')
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
        f'obj_fn must return a floating-point scalar; it returned {out.dtype}.')


def validate_positive_int(name: str, value, *, allow_none: bool = False):
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')


def validate_sigma(sigma) -> None:
  try:
    ok = math.isfinite(float(sigma)) and float(sigma) > 0
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f'sigma must be a finite number > 0, got {sigma!r}.')


def validate_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')


def check_update_args(name: str, params, obj_fn, batch, plan) -> None:
  """The checks of an estimator's ``update``: arguments present, the batch
  splittable over the data axis, ``obj_fn`` returning a real scalar."""
  require_update_args(name, params, obj_fn)
  parallel.check_batch(batch, plan)
  if batch is None:
    check_scalar_objective(obj_fn, params)
  else:
    check_scalar_objective(lambda p: obj_fn(p, batch), params)


def require_update_args(name: str, params, obj_fn) -> None:
  if params is None:
    raise ValueError(f'{name}: params must be passed to update().')
  if obj_fn is None:
    raise ValueError(
        f'{name}: update() needs the objective as the extra argument '
        '`obj_fn=lambda params: loss(params, batch)`.')
