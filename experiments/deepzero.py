"""DeepZero's CGE-vs-RGE claim on digits, over a sweep of CNN widths.

Chen et al., "DeepZero: Scaling up Zeroth-Order Optimization for Deep Model
Training" (ICLR 2024) find the coordinate-wise estimator (CGE) ahead of the
randomized one (RGE) when training CNNs and ResNets from scratch. This runs
that comparison on scikit-learn's digits with ``zojax.models.SmallCNN`` of
several widths (666 to 12,586 parameters; each model as 3 stages, for
feature reuse), DeepZero's optimizer for every method (SGD, momentum 0.9,
weight decay 5e-4, 6% linear warm-up then cosine decay, mu = 5e-3) and the
learning rate of every method and width tuned on a grid of three (chosen by
accuracy on a validation split; test accuracy reported):

* ``fo``: first-order SGD (autodiff), the reference, ``T`` steps;
* ``cge``: full CGE with feature reuse (``zojax.flax.feature_reuse_cge``),
  ``T`` steps of ``d + 1`` evaluations: the budget ``B = T (d + 1)``;
* ``sparse_cge``: DeepZero's sparse CGE: ZO-GraSP (``zojax.sparsity.
  zo_grasp_scores``, DeepZero's estimator: q = 192, 25 examples per class;
  its evaluations counted) fixes each kernel's sparsity at 90% globally; a
  random mask with those ratios (biases dense) is re-drawn 10 times per
  run, as DeepZero's every 5 of 50 epochs;
* ``rge``: RGE with Gaussian directions.

Two comparisons: (a) **equal query budget** ``B``: sparse CGE takes as many
steps as ``B`` pays for, RGE (q = 64) ``B / 65``; (b) **equal steps** ``T``:
sparse CGE against RGE with as many directions as sparse CGE has
coordinates (equal queries per step too). RGE's grid is scaled by q/d (its
variance grows as d/q). With ``--cifar10 PATH`` the same runs use
ResNet-20 on CIFAR-10 read from ``PATH`` (no download; needs a GPU).

  nice -n 10 python experiments/deepzero.py --out experiments/results
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

import zojax
import harness
from harness import run_arguments
from zojax import data
from zojax import flax as zflax
from zojax import models

WIDTHS = ((4, 8), (8, 16), (16, 32), (24, 48))
SIGMA = 5e-3
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
SPARSITY = 0.9
RGE_QUERIES = 64
GRASP_PER_CLASS = 25
MASKS_PER_RUN = 10
# Learning-rate grids; RGE's is multiplied by q / d.
GRIDS = {'fo': (0.1, 0.3, 1.0), 'cge': (0.1, 0.3, 1.0),
         'sparse_cge': (0.1, 0.3, 1.0), 'rge': (0.1, 0.3, 1.0)}


def split(cifar10_path, validation):
  """Train / validation / test arrays (the validation rows come from the
  training split and only choose learning rates)."""
  ds = data.cifar10(cifar10_path) if cifar10_path else data.digits(0.25, 0)
  x, y = ds.x_train, ds.y_train
  return {'train': (x[:-validation], y[:-validation]),
          'val': (x[-validation:], y[-validation:]),
          'test': (ds.x_test, ds.y_test)}


def grasp_ratios(stages, params, loss, train, seed):
  """ZO-GraSP layer ratios (DeepZero's estimator) and, for the record, those
  of the exact GraSP score (autodiff), at global sparsity ``SPARSITY``."""
  x, y = train
  rows = np.concatenate([np.flatnonzero(y == c)[:GRASP_PER_CLASS]
                         for c in np.unique(y)])
  probe = (jnp.asarray(x[rows]), jnp.asarray(y[rows]))
  fn = lambda p: loss(zflax.apply_stages(stages, p, probe[0]), probe)
  zo = jax.jit(lambda p: zojax.sparsity.zo_grasp_scores(fn, p, seed=seed))
  grad = jax.grad(fn)
  exact = jax.jit(lambda p: jax.tree.map(
      lambda t, h: -t * h, p, jax.jvp(grad, (p,), (grad(p),))[1]))
  ratios = zojax.sparsity.layer_sparsity(zo(params), SPARSITY)
  listed = lambda r: [v for v in jax.tree.leaves(r) if v is not None]
  return ratios, {
      'zo_grasp': listed(ratios),
      'exact_grasp': listed(zojax.sparsity.layer_sparsity(exact(params),
                                                          SPARSITY)),
      'evals': 2 * (192 + 1)}


def schedule(i, steps, warmup):
  """DeepZero's learning-rate shape: linear warm-up, then cosine to 0."""
  progress = (i - warmup) / jnp.maximum(steps - warmup, 1)
  return jnp.where(i < warmup, (i + 1) / warmup,
                   0.5 * (1 + jnp.cos(jnp.pi * progress)))


def make_step(method, stages, loss, queries, mask, seed):
  """``(init, step)``: ``step(params, state, batch, mask, i, steps, warmup,
  lr)`` is SGD with momentum and weight decay on ``method``'s estimate."""
  objective = lambda p, batch: loss(zflax.apply_stages(stages, p, batch[0]),
                                    batch)
  if method == 'fo':
    est = None
  elif method == 'rge':
    est = zojax.rge(queries, SIGMA, batch_size=64, seed=seed)
  else:
    est = zflax.feature_reuse_cge(stages, loss, SIGMA, mask=mask,
                                  batch_size=256)
  sgd = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                    optax.trace(decay=MOMENTUM))

  def estimate(p, s, batch, m):
    if est is None:
      return jax.grad(objective)(p, batch), s
    if method == 'rge':
      return est.update(None, s, p, obj_fn=objective, batch=batch)
    return est.update(None, s, p, batch=batch, mask=m)

  @jax.jit
  def step(p, state, batch, m, i, steps, warmup, lr):
    est_state, opt_state = state
    grad, est_state = estimate(p, est_state, batch, m)
    direction, opt_state = sgd.update(grad, opt_state, p)
    scale = lr * schedule(i, steps, warmup)
    p = jax.tree.map(lambda a, u: a - scale * u, p, direction)
    return p, (est_state, opt_state)

  init = lambda p: (None if est is None else est.init(p), sgd.init(p))
  return init, step


