"""MeZO's two-point modes and DistZO2-style parallelism on simulated devices:
the queries split over a mesh axis, the batch over another, and parameters
that arrive sharded stay sharded."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import zojax
from zojax import models

LR, SIGMA = 1e-2, 1e-2


def _decoder():
  model = models.Decoder(vocab_size=16, num_layers=2, d_model=16,
                         num_heads=2, max_len=8)
  tokens = jax.random.randint(jax.random.key(0), (8, 8), 0, 16)
  params = model.init(jax.random.key(1), tokens)['params']
  loss = lambda p, q, batch: models.next_token_loss(
      model.apply({'params': p}, batch, perturbation=q), batch)
  return params, tokens, loss


def _run(tx, params, tokens, loss, steps=3):
  step = jax.jit(lambda p, s, b: tx.step(p, s, perturbed_fn=loss, batch=b))
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state, tokens)
  return params, state


@functools.lru_cache(maxsize=None)
def _one_device_trajectory(queries):
  """Params after 3 steps of ``mezo`` on one device (shared by the tests
  that compare a split run with it)."""
  params, tokens, loss = _decoder()
  return _run(zojax.mezo(LR, SIGMA, queries, seed=5), params, tokens,
              loss)[0]


class TwoPointTest(absltest.TestCase):

  def test_fused_and_sequential_pairs_agree(self):
    params, tokens, loss = _decoder()
    fused, fused_state = _run(zojax.mezo(LR, SIGMA, num_queries=2, seed=2),
                              params, tokens, loss)
    sequential, state = _run(zojax.mezo(LR, SIGMA, num_queries=2, seed=2,
                                        two_point='sequential'),
                             params, tokens, loss)
    chex.assert_trees_all_close(fused, sequential, rtol=1e-4, atol=1e-6)
    self.assertEqual(zojax.estimate_info(state).num_evals, 12)
    self.assertAlmostEqual(zojax.estimate_info(fused_state).value,
                           zojax.estimate_info(state).value, places=5)


class DistributedMeZOTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('signs_over_2', 1, (2,), ('q',), 'q', None),
      ('batch_over_4', 2, (4,), ('data',), None, 'data'),
      ('queries_and_batch', 2, (2, 4), ('q', 'data'), 'q', 'data'))
  def test_same_trajectory_as_one_device(self, queries, shape, names,
                                         query_axis, data_axis):
    # one sign per device; the batch split; both axes on 8 devices (a
    # query per device of 'q', its batch split over 'data')
    params, tokens, loss = _decoder()
    reference = _one_device_trajectory(queries)
    mesh = jax.make_mesh(shape, names)
    tx = zojax.mezo(LR, SIGMA, queries, seed=5, mesh=mesh,
                    query_axis=query_axis, data_axis=data_axis)
    split, state = _run(tx, params, tokens, loss)
    # a split batch sums the loss in another order: float32 rounding of the
    # two values, divided by 2 sigma, moves an entry by ~1e-6 over 3 steps
    # (a wrong z, sign or shard mean would move it by the update, ~1e-3)
    chex.assert_trees_all_close(split, reference, rtol=1e-4,
                                atol=1e-6 if data_axis is None else 5e-6)
    self.assertEqual(zojax.estimate_info(state).num_evals, 3 * 2 * queries)

  def test_sharded_params_stay_sharded_and_nothing_is_gathered(self):
    mesh = jax.make_mesh((4,), ('fsdp',))
    rng = np.random.default_rng(0)
    params = {'w': jnp.asarray(rng.normal(size=(64, 8)), jnp.float32),
              'v': jnp.asarray(rng.normal(size=(32,)), jnp.float32)}
    coefficients = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    obj_fn = lambda p: (jnp.sum(jnp.sin(p['w']) * coefficients)
                        + jnp.sum(p['v'] ** 2))
    shardings = {'w': NamedSharding(mesh, P('fsdp', None)),
                 'v': NamedSharding(mesh, P('fsdp'))}
    sharded = jax.device_put(params, shardings)
    tx = zojax.mezo(LR, SIGMA, seed=4)
    step = jax.jit(lambda p, s: tx.step(p, s, obj_fn=obj_fn),
                   donate_argnums=(0,))
    hlo = step.lower(sharded, tx.init(params)).compile().as_text()
    self.assertNotIn('all-gather', hlo)
    state, unsharded_state = tx.init(params), tx.init(params)
    plain = jax.jit(lambda p, s: tx.step(p, s, obj_fn=obj_fn))
    for _ in range(5):
      sharded, state = step(sharded, state)
      params, unsharded_state = plain(params, unsharded_state)
    for name in params:
      self.assertEqual(sharded[name].sharding.spec,
                       shardings[name].spec)
    # the sharded loss sums in another order: rounding differs at 1e-6
    chex.assert_trees_all_close(sharded, params, rtol=1e-4, atol=5e-5)

  def test_errors(self):
    mesh = jax.make_mesh((4,), ('q',))
    with self.assertRaisesRegex(ValueError, 'do not split evenly'):
      zojax.mezo(LR, num_queries=1, mesh=mesh)
    with self.assertRaisesRegex(ValueError, 'two_point'):
      zojax.mezo(LR, two_point='parallel')


if __name__ == '__main__':
  absltest.main()
