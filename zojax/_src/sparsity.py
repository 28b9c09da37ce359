r"""DeepZero's sparsity-induced ZO training: ZO-GraSP layer ratios, masks.

DeepZero (Chen et al., ICLR 2024) trains with CGE restricted to a sparse set
of coordinates: a pruning-at-initialization score computed with finite
differences only (ZO-GraSP) fixes how sparse each layer is, and every few
steps a fresh random mask with those per-layer ratios says which coordinates
CGE perturbs (``zojax.cge(mask=...)``).

1. :func:`zo_grasp_scores`: GraSP's score :math:`S = -\theta \odot Hg`
   (Wang et al., 2020) with the Hessian-gradient product from two RGE
   estimates, as DeepZero's code computes it; :func:`cge_grasp_scores`: the
   same score from coordinate-wise differences (``3 (d + 1)`` evaluations,
   accurate where DeepZero's is noise).
2. :func:`layer_sparsity`: prune globally the fraction ``sparsity`` of the
   entries with the smallest :math:`|S|` (as DeepZero, through PyTorch's
   ``global_unstructured`` with ``L1Unstructured``) and report the pruned
   fraction of each leaf.
3. :func:`random_mask`: for each leaf, exactly ``round((1 - s) n)`` of its
   ``n`` coordinates chosen uniformly at random (leaves without a ratio stay
   dense, like DeepZero's BatchNorm and bias parameters).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.perturbable import Mask, Perturbable, resolve_mask
from zojax._src.estimators.cge import cge
from zojax._src.query import directions
from zojax._src.query import engine
from zojax._src.query import probes


def weight_leaves(params) -> Any:
  """The default leaves to sparsify: kernels (arrays with ndim >= 2)."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def zo_grasp_scores(
    obj_fn,
    params: Any,
    *,
    num_queries: int = 192,
    sigma: float = 5e-3,
    include: Mask = None,
    batch_size: Optional[int] = None,
    seed=0,
) -> Any:
  r"""DeepZero's ZO-GraSP scores :math:`S = -\theta \odot \widehat{Hg}`.

  DeepZero's estimator (``zoo_grasp_importance_score`` and ``rge`` in
  github.com/OPTML-Group/DeepZero, ``algorithm/``): with :math:`\mu` =
  ``sigma``, :math:`q` = ``num_queries`` and directions :math:`u_i` whose
  block :math:`u_{i,l}` on each included leaf :math:`l` is a Gaussian
  normalised to unit norm,

  .. math::
    \hat g(\theta) = \frac1q \sum_{i=1}^{q}
      \bigl(f(\theta + \mu u_i) - f(\theta)\bigr)\, u_i, \qquad
    \widehat{Hg} = \frac{\hat g'(\theta + \mu \hat g(\theta)) -
      \hat g(\theta)}{\mu},

  where :math:`\hat g'` draws *fresh* directions. Since
  :math:`E[u u^\top] = D = \operatorname{diag}(I_{d_l} / d_l)`,
  :math:`E \hat g = \mu D \nabla f + O(\mu^2)` (no :math:`\phi` factor: the
  difference is not divided by :math:`\mu`), and on a quadratic
  :math:`E \widehat{Hg} = \mu^2 D H D \nabla f` exactly. DeepZero's
  settings: :math:`\mu = 5 \cdot 10^{-3}`, :math:`q = 192`, 25 examples per
  class.

  What it measures. The shift :math:`\mu \hat g` is of order
  :math:`\mu^2 \|\nabla f\| / d_l`, below float32 resolution for networks
  (on the digits CNN of ``experiments/deepzero.py`` it leaves every weight
  unchanged), so :math:`\widehat{Hg}` is the difference of two independent
  RGE estimates: a noise of per-leaf scale :math:`\propto 1/\sqrt{d_l}`,
  and the per-layer ratios of :func:`layer_sparsity` are those of the
  random score :math:`|\theta_l| z / \sqrt{d_l}`, fixed by the layer sizes
  and initialisation scales, not by the Hessian. For the GraSP score
  itself use :func:`cge_grasp_scores`.

  Costs ``2 (num_queries + 1)`` evaluations of ``obj_fn``.

  Args:
    obj_fn: scalar objective of params (e.g. the loss on a batch with a few
      examples per class).
    params: the parameters at initialization.
    num_queries: :math:`q`, directions per estimate.
    sigma: :math:`\mu`, the radius of the differences and the step.
    include: which leaves are perturbed and scored (whole leaves, as in
      :func:`layer_sparsity`); default :func:`weight_leaves` (DeepZero
      perturbs the convolution and linear weights only).
    batch_size: queries evaluated at once (``vmap`` width); ``None``: all.
    seed: an integer or a PRNG key.

  Returns:
    A params-shaped pytree of float32 scores (zero on excluded leaves; NaN
    if an evaluation was not finite).

  References:
    Wang, Zhang & Grosse, Picking Winning Tickets Before Training by
    Preserving Gradient Flow (GraSP), ICLR 2020; Chen et al., DeepZero, ICLR
    2024.
  """
  checks.validate_positive_int('num_queries', num_queries)
  checks.validate_positive_float('sigma', sigma, allow_schedule=False)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  space = _space(params, include)
  first, second = keys.split(keys.key_data(seed))
  g0 = _layer_unit_rge(obj_fn, space, first, int(num_queries), sigma,
                       batch_size)
  shifted = space.shifted(g0, sigma)
  g1 = _layer_unit_rge(obj_fn, _space(shifted, include), second,
                       int(num_queries), sigma, batch_size)
  return _scores(space, [(b - a) / sigma for a, b in zip(g0, g1)])


