"""Tests for zojax.fzoos and its GP / random-feature surrogates."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import zojax
from zojax._src.estimators import surrogate
from tests.objectives import quadratic_problem

LENGTHSCALE, NOISE = 1.0, 1e-6
KERNELS = ('matern52', 'se')


@functools.partial(jax.jit, static_argnums=2)
def mean_gradient(history, x, kernel='se', lengthscale=LENGTHSCALE):
  return surrogate.posterior_mean_gradient(
      history, x, kernel=kernel, lengthscale=lengthscale, noise=NOISE)


def smooth(x):
  """A smooth non-quadratic function of a flat vector."""
  return jnp.sum(jnp.sin(x)) + 0.5 * jnp.sum(x**2 * jnp.arange(x.size)) / x.size


def history_around(x, count, spread, seed=0, size=None):
  points = x + spread * jax.random.normal(jax.random.PRNGKey(seed),
                                          (count, x.size))
  history = surrogate.QueryHistory.empty(size or count, x.size)
  return history.add(points, jax.vmap(smooth)(points))


def explicit_kernel(kernel, a, b, lengthscale):
  """The textbook kernel of two points (no squared-distance tricks)."""
  r = jnp.sqrt(jnp.sum((a - b) ** 2) + 1e-30)
  if kernel == 'se':
    return jnp.exp(-r**2 / (2 * lengthscale**2))
  u = jnp.sqrt(5.0) * r / lengthscale
  return (1 + u + u**2 / 3) * jnp.exp(-u)


def explicit_posterior_mean(history, z, kernel='se', lengthscale=LENGTHSCALE):
  """k(z, X)ᵀ (K + s²I)⁻¹ y in the original units, without the tricks."""
  pts = history.points[history.valid]
  values = history.values[history.valid]
  lo, hi = values.min(), values.max()
  k = jax.vmap(jax.vmap(explicit_kernel, (None, None, 0, None)),
               (None, 0, None, None))
  gram = k(kernel, pts, pts, lengthscale) + NOISE * jnp.eye(len(pts))
  k_z = k(kernel, z[None], pts, lengthscale)[0]
  return lo + (hi - lo) * k_z @ jnp.linalg.solve(gram,
                                                (values - lo) / (hi - lo))


class SurrogateTest(parameterized.TestCase):

  @parameterized.product(kernel=KERNELS, lengthscale=(0.8, 2.0))
  def test_posterior_mean_gradient_is_the_gradient_of_the_mean(
      self, kernel, lengthscale):
    x = jnp.linspace(-1.0, 1.0, 6)
    history = history_around(x, 12, 0.5, size=20)  # 8 empty slots
    got = mean_gradient(history, x, kernel, lengthscale)
    want = jax.grad(lambda z: explicit_posterior_mean(history, z, kernel,
                                                      lengthscale))(x)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * jnp.abs(
        want).max())

  @parameterized.parameters(('se', 1.0), ('matern52', 2.0))
  def test_surrogate_gradient_approaches_true_gradient_with_history(
      self, kernel, lengthscale):
    # (Matérn with ℓ = 1: relative error 0.054 at 60 points, 0.030 at 120.)
    x = jnp.linspace(-1.0, 1.0, 5)
    true = jax.grad(smooth)(x)
    errors = []
    for count in (4, 15, 60):
      got = mean_gradient(history_around(x, count, 0.3), x, kernel,
                          lengthscale)
      errors.append(float(jnp.linalg.norm(got - true) / jnp.linalg.norm(true)))
    self.assertLess(errors[-1], 0.05)
    self.assertLess(errors[-1], errors[0])

  @parameterized.parameters(*KERNELS)
  def test_gradient_variance_equals_explicit_trace(self, kernel):
    x = jnp.linspace(-1.0, 1.0, 6)
    history = history_around(x, 10, 0.2, size=12)
    candidates = x + 0.05 * jax.random.uniform(jax.random.PRNGKey(3), (7, 6),
                                               minval=-1, maxval=1)
    lengthscale = 0.7
    got = jax.jit(functools.partial(
        surrogate.gradient_variance, kernel=kernel, lengthscale=lengthscale,
        noise=NOISE))(history, x, candidates)
    pts = history.points[history.valid]
    k = lambda a, b: explicit_kernel(kernel, a, b, lengthscale)
    gram = jax.vmap(jax.vmap(k, (None, 0)), (0, None))(pts, pts)
    gram += NOISE * jnp.eye(len(pts))
    # Prior: -Hessian of k(τ) at |τ| = 1e-4 (Matérn's mixed derivative has
    # no autodiff value at τ = 0), whose trace is d w(0) + O(|τ|).
    tau = jnp.full(6, 1e-4 / jnp.sqrt(6.0))
    prior = -jnp.trace(jax.hessian(lambda t: k(t, jnp.zeros(6)))(tau))

    def explicit(c):
      d_k = jax.vmap(jax.grad(k), in_axes=(None, 0))(c, pts)  # (H, d)
      return prior - jnp.trace(d_k.T @ jnp.linalg.solve(gram, d_k))

    np.testing.assert_allclose(got, jax.jit(jax.vmap(explicit))(candidates),
                               rtol=2e-3)

  @parameterized.parameters(*KERNELS)
  def test_active_queries_pick_the_least_known_directions(self, kernel):
    # History spread along the first coordinate only: candidates that step
    # away along the others are the most uncertain.
    x = jnp.zeros(4)
    points = x + jnp.outer(jnp.linspace(-0.5, 0.5, 9), jnp.eye(4)[0])
    history = surrogate.QueryHistory.empty(9, 4).add(points, points[:, 0]**2)
    candidates = x + 0.3 * jnp.eye(4)
    scores = surrogate.gradient_variance(history, x, candidates,
                                         kernel=kernel,
                                         lengthscale=LENGTHSCALE, noise=NOISE)
    self.assertEqual(int(jnp.argmin(scores)), 0)

  def test_history_keeps_the_newest_finite_queries(self):
    history = surrogate.QueryHistory.empty(3, 2)
    history = history.add(jnp.ones((2, 2)), jnp.array([1.0, jnp.nan]))
    history = history.add(2 * jnp.ones((2, 2)), jnp.array([2.0, 3.0]))
    np.testing.assert_array_equal(history.values, [3.0, 0.0, 2.0])
    np.testing.assert_array_equal(history.valid, [True, False, True])
    self.assertEqual(int(history.position), 1)

  def test_nearest_picks_the_nearest_stored_queries(self):
    points = jax.random.normal(jax.random.PRNGKey(0), (30, 3))
    values = jnp.arange(30.0).at[7].set(jnp.nan)  # slot 7 is left empty
    history = surrogate.QueryHistory.empty(40, 3).add(points, values)
    centre = jnp.array([0.2, -0.1, 0.3])
    near = jax.jit(lambda h, c: h.nearest(c, 8))(history, centre)
    dists = np.linalg.norm(np.asarray(points - centre), axis=1)
    dists[7] = np.inf
    want = np.argsort(dists)[:8]
    np.testing.assert_array_equal(np.sort(np.asarray(near.values)),
                                  np.sort(want.astype(np.float32)))
    np.testing.assert_allclose(near.points, points[np.asarray(
        near.values, int)])
    self.assertTrue(bool(jnp.all(near.valid)))
    # Fewer stored than asked: all of them, then empty slots.
    few = surrogate.QueryHistory.empty(6, 3).add(points[:4], values[:4])
    near = few.nearest(centre, 5)
    np.testing.assert_array_equal(near.valid, [True] * 4 + [False])
    self.assertEqual(set(np.asarray(near.values[:4]).tolist()),
                     {0.0, 1.0, 2.0, 3.0})

  def test_local_gp_fits_the_nearest_with_the_ml_lengthscale(self):
    """LocalGP.gradient = the posterior mean gradient of the nearest
    queries, at the lengthscale surrogate.ml_lengthscale finds there."""
    x = jnp.linspace(-1.0, 1.0, 5)
    far = history_around(x + 3.0, 20, 0.3, seed=1)
    history = surrogate.QueryHistory.empty(50, 5).add(far.points, far.values)
    near = history_around(x, 25, 0.3)
    history = history.add(near.points, near.values)
    gp = surrogate.LocalGP(kernel='matern52', lengthscale='ml', noise=NOISE,
                           num_nearest=25)
    key = jax.random.PRNGKey(4)
    got, lengthscale = jax.jit(gp.gradient)(key, history, x, 1.0)
    want_ls = jax.jit(functools.partial(
        surrogate.ml_lengthscale, kernel='matern52', noise=NOISE, init=1.0,
        restarts=4, steps=20))(key, near, x)
    # The same fit up to float rounding (the slots come in another order,
    # and the likelihood is flat near its optimum).
    np.testing.assert_allclose(lengthscale, want_ls, rtol=0.02)
    np.testing.assert_allclose(
        got, mean_gradient(near, x, 'matern52', float(lengthscale)),
        rtol=1e-3, atol=1e-4)
    true = jax.grad(smooth)(x)
    self.assertGreater(float(got @ true / jnp.linalg.norm(got)
                             / jnp.linalg.norm(true)), 0.95)

  @parameterized.parameters(*KERNELS)
  def test_fourier_features_approximate_the_kernel_and_its_mean(self, kernel):
    features = surrogate.FourierFeatures.create(jax.random.PRNGKey(0), 20_000,
                                                4, 0.8, kernel)
    a = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.5, -0.2, 0.0, 1.0],
                   [0.0, 0.0, 0.5, 0.2]])
    approx = features(a) @ features(a).T
    exact = jax.vmap(jax.vmap(explicit_kernel, (None, None, 0, None)),
                     (None, 0, None, None))(kernel, a, a, 0.8)
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
    exact = surrogate.posterior_mean_gradient(history, x, kernel='se',
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

  @parameterized.named_parameters(
      ('defaults', {'num_nearest': 40}),  # Matérn-5/2, ML lengthscale
      ('former_se', {'num_nearest': None, 'kernel': 'se',
                     'lengthscale': 1.0}))
  def test_estimate_aligns_with_gradient_along_the_trajectory(self, kwargs):
    params, obj_fn = quadratic_problem()
    tx = zojax.fzoos(100, num_candidates=50, num_active=5, radius=0.1,
                     **kwargs)
    adam = optax.adam(0.05)

    @jax.jit
    def step(params, states):
      estimate, tx_state = tx.update(None, states[0], params, obj_fn=obj_fn)
      updates, adam_state = adam.update(estimate, states[1])
      return (optax.apply_updates(params, updates), (tx_state, adam_state),
              estimate)

    start = float(obj_fn(params))
    states = (tx.init(params), adam.init(params))
    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
    for _ in range(40):
      true = flat(jax.grad(obj_fn)(params))
      params, states, estimate = step(params, states)
    cosine = flat(estimate) @ true / jnp.linalg.norm(flat(estimate)) / (
        jnp.linalg.norm(true))
    self.assertGreater(float(cosine), 0.9)
    self.assertLess(float(obj_fn(params)), 0.5 * start)
    if 'lengthscale' not in kwargs:  # fitted: moved from its start
      self.assertNotAlmostEqual(float(states[0].lengthscale), 1.0, places=2)

  def test_ask_tell_reproduces_update(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.fzoos(history_size=10, num_candidates=8, num_active=2, seed=3)
    update = jax.jit(lambda s, p: tx.update(None, s, p, obj_fn=obj_fn))
    state = update(tx.init(params), params)[1]
    want, want_state = update(state, params)
    points = jax.jit(tx.ask)(state, params)
    values = [float(obj_fn(jax.tree.map(lambda x: x[i], points)))
              for i in range(3)]
    got, got_state = jax.jit(tx.tell)(state, params, points,
                                      jnp.asarray(values))
    # Two separately compiled programs: equal up to float rounding, which
    # the GP solve amplifies (5e-5 relative here).
    chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(got_state, want_state, rtol=2e-4, atol=2e-5)

  def test_non_finite_value_skips_the_step(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.fzoos(history_size=10, num_candidates=8, num_active=2)
    state = tx.update(None, tx.init(params), params, obj_fn=obj_fn)[1]
    grad, state = tx.update(None, state, params,
                            obj_fn=lambda p: obj_fn(p) + jnp.nan)
    self.assertTrue(all(bool(jnp.all(jnp.isnan(g)))
                        for g in jax.tree.leaves(grad)))
    self.assertEqual(zojax.estimate_info(state).skipped_steps, 1)
    self.assertEqual(int(jnp.sum(state.history.valid)), 3)

  def test_errors(self):
    params, obj_fn = quadratic_problem()
    for kwargs in ({'history_size': 0}, {'num_active': 6, 'num_candidates': 5},
                   {'radius': 0.0}, {'lengthscale': -1.0}, {'noise': 0.0},
                   {'lengthscale': 'mle'}, {'lengthscale': None},
                   {'kernel': 'rbf'}, {'num_nearest': 0}):
      with self.assertRaises(ValueError):
        zojax.fzoos(**kwargs)
    tx = zojax.fzoos()
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, 'scalar'):
      tx.update(None, state, params, obj_fn=lambda p: p['x'])
    with self.assertRaisesRegex(ValueError, 'initialised for'):
      tx.update(None, state, {'x': jnp.zeros(3)}, obj_fn=lambda p: p['x'][0])
    with self.assertRaisesRegex(ValueError, 'created by another transform'):
      tx.update(None, zojax.fzoos(num_active=3).init(params), params,
                obj_fn=obj_fn)


if __name__ == '__main__':
  absltest.main()
