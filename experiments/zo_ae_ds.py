"""ZO-AE-DS on digits: robustify a black-box classifier with ZO gradients.

Zhang et al., "How to Robustify Black-Box ML Models? A Zeroth-Order
Optimization Perspective" (ICLR 2022). A classifier ``f`` (a small CNN,
trained first-order on clean digits, then only *queried*) gets a denoiser
``D`` in front of it; randomized smoothing of ``f(D(x + delta))`` gives
certified l2 robustness (Cohen et al., 2019). ``D`` is trained through the
black box with zeroth-order gradients, taken with ``zojax.black_box``:

* FO-DS: D fine-tuned with the true gradients of f (white-box upper bound);
* ZO-DS: the ZO estimate on the 64-pixel denoiser output (RGE, forward
  differences, directions on the unit sphere), backpropagated into D; with
  q = 16 (q = the latent size, as the paper's q = 192 on CIFAR-10) and with
  q = 32 (the queries of central-difference ZO-AE-DS);
* ZO-AE-DS: an autoencoder between D and f; the ZO estimate is taken in its
  16-dimensional latent space on f(decoder(z)) (CGE, the paper's best
  variant), backpropagated into the encoder and D; the decoder is frozen.

Two choices follow the reference code (damon-demon/Black-Box-Defense,
``AE_DS_train.py``) by default and can be switched: ``--difference
central`` (its CGE: (f(z + mu e_j) - f(z - mu e_j)) / 2 mu, 2 x 16 queries
per example; ``forward``: 16 + f(z)) and ``--target clean_prediction`` (its
default ``--ground_truth original_output``: the loss is the cross-entropy
against the black box's prediction on the clean image, for FO-DS, ZO-DS and
ZO-AE-DS alike; ``label``: the true label). The full run also trains
ZO-AE-DS with each of the two other choices (ablation rows).

All start from the same denoiser pre-trained with MSE (no classifier
needed), which is also reported, with "no denoiser" (smoothing f itself).
Certification: CERTIFY of Cohen et al. with n0 = 100 selection samples,
n = 1000 estimation samples (200 in quick mode), alpha = 0.001, smoothing
sigma = 0.5 on pixels in [0, 1] (the largest radius n = 1000 samples can
certify is 0.5 * Phi^-1(alpha^(1/n)) = 1.23); certified accuracy at l2
radii 0-1. Black-box queries count every example query of training: the
estimate's, the forward value f(x) of each step, and (target
``clean_prediction``) one prediction per training image, made once.

  python experiments/zo_ae_ds.py            # full run: JSON + PNG in results/
  python experiments/zo_ae_ds.py --quick    # small smoke run (ZOJAX_QUICK=1)
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
from scipy import stats

import zojax
import harness
from harness import run_arguments
from zojax import data, models

SMOOTHING_SIGMA = 0.5
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
LATENT = 16
QUERIES = 16
ZO_SIGMA = 5e-3
BATCH = 64


class Denoiser(nn.Module):
  """A small residual convolutional denoiser for 8x8 images."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(32, (3, 3))(x))
    h = nn.relu(nn.Conv(32, (3, 3))(h))
    return x + nn.Conv(1, (3, 3))(h)


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(LATENT)(h)


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, z):
    h = nn.relu(nn.Dense(64)(z))
    return nn.Dense(64)(h).reshape(z.shape[0], 8, 8, 1)


def per_example_ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def batches(key, num_examples, batch_size, steps):
  keys = jax.random.split(key, steps)
  return [jax.random.choice(k, num_examples, (batch_size,), replace=False)
          for k in keys]


def fit(loss_fn, params, steps, lr, key, num_examples, batch_size=BATCH):
  """Adam on ``loss_fn(params, key, index)``; returns the trained params."""
  tx = optax.adam(lr)
  state = tx.init(params)

  @jax.jit
  def step(params, state, key, index):
    grads = jax.grad(loss_fn)(params, key, index)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  data_key, noise_key = jax.random.split(key)
  for i, index in enumerate(batches(data_key, num_examples, batch_size,
                                    steps)):
    params, state = step(params, state, jax.random.fold_in(noise_key, i),
                         index)
  return params


