"""Tests for zojax.fzoos and its GP / random-feature surrogates."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import zojax
from zojax._src import surrogate
from tests.objectives import quadratic_problem

LENGTHSCALE, NOISE = 1.0, 1e-6
mean_gradient = jax.jit(functools.partial(
    surrogate.posterior_mean_gradient, lengthscale=LENGTHSCALE, noise=NOISE))


def smooth(x):
  """A smooth non-quadratic function of a flat vector."""
  return jnp.sum(jnp.sin(x)) + 0.5 * jnp.sum(x**2 * jnp.arange(x.size)) / x.size


def history_around(x, count, spread, seed=0, size=None):
  points = x + spread * jax.random.normal(jax.random.PRNGKey(seed),
                                          (count, x.size))
  history = surrogate.QueryHistory.empty(size or count, x.size)
  return history.add(points, jax.vmap(smooth)(points))


def explicit_posterior_mean(history, z):
  """k(z, X)ᵀ (K + s²I)⁻¹ y in the original units, without the tricks."""
  pts = history.points[history.valid]
  values = history.values[history.valid]
  lo, hi = values.min(), values.max()
  sq = jnp.sum((pts[:, None] - pts[None]) ** 2, -1)
  kernel = jnp.exp(-sq / (2 * LENGTHSCALE**2)) + NOISE * jnp.eye(len(pts))
  k = jnp.exp(-jnp.sum((pts - z) ** 2, -1) / (2 * LENGTHSCALE**2))
  return lo + (hi - lo) * k @ jnp.linalg.solve(kernel, (values - lo) / (hi - lo))


class SurrogateTest(parameterized.TestCase):

  def test_posterior_mean_gradient_is_the_gradient_of_the_mean(self):
    x = jnp.linspace(-1.0, 1.0, 6)
    history = history_around(x, 12, 0.5, size=20)  # 8 empty slots
    got = mean_gradient(history, x)
    want = jax.grad(lambda z: explicit_posterior_mean(history, z))(x)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * jnp.abs(
        want).max())

  def test_surrogate_gradient_approaches_true_gradient_with_history(self):
    x = jnp.linspace(-1.0, 1.0, 5)
    true = jax.grad(smooth)(x)
    errors = []
    for count in (4, 15, 60):
      got = mean_gradient(history_around(x, count, 0.3), x)
      errors.append(float(jnp.linalg.norm(got - true) / jnp.linalg.norm(true)))
    self.assertLess(errors[-1], 0.05)
    self.assertLess(errors[-1], errors[0])

  def test_gradient_variance_equals_explicit_trace(self):
    x = jnp.linspace(-1.0, 1.0, 6)
    history = history_around(x, 10, 0.2, size=12)
    candidates = x + 0.05 * jax.random.uniform(jax.random.PRNGKey(3), (7, 6),
                                               minval=-1, maxval=1)
    got = surrogate.gradient_variance(history, x, candidates,
                                      lengthscale=LENGTHSCALE, noise=NOISE)
    pts = history.points[history.valid]
    kernel = jnp.exp(-jnp.sum((pts[:, None] - pts[None]) ** 2, -1) / 2)
    kernel += NOISE * jnp.eye(len(pts))

    def explicit(c):
      k = lambda a, b: jnp.exp(-jnp.sum((a - b) ** 2) / 2)
      d_k = jax.vmap(jax.grad(k), in_axes=(None, 0))(c, pts)  # (H, d)
      prior = jnp.trace(jax.jacfwd(jax.grad(k, 0), 1)(c, c))
      return prior - jnp.trace(d_k.T @ jnp.linalg.solve(kernel, d_k))

    np.testing.assert_allclose(got, jax.jit(jax.vmap(explicit))(candidates),
                               rtol=1e-3)

  def test_active_queries_pick_the_least_known_directions(self):
    # History spread along the first coordinate only: candidates that step
    # away along the others are the most uncertain.
    x = jnp.zeros(4)
    points = x + jnp.outer(jnp.linspace(-0.5, 0.5, 9), jnp.eye(4)[0])
    history = surrogate.QueryHistory.empty(9, 4).add(points, points[:, 0]**2)
    candidates = x + 0.3 * jnp.eye(4)
    scores = surrogate.gradient_variance(history, x, candidates,
                                         lengthscale=LENGTHSCALE, noise=NOISE)
    self.assertEqual(int(jnp.argmin(scores)), 0)

  def test_history_keeps_the_newest_finite_queries(self):
    history = surrogate.QueryHistory.empty(3, 2)
    history = history.add(jnp.ones((2, 2)), jnp.array([1.0, jnp.nan]))
    history = history.add(2 * jnp.ones((2, 2)), jnp.array([2.0, 3.0]))
    np.testing.assert_array_equal(history.values, [3.0, 0.0, 2.0])
    np.testing.assert_array_equal(history.valid, [True, False, True])
    self.assertEqual(int(history.position), 1)

  def test_fourier_features_approximate_the_kernel_and_its_mean(self):
    features = surrogate.FourierFeatures.create(jax.random.PRNGKey(0), 20_000,
                                                4, LENGTHSCALE)
    a = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.5, -0.2, 0.0, 1.0]])
    approx = features(a) @ features(a).T
    exact = jnp.exp(-jnp.sum((a[:, None] - a[None]) ** 2, -1) / 2)
    np.testing.assert_allclose(approx, exact, atol=0.03)
    weights = jax.random.normal(jax.random.PRNGKey(1), (20_000,))
    x = jnp.array([0.3, -0.1, 0.2, 0.0])
    np.testing.assert_allclose(
        features.mean_gradient(weights, x),
        jax.grad(lambda z: features(z[None])[0] @ weights)(x), rtol=1e-4,
        atol=1e-4)

  def test_fourier_fit_matches_the_exact_gp_gradient(self):
    x = jnp.linspace(-1.0, 1.0, 5)
    history = history_around(x, 40, 0.3)
    features = surrogate.FourierFeatures.create(jax.random.PRNGKey(0), 20_000,
                                                5, LENGTHSCALE)
    weights = features.fit(history, 1e-4)
    exact = surrogate.posterior_mean_gradient(history, x,
                                              lengthscale=LENGTHSCALE,
                                              noise=1e-4)
    got = features.mean_gradient(weights, x)
    cosine = got @ exact / jnp.linalg.norm(got) / jnp.linalg.norm(exact)
    self.assertGreater(float(cosine), 0.95)


class FZooSTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_shapes_dtypes_and_counts(self, dtype):
    params, obj_fn = quadratic_problem()
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    tx = zojax.fzoos(history_size=20, num_candidates=10, num_active=3)
    state = tx.init(params)
    update = self.variant(lambda s, p: tx.update(None, s, p, obj_fn=obj_fn))
    grad, state = update(state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(grad, params)
    info = zojax.estimate_info(state)
    self.assertEqual(info.num_evals, 4)
    np.testing.assert_allclose(info.value, obj_fn(params), rtol=1e-2)
    self.assertEqual(int(jnp.sum(state.history.valid)), 4)

  def test_estimate_aligns_with_gradient_along_the_trajectory(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.fzoos(history_size=60, num_candidates=50, num_active=5,
                     radius=0.1)
    opt = optax.chain(tx, optax.adam(0.05))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
      updates, state = opt.update(None, state, params, obj_fn=obj_fn)
      return optax.apply_updates(params, updates), state

    start = float(obj_fn(params))
    for _ in range(40):
      params, state = step(params, state)
    estimate, _ = tx.update(None, state[0], params, obj_fn=obj_fn)
    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
    true = flat(jax.grad(obj_fn)(params))
    cosine = flat(estimate) @ true / jnp.linalg.norm(flat(estimate)) / (
        jnp.linalg.norm(true))
    self.assertGreater(float(cosine), 0.9)
    self.assertLess(float(obj_fn(params)), 0.5 * start)

  def test_ask_tell_reproduces_update(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.fzoos(history_size=10, num_candidates=8, num_active=2, seed=3)
    state = tx.init(params)
    state = tx.update(None, state, params, obj_fn=obj_fn)[1]
    want, want_state = tx.update(None, state, params, obj_fn=obj_fn)
    points = tx.ask(jax.random.split(state.key)[1], params, state)
    values = [float(obj_fn(jax.tree.map(lambda x: x[i], points)))
              for i in range(3)]
    got, got_state = tx.tell(state, params, points, values)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-6)

  def test_non_finite_value_skips_the_step(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.fzoos(history_size=10, num_candidates=8, num_active=2)
    state = tx.update(None, tx.init(params), params, obj_fn=obj_fn)[1]
    grad, state = tx.update(None, state, params,
                            obj_fn=lambda p: obj_fn(p) + jnp.nan)
    chex.assert_trees_all_equal(grad, jax.tree.map(jnp.zeros_like, params))
    self.assertEqual(zojax.estimate_info(state).skipped_steps, 1)
    self.assertEqual(int(jnp.sum(state.history.valid)), 3)

  def test_errors(self):
    params, obj_fn = quadratic_problem()
    for kwargs in ({'history_size': 0}, {'num_active': 6, 'num_candidates': 5},
                   {'radius': 0.0}, {'lengthscale': -1.0}, {'noise': 0.0}):
      with self.assertRaises(ValueError):
        zojax.fzoos(**kwargs)
    tx = zojax.fzoos()
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, 'scalar'):
      tx.update(None, state, params, obj_fn=lambda p: p['x'])
    with self.assertRaisesRegex(ValueError, 'initialised for'):
      tx.update(None, state, {'x': jnp.zeros(3)}, obj_fn=lambda p: p['x'][0])


if __name__ == '__main__':
  absltest.main()
