"""Federated ZO reproductions: FZooS's experiments and FedKSeed's bytes.

1. ``synthetic``: the FZooS paper's quadratic clients (Shu et al., 2024,
   Sec. 6.1; ``zojax.federated.heterogeneous_quadratic``): d = 300, N = 5,
   heterogeneity C in {0.5, 5, 50}, T = 10 local steps, R = 50 rounds, Adam
   (lr 0.01) locally, 5 problem draws (the paper's count). FZooS (its local
   GP as in the reference code: Matern-5/2, ML lengthscale, the 150 nearest
   queries) against FedZO, FedProx and SCAFFOLD I/II (Q = 20 orthonormal
   directions, mu = 0.01, the reference code's settings), optimality gap
   against rounds and against queries, and the final gap split between the
   coordinates inside the box [0, 1] and those that escaped it; ablations:
   the former local GP (SE, l = 1, newest 150 queries), no ML (l = 1), no
   nearest selection (newest 150), Matern random features, no correction
   (gamma = 0), gamma_t = 1 (not adaptive), M = 1,000 features.
2. ``attack``: a federated black-box attack scaled to digits: N = 5 client
   CNNs, each trained (first-order, at set-up) on 6 of the 10 classes; one
   shared perturbation delta in [-0.2, 0.2]^64 of a test image, client
   objective the margin of its model (true-class logit minus the best other
   one); success when the clients' averaged softmax misclassifies. 16 test
   images the ensemble classifies correctly, one federated run each (a
   ``vmap`` over images), R = 30, T = 10.
3. ``metric``: non-differentiable metric optimization: an MLP (64-32-10)
   trained briefly on digits; the clients hold the test images split by
   class (2 classes each); they tune an offset in [-0.2, 0.2] of the last
   layer (330 numbers) to minimise 1 - macro-F1 on their data.
4. ``fedkseed``: FedKSeed on digits (MLP 64-32-10 from scratch, N = 8
   clients with Dirichlet(0.5) label shares, T = 20): test accuracy against
   rounds and bytes per round, beside FedZO (dense updates) and the dense
   encoding of the same FedKSeed updates.
5. ``timing``: per-round wall time for N = 8 and 64 clients (d = 300,
   M = 10,000 features) of every algorithm, on whatever device runs it.

  python experiments/federated.py                   # full run, all parts
  python experiments/federated.py --parts timing    # one part
  python experiments/federated.py --quick           # smoke run (CI)
  python experiments/federated.py --parts synthetic --methods FedZO --merge
      # rerun some methods, updating federated.json in place
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax import data as zdata
from zojax import federated
import harness
from harness import run_arguments, time_interleaved

PARTS = ('synthetic', 'attack', 'metric', 'fedkseed', 'timing')
ATTACK_EPS = 0.2
METRIC_EPS = 0.2


def baselines(local_steps: int, num_features: int) -> dict:
  """The FZooS paper's comparison (reference code's settings)."""
  return {
      'FZooS': federated.fed_fzoos(local_steps, num_features=num_features),
      'FedZO': federated.fedzo(local_steps),
      'FedProx': federated.fedprox(local_steps),
      'SCAFFOLD (I)': federated.scaffold(local_steps, variant=1),
      'SCAFFOLD (II)': federated.scaffold(local_steps, variant=2),
  }


def quick_subset(methods: dict, quick: bool, keep=('FZooS', 'FedZO')) -> dict:
  """All methods, or (smoke run) only those named in ``keep``."""
  if not quick:
    return methods
  return {k: v for k, v in methods.items() if k in keep}


def ablations(local_steps: int, num_features: int) -> dict:
  """FZooS without parts of it; the first three undo the local GP's
  defaults (Matérn-5/2, ML lengthscale, the 150 nearest of the newest
  1,000 queries) one or all at a time."""
  fzoos = lambda **kw: federated.fed_fzoos(local_steps,
                                           num_features=num_features, **kw)
  return {
      'FZooS, former GP (SE, l = 1, newest 150)': fzoos(
          kernel='se', lengthscale=1.0, history_size=150, num_nearest=None),
      'FZooS, l = 1 (no ML)': fzoos(lengthscale=1.0),
      'FZooS, newest 150 (no nearest)': fzoos(history_size=150,
                                              num_nearest=None),
      'FZooS, Matern features': fzoos(feature_kernel='matern52'),
      'FZooS, no correction': fzoos(correction='none'),
      'FZooS, gamma_t = 1': fzoos(correction='constant'),
      'FZooS, M = 1000': federated.fed_fzoos(local_steps,
                                             num_features=num_features // 10),
  }


def run_batched(algorithm, starts, client_fn, client_data, rounds, eval_fn):
  """Independent federated runs (one per leading index of ``starts`` and
  ``client_data``) as one ``vmap`` of the round; ``eval_fn`` after each.
  Returns the evaluations ``(runs, rounds, ...)`` and the cumulative
  queries ``(runs, rounds)``."""
  num_clients = jax.tree.leaves(client_data)[0].shape[1]
  state = jax.vmap(lambda p: algorithm.init(p, num_clients))(starts)
  step = jax.jit(jax.vmap(lambda p, s, d: algorithm.round(p, s, client_fn,
                                                          d)))
  evaluate = jax.jit(jax.vmap(eval_fn))
  params, curve, queries = starts, [], []
  for _ in range(rounds):
    params, state, info = step(params, state, client_data)
    curve.append(np.asarray(evaluate(params, client_data)))
    queries.append(np.asarray(info.queries))
  return np.stack(curve, 1), np.cumsum(np.stack(queries, 1), 1)


# ------------------------------------------------------------------ synthetic
def gap_parts(x: jax.Array) -> jax.Array:
  r"""The optimality gap of the quadratic clients' global objective and its
  split: :math:`F(x) - F^* = \frac{1}{10d}\sum_j (z_j + \frac12)^2`,
  :math:`z = 20\,\mathrm{clip}(x, 0, 1) - 10`, summed over the coordinates
  inside the box [0, 1] and over those that escaped it (where the clipped
  objective is flat: no gradient brings them back). Returns ``[gap, gap
  inside, gap escaped, number escaped]``."""
  z = 20 * jnp.clip(x, 0.0, 1.0) - 10
  per_coordinate = (z + 0.5) ** 2 / (10 * x.shape[0])
  inside = (x >= 0) & (x <= 1)
  return jnp.stack([jnp.sum(per_coordinate),
                    jnp.sum(jnp.where(inside, per_coordinate, 0.0)),
                    jnp.sum(jnp.where(inside, 0.0, per_coordinate)),
                    jnp.sum(~inside).astype(jnp.float32)])


def synthetic(quick: bool, trials: int = 5, methods=None,
              hets=(0.5, 5.0, 50.0)) -> dict:
  dim, rounds, steps, features = (30, 3, 3, 500) if quick else (
      300, 50, 10, 10_000)
  trials = 1 if quick else trials
  hets = (5.0,) if quick else hets
  algorithms = dict(baselines(steps, features), **ablations(steps, features))
  algorithms = quick_subset(algorithms, quick)
  if methods:
    algorithms = {k: v for k, v in algorithms.items() if k in methods}
  out = {}
  for het in hets:
    problems = [federated.heterogeneous_quadratic(
        jax.random.PRNGKey(t), dim=dim, heterogeneity=het)
                for t in range(trials)]
    starts = jnp.stack([p.start for p in problems])
    client_data = jax.tree.map(lambda *x: jnp.stack(x),
                               *[p.client_data for p in problems])
    client_fn = problems[0].client_fn
    optimum = problems[0].optimum
    measure = lambda x, d: jnp.concatenate([
        (jnp.mean(jax.vmap(lambda di: client_fn(x, di))(d)) - optimum)[None],
        gap_parts(x)])
    out[het] = {}
    for name, algorithm in algorithms.items():
      start = time.time()
      curves, queries = run_batched(algorithm, starts, client_fn,
                                    client_data, rounds, measure)
      gaps, final = curves[:, :, 0], curves[:, -1, 1:]
      out[het][name] = {
          'gap_mean': gaps.mean(0).tolist(),
          'gap_std': gaps.std(0).tolist(),
          'gap_final': gaps[:, -1].tolist(),
          'gap_inside_mean': curves[:, :, 2].mean(0).tolist(),
          'gap_inside_final': final[:, 1].tolist(),
          'gap_escaped_final': final[:, 2].tolist(),
          'escaped_final': final[:, 3].tolist(),
          'queries': queries[0].tolist(),
          'seconds': time.time() - start}
      print(f'C = {het:>4}: {name:42s} gap after {rounds} rounds '
            f'{gaps[:, -1].mean():.4f} +- {gaps[:, -1].std():.4f} (inside '
            f'{final[:, 1].mean():.4f}, escaped {final[:, 2].mean():.4f} '
            f'in {final[:, 3].mean():.1f} coords), '
            f'{int(queries[0, -1]):,} queries ({time.time() - start:.0f} s)',
            flush=True)
  return {'dim': dim, 'rounds': rounds, 'local_steps': steps,
          'trials': trials, 'num_features': features, 'results': out}


# -------------------------------------------------------------- attack (CNN)
class DigitsCNN(nn.Module):
  """A small CNN for 8x8 digits."""

  @nn.compact
  def __call__(self, images):
    x = nn.relu(nn.Conv(16, (3, 3))(images))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    return nn.Dense(10)(x.reshape(x.shape[:-3] + (-1,)))


def train_clients(model, images, labels, masks, steps, seed=0):
  """One model per client, trained with Adam on the examples its mask
  selects; returns stacked params. The clients run one after the other
  (``lax.map``): a ``vmap`` of convolution gradients becomes a grouped
  convolution, 50x slower on XLA's CPU backend."""
  opt = optax.adam(3e-3)

  def loss(p, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, images), labels)
    return jnp.sum(ce * mask) / jnp.sum(mask)

  def train_one(key_and_mask):
    key, mask = key_and_mask
    params = model.init(key, images[:1])

    def step(carry, _):
      params, state = carry
      updates, state = opt.update(jax.grad(loss)(params, mask), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None,
                                  steps)
    return params

  keys = jax.random.split(jax.random.PRNGKey(seed), masks.shape[0])
  return jax.jit(lambda k, m: jax.lax.map(train_one, (k, m)))(keys, masks)


