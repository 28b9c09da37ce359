"""Argument checks shared by every method: bad input fails early and clearly.

Hyperparameters come in two kinds. *Counts* (``num_queries``, ...) fix
shapes, so they must be static Python (or NumPy) integers. *Floats*
(``sigma``, ``learning_rate``, ...) may be a number, an optax schedule
(a callable of the step count) or a traced value (``optax.inject_hyperparams``
passes its hyperparameters as arrays): :func:`validate_positive_float` checks
what can be checked when the transform is built, and :func:`value_at` gives
the value a step uses.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from zojax._src.core.perturbable import leaf_paths


def check_scalar_objective(obj_fn: Callable[[Any], jax.Array], params,
                           name: str = 'obj_fn') -> None:
  """Raises a clear error unless ``obj_fn(params)`` is a real scalar."""
  out = jax.eval_shape(obj_fn, params)
  shape = getattr(out, 'shape', None)
  if shape != ():
    raise ValueError(
        f'{name} must return a scalar objective value; it returned '
        f'{"shape " + str(shape) if shape is not None else type(out).__name__}.'
        ' Reduce it (e.g. take the mean over the batch) inside the function.')
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
        f'{name} must return a floating-point scalar; it returned {out.dtype}.')


def validate_positive_int(name: str, value, *, allow_none: bool = False,
                          minimum: int = 1) -> None:
  """Counts are static integers (Python or NumPy) ``>= minimum``."""
  if value is None and allow_none:
    return
  if isinstance(value, jax.core.Tracer) or isinstance(value, jax.Array):
    raise ValueError(
        f'{name} fixes array shapes, so it must be a static Python int, got '
        f'an array. With optax.inject_hyperparams, list it in static_args '
        f'(static_args=({name!r},)).')
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum):
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')


def as_int(value) -> int | None:
  """A validated count as a Python int (``None`` stays ``None``)."""
  return None if value is None else int(value)


def is_concrete_number(value) -> bool:
  return isinstance(value, numbers.Number) or (
      isinstance(value, (np.ndarray, jax.Array))
      and not isinstance(value, jax.core.Tracer) and np.ndim(value) == 0)


def validate_positive_float(name: str, value, *, allow_zero: bool = False,
                            allow_schedule: bool = True) -> None:
  """A float hyperparameter: a finite number > 0 (or >= 0), an optax
  schedule, or a traced value (checked at run time by the caller)."""
  if callable(value):
    if not allow_schedule:
      raise ValueError(f'{name} must be a number, got a callable.')
    return
  if isinstance(value, jax.core.Tracer):
    return
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(
        f'{name} must be a number or an optax schedule, got {value!r}.'
    ) from None
  low_ok = number >= 0 if allow_zero else number > 0
  if not (math.isfinite(number) and low_ok):
    raise ValueError(
        f'{name} must be a finite number {">=" if allow_zero else ">"} 0, '
        f'got {value!r}.')


def validate_sigma(sigma) -> None:
  validate_positive_float('sigma', sigma)


def value_at(hyper, count: jax.Array) -> jax.Array:
  """The float32 value of a hyperparameter at step ``count``."""
  value = hyper(count) if callable(hyper) else hyper
  return jnp.asarray(value, jnp.float32)


def positive(value: jax.Array) -> jax.Array:
  """Whether a (possibly traced) hyperparameter value is finite and > 0."""
  return jnp.isfinite(value) & (value > 0)


def validate_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')


def require_update_args(name: str, params, obj_fn, positional=(),
                        objective: str = 'obj_fn') -> None:
  """The arguments every ``update`` needs, with a hint for common slips."""
  if positional:
    raise TypeError(
        f'{name}: update() takes the objective as a keyword argument, e.g. '
        f'tx.update(None, state, params, {objective}=f); got '
        f'{len(positional)} extra positional argument(s).')
  if params is None:
    raise ValueError(f'{name}: params must be passed to update().')
  if obj_fn is None:
    hint = ('`obj_fn=lambda params: loss(params, batch)`'
            if objective == 'obj_fn' else f'`{objective}=...`')
    raise ValueError(
        f'{name}: update() needs the objective as the extra argument {hint}.')


def check_state(name: str, state, state_type, evals_per_step=None) -> None:
  """Raises a clear error for a state that this transform did not create."""
  if not isinstance(state, state_type):
    raise ValueError(
        f'{name}: expected the state returned by its own init() (a '
        f'{state_type.__name__}), got {type(state).__name__}. In an '
        'optax.chain, pass the whole chain state to the chain.')
  stats = getattr(state, 'stats', None)
  if evals_per_step is None or stats is None:
    return
  recorded = stats.evals_per_step
  if not isinstance(recorded, jax.core.Tracer) and int(recorded) != int(
      evals_per_step):
    raise ValueError(
        f'{name}: this state counts {int(recorded)} evaluations per step but '
        f'{name} spends {int(evals_per_step)}: it was created by another '
        'transform (or for other params). Pass the state returned by this '
        "transform's init().")


def warn_if_sigma_rounds_away(sigma, params, name: str) -> None:
  """Warns when ``sigma`` is below the resolution of low-precision leaves.

  A perturbation ``theta + sigma u`` of a bfloat16/float16 entry rounds to
  ``theta`` when ``sigma |u|`` is below half an ulp of ``theta``, i.e. for
  ``|theta| > 2 sigma / eps``: the finite difference then sees no change.
  """
  if not is_concrete_number(sigma):
    return
  for leaf in jax.tree.leaves(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      continue
    eps = float(jnp.finfo(dtype).eps)
    if float(sigma) < eps:
      warnings.warn(
          f'{name}: sigma={float(sigma):g} is below the resolution of '
          f'{jnp.dtype(dtype).name} parameters (eps {eps:.2g}): entries with '
          f'|theta| > {2 * float(sigma) / eps:.3g} are not moved by the '
          'perturbation and their estimate is zero. Use a larger sigma or '
          'float32 parameters.', stacklevel=3)
      return


def unused_leaves(fn: Callable[[Any], jax.Array], params,
                  paths) -> list[str]:
  """The leaves among ``paths`` that ``fn(params)`` does not depend on
  (backward reachability over the traced program; a trace, no compile)."""
  jaxpr = jax.make_jaxpr(fn)(params).jaxpr
  is_var = lambda v: not isinstance(v, jax_core.Literal)
  live = {v for v in jaxpr.outvars if is_var(v)}
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars):
      live.update(v for v in eqn.invars if is_var(v))
  wanted = set(paths)
  return [path for path, var in zip(leaf_paths(params), jaxpr.invars)
          if path in wanted and var not in live]
