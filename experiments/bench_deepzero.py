"""Seconds per sparse-CGE step on ResNet-20: naive CGE vs feature reuse.

DeepZero's setting: ResNet-20 (269,722 parameters, ``zojax.models.ResNet20``
as 11 stages), a batch of ``--batch`` (256) CIFAR-shaped random images, 90%
layer-wise sparsity (every kernel keeps 10% of its entries, drawn at random;
BatchNorm scales/biases and the classifier bias stay dense: 27,915
coordinates), forward differences, sigma = 5e-3. Methods:

* ``naive``: ``zojax.cge(mask=...)`` on the whole model: every query is the
  full network with its own one-coordinate-perturbed weights;
* ``reuse``: ``zojax.flax.feature_reuse_cge`` in full float32 (matmul/conv
  precision ``highest``): each leaf's queries start from the cached input of
  its stage, only that leaf is batched, the layers above run with shared
  weights on the (queries x batch) stack;
* ``reuse_tf32``: the same at the GPU's default precision (TF32 tensor-core
  convolutions);
* ``reuse_bf16``: the same with parameters and activations cast to bfloat16
  inside every stage (the loss in float32);
* ``diff``, ``diff_tf32``, ``diff_bf16``: feature reuse propagating each
  query's *change* of the activations (``difference_precision``), the
  matmuls/convolutions on changes in float32, TF32 (the GPU's default) or
  bfloat16, everything else in float32.

For each: compile time (the first call minus a step, split into trace,
lowering, XLA's compile and the first execution), the minimum step time over
``--repeats``, FLOPs and bytes accessed per step (XLA's cost analysis of the
same step without chunking, which it cannot count through loops), and the
estimate's quality: cosine with the autodiff gradient on the masked
coordinates and relative error against the ``reuse`` (float32) estimate. ``--cost-only`` prints the
FLOPs and bytes and the size of the chunked step's program (StableHLO lines)
without compiling or running anything.

  python experiments/bench_deepzero.py                # the full setting
  python experiments/bench_deepzero.py --quick        # ResNet-8, CPU-sized
  python experiments/bench_deepzero.py --methods diff_tf32 --profile 40
                                     # + the 40 kernels taking most time
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import zojax
import harness
import profile_step
from harness import run_arguments
from zojax import flax as zflax
from zojax import models

SIGMA = 5e-3
# method -> (matmul precision of the trace, difference_precision)
METHODS = {'naive': ('highest', None), 'reuse': ('highest', None),
           'reuse_tf32': (None, None), 'reuse_bf16': (None, None),
           'diff': ('highest', 'highest'), 'diff_tf32': ('highest', 'default'),
           'diff_bf16': ('highest', 'bfloat16')}


def problem(batch: int, blocks_per_stage: int, sparsity: float):
  """Stages, stage params, a random batch, the loss and a sparse mask."""
  modules = models.ResNet20(blocks_per_stage=blocks_per_stage).stages()
  key_x, key_y, key_p, key_m = jax.random.split(jax.random.PRNGKey(0), 4)
  images = jax.random.normal(key_x, (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(key_y, (batch,), 0, 10)
  params = zflax.init_stages(modules, key_p, images[:2])
  ratios = jax.tree.map(lambda x: sparsity if x.ndim >= 2 else None, params)
  mask = zojax.sparsity.random_mask(key_m, params, ratios)
  loss = lambda logits, data: models.cross_entropy(
      logits.astype(jnp.float32), data[1])
  return zflax.module_stages(modules), params, (images, labels), loss, mask


def in_bf16(stages):
  """Each stage computing in bfloat16 (params and input cast on entry)."""
  cast = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  return tuple(lambda p, h, s=s: s(cast(p), cast(h)) for s in stages)


def make_step(method, stages, loss, mask, chunk):
  if method == 'naive':
    objective = lambda p, data: loss(zflax.apply_stages(stages, p, data[0]),
                                     data)
    tx = zojax.cge(SIGMA, mask=mask, batch_size=chunk)
    return lambda p, data: tx.update(None, tx.init(p), p, obj_fn=objective,
                                     batch=data)[0]
  if method == 'reuse_bf16':
    stages = in_bf16(stages)
  tx = zflax.feature_reuse_cge(stages, loss, SIGMA, mask=mask,
                               batch_size=chunk,
                               difference_precision=METHODS[method][1])
  return lambda p, data: tx.update(None, tx.init(p), p, batch=data)[0]


def flat(tree, mask=None):
  leaves = jax.tree.leaves(tree)
  if mask is None:
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in leaves])
  masks = jax.tree.leaves(jax.tree.map(
      lambda m, x: np.broadcast_to(np.asarray(m), np.shape(x)), mask, tree))
  return np.concatenate([np.asarray(x, np.float64)[m]
                         for x, m in zip(leaves, masks)])


def step_cost(method, stages, params, batch, loss, mask) -> dict:
  """XLA's FLOPs and bytes of one unchunked step, from the lowered HLO (the
  CPU backend reports them without compiling; others may report nothing,
  then run ``--cost-only`` on a CPU: the counts do not depend on it)."""
  lowered = jax.jit(make_step(method, stages, loss, mask, None)).lower(
      params, batch)
  return lowered.cost_analysis() or {}


def program_lines(method, stages, params, batch, loss, mask, chunk) -> int:
  """Size of the jitted (chunked) step as lowered: its StableHLO lines."""
  return jax.jit(make_step(method, stages, loss, mask, chunk)).lower(
      params, batch).as_text().count('\n')


def measure(method, stages, params, batch, loss, mask, chunk, repeats,
            profile_top=0):
  precision = METHODS[method][0]
  with jax.default_matmul_precision(precision):
    step = jax.jit(make_step(method, stages, loss, mask, chunk))
    marks = [time.perf_counter()]
    traced = step.trace(params, batch)
    marks.append(time.perf_counter())
    lowered = traced.lower()
    marks.append(time.perf_counter())
    lowered.compile()
    marks.append(time.perf_counter())
    # jit's caches hold what was just traced and compiled: this call runs it
    estimate = jax.block_until_ready(step(params, batch))
    marks.append(time.perf_counter())
    compile_s = marks[-1] - marks[0]
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(params, batch))
      times.append(time.perf_counter() - start)
    cost = step_cost(method, stages, params, batch, loss, mask)
    kernels = (profile_step.traced_kernels(lambda: step(params, batch), 1,
                                           profile_top)
               if profile_top else None)
  return estimate, {
      'method': method,
      'precision': (precision or 'default') + (
          f'/{METHODS[method][1]}' if METHODS[method][1] else ''),
      'compile_s': compile_s - min(times), 'step_s': min(times),
      # where the first call's time goes: trace, lower, XLA's compile, and
      # the first execution minus a step (loading the executable)
      'compile_parts_s': dict(zip(
          ('trace', 'lower', 'compile', 'first_run'),
          np.diff(marks).tolist()[:3] + [marks[4] - marks[3] - min(times)])),
      'flops': float(cost.get('flops', float('nan'))),
      'bytes': float(cost.get('bytes accessed', float('nan'))),
      'kernels': kernels}


def main(argv=None):
  parser = run_arguments(__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--blocks', type=int, default=3,
                      help='basic blocks per stage (3: ResNet-20)')
  parser.add_argument('--sparsity', type=float, default=0.9)
  parser.add_argument('--chunk', type=int, default=64,
                      help='queries vmapped at once')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--methods', nargs='+', default=list(METHODS))
  parser.add_argument('--profile', type=int, default=0, metavar='TOP',
                      help='also trace one step and print its TOP kernels '
                      'by total time')
  parser.add_argument('--cost-only', action='store_true',
                      help='only print FLOPs and bytes per step (no timing)')
  parser.add_argument('--tag', default=None,
                      help='suffix of the output files (default: the '
                      'platform, plus _quick)')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.blocks, args.sparsity = 32, 1, 0.99
    args.chunk, args.repeats = 32, 1
  stages, params, batch, loss, mask = problem(args.batch, args.blocks,
                                              args.sparsity)
  if args.cost_only:
    for method in args.methods:
      with jax.default_matmul_precision(METHODS[method][0]):
        cost = step_cost(method, stages, params, batch, loss, mask)
        lines = program_lines(method, stages, params, batch, loss, mask,
                              args.chunk)
      print(f'{method:<12} {cost.get("flops", np.nan) / 1e12:8.2f} TFLOP '
            f'{cost.get("bytes accessed", np.nan) / 1e9:8.1f} GB per step, '
            f'program {lines} StableHLO lines', flush=True)
    return
  num_coords = int(sum(np.sum(np.broadcast_to(m, np.shape(x))) for m, x in
                       zip(jax.tree.leaves(mask), jax.tree.leaves(params))))
  with jax.default_matmul_precision('highest'):
    objective = lambda p: loss(zflax.apply_stages(stages, p, batch[0]), batch)
    true = flat(jax.jit(jax.grad(objective))(params), mask)
    forward = jax.jit(lambda p: zflax.apply_stages(stages, p, batch[0]))
    jax.block_until_ready(forward(params))
    start = time.perf_counter()
    jax.block_until_ready(forward(params))
    forward_s = time.perf_counter() - start

  tag = args.tag or (jax.devices()[0].platform + ('_quick' if args.quick
                                                  else ''))
  os.makedirs(args.out, exist_ok=True)
  out = os.path.join(args.out, f'bench_deepzero_{tag}')
  report = {'config': {'params': models.num_params(params),
                       'coordinates': num_coords, 'batch': args.batch,
                       'blocks_per_stage': args.blocks,
                       'sparsity': args.sparsity, 'chunk': args.chunk,
                       'sigma': SIGMA, 'forward_s': forward_s,
                       'device': str(jax.devices()[0].device_kind),
                       'jax': jax.__version__,
                       'machine': platform.machine()},
            'rows': []}
  print(f'{num_coords} coordinates of {models.num_params(params)} params, '
        f'batch {args.batch}, plain forward {forward_s * 1e3:.2f} ms')
  print(f'{"method":<12} {"precision":<17} {"compile s":>9} {"step s":>8} '
        f'{"ms/coord":>8} {"TFLOP":>7} {"GB":>7} {"cos(grad)":>9} '
        f'{"rel.err":>8}')
  reference = None
  for method in args.methods:
    estimate, row = measure(method, stages, params, batch, loss, mask,
                            args.chunk, args.repeats, args.profile)
    got = flat(estimate, mask)
    if method == 'reuse':
      reference = got
    row['cosine_to_autodiff'] = float(
        got @ true / (np.linalg.norm(got) * np.linalg.norm(true)))
    row['relative_error_to_reuse_f32'] = (
        float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
        if reference is not None else None)
    row['ms_per_coordinate'] = row['step_s'] / num_coords * 1e3
    report['rows'].append(row)
    rel = row['relative_error_to_reuse_f32']
    print(f'{method:<12} {row["precision"]:<17} {row["compile_s"]:9.1f} '
          f'{row["step_s"]:8.3f} {row["ms_per_coordinate"]:8.4f} '
          f'{row["flops"] / 1e12:7.2f} {row["bytes"] / 1e9:7.1f} '
          f'{row["cosine_to_autodiff"]:9.4f} '
          f'{"-" if rel is None else f"{rel:.2e}":>8}', flush=True)
    print('  first call: ' + ', '.join(
        f'{part} {seconds:.1f} s'
        for part, seconds in row['compile_parts_s'].items()), flush=True)
    profile_step.print_kernels(row['kernels'] or {}, indent='  ')
    with open(out + '.json', 'w') as f:
      json.dump(report, f, indent=1)
  print(f'wrote {harness.shown(out)}.json')


if __name__ == '__main__':
  main()
