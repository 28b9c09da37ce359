"""Tests for the ZO-RankSGD estimator, line search and optimizer."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import zojax
from zojax._src.query.probes import num_edges, rank_weights
from tests.objectives import quadratic_problem


def ranker(f):
  """An exact ranking oracle for the objective ``f``: indices best-first."""
  return lambda candidates: jnp.argsort(jax.vmap(f)(candidates))


def _flat(tree):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1)
                         for x in jax.tree.leaves(tree)], axis=1)


def brute_force_estimate(xis, ranking, top_k):
  """(1/|E|) sum over the comparison graph's edges (i better than j) of
  xi_j - xi_i, by enumerating the edges."""
  m = len(xis)
  top = list(ranking[:top_k])
  edges = list(itertools.combinations(top, 2))  # (better, worse) in top-k
  edges += [(i, j) for i in top for j in range(m) if j not in top]
  assert len(edges) == num_edges(m, top_k)
  return sum(xis[j] - xis[i] for i, j in edges) / len(edges)


class RankWeightsTest(parameterized.TestCase):

  @parameterized.parameters((5, 3), (10, 10), (10, 1), (2, 2), (2, 1),
                            (7, 4))
  def test_weights_match_the_edge_enumeration(self, m, k):
    rng = np.random.default_rng(m * 10 + k)
    ranking = rng.permutation(m)
    weights, valid = rank_weights(jnp.asarray(ranking), m, k)
    self.assertTrue(bool(valid))
    xis = list(np.eye(m))  # unit vectors read the weight of each item
    expected = brute_force_estimate(xis, ranking, k) * num_edges(m, k)
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    self.assertAlmostEqual(float(jnp.sum(weights)), 0.0, places=5)

  def test_invalid_rankings_are_flagged(self):
    self.assertFalse(bool(rank_weights(jnp.array([1, 1, 0]), 4, 3)[1]))
    self.assertFalse(bool(rank_weights(jnp.array([0, 7]), 4, 2)[1]))
    self.assertFalse(bool(rank_weights(jnp.array([-1, 2]), 4, 2)[1]))


class RankEstimatorTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.params, self.obj_fn = quadratic_problem()

  def _update(self, tx, rank_fn, params=None):
    params = self.params if params is None else params
    state = tx.init(params)
    update, new_state = jax.jit(lambda s, p: tx.update(
        None, s, p, rank_fn=rank_fn))(state, params)
    return state, update, new_state

  @parameterized.parameters((10, 5), (10, 10), (6, 1))
  def test_estimate_matches_the_paper_formula(self, m, k):
    sigma = 0.1
    tx = zojax.rank_estimator(m, k, sigma, seed=1)
    state, update, _ = self._update(tx, ranker(self.obj_fn))
    candidates = tx.ask(state, self.params)
    chex.assert_tree_shape_prefix(candidates, (m,))
    xis = (_flat(candidates) - _flat(jax.tree.map(lambda x: x[None],
                                                  self.params))) / sigma
    ranking = np.argsort(np.asarray(jax.vmap(self.obj_fn)(candidates)))
    expected = brute_force_estimate(list(xis), ranking, k)
    got = _flat(jax.tree.map(lambda x: x[None], update))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_equal_shapes_and_dtypes(update, self.params)

  def test_invariant_to_increasing_transforms(self):
    tx = zojax.rank_estimator(10, 4, 0.1, seed=3)
    _, reference, _ = self._update(tx, ranker(self.obj_fn))
    for transform in (lambda v: jnp.exp(v / 10), lambda v: 3.0 * v + 7.0,
                      lambda v: jnp.arctan(v)):
      _, update, _ = self._update(
          tx, ranker(lambda p, t=transform: t(self.obj_fn(p))))
      chex.assert_trees_all_equal(update, reference)

  def test_mean_estimate_points_along_the_gradient(self):
    # E[g] is a positive multiple of the gradient direction for small mu
    # (Tang et al., Lemma 1); the mean of 2000 estimates must align with it.
    tx = zojax.rank_estimator(10, 5, 1e-3)
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    state = tx.init(self.params)

    def estimate(key):
      return tx.update(None, state._replace(key=key), self.params,
                       rank_fn=ranker(self.obj_fn))[0]

    mean = _flat(jax.tree.map(lambda x: x.mean(0, keepdims=True),
                              jax.jit(jax.vmap(estimate))(keys)))[0]
    grad = _flat(jax.tree.map(lambda x: x[None],
                              jax.grad(self.obj_fn)(self.params)))[0]
    cosine = mean @ grad / np.linalg.norm(mean) / np.linalg.norm(grad)
    self.assertGreater(cosine, 0.97)

  def test_pairwise_comparison_is_the_smallest_case(self):
    # m = k = 2 and m = 2, k = 1 are the same single comparison: g = xi_worse
    # - xi_better (one edge).
    rank_fn = ranker(self.obj_fn)
    _, full, _ = self._update(zojax.rank_estimator(2, 2, 0.1), rank_fn)
    _, top1, _ = self._update(zojax.rank_estimator(2, 1, 0.1), rank_fn)
    chex.assert_trees_all_close(full, top1)
    tx = zojax.rank_estimator(2, 1, 0.1)
    state = tx.init(self.params)
    candidates = tx.ask(state, self.params)
    xis = (_flat(candidates) - _flat(jax.tree.map(lambda x: x[None],
                                                  self.params))) / 0.1
    better, worse = np.argsort(np.asarray(jax.vmap(self.obj_fn)(candidates)))
    np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[None], top1))[0],
                               xis[worse] - xis[better], rtol=1e-4, atol=1e-5)

  def test_ask_tell_with_a_scripted_human(self):
    tx = zojax.rank_estimator(4, 2, 0.1, seed=7)
    state = tx.init(self.params)
    shown = []
    values = iter([])

    def human(candidates, read):
      """Prints the candidates and reads 'best second' from ``read``."""
      for i, c in enumerate(jax.tree.leaves(candidates)[0]):
        shown.append(f'candidate {i}: {np.round(np.asarray(c)[:3], 2)}')
      return [int(s) for s in read().split()]

    candidates = tx.ask(state, self.params)
    truth = np.argsort(np.asarray(jax.vmap(self.obj_fn)(candidates)))[:2]
    values = iter([f'{truth[0]} {truth[1]}'])  # the scripted answer
    ranking = human(candidates, read=lambda: next(values))
    grad, told_state = tx.tell(state, self.params, candidates, ranking)
    self.assertLen(shown, 4)
    _, update, updated_state = self._update(tx, ranker(self.obj_fn))
    chex.assert_trees_all_close(grad, update, rtol=1e-6)
    chex.assert_trees_all_equal(told_state, updated_state)
    with self.assertRaisesRegex(ValueError, 'distinct'):
      tx.tell(state, self.params, candidates, [1, 1])
    with self.assertRaisesRegex(ValueError, 'distinct'):
      tx.tell(state, self.params, candidates, [0, 9])

  def test_invalid_ranking_inside_jit_skips_the_step(self):
    tx = zojax.rank_estimator(4, 2, 0.1)
    _, update, state = self._update(tx, lambda c: jnp.array([1, 1]))
    self.assertTrue(all(bool(jnp.all(jnp.isnan(u)))
                        for u in jax.tree.leaves(update)))
    info = zojax.estimate_info(state)
    self.assertEqual((info.skipped_steps, info.num_evals), (1, 4))
    self.assertTrue(np.isnan(info.value))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'num_points'):
      zojax.rank_estimator(1, 1, 0.1)
    with self.assertRaisesRegex(ValueError, 'top_k'):
      zojax.rank_estimator(4, 5, 0.1)
    with self.assertRaisesRegex(ValueError, 'sigma'):
      zojax.rank_estimator(4, 2, 0.0)
    tx = zojax.rank_estimator(4, 2, 0.1)
    state = tx.init(self.params)
    with self.assertRaisesRegex(ValueError, 'rank_fn'):
      tx.update(None, state, self.params)
    with self.assertRaisesRegex(ValueError, 'at least 2 integer'):
      tx.update(None, state, self.params, rank_fn=lambda c: jnp.array([0]))
    with self.assertRaisesRegex(ValueError, 'integer'):
      tx.update(None, state, self.params,
                rank_fn=lambda c: jnp.array([0.0, 1.0]))


def normalized_edge_estimate(xis, ranking, top_k):
  """The authors' notebooks: sum over the edges (i better than j) of
  (xi_j - xi_i) / ||xi_j - xi_i||, divided by its norm."""
  m = len(xis)
  top = list(ranking[:top_k])
  edges = list(itertools.combinations(top, 2))
  edges += [(i, j) for i in top for j in range(m) if j not in top]
  total = sum((xis[j] - xis[i]) / np.linalg.norm(xis[j] - xis[i])
              for i, j in edges)
  return total / np.linalg.norm(total)


# Means of the order statistics of 10 standard normals, smallest first.
NORMAL_ORDER_MEANS_10 = np.array([-1.538753, -1.001357, -0.656059, -0.375765,
                                  -0.122668, 0.122668, 0.375765, 0.656059,
                                  1.001357, 1.538753])


class RankEstimatorOptionsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.params, self.obj_fn = quadratic_problem()
    self.base = _flat(jax.tree.map(lambda x: x[None], self.params))

  def _estimate(self, tx, params=None):
    """(candidates' offsets / sigma, oracle ranking, estimate) of one step."""
    params = self.params if params is None else params
    state = tx.init(params)
    candidates = tx.ask(state, params)
    ranking = np.argsort(np.asarray(jax.vmap(self.obj_fn)(candidates)))
    update, _ = jax.jit(lambda s, p: tx.update(
        None, s, p, rank_fn=ranker(self.obj_fn)))(state, params)
    return (_flat(candidates) - self.base, ranking,
            _flat(jax.tree.map(lambda x: x[None], update))[0])

  @parameterized.parameters((10, 10), (10, 5), (6, 1), (2, 1))
  def test_authors_options_match_their_notebook(self, m, k):
    tx = zojax.rank_estimator(m, k, 0.1, distribution='sphere',
                              include_center=True, normalize=True, seed=2)
    offsets, ranking, got = self._estimate(tx)
    np.testing.assert_allclose(offsets[0], 0.0)  # candidate 0 is x
    np.testing.assert_allclose(np.linalg.norm(offsets[1:], axis=1), 0.1,
                               rtol=1e-5)
    expected = normalized_edge_estimate(list(offsets / 0.1), ranking, k)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    self.assertAlmostEqual(float(np.linalg.norm(got)), 1.0, places=5)

  @parameterized.parameters('gaussian', 'sphere')
  def test_normalized_gaussian_and_sphere_edges(self, distribution):
    tx = zojax.rank_estimator(8, 3, 0.1, distribution=distribution,
                              normalize=True, seed=4)
    offsets, ranking, got = self._estimate(tx)
    expected = normalized_edge_estimate(list(offsets / 0.1), ranking, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

  def test_center_keeps_the_other_candidates_directions(self):
    with_center = zojax.rank_estimator(6, 3, 0.1, include_center=True, seed=5)
    without = zojax.rank_estimator(6, 3, 0.1, seed=5)
    a = _flat(with_center.ask(with_center.init(self.params), self.params))
    b = _flat(without.ask(without.init(self.params), self.params))
    np.testing.assert_allclose(a[0], self.base[0])
    np.testing.assert_allclose(a[1:], b[1:])
    # Unnormalised graph weights with the center: xi_0 = 0 in the formula.
    offsets, ranking, got = self._estimate(with_center)
    expected = brute_force_estimate(list(offsets / 0.1), ranking, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

  @parameterized.parameters((10, 5), (10, 10), (4, 1))
  def test_reference_weights_are_m_minus_2r(self, m, k):
    tx = zojax.rank_estimator(m, k, 0.1, weights='reference', seed=6)
    offsets, ranking, got = self._estimate(tx)
    weights = np.full(m, float(k))
    weights[ranking[:k]] = -(m - 2.0 * np.arange(k))
    expected = weights @ (offsets / 0.1) / num_edges(m, k)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

  def test_reference_weights_lean_further_along_the_gradient(self):
    # Linear objective, unit gradient u: E[g].u = sum_r w_r E[z_(r)] / |E|
    # from the normal order statistics: 1.2532 (graph), 1.3587 (reference).
    # 4,000 draws: standard error ~0.005, tolerance 0.02.
    dim, m, k = 20, 10, 5
    u = jnp.ones(dim) / np.sqrt(dim)
    params = {'x': jnp.zeros(dim)}
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    for weights, shift in (('graph', 0.0), ('reference', 1.0)):
      tx = zojax.rank_estimator(m, k, 0.1, weights=weights)
      state = tx.init(params)
      along = jax.jit(jax.vmap(lambda key: tx.update(
          None, state._replace(key=key), params,
          rank_fn=lambda c: jnp.argsort(c['x'] @ u))[0]['x'] @ u))(keys)
      w = np.full(m, float(k))
      w[:k] = -(m - 1 - 2.0 * np.arange(k)) - shift
      expected = w @ NORMAL_ORDER_MEANS_10 / num_edges(m, k)
      self.assertAlmostEqual(float(jnp.mean(along)), expected, delta=0.02)

  @parameterized.parameters(
      {'distribution': 'sphere', 'include_center': True, 'normalize': True},
      {'weights': 'reference'})
  def test_ask_tell_and_invariance_with_options(self, **options):
    tx = zojax.rank_estimator(6, 3, 0.1, seed=8, **options)
    state = tx.init(self.params)
    candidates = tx.ask(state, self.params)
    ranking = ranker(self.obj_fn)(candidates)
    told, told_state = tx.tell(state, self.params, candidates, ranking)
    update, new_state = tx.update(None, state, self.params,
                                  rank_fn=ranker(self.obj_fn))
    chex.assert_trees_all_close(told, update, rtol=1e-6)
    chex.assert_trees_all_equal(told_state, new_state)
    transformed, _ = tx.update(None, state, self.params, rank_fn=ranker(
        lambda p: jnp.exp(self.obj_fn(p) / 10)))
    chex.assert_trees_all_equal(transformed, update)

  def test_invalid_ranking_with_normalize_is_a_skipped_nan_step(self):
    tx = zojax.rank_estimator(4, 2, 0.1, distribution='sphere',
                              include_center=True, normalize=True)
    update, state = jax.jit(lambda s, p: tx.update(
        None, s, p, rank_fn=lambda c: jnp.array([2, 2])))(
            tx.init(self.params), self.params)
    self.assertTrue(all(bool(jnp.all(jnp.isnan(u)))
                        for u in jax.tree.leaves(update)))
    self.assertEqual(zojax.estimate_info(state).skipped_steps, 1)

  def test_option_errors(self):
    with self.assertRaisesRegex(ValueError, 'distribution'):
      zojax.rank_estimator(4, 2, 0.1, distribution='rademacher')
    with self.assertRaisesRegex(ValueError, 'weights'):
      zojax.rank_estimator(4, 2, 0.1, weights='linear')
    with self.assertRaisesRegex(ValueError, 'normalize'):
      zojax.rank_estimator(4, 2, 0.1, normalize=True, weights='reference')


class ZoRankSGDTest(absltest.TestCase):

  def test_converges_on_a_quadratic_from_rankings_alone(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.zo_ranksgd(0.02, 10, 5, 0.1, seed=0)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(None, s, p,
                                          rank_fn=ranker(obj_fn)))
    minimum = float(obj_fn(jax.tree.map(jnp.zeros_like, params)))
    start = float(obj_fn(params))
    for _ in range(400):
      update, state = step(params, state)
      params = optax.apply_updates(params, update)
    self.assertLess(float(obj_fn(params)), start - 0.9 * (start - minimum))
    self.assertEqual(zojax.estimate_info(state).num_evals, 4000)

  def test_line_search_never_accepts_a_worse_point(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.zo_ranksgd(1.0, 10, 5, 0.1, line_search_steps=4, seed=1)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(None, s, p,
                                          rank_fn=ranker(obj_fn)))
    values = [float(obj_fn(params))]
    for _ in range(30):
      update, state = step(params, state)
      params = optax.apply_updates(params, update)
      values.append(float(obj_fn(params)))
    self.assertTrue(np.all(np.diff(values) <= 1e-6))
    self.assertLess(values[-1], values[0])
    self.assertEqual(zojax.estimate_info(state).evals_per_step, 10 + 5)


if __name__ == '__main__':
  absltest.main()