def attack(quick: bool) -> dict:
  data = zdata.digits()
  num_clients, classes_each = 5, 6
  rounds, steps, images = (3, 3, 2) if quick else (30, 10, 16)
  subsets = [[(2 * i + k) % 10 for k in range(classes_each)]
             for i in range(num_clients)]
  masks = jnp.asarray([np.isin(data.y_train, s) for s in subsets], jnp.float32)
  model = DigitsCNN()
  params = train_clients(model, jnp.asarray(data.x_train),
                         jnp.asarray(data.y_train), masks,
                         5 if quick else 400)
  logits = jax.vmap(lambda p: model.apply(p, jnp.asarray(data.x_test)))(params)
  client_acc = [float(np.mean(np.argmax(l, -1)[np.isin(data.y_test, s)]
                              == data.y_test[np.isin(data.y_test, s)]))
                for l, s in zip(np.asarray(logits), subsets)]
  ensemble = np.argmax(np.asarray(jax.nn.softmax(logits).mean(0)), -1)
  correct = np.flatnonzero(ensemble == data.y_test)[:images]
  print(f'client CNN accuracy on their own classes: '
        f'{np.round(client_acc, 3).tolist()}; ensemble accuracy '
        f'{np.mean(ensemble == data.y_test):.3f}', flush=True)
  image_set = jnp.asarray(data.x_test[correct])
  label_set = jnp.asarray(data.y_test[correct])
  # Client data: its model (stacked over clients) and the attacked image.
  client_data = {
      'params': jax.tree.map(
          lambda x: jnp.broadcast_to(x, (len(correct),) + x.shape), params),
      'image': jnp.broadcast_to(image_set[:, None],
                                (len(correct), num_clients) + (8, 8, 1)),
      'label': jnp.broadcast_to(label_set[:, None], (len(correct),
                                                     num_clients)),
  }

  def perturbed(x, image):
    delta = ATTACK_EPS * (2 * jnp.clip(x, 0, 1) - 1)
    return jnp.clip(image + delta.reshape(8, 8, 1), 0, 1)

  def client_fn(x, client):
    out = model.apply(client['params'], perturbed(x, client['image']))
    true = out[client['label']]
    other = jnp.max(jnp.where(jnp.arange(10) == client['label'], -jnp.inf,
                              out))
    return true - other

  def success(x, clients):
    probs = jax.vmap(lambda c: jax.nn.softmax(model.apply(
        c['params'], perturbed(x, c['image']))))(clients)
    return jnp.argmax(probs.mean(0)) != clients['label'][0]

  starts = jnp.full((len(correct), 64), 0.5)
  out = {}
  for name, algorithm in quick_subset(baselines(
      steps, 1000 if quick else 10_000), quick, keep=('FedZO',)).items():
    start = time.time()
    rate, queries = run_batched(algorithm, starts, client_fn, client_data,
                                rounds, success)
    out[name] = {'success_rate': rate.mean(0).tolist(),
                 'queries': queries[0].tolist()}
    print(f'attack: {name:14s} success rate after {rounds} rounds '
          f'{rate[:, -1].mean():.3f} ({int(queries[0, -1]):,} queries, '
          f'{time.time() - start:.0f} s)', flush=True)
  return {'client_accuracy': client_acc, 'images': int(len(correct)),
          'rounds': rounds, 'local_steps': steps, 'epsilon': ATTACK_EPS,
          'results': out}


