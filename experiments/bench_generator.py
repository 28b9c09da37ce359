"""What drawing MeZO's perturbation costs: generators of normals compared.

A MeZO step on a model of ``n`` parameters draws ``n`` normals for the
perturbation (both signs share one draw) and ``n`` more for the update. This
script times one such pass alone: ``--elements`` bf16 entries (default 2**30,
about the 1.07B decoder of ``bench_mezo.py``), rewritten in place block by
block (``--block`` entries, a ``fori_loop`` of ``dynamic_update_slice`` as in
``zojax``'s ``map_blocks``) as ``x + 1e-3 * z``, for these ways of drawing
``z`` (each entry a pure function of the key and its position):

* ``floor``: ``x + 1e-3`` (no draw: the memory traffic of the pass);
* ``threefry_bits``: Threefry-2x32 words only, both words of a call used
  (the hash's cost);
* ``erfinv_only``: ``sqrt(2) erfinv`` of the position's bits (no hash: the
  transform's cost);
* ``zojax``: ``zojax``'s generator: one Threefry word per normal (word
  ``w`` is output ``w % 2`` of the call on counter ``w // 2``; on
  accelerators each word makes its own call, so that the draw is one
  fusion), 23 bits through ``sqrt(2) erfinv`` (``jax.random.normal``'s
  construction);
* ``threefry16_erfinv``: one word per two normals, 16 bits each through
  ``sqrt(2) erfinv`` (half the Threefry calls);
* ``threefry16_boxmuller``: one word per two normals, Box-Muller on its two
  16-bit halves;
* ``threefry13_16_erfinv``: ``threefry16_erfinv`` on Threefry with 13
  rounds instead of 20;
* ``jax_random_normal``: ``jax.random.normal(fold_in(key, block))`` (the
  stock generator, for reference; not position-addressable).

  python experiments/bench_generator.py            # GPU: 2**30 entries
  python experiments/bench_generator.py --quick    # CPU-sized
"""

from __future__ import annotations

import json
import math
import os
import platform

import jax
import jax.numpy as jnp

import harness
from harness import run_arguments
from zojax._src.query import directions

