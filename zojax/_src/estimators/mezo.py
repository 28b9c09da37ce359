r"""MeZO: zeroth-order SGD at the memory of inference.

One step (Malladi et al., 2023, Algorithm 1), with :math:`z_i \sim N(0, I)`
drawn for query :math:`i` of the step's key :math:`k`:

.. math::
  L_\pm = L(\theta \pm \epsilon z_i), \qquad
  g_i = \frac{L_+ - L_-}{2\epsilon}, \qquad
  \theta \leftarrow \theta - \eta\,\Big(\frac1q\sum_i g_i z_i
    + \lambda \theta\Big),

with weight decay :math:`\lambda` skipped for biases and norms. :math:`z_i`
is never stored: each entry is a counter-based draw from the step key, the
query index, the leaf's path and the entry's position (the one generator of
:mod:`zojax._src.query.directions`, so ``rge`` draws the same :math:`z`),
drawn again for each of its three uses, block by block.

Why this does not go through the query engine: the engine evaluates a
chunk of queries as one ``vmap``, which holds perturbed copies of the whole
model. MeZO's claim is the memory of inference, so its queries run one
after the other and each perturbs the model part by part:

* the objective perturbs its parameters *part by part*, right before using
  them: ``perturbed_fn(params, perturbation)`` calls
  ``perturbation.layer(layer, 'blocks', i)`` inside the ``lax.scan`` over
  stacked layers, ``perturbation.rows`` for an embedding lookup and
  ``perturbation.matmul_transposed`` for a tied output layer
  (:mod:`zojax._src.estimators.perturbation`); :class:`zojax.models.Decoder`
  does all three. At most one layer's perturbed copy is alive;
* the second forward starts after the first has ended (its scale depends on
  :math:`L_+`), so their activations are never alive together;
* the update rewrites every leaf block by block, regenerating :math:`z` per
  block, so with the parameters donated (``jax.jit(tx.step,
  donate_argnums=...)``) it is written in place.

Measured (``experiments/bench_mezo.py``): a 1.07B-parameter bf16 decoder on
an H100 needs 2.19 GB per MeZO step against 2.16 GB for one inference forward
of the same batch. A plain ``obj_fn(params)`` works for any pytree at the
cost of a transient perturbed copy of the whole tree.
"""

from __future__ import annotations

import re
from typing import Optional

import jax
import optax

from zojax._src.core import checks
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.perturbable import Mask
from zojax._src.estimators.mezo_step import Config, MeZOState, NO_DECAY
from zojax._src.estimators.mezo_step import build_transform, validate

__all__ = ('MeZOState', 'MeZOTransform', 'mezo')

MeZOTransform = ZerothOrderTransform  # the former name of mezo's type


