"""MeZO and the ZO-Bench optimizers fine-tuning a small decoder, and memory.

Two parts, as in MeZO (Malladi et al., 2023) and ZO-Bench (Zhang et al.,
2024), scaled to a CPU:

1. Memory vs model size: XLA's compiled memory analysis (arguments + outputs
   + temporaries - aliased) of one call of: inference (the loss), a MeZO
   step (``zojax.mezo`` with the model perturbing itself layer by layer), a
   MeZO step perturbing the whole tree at once, and a first-order Adam step,
   for ``zojax.models.Decoder`` s of growing size (float32). Compilation
   only: nothing is allocated, so sizes beyond this machine's memory are
   measured too.
2. Fine-tuning: a decoder is pre-trained briefly (first-order Adam) on a
   synthetic language (token ``t`` is followed by ``P1[t]`` with probability
   0.9, else by a random token), then fine-tuned on a shifted language whose
   successor table ``P2`` differs from ``P1`` on a quarter of the tokens,
   with FO Adam, MeZO (ZO-SGD), ZO-Adam, ZO-SGD-Sign and Sparse MeZO (75%
   of each layer, the largest weights, frozen). Each is run for a few
   learning rates and the best (lowest final loss) is reported; logged:
   loss and next-token accuracy against ``P2`` vs steps.

  python experiments/mezo.py            # full run (a few minutes)
  python experiments/mezo.py --quick    # a smoke run (ZOJAX_QUICK=1)
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import optax

import zojax
from bench_mezo import compiled_memory
from bench_mezo import param_shapes
from harness import run_arguments
from zojax import masks
from zojax import models

VOCAB, LENGTH, BATCH = 32, 32, 32
SIGMA = 1e-3
FINE_TUNE = {  # method -> learning rates tried
    'fo_adam': (3e-4, 1e-3, 3e-3),
    'mezo': (1e-3, 3e-3, 1e-2),
    'zo_adam': (1e-4, 3e-4, 1e-3),
    'zo_sign_sgd': (3e-5, 1e-4, 3e-4),
    'sparse_mezo': (1e-3, 3e-3, 1e-2),
}
MEMORY_SIZES = ((4, 256), (8, 512), (12, 768), (16, 1024), (24, 1536),
                (24, 2048), (32, 2560))  # (layers, width)


class MemoryArgs:
  """The workload of the memory table (as bench_mezo's arguments)."""
  vocab, batch, seq = 32000, 4, 512


def memory_table(sizes, methods) -> list[dict]:
  rows = []
  for layers, width in sizes:
    model = models.Decoder(vocab_size=MemoryArgs.vocab, num_layers=layers,
                           d_model=width, num_heads=max(1, width // 128),
                           max_len=MemoryArgs.seq)
    params = models.num_params(param_shapes(model))
    row = {'layers': layers, 'width': width, 'params': params}
    for method in methods:
      row[method] = compiled_memory(model, method, MemoryArgs)['peak']
    rows.append(row)
    ratio = (f' (FO/MeZO {row["fo_adam"] / row["mezo"]:.1f}x)'
             if 'fo_adam' in row and 'mezo' in row else '')
    print(f'{params / 1e9:6.3f}B params: ' + ', '.join(
        f'{m} {row[m]:.2f} GiB' for m in methods) + ratio, flush=True)
  return rows


@functools.partial(jax.jit, static_argnums=2)
def language(key, successors, batch):
  """Sequences where ``t`` is followed by ``successors[t]`` w.p. 0.9."""
  k_first, k_noise, k_random = jax.random.split(key, 3)
  first = jax.random.randint(k_first, (batch,), 0, VOCAB)
  keep = jax.random.uniform(k_noise, (LENGTH - 1, batch)) < 0.9
  random = jax.random.randint(k_random, (LENGTH - 1, batch), 0, VOCAB)

  def next_token(t, inputs):
    keep_t, random_t = inputs
    t = jnp.where(keep_t, successors[t], random_t)
    return t, t

  _, rest = jax.lax.scan(next_token, first, (keep, random))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def evaluate(model, params, tokens, successors):
  """Loss and next-token accuracy against the successor table."""
  logits = model.apply({'params': params}, tokens)
  hits = jnp.argmax(logits[:, :-1], -1) == successors[tokens[:, :-1]]
  return models.next_token_loss(logits, tokens), jnp.mean(hits)


def optimizer(method, lr, params):
  if method == 'fo_adam':
    return optax.adam(lr)
  if method == 'mezo':
    return zojax.mezo(lr, SIGMA)
  if method == 'sparse_mezo':
    return zojax.mezo(lr, SIGMA,
                      mask=masks.sparse_mezo(params, 0.75, stacked='blocks'))
  if method == 'zo_adam':
    return zojax.zo_adam(lr, SIGMA)
  if method == 'zo_sign_sgd':
    return zojax.zo_sign_sgd(lr, SIGMA)
  raise ValueError(method)


def train(model, params, method, lr, successors, *, steps, eval_every, seed):
  """Runs ``steps`` steps in jitted chunks; returns params and the log."""
  tx = optimizer(method, lr, params)
  state = tx.init(params)
  loss = lambda p, t: models.next_token_loss(model.apply({'params': p}, t), t)
  perturbed = lambda p, q, t: models.next_token_loss(
      model.apply({'params': p}, t, perturbation=q), t)

  def one_step(carry, key):
    p, s = carry
    tokens = language(key, successors, BATCH)
    if method == 'fo_adam':
      updates, s = tx.update(jax.grad(loss)(p, tokens), s, p)
      p = optax.apply_updates(p, updates)
    elif method in ('mezo', 'sparse_mezo'):
      p, s = tx.step(p, s, perturbed_fn=perturbed, batch=tokens)
    else:
      updates, s = tx.update(None, s, p, obj_fn=lambda q: loss(q, tokens))
      p = optax.apply_updates(p, updates)
    return (p, s), None

  @jax.jit
  def chunk(p, s, key):
    (p, s), _ = jax.lax.scan(one_step, (p, s),
                             jax.random.split(key, eval_every))
    return p, s

  eval_tokens = language(jax.random.PRNGKey(10_000), successors, 256)
  log = {'steps': [], 'loss': [], 'accuracy': []}

  def record(step, p):
    value, acc = evaluate(model, p, eval_tokens, successors)
    log['steps'].append(step)
    log['loss'].append(float(value))
    log['accuracy'].append(float(acc))

  record(0, params)
  key = jax.random.PRNGKey(seed)
  start = time.perf_counter()
  for done in range(eval_every, steps + 1, eval_every):
    key, sub = jax.random.split(key)
    params, state = chunk(params, state, sub)
    record(done, params)
  log['seconds'] = time.perf_counter() - start
  return params, log


def fine_tune(quick: bool) -> dict:
  model = models.Decoder(vocab_size=VOCAB, num_layers=2, d_model=32,
                         num_heads=2, max_len=LENGTH)
  k_init, k_p1, k_shift, k_new = jax.random.split(jax.random.PRNGKey(0), 4)
  p1 = jax.random.permutation(k_p1, VOCAB)
  shifted = jax.random.permutation(k_shift, VOCAB)[:VOCAB // 4]
  p2 = p1.at[shifted].set(jax.random.randint(k_new, shifted.shape, 0, VOCAB))
  params = model.init(k_init, jnp.zeros((1, LENGTH), jnp.int32))['params']
  pre_steps = 60 if quick else 600
  params, pre_log = train(model, params, 'fo_adam', 3e-3, p1,
                          steps=pre_steps, eval_every=pre_steps // 4, seed=1)
  print(f'pre-trained on P1 ({models.num_params(params)} params, '
        f'{pre_steps} Adam steps): loss {pre_log["loss"][-1]:.3f}, accuracy '
        f'{pre_log["accuracy"][-1]:.3f}', flush=True)
  runs = {}
  for method, rates in FINE_TUNE.items():
    steps = (40 if quick else 800) if method == 'fo_adam' else (
        80 if quick else 20_000)
    candidates = rates[1:2] if quick else rates
    best = None
    for lr in candidates:
      _, log = train(model, params, method, lr, p2, steps=steps,
                     eval_every=steps // (4 if quick else 40), seed=2)
      log['learning_rate'] = lr
      print(f'  {method:12s} lr {lr:g}: loss {log["loss"][-1]:.3f}, accuracy '
            f'{log["accuracy"][-1]:.3f} ({log["seconds"]:.1f} s)', flush=True)
      if best is None or log['loss'][-1] < best['loss'][-1]:
        best = log
    runs[method] = best
  return {'pretrain': pre_log, 'runs': runs,
          'num_params': models.num_params(params)}


def plot(result, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  rows = result['memory']
  sizes = [r['params'] / 1e9 for r in rows]
  for method, label in (('fo_adam', 'FO Adam'), ('mezo_tree',
                                                  'MeZO, whole-tree z'),
                        ('mezo', 'MeZO (zojax)'), ('inference', 'inference')):
    if method in rows[0]:
      axes[0].plot(sizes, [r[method] for r in rows], 'o-', label=label)
  axes[0].set(xlabel='parameters (billions)', ylabel='GiB (compiled, f32)',
              title='memory of one step, batch 4x512', xscale='log',
              yscale='log')
  axes[0].legend()
  for method, log in result['fine_tune']['runs'].items():
    label = f'{method} (lr {log["learning_rate"]:g})'
    axes[1].plot(log['steps'], log['loss'], label=label)
    axes[2].plot(log['steps'], log['accuracy'], label=label)
  axes[1].set(xlabel='steps', ylabel='loss on the shifted language',
              title='fine-tuning (best learning rate of 3)')
  axes[2].set(xlabel='steps', ylabel='next-token accuracy vs P2')
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = run_arguments(__doc__.splitlines()[0]).parse_args(argv)
  print('memory of one call (XLA compiled memory analysis, f32, batch 4x512):')
  if args.quick:
    memory = memory_table(MEMORY_SIZES[:1], ('inference', 'mezo', 'fo_adam'))
  else:
    memory = memory_table(MEMORY_SIZES, ('inference', 'mezo', 'mezo_tree',
                                         'fo_adam'))
  result = {'memory': memory}
  print('fine-tuning on the shifted language:')
  result['fine_tune'] = fine_tune(args.quick)
  os.makedirs(args.out, exist_ok=True)
  name = 'mezo_quick' if args.quick else 'mezo'
  with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, f'{name}.png'))
  print('wrote', os.path.join(args.out, f'{name}.json'))
  return result


if __name__ == '__main__':
  main()
