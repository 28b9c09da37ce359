r"""Estimator quality against ``jax.grad``: the curves ZO papers draw.

For an estimator (any zojax estimator transform), an objective and a point,
:func:`compare_with_gradient` draws ``num_trials`` independent estimates (one
per key, all in one jitted ``lax.map``) and reports, against the exact
gradient :math:`g = \nabla f(\theta)`:

* cosine similarity :math:`\cos(\hat g, g)` (mean and std over trials),
* relative error :math:`\|\hat g - g\| / \|g\|` (mean and std),
* relative error of the *mean* estimate :math:`\|\bar g - g\|/\|g\|` (bias
  plus Monte-Carlo noise of the mean),
* total variance :math:`E\|\hat g - \bar g\|^2` (trace of the covariance),
* queries (objective evaluations) per estimate.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from zojax._src.core import keys as keys_lib
from zojax._src.core.stats import estimate_info


class GradientComparison(NamedTuple):
  cosine_mean: float
  cosine_std: float
  relative_error_mean: float
  relative_error_std: float
  mean_relative_error: float
  variance: float
  queries_per_estimate: int
  num_trials: int


def _flat(tree) -> jax.Array:
  return jnp.concatenate(
      [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def estimates_over_keys(
    estimator: optax.GradientTransformationExtraArgs,
    obj_fn: Callable[[Any], jax.Array],
    params: Any,
    keys: jax.Array,
    batch_size: Optional[int] = None,
) -> tuple[jax.Array, Any]:
  """Flattened estimates, one row per key (the estimator state's key replaced).

  Returns:
    ``(estimates, state)``: a ``(len(keys), d)`` array and the estimator
    state after one step (for query counting).
  """
  state = estimator.init(params)

  def one(key):
    update, new_state = estimator.update(
        None, state._replace(key=keys_lib.key_data(key)), params,
        obj_fn=obj_fn)
    return _flat(update), new_state.stats

  rows, stats = jax.jit(
      lambda ks: jax.lax.map(one, ks, batch_size=batch_size))(keys)
  return rows, state._replace(stats=jax.tree.map(lambda x: x[0], stats))


def compare_with_gradient(
    estimator: optax.GradientTransformationExtraArgs,
    obj_fn: Callable[[Any], jax.Array],
    params: Any,
    *,
    num_trials: int = 100,
    seed: int = 0,
    batch_size: Optional[int] = None,
) -> GradientComparison:
  """Compares ``num_trials`` estimates with ``jax.grad(obj_fn)(params)``.

  Args:
    estimator: a zojax estimator (its state must have a ``key`` field), e.g.
      ``zojax.rge(8, 1e-3)`` or ``zojax.cge(1e-3)``.
    obj_fn: the objective; must be differentiable for the reference gradient.
    params: the point at which to compare.
    num_trials: independent estimates (keys).
    seed: seed of the trial keys.
    batch_size: trials run at once inside ``lax.map`` (``None`` = all).

  Returns:
    A :class:`GradientComparison` of Python floats.
  """
  keys = jax.random.split(jax.random.PRNGKey(seed), num_trials)
  rows, state = estimates_over_keys(estimator, obj_fn, params, keys,
                                    batch_size)
  true = _flat(jax.grad(obj_fn)(params))
  true_norm = jnp.linalg.norm(true)
  row_norms = jnp.linalg.norm(rows, axis=1)
  cosine = rows @ true / jnp.maximum(row_norms * true_norm, 1e-30)
  relative = jnp.linalg.norm(rows - true, axis=1) / true_norm
  mean = rows.mean(axis=0)
  return GradientComparison(
      cosine_mean=float(cosine.mean()),
      cosine_std=float(cosine.std()),
      relative_error_mean=float(relative.mean()),
      relative_error_std=float(relative.std()),
      mean_relative_error=float(jnp.linalg.norm(mean - true) / true_norm),
      variance=float(jnp.sum(jnp.var(rows, axis=0))),
      queries_per_estimate=estimate_info(state).evals_per_step,
      num_trials=num_trials,
  )