# ------------------------------------------------------------------- metric
class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[:-3] + (-1,))))
    return nn.Dense(10)(x)


def macro_f1(predictions, labels, weights):
  """sklearn's macro F1 over the classes present in the labels or the
  predictions, of the examples with weight 1."""
  classes = jnp.arange(10)
  pred = (predictions[:, None] == classes) * weights[:, None]
  true = (labels[:, None] == classes) * weights[:, None]
  tp = jnp.sum(pred * true, 0)
  denominator = jnp.sum(pred, 0) + jnp.sum(true, 0)
  present = denominator > 0
  f1 = jnp.where(present, 2 * tp / jnp.maximum(denominator, 1), 0.0)
  return jnp.sum(f1) / jnp.sum(present)


def metric(quick: bool) -> dict:
  data = zdata.digits()
  num_clients = 5
  rounds, steps = (3, 3) if quick else (30, 10)
  model = MLP()
  images = jnp.asarray(data.x_train)
  params = train_clients(model, images, jnp.asarray(data.y_train),
                         jnp.ones((1, len(data.y_train))), 25)
  params = jax.tree.map(lambda x: x[0], params)
  features = jax.nn.relu(
      jnp.asarray(data.x_test).reshape(-1, 64)
      @ params['params']['Dense_0']['kernel']
      + params['params']['Dense_0']['bias'])
  last = params['params']['Dense_1']
  base = jnp.concatenate([last['kernel'].ravel(), last['bias']])
  labels = jnp.asarray(data.y_test)
  masks = jnp.asarray([np.isin(data.y_test, [2 * i, 2 * i + 1])
                       for i in range(num_clients)], jnp.float32)

  def predictions(x):
    w = base + METRIC_EPS * (2 * jnp.clip(x, 0, 1) - 1)
    logits = features @ w[:320].reshape(32, 10) + w[320:]
    return jnp.argmax(logits, -1)

  def client_fn(x, mask):
    return 1 - macro_f1(predictions(x), labels, mask)

  def global_error(x, masks):
    return jnp.mean(jax.vmap(lambda m: client_fn(x, m))(masks))

  start_x = jnp.full((1, 330), 0.5)
  out = {}
  test_f1 = lambda x: float(macro_f1(predictions(x), labels,
                                     jnp.ones_like(labels, jnp.float32)))
  print(f'metric: start 1 - F1 (mean over clients) '
        f'{float(global_error(start_x[0], masks)):.4f}, test macro-F1 '
        f'{test_f1(start_x[0]):.4f}', flush=True)
  for name, algorithm in quick_subset(baselines(
      steps, 1000 if quick else 10_000), quick, keep=('FedZO',)).items():
    curve, queries = run_batched(algorithm, start_x, client_fn, masks[None],
                                 rounds, global_error)
    out[name] = {'error': curve[0].tolist(), 'queries': queries[0].tolist()}
    print(f'metric: {name:14s} 1 - F1 after {rounds} rounds '
          f'{curve[0, -1]:.4f} ({int(queries[0, -1]):,} queries)', flush=True)
  return {'start_error': float(global_error(start_x[0], masks)),
          'rounds': rounds, 'local_steps': steps, 'results': out}