def train(run, parts, arrays, lr, *, batch, seed):
  """One run of ``parts`` (from :func:`make_step`) at one learning rate;
  returns its curve and final accuracies."""
  (init, step), params, evaluate = parts
  steps, mask_ratios = run['steps'], run.get('ratios')
  key_data, key_mask = jax.random.split(jax.random.PRNGKey(seed + 1))
  x, y = arrays['train']
  redraw = max(1, steps // MASKS_PER_RUN)
  mask = run.get('mask')
  state, warmup = init(params), max(1, round(0.06 * steps))
  log = {'step': [], 'evals': [], 'val': [], 'test': []}
  cpu, wall = time.process_time(), time.perf_counter()
  for i in range(steps + 1):
    if i % max(1, steps // 8) == 0 or i == steps:
      evals = (run['extra_evals'] + zojax.estimate_info(state[0]).num_evals
               if state[0] is not None else 0)
      log['step'].append(i)
      log['evals'].append(int(evals))
      log['val'].append(evaluate(params, 'val'))
      log['test'].append(evaluate(params, 'test'))
    if i == steps:
      break
    if mask_ratios is not None and i and i % redraw == 0:
      mask = zojax.sparsity.random_mask(jax.random.fold_in(key_mask, i),
                                        params, mask_ratios)
    rows = jax.random.choice(jax.random.fold_in(key_data, i), len(y),
                             (batch,), replace=False)
    params, state = step(params, state, (x[rows], y[rows]), mask, i, steps,
                         warmup, lr)
  jax.block_until_ready(params)
  return {'learning_rate': lr, 'cpu_s': time.process_time() - cpu,
          'wall_s': time.perf_counter() - wall, 'val_accuracy': log['val'][-1],
          'test_accuracy': log['test'][-1], 'curve': log}


def tuned(run, parts, arrays, grid, *, batch, seed):
  """Trains at every rate of ``grid``; keeps all, marks the best on the
  validation split (ties: the smaller rate)."""
  trials = [train(run, parts, arrays, lr, batch=batch, seed=seed)
            for lr in grid]
  best = max(range(len(trials)), key=lambda k: (trials[k]['val_accuracy'],
                                                -k))
  out = dict(run, **trials[best])
  out.pop('mask', None)
  out.pop('ratios', None)
  out['grid'] = [{k: t[k] for k in ('learning_rate', 'val_accuracy',
                                    'test_accuracy', 'cpu_s')}
                 for t in trials]
  print(f"  {run['method']:<10} ({run['comparison']:<6}) {run['steps']:6d} "
        f"steps x {run['queries']:>6,} q  lr {out['learning_rate']:<8.3g} "
        f"val {out['val_accuracy']:.3f} test {out['test_accuracy']:.3f}  "
        f"[{sum(t['cpu_s'] for t in trials):6.1f} CPU s]", flush=True)
  return out


def compare(name, modules, arrays, args):
  """Every method on one model: (a) equal budget, (b) equal steps."""
  x, _ = arrays['train']
  params = zflax.init_stages(modules, jax.random.PRNGKey(args.seed), x[:2])
  stages = zflax.module_stages(modules)
  loss = lambda logits, batch: models.cross_entropy(logits, batch[1])
  dim, steps = models.num_params(params), args.steps
  sets = {k: (jnp.asarray(a), jnp.asarray(b)) for k, (a, b) in
          arrays.items()}
  accuracy = jax.jit(lambda p, xs, ys: models.accuracy(
      zflax.apply_stages(stages, p, xs), ys))
  evaluate = lambda p, part: float(accuracy(p, *sets[part]))
  ratios, grasp = grasp_ratios(stages, params, loss, arrays['train'],
                               args.seed)
  mask = zojax.sparsity.random_mask(jax.random.PRNGKey(args.seed + 2),
                                    params, ratios)
  coords = sum(int(np.size(leaf)) if m is True else int(np.sum(m))
               for leaf, m in zip(jax.tree.leaves(params),
                                  jax.tree.leaves(mask)))
  budget = steps * (dim + 1)
  print(f'{name}: {dim:,} parameters, budget {budget:,} evaluations, '
        f'sparse CGE {coords:,} coordinates; ZO-GraSP ratios '
        f"{np.round(grasp['zo_grasp'], 3).tolist()}, exact GraSP "
        f"{np.round(grasp['exact_grasp'], 3).tolist()}", flush=True)
  sparse = {'method': 'sparse_cge', 'queries': coords + 1, 'mask': mask,
            'ratios': ratios, 'extra_evals': grasp['evals']}
  runs = [
      {'method': 'fo', 'comparison': 'both', 'steps': steps, 'queries': 0},
      {'method': 'cge', 'comparison': 'both', 'steps': steps,
       'queries': dim + 1},
      dict(sparse, comparison='budget',
           steps=(budget - grasp['evals']) // (coords + 1)),
      dict(sparse, comparison='steps', steps=steps),
      {'method': 'rge', 'comparison': 'budget', 'queries': RGE_QUERIES + 1,
       'steps': budget // (RGE_QUERIES + 1)},
      {'method': 'rge', 'comparison': 'steps', 'queries': coords + 1,
       'steps': steps},
  ]
  compiled, out = {}, []
  for run in runs:
    kind = (run['method'], run['queries'] if run['method'] == 'rge' else 0)
    if kind not in compiled:  # one compilation per estimator
      compiled[kind] = make_step(run['method'], stages, loss,
                                 run['queries'] - 1, run.get('mask'),
                                 args.seed)
    grid = GRIDS[run['method']]
    if run['method'] == 'rge':
      grid = tuple(c * (run['queries'] - 1) / dim for c in grid)
    run = dict({'extra_evals': 0}, **run)
    out.append(tuned(run, (compiled[kind], params, evaluate), arrays,
                     grid[1:2] if args.quick else grid, batch=args.batch,
                     seed=args.seed))
  return {'model': name, 'params': dim, 'budget': budget,
          'sparse_coordinates': coords, 'grasp': grasp, 'runs': out}


def main(argv=None) -> dict:
  parser = run_arguments(__doc__.splitlines()[0])
  parser.add_argument('--cifar10', default=None,
                      help='folder with the CIFAR-10 python batches')
  parser.add_argument('--steps', type=int, default=32,
                      help='T: steps of FO and full CGE; B = T (d + 1)')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--validation', type=int, default=200,
                      help='training examples held out to choose rates')
  parser.add_argument('--widths', nargs='+', default=None,
                      help='SmallCNN channels, e.g. 8,16 24,48')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  widths = ([tuple(int(c) for c in w.split(',')) for w in args.widths]
            if args.widths else WIDTHS)
  if args.quick:
    args.steps, widths = 3, widths[:1]
  os.makedirs(args.out, exist_ok=True)
  arrays = split(args.cifar10, args.validation)
  if args.cifar10:
    networks = [('resnet20', models.ResNet20().stages())]
  else:
    networks = [(f'SmallCNN{w}', models.SmallCNN(w).stages())
                for w in widths]
  cpu = time.process_time()
  results = [compare(name, modules, arrays, args)
             for name, modules in networks]
  result = {'config': harness.config(args), 'dataset': 'cifar10' if
            args.cifar10 else 'digits', 'sigma': SIGMA, 'sparsity': SPARSITY,
            'rge_queries': RGE_QUERIES, 'grids': GRIDS,
            'cpu_s': time.process_time() - cpu, 'models': results}
  summary(result)
  with open(os.path.join(args.out, 'deepzero.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, 'deepzero.png'))
  print(f'wrote {harness.shown(args.out)}/deepzero.json, deepzero.png')
  return result


def final(model, method, comparison):
  """The tuned run of ``method`` in ``comparison`` ('budget' or 'steps')."""
  return next(r for r in model['runs'] if r['method'] == method and
              r['comparison'] in (comparison, 'both'))


def summary(result):
  """Markdown tables of test accuracy, one per comparison."""
  for comparison, title in (('budget', '(a) equal query budget'),
                            ('steps', '(b) equal steps')):
    print(f'\n{title}: test accuracy (steps)')
    print('| model | d | FO SGD | CGE | sparse CGE | RGE |')
    print('|---|---|---|---|---|---|')
    for m in result['models']:
      cells = [f"{r['test_accuracy']:.3f} ({r['steps']:,})" for r in
               (final(m, k, comparison) for k in ('fo', 'cge', 'sparse_cge',
                                                  'rge'))]
      print(f"| {m['model']} | {m['params']:,} | " + ' | '.join(cells) + ' |')
  print(f"total CPU time {result['cpu_s']:.0f} s")


COLORS = {'fo': 'black', 'cge': 'tab:blue', 'sparse_cge': 'tab:green',
          'rge': 'tab:orange'}


def plot(result, path):
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
  dims = [m['params'] for m in result['models']]
  for ax, comparison, title in ((axes[0], 'budget', '(a) equal query budget'),
                                (axes[1], 'steps', '(b) equal steps')):
    for method, color in COLORS.items():
      acc = [final(m, method, comparison)['test_accuracy']
             for m in result['models']]
      ax.plot(dims, acc, marker='o', color=color, label=method,
              linestyle='--' if method == 'fo' else '-')
    ax.set(xscale='log', xlabel='parameters d', ylabel='test accuracy',
           title=title)
  largest = result['models'][-1]
  for method in ('cge', 'sparse_cge', 'rge'):
    run = final(largest, method, 'budget')
    axes[2].plot(run['curve']['evals'], run['curve']['test'],
                 color=COLORS[method], label=method)
  axes[2].set(xlabel='function evaluations', ylabel='test accuracy',
              title=f"(a) on {largest['model']} ({largest['params']:,})")
  for ax in axes:
    ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  main()
