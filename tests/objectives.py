"""Shared test objectives with known gradients, and a jitted training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def quadratic_problem(seed: int = 0, dim: int = 6):
  """A mixed-shape params pytree and a convex quadratic over its leaves.

  f(θ) = ½ xᵀAx + bᵀx + Σ c ⊙ y² + w·(Σ y), with A SPD.
  """
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(dim, dim))
  a = jnp.asarray(g @ g.T / dim + np.eye(dim), jnp.float32)
  b = jnp.asarray(rng.normal(size=dim), jnp.float32)
  c = jnp.asarray(rng.uniform(0.5, 2.0, size=(2, 3)), jnp.float32)
  params = {
      'x': jnp.asarray(rng.normal(size=dim), jnp.float32),
      'layer': {'y': jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)},
  }

  def obj_fn(p):
    x, y = p['x'].astype(jnp.float32), p['layer']['y'].astype(jnp.float32)
    return 0.5 * x @ a @ x + b @ x + jnp.sum(c * y**2) + 0.3 * jnp.sum(y)

  return params, obj_fn


def least_squares_problem(seed: int = 0, examples: int = 16):
  """Params shaped like :func:`quadratic_problem`'s, a batch and
  ``loss(params, batch)``, a mean over examples.

  loss(θ, (X, t)) = mean_n (X_n·[x, vec(y)] − t_n)², so the loss on the whole
  batch equals the mean of the losses on equal shards of it.
  """
  rng = np.random.default_rng(seed)
  batch = (jnp.asarray(rng.normal(size=(examples, 12)), jnp.float32),
           jnp.asarray(rng.normal(size=examples), jnp.float32))
  params = {
      'x': jnp.asarray(rng.normal(size=6), jnp.float32),
      'layer': {'y': jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)},
  }

  def loss(p, data):
    inputs, targets = data
    theta = jnp.concatenate([p['x'], p['layer']['y'].reshape(-1)])
    return jnp.mean((inputs @ theta - targets) ** 2)

  return params, batch, loss


def run_steps(tx, params, obj_fn, steps, **update_args):
  """``steps`` jitted updates of ``tx`` on ``obj_fn``; returns params, state.

  ``update_args`` (e.g. ``batch=``) are passed to every ``tx.update``.
  """
  state = tx.init(params)

  # update_args enter as jit arguments: a multi-host run's global arrays
  # may not be closed over.
  @jax.jit
  def step(p, s, args):
    updates, s = tx.update(None, s, p, obj_fn=obj_fn, **args)
    return optax.apply_updates(p, updates), s

  for _ in range(steps):
    params, state = step(params, state, update_args)
  return params, state