# ------------------------------------------------------------------ fedkseed
def fedkseed(quick: bool) -> dict:
  data = zdata.digits()
  num_clients, steps = 8, 20
  rounds = 5 if quick else 200
  rng = np.random.default_rng(0)
  shares = rng.dirichlet(np.full(num_clients, 0.5), size=10)  # class -> client
  owner = np.array([rng.choice(num_clients, p=shares[y])
                    for y in data.y_train])
  per_client = max(np.bincount(owner, minlength=num_clients))
  index = np.zeros((num_clients, per_client), np.int32)
  weight = np.zeros((num_clients, per_client), np.float32)
  for c in range(num_clients):
    mine = np.flatnonzero(owner == c)
    index[c, :len(mine)], weight[c, :len(mine)] = mine, 1.0
  client_data = {'index': jnp.asarray(index), 'weight': jnp.asarray(weight)}
  images, labels = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  model = MLP()
  params = model.init(jax.random.PRNGKey(0), images[:1])

  def client_fn(p, client):
    logits = model.apply(p, images[client['index']])
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels[client['index']])
    return jnp.sum(ce * client['weight']) / jnp.sum(client['weight'])

  test_x, test_y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  accuracy = lambda p: jnp.mean(jnp.argmax(model.apply(p, test_x), -1)
                                == test_y)
  dim = sum(x.size for x in jax.tree.leaves(params))
  methods = {
      'FedKSeed (K=1024)': federated.fedkseed(
          steps, num_seeds=1024, learning_rate=0.02, sigma=1e-3),
      'FedKSeed-Pro (K=1024)': federated.fedkseed(
          steps, num_seeds=1024, learning_rate=0.02, sigma=1e-3,
          sampling='importance'),
      'FedZO (Q=20, Adam)': federated.fedzo(steps),
  }
  weights = weight.sum(1) / weight.sum()
  out = {}
  for name, algorithm in methods.items():
    start = time.time()
    _, _, history = federated.run(algorithm, params, client_fn, client_data,
                                  rounds=rounds, weights=weights,
                                  eval_fn=accuracy)
    out[name] = {'accuracy': history['eval'].tolist(),
                 'bytes_up': history['bytes_up'].tolist(),
                 'bytes_down': history['bytes_down'].tolist(),
                 'queries': np.cumsum(history['queries']).tolist()}
    print(f'fedkseed: {name:22s} accuracy after {rounds} rounds '
          f'{history["eval"][-1]:.3f}; bytes/round up '
          f'{history["bytes_up"].mean():,.0f} down '
          f'{history["bytes_down"].mean():,.0f} ({time.time() - start:.0f} s)',
          flush=True)
  dense = num_clients * dim * federated.BYTES_PER_NUMBER
  print(f'fedkseed: the same updates sent densely: {dense:,} bytes each way '
        f'per round ({dim:,} parameters, {num_clients} clients)')
  return {'dim': dim, 'clients': num_clients, 'local_steps': steps,
          'rounds': rounds, 'dense_bytes_each_way': dense, 'results': out}


