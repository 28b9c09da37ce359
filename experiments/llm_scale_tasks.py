"""The tasks of ``bench_llm_scale.py``, each run in its own process (so that
its peak memory is its own): ``run(task, config)`` prints one RESULT line."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import zojax
from zojax import models

GiB = 2.0 ** 30


def _decoder(config: dict, prefix: str) -> models.Decoder:
  width = config[f'{prefix}_width']
  return models.Decoder(
      vocab_size=config['vocab'], num_layers=config[f'{prefix}_layers'],
      d_model=width, num_heads=max(1, width // 128),
      max_len=max(config['seq'], config['dist_seq']), dtype=jnp.bfloat16,
      param_dtype=jnp.bfloat16)


def _tokens(config, batch, seq):
  return jax.random.randint(jax.random.key(1), (batch, seq), 0,
                            config['vocab'])


def _perturbed_loss(model):
  return lambda p, q, t: models.next_token_loss(
      model.apply({'params': p}, t, perturbation=q), t)


def _timed(call, repeats, warmups=1):
  """Minimum wall time of ``call()`` after ``warmups`` calls (which
  compile: on a mesh the second call compiles again, for the params and
  state now laid out on the mesh)."""
  start = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - start
  for _ in range(warmups - 1):
    jax.block_until_ready(call())
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    best = min(best, time.perf_counter() - start)
  return best, first


def _peak_gib(device=None):
  stats = (device or jax.devices()[0]).memory_stats() or {}
  return stats.get('peak_bytes_in_use', float('nan')) / GiB


def _run_mezo(model, tx, params, tokens, repeats, warmups=1):
  """Times the donated, jitted ``tx.step`` of ``model``'s perturbed loss;
  ``(best, first, params after the runs)``."""
  step = jax.jit(lambda p, s, t: tx.step(p, s, perturbed_fn=_perturbed_loss(
      model), batch=t), donate_argnums=(0, 1))
  holder = {'p': params, 's': tx.init(params)}

  def call():
    holder['p'], holder['s'] = step(holder['p'], holder['s'], tokens)
    return holder['s'].stats.value

  best, first = _timed(call, repeats, warmups)
  return best, first, holder['p']


def on_device(config, prefix='fit', batch=None, seq=None):
  model = _decoder(config, prefix)
  batch, seq = batch or config['batch'], seq or config['seq']
  tokens = _tokens(config, batch, seq)
  params = jax.jit(lambda: model.init(jax.random.key(0),
                                      tokens[:1, :4])['params'])()
  num_params = models.num_params(params)
  best, first, _ = _run_mezo(model, zojax.mezo(1e-6, 1e-3), params, tokens,
                             config['repeats'])
  return {'params_billion': num_params / 1e9,
          'step_s': best, 'first_call_s': first,
          'tokens_per_s': batch * seq / best, 'peak_gib': _peak_gib()}


def _layer_init(model):
  probe = jnp.zeros((1, 1, model.d_model), model.dtype)
  return jax.jit(lambda key: model.block().init(key, probe)['params'])


def _rest_init(model, tokens):
  small = model.clone(num_layers=1)
  params = jax.jit(lambda: small.init(jax.random.key(0),
                                      tokens[:1, :4])['params'])()
  return {k: v for k, v in params.items() if k != 'blocks'}


def offloaded(config, prefix='fit'):
  """The offloaded step; the layers are made on the device one at a time
  and parked in host memory (the whole model never is on the device)."""
  model = _decoder(config, prefix)
  batch, seq = config['batch'], config['seq']
  tokens = _tokens(config, batch, seq)
  tx = zojax.offload.OffloadedMeZO(zojax.offload.decoder_parts(model), 1e-6,
                                   1e-3)
  make_layer = _layer_init(model)
  keys = jax.random.split(jax.random.key(2), model.num_layers)
  start = time.perf_counter()
  host, state = tx.init_layers(_rest_init(model, tokens),
                               (make_layer(k) for k in keys))
  init_s = time.perf_counter() - start
  holder = {'h': host, 's': state}

  def call():
    holder['h'], holder['s'] = tx.step(holder['h'], holder['s'], tokens)
    return holder['s'].stats.value

  best, first = _timed(call, config['repeats'])
  layer_params = sum(x.size for x in jax.tree.leaves(host.layers[0]))
  rest_params = sum(x.size for x in jax.tree.leaves(host.rest))
  return {'params_billion': (layer_params * model.num_layers + rest_params)
          / 1e9, 'step_s': best, 'first_call_s': first, 'init_s': init_s,
          'tokens_per_s': batch * seq / best, 'peak_gib': _peak_gib(),
          'limit_gib': (jax.devices()[0].memory_stats() or {}).get(
              'bytes_limit', float('nan')) / GiB,
          'value': float(holder['s'].stats.value)}


def distributed(config, num_queries, devices, split):
  """mezo on the 1.07B decoder: 1 device, or 2 with the queries / batch
  split over a mesh axis."""
  model = _decoder(config, 'dist')
  batch, seq = config['dist_batch'], config['dist_seq']
  tokens = _tokens(config, batch, seq)
  params = jax.jit(lambda: model.init(jax.random.key(0),
                                      tokens[:1, :4])['params'])()
  mesh_args = {}
  if devices > 1:
    mesh = jax.make_mesh((devices,), (split,),
                         devices=jax.devices()[:devices])
    mesh_args = ({'mesh': mesh, 'query_axis': 'q'} if split == 'q' else
                 {'mesh': mesh, 'data_axis': 'data'})
  num_params = models.num_params(params)
  best, first, _ = _run_mezo(
      model, zojax.mezo(1e-6, 1e-3, num_queries, **mesh_args), params, tokens,
      config['repeats'], warmups=2)
  return {'devices': devices, 'split': split, 'num_queries': num_queries,
          'step_s': best, 'first_call_s': first,
          'tokens_per_s': batch * seq / best,
          'params_billion': num_params / 1e9}


def _tensor_parallel(path: str, leaf, mesh):
  """A kernel of a stacked layer split along its last (output) axis, the
  embedding along the vocabulary; the rest replicated."""
  if leaf.ndim == 3 and path.endswith('kernel'):
    return NamedSharding(mesh, P(None, None, 'model'))
  if path == 'embed':
    return NamedSharding(mesh, P('model', None))
  return NamedSharding(mesh, P())


def sharded(config):
  """A decoder too large for one device, its params split over 2 (tensor
  parallel), fine-tuned by mezo under jit: the params stay split."""
  model = _decoder(config, 'sharded')
  batch, seq = config['dist_batch'], config['dist_seq']
  tokens = _tokens(config, batch, seq)
  # Auto axes: GSPMD propagates the layout through the model (Explicit axes
  # would need the model's own sharding annotations)
  mesh = jax.make_mesh((2,), ('model',), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             tokens[:1, :4])['params'])
  paths = zojax._src.core.perturbable.leaf_paths(shapes)  # pylint: disable=protected-access
  shardings = jax.tree.unflatten(jax.tree.structure(shapes), [
      _tensor_parallel(p, x, mesh) for p, x in zip(paths, jax.tree.leaves(
          shapes))])
  params = jax.jit(lambda: model.init(jax.random.key(0), tokens[:1, :4])[
      'params'], out_shardings=shardings)()
  best, first, params = _run_mezo(model, zojax.mezo(1e-6, 1e-3), params,
                                  tokens, config['repeats'], warmups=2)
  kept = all(a.sharding.is_equivalent_to(b, a.ndim) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(shardings)))
  bytes_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  return {'params_billion': models.num_params(shapes) / 1e9,
          'params_gib': bytes_total / GiB, 'step_s': best,
          'first_call_s': first, 'tokens_per_s': batch * seq / best,
          'shardings_kept': bool(kept),
          'peak_gib_per_device': [_peak_gib(d) for d in jax.devices()[:2]]}


TASKS = {
    'on_device': lambda c: on_device(c),
    'offloaded': lambda c: offloaded(c),
    'offloaded_big': lambda c: offloaded(c, 'big'),
    'dist_1': lambda c: distributed(c, 1, 1, 'q'),
    'dist_signs_2': lambda c: distributed(c, 1, 2, 'q'),
    'dist_queries_1': lambda c: distributed(c, 2, 1, 'q'),
    'dist_queries_2': lambda c: distributed(c, 2, 2, 'q'),
    'dist_data_2': lambda c: distributed(c, 1, 2, 'data'),
    'sharded_2': sharded,
}


def run(task: str, config: dict) -> None:
  result = {'task': task, 'device': str(jax.devices()[0]),
            'jax': jax.__version__}
  result.update(TASKS[task](config))
  print('RESULT ' + json.dumps(result, default=float), flush=True)
