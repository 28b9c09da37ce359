"""ZO2-style offloading (zojax.offload): the layers live in host memory and
the trajectory is on-device MeZO's."""

import chex
import jax
import numpy as np
from absl.testing import absltest

import zojax
from zojax import models


class OffloadTest(absltest.TestCase):

  def test_same_trajectory_as_on_device_mezo(self):
    model = models.Decoder(vocab_size=16, num_layers=3, d_model=16,
                           num_heads=2, max_len=8)
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 16)
    params = model.init(jax.random.key(1), tokens)['params']
    loss = lambda p, q, batch: models.next_token_loss(
        model.apply({'params': p}, batch, perturbation=q), batch)
    tx = zojax.mezo(1e-2, 1e-2, weight_decay=0.1, seed=7)
    step = jax.jit(lambda p, s: tx.step(p, s, perturbed_fn=loss,
                                        batch=tokens))
    reference, state = params, tx.init(params)
    for _ in range(3):
      reference, state = step(reference, state)

    offloaded = zojax.offload.OffloadedMeZO(
        zojax.offload.decoder_parts(model), 1e-2, 1e-2, weight_decay=0.1,
        seed=7)
    host, host_state = offloaded.init(params)
    self.assertLen(host.layers, 3)
    for layer in host.layers:  # parked in (pinned) host memory
      self.assertTrue(all(
          isinstance(x, np.ndarray) or x.sharding.memory_kind == 'pinned_host'
          for x in jax.tree.leaves(layer)))
    for _ in range(3):
      old_leaves = jax.tree.leaves(host.layers)
      new_host, host_state = offloaded.step(host, host_state, tokens)
      # each layer's slot is rewritten in place (host memory holds one
      # model, not the old and the new one)
      self.assertIs(new_host.layers, host.layers)
      self.assertTrue(all(a is not b for a, b in zip(
          old_leaves, jax.tree.leaves(new_host.layers))))
      host = new_host
    got = offloaded.gather(host, host_state)
    chex.assert_trees_all_close(got, reference, rtol=1e-4, atol=1e-6)
    info, want = (zojax.estimate_info(host_state),
                  zojax.estimate_info(state))
    self.assertEqual((info.num_evals, info.steps), (6, 3))
    self.assertAlmostEqual(info.value, want.value, places=4)

  def test_errors(self):
    parts = zojax.offload.decoder_parts(models.Decoder())
    with self.assertRaisesRegex(ValueError, 'sigma'):
      zojax.offload.OffloadedMeZO(parts, 1e-3, 0.0)


if __name__ == '__main__':
  absltest.main()