# -------------------------------------------------------------------- timing
def timing(quick: bool) -> dict:
  dim, features = (30, 1000) if quick else (300, 10_000)
  rows = []
  for clients in ((8,) if quick else (8, 64)):
    prob = federated.heterogeneous_quadratic(
        jax.random.PRNGKey(0), num_clients=clients, dim=dim, heterogeneity=5.)
    methods = quick_subset(baselines(10, features), quick, keep=('FedZO',))
    methods['FedKSeed (K=4096)'] = federated.fedkseed(10)
    calls = {}
    for name, algorithm in methods.items():
      state = algorithm.init(prob.start, clients)
      step = jax.jit(lambda p, s, a=algorithm: a.round(
          p, s, prob.client_fn, prob.client_data))
      calls[name] = (step, (prob.start, state))
    compile_start = time.time()
    best = time_interleaved(calls, 2 if quick else 5)
    for name, seconds in best.items():
      rows.append({'clients': clients, 'method': name,
                   'seconds_per_round': seconds})
      print(f'timing: N = {clients:3d} {name:18s} {1e3 * seconds:9.1f} ms '
            f'per round', flush=True)
    print(f'(N = {clients}: {time.time() - compile_start:.0f} s with compiles)')
  return {'device': jax.devices()[0].device_kind, 'dim': dim,
          'num_features': features, 'rows': rows}