def certify(predict, images, labels, key, n0, n, alpha=1e-3):
  """Cohen et al.'s CERTIFY; certified accuracy at each radius of RADII."""
  def counts(image, key, num):
    """Class votes of ``predict`` on ``num`` noisy copies of ``image``."""
    chunk = min(500, num)
    assert num % chunk == 0, (num, chunk)

    def votes(k):
      noise = SMOOTHING_SIGMA * jax.random.normal(k, (chunk,) + image.shape)
      return jnp.bincount(jnp.argmax(predict(image[None] + noise), -1),
                          length=10)
    return jnp.sum(jax.lax.map(votes, jax.random.split(key, num // chunk)),
                   axis=0)

  counts = jax.jit(counts, static_argnums=2)
  results = []
  for i, (image, label) in enumerate(zip(images, labels)):
    k0, k1 = jax.random.split(jax.random.fold_in(key, i))
    top = int(jnp.argmax(counts(image, k0, n0)))
    hits = int(counts(image, k1, n)[top])
    p_lower = stats.beta.ppf(alpha, hits, n - hits + 1) if hits else 0.0
    if p_lower > 0.5:
      results.append((top, SMOOTHING_SIGMA * stats.norm.ppf(p_lower)))
    else:
      results.append((-1, 0.0))
  predictions = np.array([r[0] for r in results])
  radii = np.array([r[1] for r in results])
  return {f'{r:g}': float(np.mean((predictions == np.asarray(labels))
                                  & (radii >= r))) for r in RADII}


DIFFERENCES = ('central', 'forward')
TARGETS = ('clean_prediction', 'label')


def black_box_classifier(ds, quick, keys):
  """The CNN, trained first-order on clean images, then only queried."""
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  cnn = models.SmallCNN((16, 32))
  cnn_params = cnn.init(next(keys), x_train[:1])['params']
  cnn_params = fit(
      lambda p, k, i: models.cross_entropy(
          cnn.apply({'params': p}, x_train[i]), y_train[i]),
      cnn_params, 200 if quick else 1500, 3e-3, next(keys), len(y_train))
  return jax.jit(lambda x: cnn.apply({'params': cnn_params}, x))


def pretrain(x_train, steps, keys):
  """Denoiser and autoencoder trained with MSE only (no classifier)."""
  noisy = lambda k, i: x_train[i] + SMOOTHING_SIGMA * jax.random.normal(
      k, x_train[i].shape)
  denoiser, encoder, decoder = Denoiser(), Encoder(), Decoder()
  den0 = denoiser.init(next(keys), x_train[:1])['params']
  den0 = fit(lambda p, k, i: jnp.mean(
      (denoiser.apply({'params': p}, noisy(k, i)) - x_train[i]) ** 2),
      den0, steps, 1e-3, next(keys), len(x_train))
  ae0 = {'enc': encoder.init(next(keys), x_train[:1])['params'],
         'dec': decoder.init(next(keys), jnp.zeros((1, LATENT)))['params']}
  autoencode = lambda p, x: decoder.apply({'params': p['dec']}, encoder.apply(
      {'params': p['enc']}, x))
  ae0 = fit(lambda p, k, i: jnp.mean((autoencode(p, x_train[i])
                                      - x_train[i]) ** 2),
            ae0, steps, 1e-3, next(keys), len(x_train))
  return den0, ae0


def fine_tuning_losses(logits_of, x_train, targets, ae0):
  """The defender's losses ``(params, key, index) -> loss`` towards
  ``targets``: FO-DS, ZO-DS with ``q`` queries, ZO-AE-DS with a given
  difference and targets."""
  denoiser, encoder, decoder = Denoiser(), Encoder(), Decoder()
  noisy = lambda k, i: x_train[i] + SMOOTHING_SIGMA * jax.random.normal(
      k, x_train[i].shape)

  def fo_ds(p, k, i):
    out = denoiser.apply({'params': p}, noisy(k, i))
    return jnp.mean(per_example_ce(logits_of(out), targets[i]))

  def zo_ds(queries):
    def loss(p, k, i):
      noise_key, zo_key = jax.random.split(k)
      queried = zojax.black_box(
          lambda imgs: per_example_ce(logits_of(imgs), targets[i]), ZO_SIGMA,
          num_queries=queries, distribution='sphere')
      return jnp.mean(queried(zo_key, denoiser.apply({'params': p},
                                                      noisy(noise_key, i))))
    return loss

  def zo_ae_ds(difference, labels):
    def loss(p, k, i):
      noise_key, zo_key = jax.random.split(k)
      queried = zojax.black_box(
          lambda z: per_example_ce(logits_of(decoder.apply(
              {'params': ae0['dec']}, z)), labels[i]),
          ZO_SIGMA, distribution='coordinates', difference=difference)
      latent = encoder.apply({'params': p['enc']}, denoiser.apply(
          {'params': p['den']}, noisy(noise_key, i)))
      return jnp.mean(queried(zo_key, latent))
    return loss

  return fo_ds, zo_ds, zo_ae_ds


def pipelines(args, quick, logits_of, ds, keys):
  """name -> (predict, black-box queries spent in training)."""
  steps = 60 if quick else 1500
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  clean = jnp.argmax(logits_of(x_train), -1)  # one query per image, once
  targets = {'clean_prediction': clean, 'label': y_train}
  target_queries = {'clean_prediction': len(x_train), 'label': 0}
  den0, ae0 = pretrain(x_train, steps, keys)
  fo_ds, zo_ds, zo_ae_ds = fine_tuning_losses(
      logits_of, x_train, targets[args.target], ae0)
  denoiser, encoder, decoder = Denoiser(), Encoder(), Decoder()
  denoise = lambda p: lambda x: logits_of(denoiser.apply({'params': p}, x))
  through_ae = lambda p: lambda x: logits_of(decoder.apply(
      {'params': ae0['dec']}, encoder.apply({'params': p['enc']},
                                            denoiser.apply({'params': p['den']},
                                                           x))))
  train = lambda loss, start: fit(loss, start, steps, 1e-3, next(keys),
                                  len(y_train))
  per_step = lambda queries: BATCH * (queries + 1) * steps  # + f(x) each
  latent_queries = {'central': 2 * LATENT, 'forward': LATENT}
  out = {'no denoiser': (logits_of, 0),
         'MSE-trained denoiser (no classifier)': (denoise(den0), 0),
         'FO-DS (white-box)': (denoise(train(fo_ds, den0)), 0)}
  for q in sorted({LATENT, latent_queries[args.difference]}):
    out[f'ZO-DS (RGE on 64 pixels, q={q})'] = (
        denoise(train(zo_ds(q), den0)),
        per_step(q) + target_queries[args.target])
  start = {'den': den0, 'enc': ae0['enc']}
  runs = [(args.difference, args.target)]
  if not quick:  # ablations: the other difference, the other target
    runs += [(other, args.target) for other in DIFFERENCES
             if other != args.difference]
    runs += [(args.difference, other) for other in TARGETS
             if other != args.target]
  for difference, target in runs:
    loss = zo_ae_ds(difference, targets[target])
    name = f'ZO-AE-DS (CGE on {LATENT} latents, {difference}, {target})'
    out[name] = (through_ae(train(loss, start)),
                 per_step(latent_queries[difference])
                 + target_queries[target])
  return out


def main(argv=None) -> dict:
  parser = run_arguments(__doc__.splitlines()[0])
  parser.add_argument('--difference', choices=DIFFERENCES, default='central',
                      help="ZO-AE-DS's CGE differences (reference: central)")
  parser.add_argument('--target', choices=TARGETS,
                      default='clean_prediction',
                      help='the class the denoiser is trained towards '
                      "(reference: the black box's clean prediction)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  quick = args.quick
  n_test, n_samples = (30, 200) if quick else (200, 1000)
  ds = data.digits(test_fraction=0.25, seed=0)
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
  logits_of = black_box_classifier(ds, quick, keys)
  clean_accuracy = float(models.accuracy(logits_of(ds.x_test), ds.y_test))
  test_x, test_y = ds.x_test[:n_test], ds.y_test[:n_test]
  noisy_test = jnp.asarray(ds.x_test) + SMOOTHING_SIGMA * jax.random.normal(
      jax.random.PRNGKey(8), ds.x_test.shape)
  rows = []
  for name, (predict, queries) in pipelines(args, quick, logits_of, ds,
                                            keys).items():
    rows.append({
        'method': name,
        'certified_accuracy': certify(predict, jnp.asarray(test_x), test_y,
                                      jax.random.PRNGKey(7), 100, n_samples),
        'noisy_accuracy': float(models.accuracy(predict(noisy_test),
                                                ds.y_test)),
        'black_box_queries': queries})
    print(name, rows[-1], flush=True)
  print_table(rows, clean_accuracy, n_test, n_samples)
  plot(rows, os.path.join(args.out, 'zo_ae_ds.png'))
  result = {'quick': quick, 'config': harness.config(args),
            'clean_accuracy': clean_accuracy,
            'smoothing_sigma': SMOOTHING_SIGMA, 'test_images': n_test,
            'certify_samples': n_samples, 'alpha': 1e-3,
            'fine_tune_steps': 60 if quick else 1500, 'rows': rows,
            'seconds': time.time() - start}
  with open(os.path.join(args.out, 'zo_ae_ds.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {harness.shown(args.out)}/zo_ae_ds.json, zo_ae_ds.png '
        f'({result["seconds"]:.0f} s)')
  return result


def print_table(rows, clean_accuracy, n_test, n_samples):
  print(f'\nclassifier clean test accuracy {clean_accuracy:.3f}; smoothing '
        f'sigma {SMOOTHING_SIGMA}; {n_test} test images, n = {n_samples}\n')
  header = ' | '.join(f'r = {r:g}' for r in RADII)
  print(f'| method | {header} | noisy acc. | black-box queries |\n|---|'
        + '---|' * (len(RADII) + 2))
  for r in rows:
    cells = ' | '.join(f"{r['certified_accuracy'][f'{x:g}']:.3f}"
                       for x in RADII)
    print(f"| {r['method']} | {cells} | {r['noisy_accuracy']:.3f} | "
          f"{r['black_box_queries']:,} |")


def plot(rows, path):
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for r in rows:
    ax.plot(RADII, [r['certified_accuracy'][f'{x:g}'] for x in RADII], 'o-',
            label=r['method'])
  ax.set(xlabel='l2 radius', ylabel='certified accuracy', ylim=(0, 1),
         title=f'digits, randomized smoothing sigma = {SMOOTHING_SIGMA}')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  main()
