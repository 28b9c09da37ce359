"""Shared test objectives with known gradients."""

import jax.numpy as jnp
import numpy as np


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
