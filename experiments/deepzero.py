"""DeepZero on digits: FO-SGD, RGE, CGE and sparse CGE with feature reuse.

Reproduces the qualitative comparisons of Chen et al., "DeepZero: Scaling up
Zeroth-Order Optimization for Deep Model Training" (ICLR 2024) on
scikit-learn's digits (a ``zojax.models.SmallCNN`` of 1,898 parameters, as 3
stages), each ZO method given the same budget of function evaluations:

* ``fo_sgd``: first-order SGD (autodiff), the reference;
* ``rge``: ZO-SGD with RGE, ``q`` Gaussian directions per step;
* ``cge``: ZO-SGD with full CGE (every coordinate every step), evaluated with
  ``zojax.flax.feature_reuse_cge``;
* ``sparse_cge``: DeepZero's sparsity-induced CGE: ZO-GraSP scores (finite
  differences only; their evaluations are counted) give per-layer sparsity
  ratios at ``--sparsity``; every ``--redraw`` steps a fresh random mask with
  those ratios selects the coordinates CGE perturbs (biases stay dense).

All use SGD with momentum 0.9 on mini-batches of 128 and log test accuracy
against function evaluations, steps and wall time (JSON + PNG). With
``--cifar10 PATH`` the same runs use ResNet-20 on CIFAR-10 read from ``PATH``
(``zojax.data.cifar10``; no download). That run needs a GPU and hours.

  python experiments/deepzero.py            # digits, full budget
  python experiments/deepzero.py --quick    # a smoke run (ZOJAX_QUICK=1)
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import zojax
from harness import run_arguments
from zojax import data
from zojax import flax as zflax
from zojax import models

METHODS = ('fo_sgd', 'rge', 'cge', 'sparse_cge')
SIGMA = 5e-3
BATCH = 128


def setup(cifar10_path):
  """Dataset, stage modules and learning rates for digits or CIFAR-10."""
  if cifar10_path:
    ds = data.cifar10(cifar10_path)
    modules = models.ResNet20().stages()
    rates = {'fo_sgd': 0.1, 'rge': 1e-3, 'cge': 0.1, 'sparse_cge': 0.1}
  else:
    ds = data.digits(test_fraction=0.25, seed=0)
    modules = models.SmallCNN((8, 16)).stages()
    rates = {'fo_sgd': 0.1, 'rge': 0.01, 'cge': 0.1, 'sparse_cge': 0.1}
  return ds, modules, rates


def train(method, ds, modules, learning_rate, *, steps, eval_every, queries,
          sparsity, redraw, seed=0):
  """Trains one method; returns its log (accuracy vs evaluations, time)."""
  key_init, key_data, key_mask = jax.random.split(jax.random.PRNGKey(seed), 3)
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  params = zflax.init_stages(modules, key_init, x_train[:2])
  stages = zflax.module_stages(modules)
  loss = lambda logits, batch: models.cross_entropy(logits, batch[1])
  objective = lambda p, batch: loss(zflax.apply_stages(stages, p, batch[0]),
                                    batch)
  sgd = optax.sgd(learning_rate, momentum=0.9)
  extra_evals, info, mask = 0, {}, None

  if method == 'fo_sgd':
    tx = sgd
    update = lambda p, s, batch, mask: tx.update(
        jax.grad(objective)(p, batch), s, p)
  elif method == 'rge':
    tx = optax.chain(zojax.rge(queries, SIGMA, seed=seed), sgd)
    update = lambda p, s, batch, mask: tx.update(None, s, p, obj_fn=objective,
                                                 batch=batch)
  else:
    if method == 'sparse_cge':
      probe = (x_train[:BATCH], y_train[:BATCH])
      scores = zojax.sparsity.zo_grasp_scores(
          lambda p: objective(p, probe), params, num_queries=queries,
          sigma=SIGMA, seed=seed)
      extra_evals = 2 * (queries + 1)  # two RGE estimates, counted
      ratios = zojax.sparsity.layer_sparsity(scores, sparsity)
      info['layer_sparsity'] = [r for r in jax.tree.leaves(ratios)
                                if r is not None]
      mask = zojax.sparsity.random_mask(key_mask, params, ratios)
    tx = optax.chain(zflax.feature_reuse_cge(stages, loss, SIGMA, mask=mask,
                                             batch_size=256), sgd)
    update = lambda p, s, batch, m: tx.update(None, s, p, batch=batch,
                                              mask=m)

  @jax.jit
  def step(p, s, index, mask):
    updates, s = update(p, s, (x_train[index], y_train[index]), mask)
    return optax.apply_updates(p, updates), s

  accuracy = jax.jit(lambda p: models.accuracy(
      zflax.apply_stages(stages, p, x_test), y_test))
  state = tx.init(params)
  log = {'step': [], 'evals': [], 'seconds': [], 'accuracy': []}
  elapsed = 0.0
  for i in tqdm.trange(steps + 1, desc=method, leave=False, mininterval=5,
                       disable=None):  # off when not a terminal
    if i % eval_every == 0 or i == steps:
      evals = (zojax.estimate_info(state).num_evals + extra_evals
               if method != 'fo_sgd' else 0)
      log['step'].append(i)
      log['evals'].append(evals)
      log['seconds'].append(elapsed)
      log['accuracy'].append(float(accuracy(params)))
    if i == steps:
      break
    if method == 'sparse_cge' and i and i % redraw == 0:
      mask = zojax.sparsity.random_mask(jax.random.fold_in(key_mask, i),
                                        params, ratios)
    index = jax.random.choice(jax.random.fold_in(key_data, i),
                              len(y_train), (BATCH,), replace=False)
    start = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, index, mask))
    elapsed += time.perf_counter() - start
  if method != 'fo_sgd':
    info['evals_per_step'] = zojax.estimate_info(state).evals_per_step
  return {'method': method, 'learning_rate': learning_rate, 'steps': steps,
          **info, **log}


def main(argv=None) -> dict:
  parser = run_arguments(__doc__.splitlines()[0])
  parser.add_argument('--cifar10', default=None,
                      help='folder with the CIFAR-10 python batches')
  parser.add_argument('--cge-steps', type=int, default=150,
                      help='steps of full CGE; fixes the evaluation budget')
  parser.add_argument('--queries', type=int, default=64,
                      help='RGE directions (and ZO-GraSP queries)')
  parser.add_argument('--sparsity', type=float, default=0.9)
  parser.add_argument('--redraw', type=int, default=20,
                      help='steps between sparse masks')
  parser.add_argument('--methods', nargs='+', default=list(METHODS))
  args = parser.parse_args(argv)
  if args.quick:
    args.cge_steps = 2
  os.makedirs(args.out, exist_ok=True)
  ds, modules, rates = setup(args.cifar10)
  params = zflax.init_stages(modules, jax.random.PRNGKey(0), ds.x_train[:2])
  dim = models.num_params(params)
  budget = args.cge_steps * (dim + 1)
  runs = []
  for method in args.methods:
    if method == 'fo_sgd' or method == 'cge':
      steps = args.cge_steps
    elif method == 'rge':
      steps = budget // (args.queries + 1)
    else:  # sparse_cge: the same budget, more (cheaper) steps
      ratios = jax.tree.map(lambda x: args.sparsity if x.ndim >= 2 else 0.0,
                            params)
      kept = sum(round((1 - r) * np.size(x)) for r, x in
                 zip(jax.tree.leaves(ratios), jax.tree.leaves(params)))
      steps = (budget - 2 * (args.queries + 1)) // (kept + 1)
    run = train(method, ds, modules, rates[method], steps=steps,
                eval_every=max(1, steps // 30), queries=args.queries,
                sparsity=args.sparsity, redraw=args.redraw)
    runs.append(run)
    print(f"{method:<11} lr {run['learning_rate']:<6g} {steps:6d} steps "
          f"{run['evals'][-1]:>10,} evals {run['seconds'][-1]:7.1f} s  "
          f"test accuracy {run['accuracy'][-1]:.3f}", flush=True)
  result = {'quick': args.quick, 'dataset': 'cifar10' if args.cifar10
            else 'digits', 'params': dim, 'evaluation_budget': budget,
            'sigma': SIGMA, 'batch': BATCH, 'sparsity': args.sparsity,
            'runs': runs}
  with open(os.path.join(args.out, 'deepzero.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plot(runs, os.path.join(args.out, 'deepzero.png'))
  print(f'wrote {args.out}/deepzero.json, deepzero.png')
  return result


def plot(runs, path):
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  colors = dict(zip(METHODS, ('black', 'tab:orange', 'tab:blue', 'tab:green')))
  for run in runs:
    style = {'label': run['method'], 'color': colors[run['method']]}
    if run['method'] != 'fo_sgd':
      axes[0].plot(run['evals'], run['accuracy'], **style)
    axes[1].plot(run['seconds'], run['accuracy'], **style)
  axes[0].set(xlabel='function evaluations', ylabel='test accuracy',
              title='same evaluation budget')
  axes[1].set(xlabel='training wall time (s)', ylabel='test accuracy',
              title='wall time (CPU)')
  for ax in axes:
    ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  main()
