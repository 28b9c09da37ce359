"""Two local processes joined by ``jax.distributed.initialize`` (CPU, gloo
collectives, localhost coordinator) agree with the single-process result."""

import os
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl.testing import absltest

import zojax
from tests.objectives import least_squares_problem, run_steps

TIMEOUT_S = 240
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _single_process_results():
  params, batch, loss = least_squares_problem()
  obj_fn = lambda p: loss(p, batch)

  def estimate(tx):
    return jax.jit(lambda p, s: tx.update(None, s, p, obj_fn=obj_fn))(
        params, tx.init(params))[0]

  mezo = zojax.mezo(1e-2, 1e-2, num_queries=2, seed=3)
  step = jax.jit(lambda p, s: mezo.step(p, s, obj_fn=obj_fn))
  mezo_params, state = params, mezo.init(params)
  for _ in range(3):
    mezo_params, state = step(mezo_params, state)
  return {
      'mezo_3_steps': mezo_params,
      'rge_queries': estimate(zojax.rge(8, 1e-2)),
      'cge_queries_and_data': estimate(zojax.cge(1e-2, num_coords=8)),
      'zo_adam_5_steps': run_steps(
          zojax.zo_adam(0.05, num_queries=4, seed=1), params, obj_fn, 5)[0],
  }


class MultiProcessTest(absltest.TestCase):

  def test_two_processes_agree_with_one(self):
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
    with tempfile.TemporaryDirectory() as tmp:
      outs = [os.path.join(tmp, f'process{i}.npz') for i in range(2)]
      logs = [open(os.path.join(tmp, f'process{i}.log'), 'w+')
              for i in range(2)]
      workers = [
          subprocess.Popen(
              [sys.executable, '-m', 'tests.multiprocess_worker', str(i),
               str(port), outs[i]],
              cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
          for i in range(2)]
      try:
        codes = [w.wait(timeout=TIMEOUT_S) for w in workers]
      finally:
        for w in workers:  # never leave a process behind
          if w.poll() is None:
            w.kill()
            w.wait()
      for i, code in enumerate(codes):
        logs[i].seek(0)
        self.assertEqual(code, 0, f'process {i} failed:\n{logs[i].read()}')
        logs[i].close()
      expected = _single_process_results()
      for out in outs:
        got = np.load(out)
        for name, tree in expected.items():
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            key = f'{name}/{jax.tree_util.keystr(path)}'
            np.testing.assert_allclose(got[key], leaf, rtol=1e-3, atol=2e-3,
                                       err_msg=key)


if __name__ == '__main__':
  absltest.main()