def mezo(
    learning_rate: optax.ScalarOrSchedule,
    sigma=1e-3,
    num_queries: int = 1,
    *,
    weight_decay: float = 0.0,
    no_decay: Optional[str] = NO_DECAY,
    mask: Mask = None,
    blockwise: Optional[str] = None,
    two_point: str = 'fused',
    seed=0,
    mesh: Optional[jax.sharding.Mesh] = None,
    query_axis: Optional[str] = None,
    data_axis: Optional[str] = None,
) -> ZerothOrderTransform:
  r"""MeZO's memory-efficient ZO-SGD (regenerated perturbations).

  Objective, one of (as the extra argument of ``update``/``step``):

  * ``obj_fn(params) -> loss``: any pytree, evaluated at
    ``perturbation.tree(params)`` (one transient perturbed copy);
  * ``perturbed_fn(params, perturbation) -> loss``: the objective perturbs
    its parameters itself, part by part, with the ``perturbation`` it
    receives (``.tree(subtree, path)``, ``.layer(slice, path, index)``,
    ``.rows``, ``.matmul_transposed``), e.g.
    ``lambda p, pert: loss(model.apply({'params': p}, x, perturbation=pert))``
    with :class:`zojax.models.Decoder`.

  Either must use (perturb) every trained leaf; the first call checks this.
  With ``batch=``, the objective is called as ``f(params, batch)`` (or
  ``f(params, perturbation, batch)``).

  ``update`` returns the update :math:`-\eta(\frac1q\sum_i g_i z_i +
  \lambda\theta)` as a tree (optax's contract); ``step(params, state, ...)``
  returns ``(new_params, new_state)``: jit it with ``donate_argnums`` on the
  params so the update is written into their buffers. ``ask(state,
  params)`` returns the ``2q`` points ``[θ+εz_0, θ−εz_0, ...]`` (whole
  perturbed copies) and ``tell(state, params, points, values)`` returns
  what ``update`` returns.

  Non-finite values: MeZO is an optimizer (it applies the learning rate), so
  a step whose :math:`g` is not finite changes nothing (``update`` returns
  zeros, ``step`` the same params) and is counted in
  ``estimate_info(state).skipped_steps``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    sigma: :math:`\epsilon` (MeZO's default 1e-3): a float, an optax
      schedule, or a traced value.
    num_queries: :math:`q` two-point queries per step (MeZO's :math:`n`;
      default 1), evaluated one after the other.
    weight_decay: :math:`\lambda` (decoupled from :math:`g`, as MeZO's code).
    no_decay: regex of leaf paths without weight decay (default: biases,
      norms, scales, as MeZO's ``bias``/``layer_norm`` rule); None decays all.
    mask: coordinates trained (others are neither perturbed, decayed nor
      updated): a zojax mask or mask rule, or
      :func:`zojax.masks.sparse_mezo` (Sparse MeZO: per layer the fraction
      ``1 - sparsity`` of smallest magnitude at the current weights,
      evaluated on the fly, no stored mask).
    blockwise: block-wise ZO (ZO-Bench): a regex of the stacked leaves (e.g.
      ``'blocks'`` for :class:`zojax.models.Decoder`); each index of their
      leading axis (a layer) is a block and the other trained leaves form one
      more; step :math:`t` perturbs and updates only block
      :math:`t \bmod B`, cycling through the model. None: the whole model
      every step.
    two_point: ``'fused'`` (default): the :math:`\pm\epsilon` forwards of a
      query run as one ``vmap`` sharing one draw of :math:`z` per block (two
      perturbed copies of a layer and two sets of activations alive);
      ``'sequential'``: one after the other, :math:`z` drawn for each
      (:mod:`zojax._src.estimators.two_point`).
    seed: an integer or a PRNG key.
    mesh, query_axis, data_axis: DistZO2's parallelism, with the meaning
      they have for :func:`zojax.rge`: the step's :math:`2q` evaluations are
      split over ``query_axis`` (whole queries when they divide evenly; with
      :math:`q = 1` over 2 devices, one sign each), the batch over
      ``data_axis`` (``batch=`` then holds the whole batch and the objective
      is called on each device's shard, losses averaged); only scalars cross
      devices and every device applies the same update to its replicated
      parameters. Parameters that arrive *sharded* (FSDP/tensor-parallel
      ``NamedSharding``) need no mesh here: under ``jax.jit`` the
      counter-based draws and the update are partitioned like the
      parameters, shard-local, and the step returns them sharded the same
      way.

  Returns:
    A :class:`zojax.ZerothOrderTransform` with ``step``. :math:`2q`
    evaluations per step; ``zojax.estimate_info(state).value`` is the mean
    of :math:`(L_+ + L_-)/2`.

  References:
    Malladi et al., Fine-Tuning Language Models with Just Forward Passes
    (MeZO), NeurIPS 2023; Liu et al., Sparse MeZO, 2024; Zhang et al.,
    ZO-Bench, ICML 2024.
  """
  plan = validate(learning_rate, sigma, num_queries, two_point, seed, mesh,
                  query_axis, data_axis, 'mezo')
  if checks.is_concrete_number(weight_decay) and weight_decay < 0:
    raise ValueError(f'weight_decay must be >= 0, got {weight_decay!r}.')
  config = Config(learning_rate, sigma, int(num_queries), weight_decay,
                  re.compile(no_decay) if no_decay else None, mask,
                  re.compile(blockwise) if blockwise else None, two_point,
                  plan)
  return build_transform(config, seed)
