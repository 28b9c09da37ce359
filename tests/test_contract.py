"""The shared contract, run over a registry of every estimator and optimizer.

In the style of optax's ``contrib/_common_test.py``: one parametrized file;
a new method is one entry in ``REGISTRY`` and gets all of it. The problem is
a tiny two-stage model (a tuple of stage params, so the feature-reuse
estimator runs on the same objective as everyone else).
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized

import zojax
from zojax import flax as zflax


def _stage_in(p, x):
  return jnp.tanh(x @ p['w'] + p['b'])


def _stage_out(p, h):
  return h @ p['v']


STAGES = (_stage_in, _stage_out)
_RNG = np.random.default_rng(0)
BATCH = (jnp.asarray(_RNG.normal(size=(8, 3)), jnp.float32),
         jnp.asarray(_RNG.normal(size=(8, 1)), jnp.float32))
PARAMS = ({'w': jnp.asarray(_RNG.normal(size=(3, 4)) / 2, jnp.float32),
           'b': jnp.zeros(4, jnp.float32)},
          {'v': jnp.asarray(_RNG.normal(size=(4, 1)) / 2, jnp.float32)})


def stage_loss(out, batch):
  return jnp.mean((out - batch[1]) ** 2)


def objective(params):
  """Casts to float32 so bf16 params give a float32 loss."""
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  return stage_loss(zflax.apply_stages(STAGES, params, BATCH[0]), BATCH)


def ranker(obj_fn):
  return lambda candidates: jnp.argsort(jax.vmap(obj_fn)(candidates))


class Entry(NamedTuple):
  """A registry entry.

  Attributes:
    make: ``(seed=..., **mesh_kwargs) -> transform``.
    oracle: ``'obj_fn'``, ``'rank_fn'`` or ``'stages'`` (feature reuse).
    is_estimator: True for estimators (a non-finite step gives NaN, skipped
      by a downstream ``apply_if_finite``); False for optimizers (zero).
    ask_tell: ``'values'``, ``'ranking'``, ``'derivatives'`` (what ``tell``
      takes), or None: no single-round ask/tell (a clear error instead).
    mesh: the keyword that splits its queries over a mesh axis, or None.
    counts_callbacks: evaluations counted = callbacks executed (not for
      JVPs, whose primal a chunk of directions shares, nor for feature
      reuse, which runs the loss on changed and unchanged activations).
    tol: of "equal up to float rounding" comparisons.
    random: whether a step depends on the seed (full CGE draws nothing).
  """

  make: Callable[..., Any]
  oracle: str = 'obj_fn'
  is_estimator: bool = True
  ask_tell: Optional[str] = 'values'
  mesh: Optional[str] = 'query_axis'
  counts_callbacks: bool = True
  tol: float = 1e-4
  random: bool = True


REGISTRY = {
    'rge': Entry(lambda **kw: zojax.rge(4, 1e-2, **kw)),
    'rge_central_rademacher': Entry(lambda **kw: zojax.rge(
        4, 1e-2, difference='central', distribution='rademacher',
        batch_size=2, **kw)),
    'cge': Entry(lambda **kw: zojax.cge(1e-2, batch_size=5, **kw), tol=1e-3,
                 random=False),
    'cge_sampled': Entry(lambda **kw: zojax.cge(1e-2, num_coords=8,
                                                difference='central', **kw)),
    'forward_gradient': Entry(lambda **kw: zojax.forward_gradient(4, **kw),
                              ask_tell='derivatives', counts_callbacks=False),
    'rank_estimator': Entry(lambda **kw: zojax.rank_estimator(6, 3, 0.1, **kw),
                            oracle='rank_fn', ask_tell='ranking', mesh=None),
    'fzoos': Entry(lambda **kw: zojax.fzoos(8, num_candidates=6, num_active=3,
                                            **kw), mesh=None, tol=1e-3),
    'cbo': Entry(lambda **kw: zojax.cbo(8, **kw)),
    'ga': Entry(lambda **kw: zojax.ga(8, 0.1, truncation=3, **kw)),
    'feature_reuse_cge': Entry(
        lambda **kw: zflax.feature_reuse_cge(STAGES, stage_loss, 1e-2, **kw),
        oracle='stages', counts_callbacks=False, tol=1e-3, random=False),
    'mezo': Entry(lambda **kw: zojax.mezo(0.1, 1e-2, **kw),
                  is_estimator=False, mesh=None),
    'zo_sgd': Entry(lambda **kw: zojax.zo_sgd(0.1, 1e-2, 4, **kw),
                    is_estimator=False),
    'zo_sgd_momentum': Entry(lambda **kw: zojax.zo_sgd_momentum(
        0.1, 1e-2, 4, **kw), is_estimator=False),
    'zo_sign_sgd': Entry(lambda **kw: zojax.zo_sign_sgd(0.1, 1e-2, 4, **kw),
                         is_estimator=False),
    'zo_sgd_conservative': Entry(lambda **kw: zojax.zo_sgd_conservative(
        0.1, 1e-2, **kw), is_estimator=False, ask_tell=None, mesh=None),
    'zo_adam': Entry(lambda **kw: zojax.zo_adam(0.1, 1e-2, 4, **kw),
                     is_estimator=False),
    'forward_grad': Entry(lambda **kw: zojax.forward_grad(
        0.1, num_queries=4, **kw), is_estimator=False,
                          ask_tell='derivatives', counts_callbacks=False),
    'zo_ranksgd': Entry(lambda **kw: zojax.zo_ranksgd(0.1, 6, 3, **kw),
                        oracle='rank_fn', is_estimator=False,
                        ask_tell='ranking', mesh=None),
    'zo_ranksgd_line_search': Entry(
        lambda **kw: zojax.zo_ranksgd(0.1, 6, 3, line_search_steps=2, **kw),
        oracle='rank_fn', is_estimator=False, ask_tell=None, mesh=None),
}
NAMES = tuple(REGISTRY)


def oracle_args(entry: Entry, obj_fn=objective) -> dict:
  if entry.oracle == 'rank_fn':
    return {'rank_fn': ranker(obj_fn)}
  if entry.oracle == 'stages':
    return {'batch': BATCH}
  return {'obj_fn': obj_fn}


def nan_oracle_args(entry: Entry) -> dict:
  if entry.oracle == 'rank_fn':  # an invalid ranking: repeated indices
    return {'rank_fn': lambda c: jnp.zeros(
        jax.tree.leaves(c)[0].shape[0], jnp.int32)}
  if entry.oracle == 'stages':
    return {'batch': (BATCH[0], BATCH[1] * jnp.nan)}
  return {'obj_fn': lambda p: objective(p) * jnp.nan}


def stepper(tx, entry, **oracle):
  oracle = oracle or oracle_args(entry)

  def step(params, state):
    updates, state = tx.update(None, state, params, **oracle)
    return optax.apply_updates(params, updates), state

  return step


@functools.lru_cache(maxsize=None)
def transform(name):
  """One transform per entry for stepping: ``seed`` only fixes the state's
  initial key, so states from ``make(seed=s).init`` share one compiled step
  (which keeps this file's compile time down)."""
  return REGISTRY[name].make(seed=0)


@functools.lru_cache(maxsize=None)
def jitted_step(name):
  return jax.jit(stepper(transform(name), REGISTRY[name]))


def run(name, seed, params=PARAMS, steps=2, jit=True):
  entry = REGISTRY[name]
  step = jitted_step(name) if jit else stepper(transform(name), entry)
  state = entry.make(seed=seed).init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


class ContractTest(parameterized.TestCase):

  @parameterized.parameters(*NAMES)
  def test_shapes_dtypes_and_counts(self, name):
    entry = REGISTRY[name]
    tx = transform(name)
    for dtype in ('float32', 'bfloat16'):  # traced only: no compilation
      params = jax.tree.map(lambda x, d=dtype: x.astype(d), PARAMS)
      updates, state = jax.eval_shape(lambda p: tx.update(
          None, tx.init(p), p, **oracle_args(entry)), params)
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    info = zojax.estimate_info(run(name, 0, steps=1)[1])
    self.assertEqual((info.steps, info.num_evals),
                     (1, info.evals_per_step))
    self.assertGreater(info.num_evals, 0)

  @parameterized.parameters(*NAMES)
  def test_jit_equals_no_jit_and_seeds(self, name):
    entry = REGISTRY[name]
    jitted, _ = run(name, 1, steps=1)
    eager, _ = run(name, 1, steps=1, jit=False)
    chex.assert_trees_all_close(jitted, eager, rtol=entry.tol,
                                atol=entry.tol)
    chex.assert_trees_all_equal(jitted, run(name, 1, steps=1)[0])
    if entry.random:
      other, _ = run(name, 2, steps=1)
      self.assertFalse(np.allclose(jax.tree.leaves(other)[0],
                                   jax.tree.leaves(jitted)[0]))

  @parameterized.parameters(*NAMES)
  def test_traced_seed_under_vmap(self, name):
    entry = REGISTRY[name]

    def train(seed):  # the transform built with a traced seed, inside vmap
      tx = entry.make(seed=seed)
      return stepper(tx, entry)(PARAMS, tx.init(PARAMS))[0]

    batched = jax.jit(jax.vmap(train))(jnp.arange(2))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], batched),
                                run(name, 1, steps=1)[0], rtol=entry.tol,
                                atol=entry.tol)

  @parameterized.parameters(*NAMES)
  def test_donation_twice_and_typed_key_seed(self, name):
    entry = REGISTRY[name]
    tx = entry.make(seed=jax.random.key(3))
    step = jax.jit(stepper(transform(name), entry), donate_argnums=(0, 1))
    for _ in range(2):  # a second init after donating the first state
      params = jax.tree.map(jnp.copy, PARAMS)
      state = tx.init(params)
      keys = [x for x in jax.tree.leaves(state) if x.dtype == jnp.uint32]
      self.assertTrue(keys and all(k.shape[-1:] == (2,) for k in keys))
      params, state = step(params, state)
      params, state = step(params, state)
    self.assertEqual(zojax.estimate_info(state).steps, 2)

  @parameterized.parameters(*NAMES)
  def test_checkpoint_round_trip_resumes_the_trajectory(self, name):
    step = jitted_step(name)
    params, state = run(name, 4)
    blob = flax.serialization.to_bytes((params, state))
    template = (PARAMS, transform(name).init(PARAMS))
    straight, restored = (params, state), flax.serialization.from_bytes(
        template, blob)
    for _ in range(2):
      straight, restored = step(*straight), step(*restored)
    chex.assert_trees_all_equal(straight, restored)

  @parameterized.parameters(*NAMES)
  def test_non_finite_step_is_skipped_and_counted(self, name):
    entry = REGISTRY[name]
    tx = transform(name)
    if entry.is_estimator:  # optax's convention: NaN, apply_if_finite skips
      tx = optax.chain(tx, optax.apply_if_finite(optax.sgd(0.1), 5))
    state = tx.init(PARAMS)
    step = jax.jit(stepper(tx, entry, **nan_oracle_args(entry)))
    params, state = step(PARAMS, state)
    chex.assert_trees_all_equal(params, PARAMS)
    info = zojax.estimate_info(state)
    self.assertEqual((info.skipped_steps, info.steps), (1, 1))

  @parameterized.parameters(*NAMES)
  def test_tell_of_ask_equals_update(self, name):
    entry = REGISTRY[name]
    tx = transform(name)
    _, state = run(name, 5, steps=1)  # a state with some history
    params = PARAMS
    if entry.ask_tell is None:
      with self.assertRaisesRegex(ValueError, 'no ask/tell: a step'):
        tx.ask(state, params)
      return
    want, want_state = jax.jit(lambda s: tx.update(
        None, s, params, **oracle_args(entry)))(state)
    points = tx.ask(state, params)
    if entry.ask_tell == 'ranking':
      values = ranker(objective)(points)
    elif entry.ask_tell == 'derivatives':
      values = jax.vmap(lambda t: jax.jvp(objective, (params,), (t,))[1])(
          points)
    else:  # a plain Python loop over the points, as outside JAX
      values = np.array([float(objective(jax.tree.map(lambda x, i=i: x[i],
                                                      points)))
                         for i in range(jax.tree.leaves(points)[0].shape[0])])
    got, got_state = tx.tell(state, params, points, values)
    chex.assert_trees_all_close(got, want, rtol=5e-3, atol=5e-3)
    want_info, got_info = (zojax.estimate_info(want_state),
                           zojax.estimate_info(got_state))
    self.assertEqual(got_info.num_evals, want_info.num_evals)
    self.assertEqual(got_info.steps, want_info.steps)
    keys = lambda s: [x for x in jax.tree.leaves(s) if x.dtype == jnp.uint32]
    chex.assert_trees_all_equal(keys(got_state), keys(want_state))

  @parameterized.parameters(*[n for n in NAMES
                              if REGISTRY[n].counts_callbacks])
  def test_evaluations_counted_equal_evaluations_executed(self, name):
    entry = REGISTRY[name]
    executed = []

    def counted(params):
      jax.debug.callback(lambda _: executed.append(1),
                         jax.tree.leaves(params)[0].reshape(-1)[0])
      return objective(params)

    tx = transform(name)
    step = jax.jit(stepper(tx, entry, **oracle_args(entry, counted)))
    params, state = step(PARAMS, tx.init(PARAMS))
    params, state = step(params, state)
    jax.effects_barrier()
    self.assertEqual(len(executed), zojax.estimate_info(state).num_evals)

  @parameterized.parameters(*[n for n in NAMES if REGISTRY[n].mesh])
  def test_sharded_step_equals_unsharded(self, name):
    entry = REGISTRY[name]
    mesh = jax.make_mesh((4,), ('q',))
    sharded_tx = entry.make(seed=7, mesh=mesh, **{entry.mesh: 'q'})
    step = jax.jit(stepper(sharded_tx, entry))
    params, state = PARAMS, sharded_tx.init(PARAMS)
    for _ in range(2):
      params, state = step(params, state)
    chex.assert_trees_all_close(params, run(name, 7)[0], rtol=entry.tol,
                                atol=entry.tol)


