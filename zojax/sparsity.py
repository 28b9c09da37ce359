r"""DeepZero's sparsity-induced ZO training: ZO-GraSP layer ratios, random masks.

DeepZero (Chen et al., ICLR 2024) trains with CGE restricted to a sparse set
of coordinates: a pruning-at-initialization score computed with finite
differences only (ZO-GraSP) fixes how sparse each layer is, and every few
steps a fresh random mask with those per-layer ratios says which coordinates
CGE perturbs (``zojax.cge(mask=...)``).

1. :func:`zo_grasp_scores`: GraSP's score :math:`S = -\theta \odot Hg`
   (Wang et al., 2020) with the Hessian-gradient product from two RGE
   estimates, :math:`Hg \approx (\hat g(\theta + \delta\hat g) -
   \hat g(\theta)) / \delta`.
2. :func:`layer_sparsity`: prune globally the fraction ``sparsity`` of the
   entries with the smallest :math:`|S|` (as DeepZero, through PyTorch's
   ``global_unstructured`` with ``L1Unstructured``) and report the pruned
   fraction of each leaf.
3. :func:`random_mask`: for each leaf, exactly ``round((1 - s) n)`` of its
   ``n`` coordinates chosen uniformly at random (leaves without a ratio stay
   dense, like DeepZero's BatchNorm and bias parameters).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src.perturbable import Mask, resolve_mask
from zojax._src.rge import rge


def weight_leaves(params) -> Any:
  """The default leaves to sparsify: kernels (arrays with ndim >= 2)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def zo_grasp_scores(
    obj_fn,
    params: Any,
    *,
    num_queries: int = 64,
    sigma: float = 5e-3,
    step: float = 5e-3,
    distribution: str = 'gaussian',
    seed=0,
) -> Any:
  r"""ZO-GraSP importance scores :math:`S = -\theta \odot \widehat{Hg}`.

  .. math::
    \hat g_0 = \hat g(\theta), \qquad
    \hat g_1 = \hat g(\theta + \delta \hat g_0), \qquad
    \widehat{Hg} = (\hat g_1 - \hat g_0) / \delta,

  where :math:`\hat g` is a forward-difference RGE with ``num_queries``
  directions and radius ``sigma``, and :math:`\delta` = ``step``. Both
  estimates use the *same* directions (common random numbers), so their
  difference is a finite difference of the same directional slopes; DeepZero
  draws fresh directions for the second estimate, which only adds variance.
  Costs ``2 (num_queries + 1)`` evaluations of ``obj_fn``.

  Args:
    obj_fn: scalar objective of params (e.g. the loss on a batch with a few
      examples per class).
    params: the parameters at initialization.
    num_queries, sigma, distribution, seed: of the RGE estimates.
    step: :math:`\delta`.

  Returns:
    A params-shaped pytree of float32 scores.

  References:
    Wang, Zhang & Grosse, Picking Winning Tickets Before Training by
    Preserving Gradient Flow (GraSP), ICLR 2020; Chen et al., DeepZero, ICLR
    2024.
  """
  estimator = rge(num_queries, sigma, distribution=distribution, seed=seed)
  state = estimator.init(params)
  estimate = lambda p: estimator.update(None, state, p, obj_fn=obj_fn)[0]
  g0 = estimate(params)
  shifted = jax.tree.map(lambda p, g: p + step * g, params, g0)
  g1 = estimate(shifted)
  return jax.tree.map(
      lambda p, a, b: -jnp.asarray(p, jnp.float32) * (b - a) / step,
      params, g0, g1)


def layer_sparsity(scores: Any, sparsity: float,
                   include: Mask = None) -> Any:
  """Per-leaf pruned fraction after global pruning by ``|score|``.

  Prunes the fraction ``sparsity`` of all included entries with the smallest
  absolute score (ties broken by position) and returns, for every included
  leaf, the fraction of its entries pruned; excluded leaves get ``None``.

  Args:
    scores: params-shaped scores (e.g. from :func:`zo_grasp_scores`).
    sparsity: global fraction to prune, in [0, 1).
    include: which leaves take part (a mask pytree of Python bools or a
      callable, see :mod:`zojax.masks`); default: :func:`weight_leaves`.

  Returns:
    A params-shaped pytree of Python floats (or ``None``).
  """
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f'sparsity must be in [0, 1), got {sparsity!r}.')
  leaves, treedef = jax.tree.flatten(scores)
  chosen = _included(scores, include)
  sizes = [int(np.size(x)) for x, c in zip(leaves, chosen) if c]
  if not sizes:
    raise ValueError('layer_sparsity: no leaf is included.')
  flat = np.concatenate([np.abs(np.asarray(x, np.float64)).ravel()
                         for x, c in zip(leaves, chosen) if c])
  num_pruned = int(round(sparsity * flat.size))
  pruned = np.zeros(flat.size, bool)
  pruned[np.argsort(flat, kind='stable')[:num_pruned]] = True
  fractions = iter(np.split(pruned, np.cumsum(sizes)[:-1]))
  out = [float(np.mean(next(fractions))) if c else None for c in chosen]
  return jax.tree.unflatten(treedef, out)


def random_mask(key: jax.Array, params: Any, sparsity: Any) -> Any:
  """A random mask with the given per-leaf sparsity, for ``cge(mask=...)``.

  Each leaf with a ratio ``s`` keeps exactly ``round((1 - s) n)`` of its
  ``n`` entries, chosen uniformly without replacement (a fresh draw per
  ``key``: re-draw it on a schedule, as DeepZero does); a leaf whose ratio
  is ``None`` is kept whole (``True``).

  Args:
    key: PRNG key.
    params: the parameters (shapes only).
    sparsity: params-shaped pytree of floats or ``None`` (e.g. from
      :func:`layer_sparsity`).

  Returns:
    A params-shaped pytree of bool arrays (or ``True``).
  """
  leaves, treedef = jax.tree.flatten(params)
  ratios = treedef.flatten_up_to(sparsity)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, leaf, ratio in zip(keys, leaves, ratios):
    if ratio is None:
      out.append(True)
      continue
    size = int(np.size(leaf))
    keep = int(round((1.0 - ratio) * size))
    order = jax.random.permutation(k, size)
    mask = jnp.zeros(size, bool).at[order[:keep]].set(True)
    out.append(mask.reshape(np.shape(leaf)))
  return jax.tree.unflatten(treedef, out)


def _included(tree, include: Mask) -> list[bool]:
  rule = weight_leaves if include is None else include
  resolved = resolve_mask(rule, tree)
  for m in resolved:
    if not isinstance(m, bool):
      raise ValueError('include must select whole leaves (Python bools), '
                       'not elementwise masks.')
  return resolved