def _layer_unit_rge(obj_fn, space: Perturbable, key, count: int, mu,
                    batch_size) -> tuple[jax.Array, ...]:
  r""":math:`\frac1q \sum_i (f(\theta + \mu u_i) - f(\theta)) u_i` on the
  active leaves, :math:`u_{i,l}` a unit-norm Gaussian per leaf (drawn by
  the one generator from ``leaf_key(query_key(key, i), path)``)."""

  def make(index):
    query = directions.query_key(key, index)
    draws = [directions.leaf_normal(directions.leaf_key(query, path), shape)
             for path, shape in zip(space.paths, space.shapes)]
    return tuple(z / jnp.linalg.norm(z) for z in draws)

  objective = lambda p: jnp.asarray(obj_fn(p), jnp.float32)
  base = objective(jax.tree.unflatten(space.treedef, space.leaves))
  probe = probes.finite_difference(objective, space, difference='forward',
                                   sigma=mu, base=base)
  units = engine.Directions(count, make, mu / count, space)
  summed, values = engine.weighted_direction_sum(units, probe, batch_size)
  finite = jnp.isfinite(base) & jnp.all(jnp.isfinite(values))
  return tuple(jnp.where(finite, units.scale * s, jnp.nan) for s in summed)


def cge_grasp_scores(
    obj_fn,
    params: Any,
    *,
    sigma: float = 5e-3,
    shift: float = 0.3,
    batch_size: Optional[int] = None,
) -> Any:
  r"""GraSP scores :math:`S = -\theta \odot \widehat{Hg}` from CGE.

  With :math:`\hat g` the forward-difference coordinate-wise estimate over
  all :math:`d` parameters (radius :math:`\sigma` = ``sigma``),
  :math:`v = \hat g(\theta) / \|\hat g(\theta)\|` and :math:`\epsilon` =
  ``shift``,

  .. math::
    \widehat{Hg} = \|\hat g(\theta)\|\,
      \frac{\hat g(\theta + \epsilon v) - \hat g(\theta - \epsilon v)}
           {2 \epsilon},

  a central difference of gradients along :math:`g` (error
  :math:`O(\epsilon^2)` on smooth objectives; the :math:`O(\sigma)` bias of
  forward differences cancels to first order). As in GraSP, :math:`g` and
  :math:`H` cover every parameter (biases and norms too: leaving them out
  changes :math:`Hg` on the kernels by ~25% on a small CNN); the scores of
  all leaves are returned and :func:`layer_sparsity` picks the kernels. A
  shift of fixed length makes the estimate independent of the gradient's
  scale; on ReLU networks a shift of a few tenths also averages over the
  kinks that autodiff's :math:`Hg` ignores. Costs ``3 (d + 1)``
  evaluations (three full CGE steps). Not in DeepZero, whose estimator is
  :func:`zo_grasp_scores`.

  Args:
    obj_fn: scalar objective of params.
    params: the parameters at initialization.
    sigma: radius of the coordinate differences.
    shift: :math:`\epsilon`, length of the shift along the gradient.
    batch_size: coordinates evaluated at once (``vmap`` width).

  Returns:
    A params-shaped pytree of float32 scores.

  References:
    Wang, Zhang & Grosse, GraSP, ICLR 2020.
  """
  checks.validate_positive_float('sigma', sigma, allow_schedule=False)
  checks.validate_positive_float('shift', shift, allow_schedule=False)
  space = Perturbable.build(params)
  estimator = cge(sigma, batch_size=batch_size)
  state = estimator.init(params)

  def gradient(p):
    estimate = estimator.update(None, state, p, obj_fn=obj_fn)[0]
    return [jnp.asarray(g, jnp.float32) for g in jax.tree.leaves(estimate)]

  g0 = gradient(params)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in g0))
  along = [g / norm for g in g0]
  plus = gradient(space.shifted(along, shift))
  minus = gradient(space.shifted(along, -shift))
  return _scores(space, [norm * (a - b) / (2 * shift)
                         for a, b in zip(plus, minus)])


def _space(params, include: Mask) -> Perturbable:
  """The included leaves of ``params`` as a :class:`Perturbable`."""
  chosen = _included(params, include)
  if not any(chosen):
    raise ValueError('no leaf is included: nothing to score.')
  return Perturbable.build(params, jax.tree.unflatten(
      jax.tree.structure(params), chosen))


def _scores(space: Perturbable, hg) -> Any:
  r""":math:`-\theta \odot Hg` on the active leaves, zeros elsewhere."""
  scores = [-jnp.asarray(space.leaves[i], jnp.float32) * h
            for i, h in zip(space.active, hg)]
  out = [jnp.zeros(jnp.shape(leaf), jnp.float32) for leaf in space.leaves]
  for i, s in zip(space.active, scores):
    out[i] = s
  return jax.tree.unflatten(space.treedef, out)


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
