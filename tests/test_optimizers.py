"""Tests for the ZO-Bench optimizer aliases and their building blocks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import zojax
from tests.objectives import quadratic_problem, run_steps

ALIASES = ('zo_sgd', 'zo_sgd_momentum', 'zo_sign_sgd', 'zo_sgd_conservative',
           'zo_adam', 'forward_grad')


def _explicit_two_point(params, obj_fn, state, sigma=1e-3):
  """ZO-Bench's g and z for one query, rebuilt from the estimator's ask."""
  tx = zojax.rge(1, sigma, difference='central')
  points = tx.ask(tx.init(params)._replace(key=state.key), params)
  z = jax.tree.map(lambda p, x: (x[0] - p) / sigma, params, points)
  plus = jax.tree.map(lambda x: x[0], points)
  minus = jax.tree.map(lambda x: x[1], points)
  g = (obj_fn(plus) - obj_fn(minus)) / (2 * sigma)
  return g, z


class OptimizerTest(parameterized.TestCase):

  @parameterized.parameters(*ALIASES)
  def test_alias_decreases_a_quadratic(self, name):
    params, obj_fn = quadratic_problem()
    learning_rate = 0.05 if name == 'zo_adam' else 0.002 if (
        name == 'zo_sgd_momentum') else 0.01
    tx = getattr(zojax, name)(learning_rate, seed=3)
    final, state = run_steps(tx, params, obj_fn, 400)
    chex.assert_trees_all_equal_shapes_and_dtypes(final, params)
    self.assertLess(float(obj_fn(final)), float(obj_fn(params)) - 2.0)
    info = zojax.estimate_info(state)
    per_step = {'zo_sgd_conservative': 5, 'forward_grad': 1}.get(name, 2)
    self.assertEqual(info.num_evals, 400 * per_step)

  @parameterized.parameters(*ALIASES)
  def test_uniform_signature(self, name):
    params, obj_fn = quadratic_problem()
    tx = getattr(zojax, name)(1e-3, sigma=1e-3, num_queries=2, seed=0)
    updates, state = tx.update(None, tx.init(params), params, obj_fn=obj_fn)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    self.assertGreater(zojax.estimate_info(state).num_evals, 0)

  def test_learning_rate_schedule_is_accepted(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.zo_adam(optax.linear_schedule(0.05, 0.0, 100), sigma=1e-3,
                       seed=0)
    final, _ = run_steps(tx, params, obj_fn, 100)
    self.assertLess(float(obj_fn(final)), float(obj_fn(params)))

  def test_zo_sgd_is_minus_lr_g_z(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.zo_sgd(0.1, sigma=1e-3, seed=7)
    state = tx.init(params)
    updates, _ = tx.update(None, state, params, obj_fn=obj_fn)
    g, z = _explicit_two_point(params, obj_fn, state[0])
    chex.assert_trees_all_close(
        updates, jax.tree.map(lambda v: -0.1 * g * v, z), rtol=2e-3,
        atol=2e-3)

  def test_sign_rule_is_the_sign_of_the_scalar_difference(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.zo_sign_sgd(0.1, seed=5)
    state = tx.init(params)
    updates, _ = tx.update(None, state, params, obj_fn=obj_fn)
    g, z = _explicit_two_point(params, obj_fn, state[0])
    expected = jax.tree.map(lambda v: -0.1 * jnp.sign(g) * v, z)
    chex.assert_trees_all_close(updates, expected, rtol=1e-3, atol=1e-3)
    # it is NOT the elementwise sign of ĝ
    self.assertFalse(np.allclose(np.abs(updates['x']), 0.1))

  def test_momentum_matches_heavy_ball_on_the_same_estimates(self):
    params, obj_fn = quadratic_problem()
    momentum = zojax.zo_sgd_momentum(0.01, momentum=0.9, seed=2)
    plain = optax.chain(zojax.rge(1, 1e-3, difference='central', seed=2),
                        optax.identity())
    s_m, s_p = momentum.init(params), plain.init(params)
    p, trace = params, jax.tree.map(jnp.zeros_like, params)
    for _ in range(5):
      u_m, s_m = momentum.update(None, s_m, p, obj_fn=obj_fn)
      g, s_p = plain.update(None, s_p, p, obj_fn=obj_fn)
      trace = jax.tree.map(lambda t, gi: 0.9 * t + gi, trace, g)
      chex.assert_trees_all_close(u_m, jax.tree.map(lambda t: -0.01 * t,
                                                    trace), rtol=1e-4,
                                  atol=1e-6)
      p = optax.apply_updates(p, u_m)

  def test_conservative_never_increases_the_loss(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.zo_sgd_conservative(0.08, seed=1)  # too large for plain SGD
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(None, s, p, obj_fn=obj_fn))
    p, losses = params, [float(obj_fn(params))]
    moves = 0
    for _ in range(50):
      u, state = step(p, state)
      p = optax.apply_updates(p, u)
      losses.append(float(obj_fn(p)))
      moves += int(any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u)))
    self.assertTrue(all(b <= a + 1e-5 for a, b in zip(losses, losses[1:])))
    self.assertGreater(moves, 5)
    plain, _ = run_steps(zojax.zo_sgd(0.08, seed=1), params, obj_fn, 50)
    self.assertGreater(float(obj_fn(plain)), losses[-1])
    self.assertEqual(zojax.estimate_info(state).num_evals, 50 * 5)

  def test_conservative_selection_rule(self):
    obj_fn = lambda p: jnp.sum((p['w'] - 1.0) ** 2)
    params = {'w': jnp.zeros(3)}
    tx = zojax.conservative_selection()
    state = tx.init(params)
    toward = {'w': jnp.full(3, 0.5)}
    away = {'w': jnp.full(3, -0.5)}
    overshoot = {'w': jnp.full(3, 3.0)}
    u, state = tx.update(toward, state, params, obj_fn=obj_fn)
    chex.assert_trees_all_close(u, toward)
    u, state = tx.update(away, state, params, obj_fn=obj_fn)
    chex.assert_trees_all_close(u, toward)  # the reverse is better
    u, state = tx.update(overshoot, state, params, obj_fn=obj_fn)
    chex.assert_trees_all_close(u, {'w': jnp.zeros(3)})  # stay
    info = zojax.estimate_info(state)
    self.assertEqual(info.num_evals, 9)
    self.assertEqual(info.value, 3.0)

  def test_conservative_handles_non_finite_values(self):
    params = {'w': jnp.zeros(2)}
    obj_fn = lambda p: jnp.where(p['w'][0] > 0, jnp.nan, jnp.sum(p['w'] ** 2))
    tx = zojax.conservative_selection()
    u, state = tx.update({'w': jnp.ones(2)}, tx.init(params), params,
                         obj_fn=obj_fn)
    # θ + u is NaN, θ is 0, θ - u is 2: stay
    chex.assert_trees_all_close(u, {'w': jnp.zeros(2)})
    always_nan = lambda p: jnp.nan * jnp.sum(p['w'])
    u, state = tx.update({'w': jnp.ones(2)}, state, params, obj_fn=always_nan)
    chex.assert_trees_all_close(u, {'w': jnp.zeros(2)})
    self.assertEqual(zojax.estimate_info(state).skipped_steps, 1)

  def test_forward_gradient_mean_is_the_gradient(self):
    params, obj_fn = quadratic_problem()
    true = np.concatenate([np.ravel(x) for x in
                           jax.tree.leaves(jax.grad(obj_fn)(params))])
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    rows, state = zojax.diagnostics.estimates_over_keys(
        zojax.forward_gradient(4), obj_fn, params, keys, batch_size=500)
    stderr = rows.std(axis=0) / np.sqrt(len(keys))
    np.testing.assert_array_less(np.abs(rows.mean(axis=0) - true),
                                 5 * stderr + 1e-4)
    self.assertEqual(zojax.estimate_info(state).evals_per_step, 4)

  def test_forward_gradient_single_direction_is_exact_projection(self):
    params, obj_fn = quadratic_problem()
    tx = zojax.forward_gradient(1, seed=4)
    state = tx.init(params)
    estimate, _ = tx.update(None, state, params, obj_fn=obj_fn)
    g, z = _explicit_two_point(params, obj_fn, state, sigma=1e-3)
    # jvp gives ∇f·z exactly; the central difference agrees to O(eps)
    chex.assert_trees_all_close(estimate, jax.tree.map(lambda v: g * v, z),
                                rtol=5e-3, atol=5e-3)

  def test_errors(self):
    for name in ALIASES:
      with self.assertRaisesRegex(ValueError, 'num_queries'):
        getattr(zojax, name)(0.1, num_queries=0)
    with self.assertRaisesRegex(ValueError, 'sigma'):
      zojax.zo_adam(1e-3, sigma=-1.0)
