"""Parameter selection for zeroth-order estimators.

Every function here returns a *mask rule*: a callable ``params -> mask`` that
``zojax.rge(mask=...)`` and ``zojax.cge(mask=...)`` accept (as does
``optax.masked``). A mask is a pytree like ``params`` whose leaves are Python
bools (a whole leaf in or out, known when tracing, so frozen leaves cost
nothing) or boolean arrays (coordinate-wise selection).

Example::

  only_head = zojax.masks.by_path(r'Dense_2')
  small = zojax.masks.by_magnitude(keep_fraction=0.2, keep='smallest')
  both = zojax.masks.intersect(only_head, small)
  tx = zojax.rge(16, 1e-3, mask=both)
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Union

import jax
import jax.numpy as jnp

from zojax._src.core.perturbable import leaf_paths, resolve_mask

MaskRule = Callable[[Any], Any]


def by_path(pattern: Union[str, Iterable[str]], *,
            exclude: bool = False) -> MaskRule:
  """Selects whole leaves whose '/'-joined path matches a regex.

  Paths look like ``'params/Dense_0/kernel'`` (``jax.tree_util.keystr`` with
  ``simple=True, separator='/'``); matching uses ``re.search``.

  Args:
    pattern: a regex, or several (a leaf is selected if any matches).
    exclude: select the leaves that do *not* match instead.

  Returns:
    A mask rule producing Python bools (static: frozen leaves cost nothing).
  """
  patterns = [pattern] if isinstance(pattern, str) else list(pattern)
  compiled = [re.compile(p) for p in patterns]

  def rule(params):
    selected = [any(c.search(path) for c in compiled) != exclude
                for path in leaf_paths(params)]
    return jax.tree.unflatten(jax.tree.structure(params), selected)

  return rule


def by_magnitude(keep_fraction: float, *, keep: str = 'smallest') -> MaskRule:
  """Selects, in every leaf, the entries of smallest (or largest) magnitude.

  The threshold is the per-leaf quantile of ``|θ|``, so each leaf keeps about
  ``keep_fraction`` of its entries (ties may keep a few more). It is computed
  from the params it is called on, so used as ``mask=`` it follows the
  parameters during training; call it once outside ``jit`` to freeze it.

  Args:
    keep_fraction: fraction of each leaf to select, in (0, 1].
    keep: ``'smallest'`` (Sparse MeZO's choice) or ``'largest'``.

  Returns:
    A mask rule producing boolean arrays.
  """
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f'keep_fraction must be in (0, 1], got {keep_fraction}.')
  if keep not in ('smallest', 'largest'):
    raise ValueError(f"keep must be 'smallest' or 'largest', got {keep!r}.")

  def leaf_mask(leaf):
    magnitude = jnp.abs(leaf.astype(jnp.float32))
    if keep == 'smallest':
      return magnitude <= jnp.quantile(magnitude, keep_fraction)
    return magnitude >= jnp.quantile(magnitude, 1.0 - keep_fraction)

  return lambda params: jax.tree.map(leaf_mask, params)


def intersect(*rules: MaskRule) -> MaskRule:
  """Coordinates selected by every rule (logical and)."""
  if not rules:
    raise ValueError('intersect needs at least one mask rule.')

  def rule(params):
    resolved = [resolve_mask(r, params) for r in rules]
    combined = []
    for per_leaf in zip(*resolved):
      if any(m is False for m in per_leaf):
        combined.append(False)
        continue
      arrays = [m for m in per_leaf if m is not True]
      combined.append(True if not arrays else
                      jnp.logical_and.reduce(jnp.stack(arrays)))
    return jax.tree.unflatten(jax.tree.structure(params), combined)

  return rule


def count_selected(mask, params) -> int:
  """Number of coordinates a mask (or mask rule) selects in ``params``."""
  total = 0
  for leaf, m in zip(jax.tree.leaves(params), resolve_mask(mask, params)):
    total += int(jnp.size(leaf)) if m is True else int(jnp.sum(m))
  return total


class MagnitudeThresholds:
  r"""Sparse MeZO's mask: in each layer, the entries of smallest magnitude.

  At every step the mask is :math:`|\theta| \le h_l` with :math:`h_l` the
  magnitude of the :math:`k`-th smallest entry of layer :math:`l` *at the
  current weights*, :math:`k = \lceil (1 - s)\,n_l \rceil`, so a fraction
  :math:`1 - s` of every layer is selected on every step (ties aside). A
  layer is a leaf, or one slice along the leading axis of a stacked leaf
  (paths matching ``stacked``). It is a mask rule (``params -> boolean
  arrays``) usable wherever zojax takes a mask; :func:`zojax.mezo`
  recognises it and evaluates :math:`|\theta| \le h_l` on the fly, block by
  block inside the forward and in the update, so no mask is stored: only the
  thresholds (one number per layer) are computed at the start of a step (a
  sort of one layer at a time).

  Attributes:
    sparsity: :math:`s`, the fraction of each layer frozen, in [0, 1).
    stacked: regex of the stacked leaves (one threshold per slice), or None.
  """

  def __init__(self, sparsity: float, stacked: Union[str, None] = None):
    if not 0.0 <= sparsity < 1.0:
      raise ValueError(f'sparsity must be in [0, 1), got {sparsity}.')
    self.sparsity = float(sparsity)
    self.stacked = stacked
    self._pattern = re.compile(stacked) if stacked else None

  def _threshold(self, layer: jax.Array) -> jax.Array:
    """The magnitude of the k-th smallest entry of one layer."""
    magnitude = jnp.sort(jnp.abs(layer).reshape(-1))
    count = max(1, math.ceil((1.0 - self.sparsity) * magnitude.shape[0]))
    return magnitude[count - 1]

  def per_leaf(self, params) -> list[jax.Array]:
    """The thresholds at ``params`` (flattening order): a scalar per leaf,
    or a vector with one value per slice of a stacked leaf."""
    out = []
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
      if (self._pattern is not None and self._pattern.search(path)
          and jnp.ndim(leaf) >= 1):
        out.append(jax.lax.map(self._threshold, leaf))  # a layer at a time
      else:
        out.append(self._threshold(leaf))
    return out

  def __call__(self, params):
    leaves, treedef = jax.tree.flatten(params)

    def leaf_mask(leaf, h):
      h = jnp.reshape(h, jnp.shape(h) + (1,) * (leaf.ndim - jnp.ndim(h)))
      return jnp.abs(leaf) <= h

    return jax.tree.unflatten(
        treedef, [leaf_mask(x, h) for x, h in zip(leaves,
                                                  self.per_leaf(params))])


def sparse_mezo(sparsity, *args, stacked: Union[str, None] = None
                ) -> MagnitudeThresholds:
  r"""Sparse MeZO's mask rule (Liu et al., 2024): per layer, the fraction
  ``1 - sparsity`` of the entries of smallest magnitude, at the current
  weights of every step (see :class:`MagnitudeThresholds`).

  Called as ``sparse_mezo(sparsity, stacked=...)``; the earlier spelling
  ``sparse_mezo(params, sparsity, stacked=...)`` is still accepted (the
  params are not needed: the thresholds follow the weights).

  Args:
    sparsity: fraction of each layer frozen, in [0, 1).
    stacked: regex of leaf paths whose leading axis stacks layers (e.g.
      ``'blocks'`` for :class:`zojax.models.Decoder`): one threshold per
      slice. Other leaves get one threshold each.

  Returns:
    A :class:`MagnitudeThresholds` mask rule.
  """
  if args:  # the earlier spelling: sparse_mezo(params, sparsity)
    if len(args) != 1:
      raise TypeError('sparse_mezo(sparsity, *, stacked=None)')
    sparsity = args[0]
  return MagnitudeThresholds(sparsity, stacked)
