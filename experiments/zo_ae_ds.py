"""ZO-AE-DS on digits: robustify a black-box classifier with ZO gradients.

Zhang et al., "How to Robustify Black-Box ML Models? A Zeroth-Order
Optimization Perspective" (ICLR 2022). A classifier ``f`` (a small CNN,
trained first-order on clean digits, then only *queried*) gets a denoiser
``D`` in front of it; randomized smoothing of ``f(D(x + delta))`` gives
certified l2 robustness (Cohen et al., 2019). ``D`` is trained through the
black box with zeroth-order gradients, taken with ``zojax.black_box``:

* FO-DS: D fine-tuned with the true gradients of f (white-box upper bound);
* ZO-DS: the ZO estimate on the 64-pixel denoiser output (RGE, directions
  on the unit sphere, q = 16), backpropagated into D;
* ZO-AE-DS: an autoencoder between D and f; the ZO estimate is taken in its
  16-dimensional latent space on f(decoder(z)) (CGE: 16 coordinate queries,
  the paper's best variant), backpropagated into the encoder and D; the
  decoder is frozen. Same queries per example and step as ZO-DS.

All start from the same denoiser pre-trained with MSE (no classifier
needed), which is also reported, with "no denoiser" (smoothing f itself).
Certification: CERTIFY of Cohen et al. with n0 = 100 selection samples,
n = 1000 estimation samples (200 in quick mode), alpha = 0.001, smoothing
sigma = 0.5 on pixels in [0, 1] (the largest radius n = 1000 samples can
certify is 0.5 * Phi^-1(alpha^(1/n)) = 1.23); certified accuracy at l2
radii 0-1.

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
from harness import run_arguments
from zojax import data, models

SMOOTHING_SIGMA = 0.5
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
LATENT = 16
QUERIES = 16
ZO_SIGMA = 5e-3


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


def fit(loss_fn, params, steps, lr, key, num_examples, batch_size=64):
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


def main(argv=None) -> dict:
  args = run_arguments(__doc__.splitlines()[0]).parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  quick = args.quick
  steps = 60 if quick else 1500
  n_test, n_samples = (30, 200) if quick else (200, 1000)
  ds = data.digits(test_fraction=0.25, seed=0)
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  key = jax.random.PRNGKey(0)
  keys = iter(jax.random.split(key, 16))

  # 1. The classifier: trained first-order on clean images, then a black box.
  cnn = models.SmallCNN((16, 32))
  cnn_params = cnn.init(next(keys), x_train[:1])['params']
  cnn_params = fit(
      lambda p, k, i: models.cross_entropy(
          cnn.apply({'params': p}, x_train[i]), y_train[i]),
      cnn_params, 200 if quick else 1500, 3e-3, next(keys), len(y_train))
  logits_of = jax.jit(lambda x: cnn.apply({'params': cnn_params}, x))
  clean_accuracy = float(models.accuracy(logits_of(ds.x_test), ds.y_test))

  # 2. Pre-training with MSE only (no classifier): denoiser and autoencoder.
  noisy = lambda k, i: x_train[i] + SMOOTHING_SIGMA * jax.random.normal(
      k, x_train[i].shape)
  denoiser, encoder, decoder = Denoiser(), Encoder(), Decoder()
  den0 = denoiser.init(next(keys), x_train[:1])['params']
  den0 = fit(lambda p, k, i: jnp.mean(
      (denoiser.apply({'params': p}, noisy(k, i)) - x_train[i]) ** 2),
      den0, steps, 1e-3, next(keys), len(y_train))
  ae0 = {'enc': encoder.init(next(keys), x_train[:1])['params'],
         'dec': decoder.init(next(keys), jnp.zeros((1, LATENT)))['params']}
  autoencode = lambda p, x: decoder.apply({'params': p['dec']}, encoder.apply(
      {'params': p['enc']}, x))
  ae0 = fit(lambda p, k, i: jnp.mean((autoencode(p, x_train[i])
                                      - x_train[i]) ** 2),
            ae0, steps, 1e-3, next(keys), len(y_train))

  # 3. Fine-tuning through the classifier: FO, ZO on pixels, ZO in latent.
  def fo_ds(p, k, i):
    out = denoiser.apply({'params': p}, noisy(k, i))
    return jnp.mean(per_example_ce(cnn.apply({'params': cnn_params}, out),
                                   y_train[i]))

  def zo_ds(p, k, i):
    noise_key, zo_key = jax.random.split(k)
    queried = zojax.black_box(
        lambda imgs: per_example_ce(logits_of(imgs), y_train[i]), ZO_SIGMA,
        num_queries=QUERIES, directions='sphere')
    return jnp.mean(queried(zo_key, denoiser.apply({'params': p},
                                                    noisy(noise_key, i))))

  def zo_ae_ds(p, k, i):
    noise_key, zo_key = jax.random.split(k)
    queried = zojax.black_box(
        lambda z: per_example_ce(logits_of(decoder.apply(
            {'params': ae0['dec']}, z)), y_train[i]),
        ZO_SIGMA, directions='coordinates')
    latent = encoder.apply({'params': p['enc']}, denoiser.apply(
        {'params': p['den']}, noisy(noise_key, i)))
    return jnp.mean(queried(zo_key, latent))

  fine_steps = steps
  fo_params = fit(fo_ds, den0, fine_steps, 1e-3, next(keys), len(y_train))
  zo_params = fit(zo_ds, den0, fine_steps, 1e-3, next(keys), len(y_train))
  zoae_params = fit(zo_ae_ds, {'den': den0, 'enc': ae0['enc']}, fine_steps,
                    1e-3, next(keys), len(y_train))

  pipelines = {
      'no denoiser': logits_of,
      'MSE-trained denoiser (no classifier)': lambda x: logits_of(
          denoiser.apply({'params': den0}, x)),
      'FO-DS (white-box)': lambda x: logits_of(
          denoiser.apply({'params': fo_params}, x)),
      'ZO-DS (RGE on 64 pixels, q=16)': lambda x: logits_of(
          denoiser.apply({'params': zo_params}, x)),
      'ZO-AE-DS (CGE on 16 latents)': lambda x: logits_of(decoder.apply(
          {'params': ae0['dec']}, encoder.apply(
              {'params': zoae_params['enc']}, denoiser.apply(
                  {'params': zoae_params['den']}, x)))),
  }
  batch = 64
  queries_per_step = {
      'ZO-DS (RGE on 64 pixels, q=16)': batch * (QUERIES + 1),
      'ZO-AE-DS (CGE on 16 latents)': batch * (LATENT + 1)}
  test_x, test_y = ds.x_test[:n_test], ds.y_test[:n_test]
  rows = []
  for name, predict in pipelines.items():
    certified = certify(predict, jnp.asarray(test_x), test_y,
                        jax.random.PRNGKey(7), 100, n_samples)
    noisy_test = jnp.asarray(ds.x_test) + SMOOTHING_SIGMA * jax.random.normal(
        jax.random.PRNGKey(8), ds.x_test.shape)
    rows.append({
        'method': name, 'certified_accuracy': certified,
        'noisy_accuracy': float(models.accuracy(predict(noisy_test),
                                                ds.y_test)),
        'black_box_queries': (queries_per_step[name] * fine_steps
                              if name in queries_per_step else 0)})
    print(name, rows[-1], flush=True)

  print(f'\nclassifier clean test accuracy {clean_accuracy:.3f}; smoothing '
        f'sigma {SMOOTHING_SIGMA}; {n_test} test images, n = {n_samples}\n')
  header = ' | '.join(f'r = {r:g}' for r in RADII)
  print(f'| method | {header} | noisy acc. | black-box queries |\n|---|'
        + '---|' * (len(RADII) + 2))
  for r in rows:
    cells = ' | '.join(f"{r['certified_accuracy'][f'{x:g}']:.2f}"
                       for x in RADII)
    print(f"| {r['method']} | {cells} | {r['noisy_accuracy']:.3f} | "
          f"{r['black_box_queries']:,} |")
  plot(rows, os.path.join(args.out, 'zo_ae_ds.png'))
  result = {'quick': quick, 'clean_accuracy': clean_accuracy,
            'smoothing_sigma': SMOOTHING_SIGMA, 'test_images': n_test,
            'certify_samples': n_samples, 'alpha': 1e-3,
            'fine_tune_steps': fine_steps, 'rows': rows,
            'seconds': time.time() - start}
  with open(os.path.join(args.out, 'zo_ae_ds.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {args.out}/zo_ae_ds.json, zo_ae_ds.png '
        f'({result["seconds"]:.0f} s)')
  return result


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
