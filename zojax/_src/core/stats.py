"""Honest bookkeeping of what an estimator spent, and ``estimate_info``.

Zeroth-order papers compare methods by the number of function evaluations
(queries), so every zojax transform that evaluates the objective keeps an
:class:`EstimateStats` in its state and counts every evaluation it made,
including those of steps that were skipped because a value was not finite.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class EstimateStats(NamedTuple):
  """Per-transform counters kept in the optimizer state (plain arrays).

  Attributes:
    value: the last objective value the transform computed (float32).
    steps: number of ``update`` calls so far (int32).
    evals_per_step: objective evaluations one ``update`` spends (int32,
      constant for a given configuration and parameter structure).
    skipped_steps: steps this transform skipped because an objective value
      was not finite (int32): an estimator then returns a NaN estimate (so a
      downstream ``optax.apply_if_finite`` skips the step), an optimizer a
      zero update.
  """

  value: jax.Array
  steps: jax.Array
  evals_per_step: jax.Array
  skipped_steps: jax.Array

  @classmethod
  def create(cls, evals_per_step: int) -> 'EstimateStats':
    return cls(
        value=jnp.full((), jnp.nan, jnp.float32),
        steps=jnp.zeros((), jnp.int32),
        evals_per_step=jnp.asarray(evals_per_step, jnp.int32),
        skipped_steps=jnp.zeros((), jnp.int32),
    )

  def record(self, value: jax.Array, finite: jax.Array) -> 'EstimateStats':
    return self._replace(
        value=jnp.asarray(value, jnp.float32),
        steps=self.steps + 1,
        skipped_steps=self.skipped_steps + jnp.where(finite, 0, 1).astype(
            jnp.int32),
    )


class EstimateInfo(NamedTuple):
  """What :func:`estimate_info` reports.

  Attributes:
    value: the objective value at the parameters the (first) estimator last
      saw, as that estimator computed it: ``f(params)`` for forward
      differences, the mean of ``(f(params + sigma d) + f(params - sigma d))/2``
      over the queries for central ones (equal to ``f(params)`` up to
      O(sigma^2), at no extra evaluation). NaN before the first step.
    num_evals: cumulative objective evaluations spent by *every* zojax
      transform in the state (estimator plus e.g. the 3 evaluations per step
      of :func:`zojax.conservative_selection`).
    skipped_steps: steps skipped because of a non-finite objective value,
      summed over the transforms (zojax's optimizers run the transforms
      after the estimator only on finite estimates, so a step is counted
      once).
    steps: ``update`` calls of the first estimator.
    evals_per_step: evaluations per step, summed over the transforms.
  """

  value: float
  num_evals: int
  skipped_steps: int
  steps: int
  evals_per_step: int

  @property
  def num_queries(self) -> int:
    """Alias of ``num_evals`` (the term ZO papers use)."""
    return self.num_evals

  def __getitem__(self, key):
    """Fields also by name: ``info['num_evals']``."""
    if isinstance(key, str):
      return getattr(self, key)
    return tuple.__getitem__(self, key)


def _is_stats(node: Any) -> bool:
  return isinstance(node, EstimateStats)


def estimate_info(state: Any) -> EstimateInfo:
  """Summarises the zojax counters found anywhere in an optimizer state.

  Works on the state of a single estimator and on the state of any
  ``optax.chain`` (or other pytree of states) containing zojax transforms.
  On a concrete state it returns Python numbers (exact counts, whatever their
  size); inside ``jit`` it returns arrays (``num_evals`` then is an int32
  product, exact below 2**31 evaluations).

  Args:
    state: an optimizer state.

  Returns:
    An :class:`EstimateInfo`.
  """
  found = [node for node in jax.tree.leaves(state, is_leaf=_is_stats)
           if _is_stats(node)]
  if not found:
    raise ValueError('estimate_info: no zojax estimator state was found in '
                     f'the given state of type {type(state).__name__}.')
  first = found[0]
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(found)):
    as_int = as_float = lambda x: x  # inside jit: keep the arrays
  else:
    as_int, as_float = int, float  # exact Python numbers
  return EstimateInfo(
      value=as_float(first.value),
      num_evals=sum(as_int(s.steps) * as_int(s.evals_per_step) for s in found),
      skipped_steps=sum(as_int(s.skipped_steps) for s in found),
      steps=as_int(first.steps),
      evals_per_step=sum(as_int(s.evals_per_step) for s in found),
  )