# ------------------------------------------------------------------- figures
def plot(result: dict, path: str) -> None:
  """One panel per curve; every method keeps its colour across panels (one
  legend below), FZooS's ablations dashed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = []
  if 'synthetic' in result:
    for het, methods in result['synthetic']['results'].items():
      panels.append((f'quadratic, C = {het}: gap vs rounds', methods,
                     None, 'gap_mean', 'log'))
      panels.append((f'quadratic, C = {het}: gap vs queries', methods,
                     'queries', 'gap_mean', 'log'))
      if 'gap_inside_mean' in next(iter(methods.values())):
        panels.append((f'C = {het}: gap of the coordinates in [0, 1]',
                       methods, None, 'gap_inside_mean', 'log'))
  for part, key, title in (('attack', 'success_rate', 'attack success rate'),
                           ('metric', 'error', '1 - macro-F1'),
                           ('fedkseed', 'accuracy', 'FedKSeed: test accuracy')):
    if part in result:
      panels.append((title, result[part]['results'], None, key, 'linear'))
  if not panels:
    return
  names = list(dict.fromkeys(n for panel in panels for n in panel[1]))
  palette = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]
  colours = {n: palette[i % len(palette)] for i, n in enumerate(names)}
  cols = 4
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows),
                           squeeze=False)
  lines = {}
  for ax, (title, methods, xkey, ykey, scale) in zip(axes.flat, panels):
    for name, series in methods.items():
      y = np.asarray(series[ykey])
      x = np.asarray(series[xkey]) if xkey else np.arange(1, len(y) + 1)
      lines[name], = ax.plot(x, y, label=name, lw=1.4, color=colours[name],
                             ls='--' if name.startswith('FZooS,') else '-')
    ax.set_yscale(scale)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('queries' if xkey else 'round')
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  fig.legend(list(lines.values()), list(lines), loc='lower center',
             ncol=4, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.03 + 0.025 * -(-len(lines) // 4) / rows, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def merge_into(path: str, result: dict) -> dict:
  """``result`` written over the JSON at ``path`` (nested dicts merged, so
  a run of some parts or some methods updates only those)."""
  def merged(old, new):
    if not (isinstance(old, dict) and isinstance(new, dict)):
      return new
    return {**old, **{k: merged(old.get(k), v) for k, v in new.items()}}

  if not os.path.exists(path):
    return result
  with open(path) as f:
    return merged(json.load(f), json.loads(json.dumps(result)))


def main(argv=None) -> dict:
  parser = run_arguments(__doc__.splitlines()[0])
  parser.add_argument('--parts', nargs='+', default=list(PARTS),
                      choices=PARTS)
  parser.add_argument('--trials', type=int, default=5,
                      help='problem draws of the synthetic part')
  parser.add_argument('--methods', nargs='+', default=None,
                      help='only these methods in the synthetic part')
  parser.add_argument('--hets', nargs='+', type=float,
                      default=[0.5, 5.0, 50.0],
                      help='heterogeneities C of the synthetic part')
  parser.add_argument('--merge', action='store_true',
                      help='update federated.json in --out with what ran')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  parts = {'synthetic': lambda quick: synthetic(
      quick, args.trials, args.methods, tuple(args.hets)),
           'attack': attack, 'metric': metric, 'fedkseed': fedkseed,
           'timing': timing}
  result = {'quick': args.quick}
  for name in args.parts:
    result[name] = parts[name](args.quick)
  result['seconds'] = time.time() - start
  tag = '' if args.merge or set(args.parts) == set(PARTS) else (
      '_' + '_'.join(args.parts))
  path = os.path.join(args.out, f'federated{tag}.json')
  if args.merge:
    result = merge_into(path, result)
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, f'federated{tag}.png'))
  print(f'wrote {harness.shown(args.out)}/federated{tag}.json and .png '
        f'({result["seconds"]:.0f} s)')
  return result


if __name__ == '__main__':
  main()