SQRT2 = math.sqrt(2.0)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key, x0, x1, rounds: int):
  """Threefry-2x32 with ``rounds`` rounds (Salmon et al., SC'11: 20 is the
  default, 13 the fewest that pass BigCrush), key injected every 4 rounds;
  with 20 rounds it equals ``jax``'s ``threefry2x32_p`` (checked in
  ``tests/test_experiments.py``)."""
  schedule = (key[0], key[1], key[0] ^ key[1] ^ jnp.uint32(0x1BD11BDA))
  x0, x1 = x0 + schedule[0], x1 + schedule[1]
  for r in range(rounds):
    rotation = _ROTATIONS[(r // 4) % 2][r % 4]
    x0 = x0 + x1
    x1 = (x1 << jnp.uint32(rotation)) | (x1 >> jnp.uint32(32 - rotation))
    x1 = x1 ^ x0
    if r % 4 == 3:
      j = r // 4 + 1
      x0 = x0 + schedule[j % 3]
      x1 = x1 + schedule[(j + 1) % 3] + jnp.uint32(j)
  return x0, x1


def _threefry_words(key, rows, cols, rounds: int = 20):
  """``(rows, cols)`` words: both outputs of Threefry(key; row, w // 2),
  zojax's word stream (``directions.words``) for 20 rounds."""
  if rounds == 20:
    return directions.words(key, rows, 0, cols)
  pairs = -(-cols // 2)
  high = jnp.broadcast_to(rows[:, None], (rows.shape[0], pairs))
  low = jnp.broadcast_to(jnp.arange(pairs, dtype=jnp.uint32), high.shape)
  out0, out1 = threefry2x32(key, high, low, rounds)
  return jnp.stack([out0, out1], -1).reshape(rows.shape[0], -1)[:, :cols]


def _erfinv_normal(bits, mantissa_bits):
  """``sqrt(2) erfinv(u)``, ``u`` in (-1, 1) from the top bits of ``bits``."""
  levels = float(1 << mantissa_bits)
  u = (bits.astype(jnp.float32) + 0.5) * (2.0 / levels) - 1.0
  return SQRT2 * jax.lax.erf_inv(u)


def _halves(bits):
  return bits >> 16, bits & jnp.uint32(0xFFFF)


def _erfinv16(key, rows, cols, rounds=20):
  """Two normals per word, one from each 16-bit half."""
  high, low = _halves(_threefry_words(key, rows, -(-cols // 2), rounds))
  z = jnp.stack([_erfinv_normal(high, 16), _erfinv_normal(low, 16)], -1)
  return z.reshape(rows.shape[0], -1)[:, :cols]


def gen_floor(key, rows, cols):
  del key
  return jnp.ones((rows.shape[0], cols), jnp.float32)


def gen_threefry_bits(key, rows, cols):
  bits = _threefry_words(key, rows, cols)
  return jax.lax.bitcast_convert_type(
      (bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)


def gen_erfinv_only(key, rows, cols):
  del key
  position = rows[:, None] * jnp.uint32(cols) + jnp.arange(cols,
                                                           dtype=jnp.uint32)
  return _erfinv_normal(position >> 9, 23)


def gen_zojax(key, rows, cols):
  return directions.normal_from_words(directions.words(key, rows, 0, cols))


def gen_threefry16_erfinv(key, rows, cols):
  return _erfinv16(key, rows, cols)


def gen_threefry16_boxmuller(key, rows, cols):
  high, low = _halves(_threefry_words(key, rows, -(-cols // 2)))
  u1 = (high.astype(jnp.float32) + 0.5) * (1.0 / 65536.0)
  theta = (low.astype(jnp.float32) + 0.5) * (2.0 * math.pi / 65536.0)
  radius = jnp.sqrt(-2.0 * jnp.log(u1))
  z = jnp.stack([radius * jnp.cos(theta), radius * jnp.sin(theta)], -1)
  return z.reshape(rows.shape[0], -1)[:, :cols]


def gen_threefry13_16_erfinv(key, rows, cols):
  return _erfinv16(key, rows, cols, rounds=13)


def gen_jax_random_normal(key, rows, cols):
  typed = jax.random.wrap_key_data(key)
  return jax.random.normal(jax.random.fold_in(typed, rows[0]),
                           (rows.shape[0], cols))


GENERATORS = {name[4:]: fn for name, fn in globals().items()
              if name.startswith('gen_')}


def pass_fn(generator, block_rows: int):
  """``x + 1e-3 z`` over ``x`` of shape (R, C), ``block_rows`` rows a block."""

  def run(x, key):
    num_blocks = x.shape[0] // block_rows

    def body(i, x):
      start = i * block_rows
      rows = start.astype(jnp.uint32) + jnp.arange(block_rows,
                                                   dtype=jnp.uint32)
      block = jax.lax.dynamic_slice_in_dim(x, start, block_rows, 0)
      z = generator(key, rows, x.shape[1])
      return jax.lax.dynamic_update_slice_in_dim(
          x, (block + 1e-3 * z).astype(x.dtype), start, 0)

    return jax.lax.fori_loop(0, num_blocks, body, x)

  return jax.jit(run, donate_argnums=0)


def main(argv=None):
  parser = run_arguments(__doc__.splitlines()[0])
  parser.add_argument('--elements', type=int, default=1 << 30)
  parser.add_argument('--block', type=int, default=1 << 22)
  parser.add_argument('--cols', type=int, default=1 << 14)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--generators', nargs='+', default=list(GENERATORS))
  parser.add_argument('--tag', default='')
  args = parser.parse_args(argv)
  if args.quick:
    args.elements, args.block, args.cols, args.repeats = 1 << 22, 1 << 18, \
        1 << 10, 2
  shape = (args.elements // args.cols, args.cols)
  block_rows = max(1, args.block // args.cols)
  key = jax.random.key_data(jax.random.key(0))
  rows = {}
  for name in args.generators:
    fn = pass_fn(GENERATORS[name], block_rows)
    holder = {'x': jnp.zeros(shape, jnp.bfloat16)}

    def call():
      holder['x'] = fn(holder['x'], key)
      return holder['x']

    best = harness.time_interleaved({name: (call, ())}, args.repeats)[name]
    rows[name] = {'pass_s': best,
                  'normals_per_s': args.elements / best}
  base = rows.get('floor', {}).get('pass_s', float('nan'))
  print(f'{args.elements / 1e9:.3f}B bf16 entries, blocks of {args.block}, '
        f'backend {jax.default_backend()} ({jax.devices()[0].device_kind})')
  print(f'{"generator":>22} | {"pass ms":>8} | {"x floor":>7} | '
        f'{"G normals/s":>11}')
  for name, r in rows.items():
    print(f'{name:>22} | {1e3 * r["pass_s"]:8.2f} | {r["pass_s"] / base:7.2f}'
          f' | {r["normals_per_s"] / 1e9:11.1f}')
  os.makedirs(args.out, exist_ok=True)
  name = f'bench_generator{"_quick" if args.quick else ""}{args.tag}.json'
  with open(os.path.join(args.out, name), 'w') as f:
    json.dump({'config': harness.config(args), 'jax': jax.__version__,
               'device': jax.devices()[0].device_kind,
               'machine': platform.machine(), 'results': rows}, f, indent=1)
  print('wrote', harness.shown(os.path.join(args.out, name)))
  return rows


if __name__ == '__main__':
  main()