class EcosystemTest(parameterized.TestCase):
  """Small programs a user writes with optax's own wrappers."""

  @parameterized.parameters('zo_sgd', 'zo_adam', 'zo_sgd_momentum')
  def test_inject_hyperparams_learning_rate_and_sigma(self, name):
    factory = getattr(zojax, name)
    tx = optax.inject_hyperparams(factory, static_args=('num_queries',))(
        learning_rate=1e-2, sigma=1e-2)
    state = tx.init(PARAMS)
    step = jax.jit(stepper(tx, REGISTRY['zo_sgd']))
    params, state = step(PARAMS, state)
    state.hyperparams['sigma'] = jnp.asarray(5e-3)   # change it in flight
    state.hyperparams['learning_rate'] = jnp.asarray(0.0)
    frozen, state = step(params, state)
    chex.assert_trees_all_close(frozen, params)
    self.assertEqual(zojax.estimate_info(state).num_evals, 4)

  def test_sigma_schedule(self):
    schedule = optax.linear_schedule(1e-2, 0.0, 2)  # sigma 0 at step 2
    tx = optax.chain(zojax.rge(4, schedule),
                     optax.apply_if_finite(optax.sgd(0.1), 5))
    step = jax.jit(stepper(tx, REGISTRY['rge']))
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(3):
      params, state = step(params, state)
    info = zojax.estimate_info(state)
    self.assertEqual((info.steps, info.skipped_steps), (3, 1))
    chex.assert_tree_all_finite(params)

  def test_multi_steps_after_the_estimator_counts_exactly(self):
    # Accumulate ZO estimates: the estimator first, MultiSteps on the rest.
    executed = []

    def counted(params):
      jax.debug.callback(lambda _: executed.append(1),
                         jax.tree.leaves(params)[0].reshape(-1)[0])
      return objective(params)

    tx = optax.chain(zojax.rge(4, 1e-2),
                     optax.MultiSteps(optax.sgd(0.1), 4).gradient_transformation())
    state = tx.init(PARAMS)
    step = jax.jit(stepper(tx, REGISTRY['rge'], obj_fn=counted))
    params = PARAMS
    for _ in range(4):
      params, state = step(params, state)
    jax.effects_barrier()
    info = zojax.estimate_info(state)
    self.assertEqual((info.num_evals, len(executed)), (20, 20))
    self.assertFalse(np.allclose(params[1]['v'], PARAMS[1]['v']))

  def test_positional_objective_and_foreign_state_get_clear_errors(self):
    tx = zojax.rge(4, 1e-2)
    state = tx.init(PARAMS)
    with self.assertRaisesRegex(TypeError, 'keyword argument'):
      tx.update(None, state, PARAMS, objective)
    with self.assertRaisesRegex(ValueError, 'created by another transform'):
      tx.update(None, zojax.cge(1e-2).init(PARAMS), PARAMS, obj_fn=objective)
    with self.assertRaisesRegex(ValueError, 'expected the state returned'):
      tx.update(None, optax.adam(1e-3).init(PARAMS), PARAMS,
                obj_fn=objective)
    self.assertIsNotNone(zojax.rge(np.int64(4), 1e-2, seed=np.int32(1)))

  def test_sigma_below_bfloat16_resolution_warns(self):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    with self.assertWarnsRegex(UserWarning, 'below the resolution'):
      zojax.cge(1e-4).init(params)


if __name__ == '__main__':
  absltest.main()
