"""Feature reuse for layered Flax models: stages, and CGE over them.

A model written as a sequence of stages (``h_l = stage_l(params_l,
h_{l-1})``) lets a coordinate-wise estimator evaluate the queries of stage
``l`` from the cached ``h_{l-1}`` (DeepZero's feature reuse):
:func:`feature_reuse_cge`. The helpers turn Flax modules into such stages::

  modules = zojax.models.ResNet20().stages()
  params = zojax.flax.init_stages(modules, key, images)       # tuple
  stages = zojax.flax.module_stages(modules)
  loss = lambda logits, batch: zojax.models.cross_entropy(logits, batch[1])
  tx = optax.chain(zojax.flax.feature_reuse_cge(stages, loss, 5e-3,
                                                mask=mask), optax.sgd(0.1))
  updates, state = tx.update(None, state, params, batch=(images, labels))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from zojax._src.estimators.feature_reuse import apply_stages, feature_reuse_cge

__all__ = ('apply_stages', 'feature_reuse_cge', 'init_stages',
           'module_stages')


def module_stages(modules: Sequence[nn.Module]
                  ) -> tuple[Callable[[Any, Any], Any], ...]:
  """``stage(params, h) = module.apply({'params': params}, h)`` per module."""
  return tuple(
      (lambda params, h, m=m: m.apply({'params': params}, h))
      for m in modules)


def init_stages(modules: Sequence[nn.Module], key: jax.Array,
                x: Any) -> tuple[Any, ...]:
  """Initializes the modules in order, each on the previous one's output.

  Returns:
    The tuple of per-stage ``params`` (the ``'params'`` collections).
  """
  params = []
  for module, k in zip(modules, jax.random.split(key, len(modules))):
    variables = module.init(k, x)
    params.append(variables['params'])
    x = module.apply(variables, x)
  return tuple(params)
