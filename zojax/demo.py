"""Main demo: train a Flax MLP on scikit-learn's digits with CGE, RGE and Adam.

  python -m zojax.demo                 # full run (a few minutes on 2 CPU cores)
  python -m zojax.demo --quick         # seconds (also: ZOJAX_QUICK=1)

Every zeroth-order method gets the same budget of objective evaluations; each
step uses a fresh minibatch. First-order Adam (``jax.grad``) is the reference.
Prints a table of test accuracy vs function evaluations, writes
``results/demo.json`` and the plot ``results/demo.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import zojax
from zojax import data as data_lib
from zojax import models


class Method(NamedTuple):
  name: str
  make: Callable[[], optax.GradientTransformationExtraArgs]
  zeroth_order: bool


def methods(sigma: float) -> list[Method]:
  return [
      Method('CGE (all coords) + Adam',
             lambda: optax.chain(zojax.cge(sigma, batch_size=512),
                                 optax.adam(1e-2)), True),
      Method('RGE q=16 + Adam',
             lambda: optax.chain(zojax.rge(16, sigma), optax.adam(1e-3)),
             True),
      Method('first-order Adam', lambda: optax.adam(1e-2), False),
  ]


def _progress(total: int, desc: str):
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, desc=desc, leave=False)
  except ImportError:  # tqdm is optional
    return None


def train(method: Method, dataset: data_lib.Dataset, *, eval_budget: int,
          fo_steps: int, batch: int, evals_between_logs: int, seed: int):
  """Trains one method; returns its log (evals, steps, test acc, seconds)."""
  model = models.MLP((32, dataset.num_classes))
  x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
  x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
  params = model.init(jax.random.PRNGKey(seed), x_train[:1])['params']
  tx = method.make()
  state = tx.init(params)

  def loss(p, xb, yb):
    return models.cross_entropy(model.apply({'params': p}, xb), yb)

  def one_step(carry, key):
    p, s = carry
    idx = jax.random.choice(key, x_train.shape[0], (batch,), replace=False)
    xb, yb = x_train[idx], y_train[idx]
    if method.zeroth_order:
      updates, s = tx.update(None, s, p, obj_fn=lambda q: loss(q, xb, yb))
    else:
      updates, s = tx.update(jax.grad(loss)(p, xb, yb), s, p)
    return (optax.apply_updates(p, updates), s), None

  @jax.jit
  def run(p, s, keys):
    (p, s), _ = jax.lax.scan(one_step, (p, s), keys)
    acc = models.accuracy(model.apply({'params': p}, x_test), y_test)
    return p, s, acc

  if method.zeroth_order:
    evals_per_step = zojax.estimate_info(state).evals_per_step
    total_steps = max(1, eval_budget // evals_per_step)
    steps_per_log = max(1, evals_between_logs // evals_per_step)
  else:
    evals_per_step, total_steps = 1, fo_steps
    steps_per_log = max(1, fo_steps // 200)
  # whole chunks only: every call of `run` has the same length, so it
  # compiles once (a shorter last chunk would compile again)
  steps_per_log = min(steps_per_log, total_steps)
  total_steps -= total_steps % steps_per_log
  log = dict(method=method.name, evals=[], steps=[], test_accuracy=[],
             seconds=[])
  key = jax.random.PRNGKey(seed + 1)
  bar = _progress(total_steps, method.name)
  done, elapsed = 0, 0.0
  while done < total_steps:
    n = steps_per_log
    key, sub = jax.random.split(key)
    start = time.perf_counter()
    params, state, acc = run(params, state, jax.random.split(sub, n))
    acc = float(acc)
    elapsed += time.perf_counter() - start
    done += n
    evals = (zojax.estimate_info(state).num_evals if method.zeroth_order
             else done)
    for field, value in (('evals', evals), ('steps', done),
                         ('test_accuracy', acc), ('seconds', elapsed)):
      log[field].append(value)
    if bar is not None:
      bar.update(n)
      bar.set_postfix(acc=f'{acc:.3f}', evals=f'{evals:,}')
  if bar is not None:
    bar.close()
  return log


def plot(logs, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_evals, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
  for log in logs:
    fo = log['method'].startswith('first-order')
    style = dict(label=log['method'], ls='--' if fo else '-')
    ax_evals.plot(log['evals'], log['test_accuracy'], **style)
    ax_time.plot(log['seconds'], log['test_accuracy'], **style)
  ax_evals.set_xscale('log')
  ax_evals.set_xlabel('objective evaluations (first-order: gradient steps)')
  ax_time.set_xlabel('training wall time (s)')
  for ax in (ax_evals, ax_time):
    ax.set_ylabel('test accuracy')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle('zojax demo: 2-layer MLP (2,410 params) on digits')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      default=os.environ.get('ZOJAX_QUICK') == '1')
  parser.add_argument('--eval-budget', type=int, default=1_500_000,
                      help='objective evaluations per zeroth-order method')
  parser.add_argument('--fo-steps', type=int, default=600)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--sigma', type=float, default=5e-3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='results')
  args = parser.parse_args(argv)
  if args.quick:
    args.eval_budget, args.fo_steps = 30_000, 60

  dataset = data_lib.digits(seed=args.seed)
  logs = []
  for method in methods(args.sigma):
    logs.append(train(method, dataset, eval_budget=args.eval_budget,
                      fo_steps=args.fo_steps, batch=args.batch,
                      evals_between_logs=args.eval_budget // 200,
                      seed=args.seed))

  print(f'\n{"method":<26} {"steps":>7} {"evals":>10} {"test acc":>9} '
        f'{"time (s)":>9}')
  for log in logs:
    evals = (f'{log["evals"][-1]:>10,}' if 'first-order' not in log['method']
             else f'{"(grads)":>10}')
    print(f'{log["method"]:<26} {log["steps"][-1]:>7} {evals} '
          f'{log["test_accuracy"][-1]:>9.3f} {log["seconds"][-1]:>9.1f}')
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'demo.json'), 'w') as f:
    json.dump(dict(config=vars(args), logs=logs), f, indent=1)
  png = os.path.join(args.out, 'demo.png')
  plot(logs, png)
  print(f'wrote {os.path.join(args.out, "demo.json")} and {png}')
  return logs


if __name__ == '__main__':
  main()
