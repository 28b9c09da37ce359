"""One process of the 2-process test (``tests/test_multiprocess.py``).

Run as ``python -m tests.multiprocess_worker PROCESS_ID PORT OUT.npz`` with
2 CPU devices per process; joins the cluster with
``jax.distributed.initialize`` and writes this process's view of the results.
"""

import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'

import jax  # noqa: E402  (the environment must be set first)
import numpy as np  # noqa: E402

import zojax  # noqa: E402
from tests.objectives import least_squares_problem, run_steps  # noqa: E402

NUM_PROCESSES = 2


def local_copy(tree):
  """A replicated global array as numpy, from this process's shards."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data),
                      tree)


def main(process_id: int, port: int, out: str) -> None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}',
                             num_processes=NUM_PROCESSES,
                             process_id=process_id,
                             initialization_timeout=60)
  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 4
  params, batch, loss = least_squares_problem()
  params = jax.tree.map(np.asarray, params)
  batch = jax.tree.map(np.asarray, batch)
  results = {}

  # Queries over all 4 devices of both processes.
  query_mesh = jax.sharding.Mesh(np.array(jax.devices()), ('q',))
  tx = zojax.rge(8, 1e-2, mesh=query_mesh)
  update, _ = jax.jit(lambda p, s: tx.update(
      None, s, p, obj_fn=lambda q: loss(q, batch)))(params, tx.init(params))
  results['rge_queries'] = local_copy(update)

  # Data split across the processes, queries across each one's 2 devices.
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2),
                           ('data', 'q'))
  share = len(batch[1]) // NUM_PROCESSES
  local_batch = jax.tree.map(
      lambda x: x[process_id * share:(process_id + 1) * share], batch)
  global_batch = zojax.parallel.shard_batch(local_batch, mesh, 'data')
  tx = zojax.cge(1e-2, num_coords=8, mesh=mesh, query_axis='q',
                 data_axis='data')
  update, _ = jax.jit(lambda p, s, b: tx.update(None, s, p, obj_fn=loss,
                                                batch=b))(
                                                    params, tx.init(params),
                                                    global_batch)
  results['cge_queries_and_data'] = local_copy(update)

  tx = zojax.zo_adam(0.05, num_queries=4, seed=1, mesh=mesh, query_axis='q',
                     data_axis='data')
  trained, _ = run_steps(tx, params, loss, 5, batch=global_batch)
  results['zo_adam_5_steps'] = local_copy(trained)

  # MeZO (DistZO2): the batch over the processes, the +/- evaluations of
  # each query over each process's 2 devices, 3 in-place steps.
  tx = zojax.mezo(1e-2, 1e-2, num_queries=2, seed=3, mesh=mesh,
                  query_axis='q', data_axis='data')
  step = jax.jit(lambda p, s, b: tx.step(p, s, obj_fn=loss, batch=b))
  mezo_params, state = params, tx.init(params)
  for _ in range(3):
    mezo_params, state = step(mezo_params, state, global_batch)
  results['mezo_3_steps'] = local_copy(mezo_params)

  flat = {f'{name}/{jax.tree_util.keystr(path)}': leaf
          for name, tree in results.items()
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  np.savez(out, **flat)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
