"""MeZO and the ZO-Bench optimizers fine-tuning a small decoder, and memory.

Three parts, as in MeZO (Malladi et al., 2023) and ZO-Bench (Zhang et al.,
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
   of each layer, the largest weights at the current step, frozen). Each is
   run for a few learning rates and the best (lowest final loss) is
   reported; logged: loss and next-token accuracy against ``P2`` vs steps,
   and the fraction of the entries changed by the first and the last step.
3. Quantized fine-tuning, as in QZO (ICLR 2026): the same pre-trained
   decoder, its blocks' kernels quantized (int8 and int4, symmetric absmax
   per group of ``GROUP_SIZE`` input rows: kernel = scale * code), is
   fine-tuned on ``P2`` with ``zojax.qzo`` (the scales only, codes frozen)
   and, for comparison, with ``zojax.mezo`` on the dequantized float
   weights (every parameter), for the same steps and the best of three
   learning rates each. QZO's epsilon is ``SIGMA / (2^(b-1) - 1)``, so that
   the largest weight of a group moves by ``SIGMA z``, as in MeZO.

  python experiments/mezo.py            # full run (about 25 minutes)
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
import harness
from harness import run_arguments
from zojax import masks
from zojax import models
from zojax._src import quantization

VOCAB, LENGTH, BATCH = 32, 32, 32
SIGMA = 1e-3
FINE_TUNE = {  # method -> learning rates tried
    'fo_adam': (3e-4, 1e-3, 3e-3),
    'mezo': (1e-3, 3e-3, 1e-2),
    'zo_adam': (1e-4, 3e-4, 1e-3),
    'zo_sign_sgd': (3e-5, 1e-4, 3e-4),
    'sparse_mezo': (1e-3, 3e-3, 1e-2),
}
GROUP_SIZE = 32  # input rows per scale of the quantized kernels
QZO = {  # quantization -> (largest code 2^(b-1) - 1, QZO's rates, clip C)
    'int8': (127, (1e-6, 3e-6, 1e-5), 200.0),
    'int4': (7, (3e-4, 1e-3, 3e-3), 10.0),
}
QUANTIZED_STEPS = 5000
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


def optimizer(method, lr, quantized=None):
  """The optax transform of ``method``; ``quantized``: the model's
  quantization, for QZO."""
  if method == 'fo_adam':
    return optax.adam(lr)
  if method == 'mezo':
    return zojax.mezo(lr, SIGMA)
  if method == 'sparse_mezo':
    return zojax.mezo(lr, SIGMA,
                      mask=masks.sparse_mezo(0.75, stacked='blocks'))
  if method == 'zo_adam':
    return zojax.zo_adam(lr, SIGMA)
  if method == 'zo_sign_sgd':
    return zojax.zo_sign_sgd(lr, SIGMA)
  if method == 'qzo':
    levels, _, clip = QZO[quantized]
    return zojax.qzo(lr, SIGMA / levels, clip=clip)
  raise ValueError(method)


def changed_fraction(old, new) -> jax.Array:
  """Fraction of all the parameter entries that differ between two trees."""
  changed = sum(jnp.sum(a != b) for a, b in zip(jax.tree.leaves(old),
                                                 jax.tree.leaves(new)))
  return changed / models.num_params(old)


def train(model, params, method, lr, successors, *, steps, eval_every, seed):
  """Runs ``steps`` steps in jitted chunks; returns params and the log."""
  tx = optimizer(method, lr, model.quantization)
  state = tx.init(params)
  loss = lambda p, t: models.next_token_loss(model.apply({'params': p}, t), t)
  perturbed = lambda p, q, t: models.next_token_loss(
      model.apply({'params': p}, t, perturbation=q), t)

  def one_step(carry, key):
    old, s = carry
    p = old
    tokens = language(key, successors, BATCH)
    if method == 'fo_adam':
      updates, s = tx.update(jax.grad(loss)(p, tokens), s, p)
      p = optax.apply_updates(p, updates)
    elif method in ('mezo', 'sparse_mezo', 'qzo'):
      p, s = tx.step(p, s, perturbed_fn=perturbed, batch=tokens)
    else:
      updates, s = tx.update(None, s, p, obj_fn=lambda q: loss(q, tokens))
      p = optax.apply_updates(p, updates)
    return (p, s), changed_fraction(old, p)

  @jax.jit
  def chunk(p, s, key):
    (p, s), changed = jax.lax.scan(one_step, (p, s),
                                   jax.random.split(key, eval_every))
    return p, s, changed

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
    params, state, changed = chunk(params, state, sub)
    record(done, params)
    log.setdefault('updated_first', float(changed[0]))
  log['updated_last'] = float(changed[-1])
  log['seconds'] = time.perf_counter() - start
  return params, log


def pretrain(quick: bool):
  """The decoder pre-trained on ``P1``: (model, params, log, P2)."""
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
  return model, params, pre_log, p2


def best_run(model, params, method, rates, successors, *, steps,
             quick) -> dict:
  """The log of the learning rate with the lowest final loss."""
  best = None
  for lr in rates[1:2] if quick else rates:
    _, log = train(model, params, method, lr, successors, steps=steps,
                   eval_every=steps // (4 if quick else 40), seed=2)
    log['learning_rate'] = lr
    print(f'  {method:12s} lr {lr:g}: loss {log["loss"][-1]:.3f}, accuracy '
          f'{log["accuracy"][-1]:.3f} ({log["seconds"]:.1f} s); entries '
          f'changed: {log["updated_first"]:.3f} by step 1, '
          f'{log["updated_last"]:.3f} by step {steps}', flush=True)
    if best is None or log['loss'][-1] < best['loss'][-1]:
      best = log
  return best


def fine_tune(model, params, pre_log, p2, quick: bool) -> dict:
  runs = {}
  for method, rates in FINE_TUNE.items():
    steps = (40 if quick else 800) if method == 'fo_adam' else (
        80 if quick else 20_000)
    runs[method] = best_run(model, params, method, rates, p2, steps=steps,
                            quick=quick)
  return {'pretrain': pre_log, 'runs': runs,
          'num_params': models.num_params(params)}


def dequantize(params, quantized: str):
  """Float decoder params of quantized ones: every ``codes``/``qscale`` pair
  of the blocks back to ``kernel = qscale * codes`` (per stacked layer)."""
  bits = quantization.BITS[quantized]

  def convert(tree):
    if isinstance(tree, dict) and 'codes' in tree:
      kernel = jax.vmap(lambda c, s: quantization.dequantize_kernel(
          c, s, bits))(tree['codes'], tree['qscale'])
      rest = {k: v for k, v in tree.items() if k not in ('codes', 'qscale')}
      return {**rest, 'kernel': kernel}
    if isinstance(tree, dict):
      return {k: convert(v) for k, v in tree.items()}
    return tree

  return {**params, 'blocks': convert(params['blocks'])}


def nbytes(params, only: str = '') -> int:
  """Bytes of the leaves whose last key ends with ``only`` (default: all)."""
  return sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(
      params) if str(path[-1].key).endswith(only))


def quantized_fine_tune(model, params, p2, quick: bool) -> dict:
  """QZO on the scales of the quantized pre-trained decoder vs MeZO on its
  dequantized float weights, int8 and int4."""
  steps = 80 if quick else QUANTIZED_STEPS
  result = {'group_size': GROUP_SIZE, 'steps': steps}
  for quantized, (_, rates, clip) in QZO.items():
    q_model = model.clone(quantization=quantized, group_size=GROUP_SIZE)
    q_params = models.quantize(params, quantized, GROUP_SIZE)
    float_params = dequantize(q_params, quantized)
    runs = {'qzo': best_run(q_model, q_params, 'qzo', rates, p2,
                            steps=steps, quick=quick),
            'mezo': best_run(model, float_params, 'mezo', FINE_TUNE['mezo'],
                             p2, steps=steps, quick=quick)}
    row = {'clip': clip, 'runs': runs,
           'trainable_bytes': {'qzo': nbytes(q_params, 'qscale'),
                               'mezo': nbytes(float_params)},
           'model_bytes': {'qzo': nbytes(q_params),
                           'mezo': nbytes(float_params)}}
    print(f'{quantized} (group {GROUP_SIZE}): before fine-tuning loss '
          f'{runs["qzo"]["loss"][0]:.3f}, accuracy '
          f'{runs["qzo"]["accuracy"][0]:.3f}; trainable state: QZO '
          f'{row["trainable_bytes"]["qzo"]} B (scales), MeZO '
          f'{row["trainable_bytes"]["mezo"]} B (float weights); model: '
          f'{row["model_bytes"]["qzo"]} B quantized', flush=True)
    result[quantized] = row
  return result


def plot(result, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(20, 4))
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
  for quantized in QZO:
    for method, name in (('qzo', 'QZO'), ('mezo', 'MeZO, dequantized')):
      log = result['qzo'][quantized]['runs'][method]
      label = f'{quantized}: {name} (lr {log["learning_rate"]:g})'
      axes[3].plot(log['steps'], log['accuracy'], label=label)
  axes[3].set(xlabel='steps', ylabel='next-token accuracy vs P2',
              title='quantized model (best learning rate of 3)')
  axes[3].legend(fontsize=8)
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
  model, params, pre_log, p2 = pretrain(args.quick)
  result['fine_tune'] = fine_tune(model, params, pre_log, p2, args.quick)
  print('quantized fine-tuning (QZO: scales only; MeZO: dequantized '
        'weights):')
  result['qzo'] = quantized_fine_tune(model, params, p2, args.quick)
  os.makedirs(args.out, exist_ok=True)
  name = 'mezo_quick' if args.quick else 'mezo'
  with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, f'{name}.png'))
  print('wrote', harness.shown(os.path.join(args.out, f'{name}.json')))
  return result


if __name__ == '__main__':
  main()
