"""Memory and speed of a MeZO step vs inference and a first-order Adam step.

The model is ``zojax.models.Decoder`` (stacked layers run by ``lax.scan``,
random initialisation), the batch ``--batch`` sequences of ``--seq`` random
tokens, the loss next-token cross-entropy. Methods, each one jitted call with
the parameters (and optimizer state) donated:

* ``inference``: the loss (one forward);
* ``mezo``: one ``zojax.mezo`` step with ``perturbed_fn`` (the model perturbs
  one part at a time, each layer inside the scan; the update is written in
  place block by block);
* ``mezo_tree``: the same step with ``obj_fn`` (the whole perturbed tree at
  once: what a model that cannot perturb itself costs);
* ``fo_adam``: ``jax.grad`` of the loss and ``optax.adam`` (moments in the
  parameter dtype), no rematerialisation;
* ``mezo_sequential``: ``mezo`` with ``two_point='sequential'`` (the two
  perturbed forwards one after the other, :math:`z` drawn for each);
* ``mezo_noise``: the ``mezo`` step without the model (its loss sums the
  perturbed parameters): the cost of drawing :math:`z` and writing the
  perturbed and updated parameters, a breakdown of the ``mezo`` row;
* ``qzo_int8``, ``qzo_int4``: one ``zojax.qzo`` step on the same decoder with
  int8 / packed int4 weights and per-group (64) scales (``perturbed_fn``);
  ``inference_int4``: the quantized model's loss.

For each: XLA's compiled memory analysis (arguments, outputs, temporaries;
``peak`` = arguments + outputs + temporaries - aliased), and on a GPU the
measured peak memory of one call (``peak_bytes_in_use``, each method in a
fresh process) and its time (minimum over ``--repeats``), with tokens/s.
``--largest`` searches, from the compiled memory analysis, the most layers
of width ``--d-model`` that fit the device's memory for each method.

  python experiments/bench_mezo.py                 # GPU: 1.07B params, bf16
  python experiments/bench_mezo.py --quick         # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

import zojax
import harness
from harness import run_arguments
from zojax import models
from zojax._src.estimators import perturbation

METHODS = ('inference', 'mezo', 'mezo_tree', 'fo_adam', 'mezo_sequential',
           'mezo_noise', 'qzo_int8', 'qzo_int4', 'inference_int4')
GiB = 2.0 ** 30


def decoder(args, num_layers=None) -> models.Decoder:
  dtype = {'bf16': jnp.bfloat16, 'f32': jnp.float32}[args.dtype]
  return models.Decoder(
      vocab_size=args.vocab, num_layers=num_layers or args.layers,
      d_model=args.d_model, num_heads=args.heads, max_len=args.seq,
      dtype=dtype, param_dtype=dtype)


def method_model(method: str, model: models.Decoder) -> models.Decoder:
  """The decoder a method runs on (quantized for the QZO rows)."""
  if method.endswith('int8') or method.endswith('int4'):
    return model.clone(quantization=method[-4:], group_size=64)
  return model


def method_call(method: str, model: models.Decoder):
  """(function, donated argnums, builds its extra state from params)."""
  model = method_model(method, model)
  loss = lambda p, t: models.next_token_loss(model.apply({'params': p}, t), t)
  perturbed = lambda p, q, t: models.next_token_loss(
      model.apply({'params': p}, t, perturbation=q), t)
  if method.startswith('inference'):  # only the loss: no params copy
    return (lambda p, s, t: loss(p, t)), (), lambda p: ()
  if method.startswith('qzo'):
    tx = zojax.qzo(1e-6, 1e-3, clip=100.0)

    def step(p, s, t):
      p, s = tx.step(p, s, batch=t, perturbed_fn=perturbed)
      return p, s, s.stats.value

    return step, (0, 1), tx.init
  if method == 'mezo_noise':
    tx = zojax.mezo(1e-6, 1e-3)
    total = lambda p, t: sum(jnp.sum(x, dtype=jnp.float32)
                             for x in jax.tree.leaves(p))

    def step(p, s, t):
      p, s = tx.step(p, s, batch=t, obj_fn=total)
      return p, s, s.stats.value

    return step, (0, 1), tx.init
  if method in ('mezo', 'mezo_tree', 'mezo_sequential'):
    tx = zojax.mezo(1e-6, 1e-3, two_point=(
        'sequential' if method == 'mezo_sequential' else 'fused'))
    kwargs = ({'perturbed_fn': perturbed} if method == 'mezo' else
              {'obj_fn': loss})

    def step(p, s, t):
      p, s = tx.step(p, s, batch=t, **kwargs)
      return p, s, s.stats.value

    return step, (0, 1), tx.init
  if method == 'fo_adam':
    tx = optax.adam(1e-5)

    def step(p, s, t):
      value, grads = jax.value_and_grad(loss)(p, t)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, value

    return step, (0, 1), tx.init
  raise ValueError(method)


def param_shapes(model):
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params'])


def abstract_inputs(model, method, args):
  _, _, init_state = method_call(method, model)
  params = param_shapes(method_model(method, model))
  return params, jax.eval_shape(init_state, params), jax.ShapeDtypeStruct(
      (args.batch, args.seq), jnp.int32)


def compiled_memory(model, method, args) -> dict:
  fn, donate, _ = method_call(method, model)
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(
      *abstract_inputs(model, method, args)).compile()
  stats = compiled.memory_analysis()
  sizes = {name: getattr(stats, f'{name}_size_in_bytes') / GiB
           for name in ('argument', 'output', 'alias', 'temp')}
  sizes['peak'] = (sizes['argument'] + sizes['output'] + sizes['temp'] -
                   sizes['alias'])
  sizes['compile_s'] = time.perf_counter() - start
  return sizes


def runner(model, method, args):
  """``(call, params, state)``: the method's jitted call on a random batch,
  ``call(params, state) -> (params, state, value)`` (the inputs donated),
  and the params and state it starts from."""
  fn, donate, init_state = method_call(method, model)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq),
                              0, args.vocab)
  params = jax.jit(lambda: method_model(method, model).init(
      jax.random.PRNGKey(0), tokens[:1, :4])['params'])()
  state = jax.jit(init_state)(params)
  jitted = jax.jit(fn, donate_argnums=donate)

  def call(params, state):
    if method.startswith('inference'):
      return params, state, jitted(params, state, tokens)
    return jitted(params, state, tokens)

  return call, params, state


def measure(model, method, args) -> dict:
  """Runs the method on the device; peak memory and time of one call."""
  call, params, state = runner(model, method, args)
  params, state, value = call(params, state)  # compile + warm up
  jax.block_until_ready(value)
  best = float('inf')
  for _ in range(args.repeats):
    start = time.perf_counter()
    params, state, value = call(params, state)
    jax.block_until_ready(value)
    best = min(best, time.perf_counter() - start)
  memory = jax.devices()[0].memory_stats() or {}  # None on a CPU
  return {'step_s': best, 'tokens_per_s': args.batch * args.seq / best,
          'measured_peak': memory.get('peak_bytes_in_use', float('nan')) / GiB,
          'device_limit': memory.get('bytes_limit', float('nan')) / GiB,
          'value': float(value)}


def largest_layers(args, method: str, limit_gib: float) -> dict:
  """Most layers whose compiled peak fits ``limit_gib``: the peak is affine
  in the number of layers, so it is extrapolated from 2 and 6 layers, then
  checked (and corrected one layer at a time) by compiling."""
  perturbation.BLOCK_ELEMENTS = args.block_elements
  peak = lambda n: compiled_memory(decoder(args, n), method, args)['peak']
  p2, p6 = peak(2), peak(6)
  layers = max(0, int(2 + (limit_gib - p2) / ((p6 - p2) / 4)))
  while layers > 0 and peak(layers) > limit_gib:
    layers -= 1
  while peak(layers + 1) <= limit_gib:
    layers += 1
  params = models.num_params(param_shapes(decoder(args, max(layers, 1))))
  return {'layers': layers, 'params_billion': params / 1e9 if layers else 0.0,
          'peak_per_layer_gib': (p6 - p2) / 4}


def worker(args) -> None:
  """One method in this fresh process (so the peak is its own); JSON out."""
  model = decoder(args)
  perturbation.BLOCK_ELEMENTS = args.block_elements
  result = compiled_memory(model, args.worker, args)
  result.update(measure(model, args.worker, args))
  print('RESULT ' + json.dumps(result))


def add_model_arguments(parser) -> None:
  """The decoder's and the batch's flags (shared with profile_step.py)."""
  parser.add_argument('--layers', type=int, default=20)
  parser.add_argument('--d-model', type=int, default=2048)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seq', type=int, default=512)
  parser.add_argument('--dtype', choices=('bf16', 'f32'), default='bf16')


def quick_model(args) -> None:
  """The CPU-sized decoder and batch of ``--quick``."""
  args.layers, args.d_model, args.heads, args.vocab = 2, 256, 4, 1024
  args.batch, args.seq = 2, 64


def main():
  parser = run_arguments(__doc__.splitlines()[0])
  add_model_arguments(parser)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--methods', nargs='+', default=list(METHODS))
  parser.add_argument('--largest', action='store_true',
                      help='search the largest model per method')
  parser.add_argument('--tag', default='')
  parser.add_argument('--block-elements', type=int,
                      default=perturbation.BLOCK_ELEMENTS,
                      help='most entries per block of the noise draws and '
                      'of the update')
  parser.add_argument('--worker', choices=METHODS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    quick_model(args)
    args.repeats = 2
  if args.worker:
    return worker(args)

  model = decoder(args)
  num_params = models.num_params(param_shapes(model))
  print(f'Decoder: {args.layers} layers, d={args.d_model}, vocab '
        f'{args.vocab}: {num_params / 1e9:.3f}B params, {args.dtype}; batch '
        f'{args.batch}x{args.seq}; backend {jax.default_backend()}')
  rows = {}
  forwarded = [a for a in sys.argv[1:] if a != '--largest']
  for method in args.methods:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *forwarded, '--worker',
         method], capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
    if not lines:
      print(f'{method}: failed\n{out.stderr[-2000:]}')
      rows[method] = {'error': out.stderr[-2000:]}
      continue
    rows[method] = json.loads(lines[0][len('RESULT '):])

  header = (f'{"method":>10} | {"args":>6} | {"temp":>6} | {"peak":>6} | '
            f'{"x inf":>5} | {"measured":>8} | {"x inf":>5} | {"step s":>7} '
            f'| {"tokens/s":>9}')
  print('GiB from XLA\'s compiled memory analysis; measured = '
        'peak_bytes_in_use\n' + header + '\n' + '-' * len(header))
  base = rows.get('inference', {})
  for method, r in rows.items():
    if 'error' in r:
      continue
    ratio = r['peak'] / base['peak'] if 'peak' in base else float('nan')
    measured = r.get('measured_peak', float('nan'))
    m_ratio = measured / base.get('measured_peak', float('nan'))
    print(f'{method:>10} | {r["argument"]:6.2f} | {r["temp"]:6.2f} | '
          f'{r["peak"]:6.2f} | {ratio:5.2f} | {measured:8.2f} | '
          f'{m_ratio:5.2f} | {r.get("step_s", float("nan")):7.3f} | '
          f'{r.get("tokens_per_s", float("nan")):9.0f}')

  largest = {}
  if args.largest:
    limit = rows.get('inference', {}).get('device_limit') or 80.0
    for method in args.methods:
      largest[method] = largest_layers(args, method, limit)
      print(f'largest for {method} within {limit:.1f} GiB: '
            f'{largest[method]["layers"]} layers = '
            f'{largest[method]["params_billion"]:.2f}B params')

  os.makedirs(args.out, exist_ok=True)
  name = f'bench_mezo{"_quick" if args.quick else ""}{args.tag}.json'
  with open(os.path.join(args.out, name), 'w') as f:
    json.dump({'config': harness.config(args), 'num_params': num_params,
               'device': str(jax.devices()[0]), 'jax': jax.__version__,
               'machine': platform.machine(), 'results': rows,
               'largest': largest}, f, indent=1)
  print('wrote', harness.shown(os.path.join(args.out, name)))


if __name__ == '__main__':
  main()
