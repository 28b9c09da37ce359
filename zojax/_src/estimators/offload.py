r"""ZO2-style MeZO with the stacked layers in host memory, streamed per step.

ZO2 (Wang et al., "Scalable Zeroth-Order Fine-Tuning for Extremely Large
Language Models with Limited GPU Memory") keeps the parameters in CPU memory
and uploads each transformer block once per step: both perturbed forwards
run on it while it is on the accelerator, and the previous step's update is
applied to it on upload, from the stored scalar and seed. zojax does the
same for any model written as three parts (:class:`zojax.models.Decoder`
has them): ``embed(rest, batch, perturbation)``, ``layer(layer_params, x)``
for each slice of the stacked subtree, ``logits(rest, x, perturbation)``,
with ``rest`` (embeddings, final norm) kept on the device.

One step :math:`t`, layer by layer, in a Python loop (a jitted function per
part, compiled once; JAX dispatches asynchronously, so the upload of layer
:math:`l + 1` and the download of layer :math:`l - 1` overlap the compute
of layer :math:`l`: double buffering with one layer in flight each way; the
loop waits for layer :math:`l - 1`'s output before it uploads layer
:math:`l + 1`, so at most two layers are on the device whatever the
model's size):

1. upload :math:`\theta_l` (stale by one step);
2. apply the pending update :math:`\theta_l \leftarrow \theta_l -
   \eta_{t-1}(g_{t-1} z_{t-1,l} + \lambda\theta_l)` (drawing
   :math:`z_{t-1,l}` again from step :math:`t-1`'s key);
3. run the layer on both activations of the pair, :math:`\theta_l \pm
   \epsilon z_{t,l}` from one draw (a ``vmap`` over the sign);
4. download the updated :math:`\theta_l`.

The noise, the update and their arithmetic are :func:`zojax.mezo`'s (the
one generator draws any layer of a stacked leaf by itself), so the
trajectory is on-device ``mezo``'s with ``two_point='fused'``, up to the
float rounding of differently compiled forwards. Supported: one query per
step, every leaf trained, weight decay; :meth:`OffloadedMeZO.gather` returns
the params with the last update applied.

Host memory holds one copy of the stacked layers (``step`` rewrites
``host.layers`` in place) plus one layer in flight. On GPUs the layers sit in
pinned host memory, which XLA caps at 64 GB unless the environment variable
``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`` (set before JAX starts) allows more.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.core.perturbable import leaf_paths
from zojax._src.core.stats import EstimateStats
from zojax._src.estimators import mezo_step
from zojax._src.estimators.perturbation import LeafSelection, Perturbation
from zojax._src.estimators.perturbation import block_elements
from zojax._src.query import directions


class OffloadState(NamedTuple):
  """``mezo``'s counters plus the update not yet applied to the layers in
  host memory: the key of that step and ``(g, learning rate)`` (zeros when
  there is none or the step was skipped)."""

  key: jax.Array
  count: jax.Array
  stats: EstimateStats
  pending_key: jax.Array
  pending: jax.Array


class Parts(NamedTuple):
  """A model with stacked layers: ``embed(rest, batch, perturbation) -> x``,
  ``layer(layer_params, x) -> x``, ``logits(rest, x, perturbation)`` and
  ``loss(logits, batch) -> scalar``; ``stacked`` names the stacked subtree
  at the root of the params."""

  embed: Callable[..., Any]
  layer: Callable[..., Any]
  logits: Callable[..., Any]
  loss: Callable[..., Any]
  stacked: str = 'blocks'


def host_memory(device) -> Callable[[Any], Any]:
  """Where parked layers live: pinned host memory of ``device`` when the
  backend has it (GPUs), else NumPy arrays (CPU tests)."""
  kinds = {m.kind for m in device.addressable_memories()}
  if 'pinned_host' in kinds:
    sharding = jax.sharding.SingleDeviceSharding(device,
                                                 memory_kind='pinned_host')
    return lambda tree: jax.device_put(tree, sharding)
  return lambda tree: jax.tree.map(np.asarray, tree)


class HostParams(NamedTuple):
  """The params of :class:`OffloadedMeZO`: ``rest`` on the device, ``layers``
  (one pytree per slice of the stacked subtree) in host memory."""

  rest: Any
  layers: list


class OffloadedMeZO:
  """MeZO with the stacked layers in host memory (see the module docstring).

  ``host, state = tx.init(params)``; ``host, state = tx.step(host, state,
  batch)`` (a Python loop over the layers, each part jitted once);
  ``params = tx.gather(host, state)`` (the last update applied, stacked on
  the device). Same arguments as :func:`zojax.mezo`, with the model given
  as :class:`Parts`.
  """

  def __init__(self, parts: Parts, learning_rate, sigma=1e-3, *,
               weight_decay: float = 0.0,
               no_decay: Optional[str] = mezo_step.NO_DECAY, seed=0,
               device=None):
    checks.validate_sigma(sigma)
    checks.validate_positive_float('learning_rate', learning_rate,
                                   allow_zero=True)
    keys.check_seed(seed)
    self.parts, self.seed = parts, seed
    self.learning_rate, self.sigma = learning_rate, sigma
    self.config = mezo_step.Config(
        learning_rate, sigma, 1, weight_decay,
        re.compile(no_decay) if no_decay else None, None, None, 'fused')
    self.device = device or jax.devices()[0]
    self._park = host_memory(self.device)
    on_device = jax.sharding.SingleDeviceSharding(
        self.device, memory_kind=self.device.default_memory().kind)
    self._upload = lambda tree: jax.device_put(tree, on_device)
    self._embed = jax.jit(self._embed_pair)
    self._layer = jax.jit(self._layer_step)
    self._loss = jax.jit(self._loss_pair)
    self._rest = jax.jit(self._update_rest)
    self._finish = jax.jit(self._finish_step)

  # --- set-up -------------------------------------------------------------
  def init(self, params) -> tuple[HostParams, OffloadState]:
    """Moves the stacked layers of ``params`` to host memory."""
    stacked = params[self.parts.stacked]
    rest = {k: v for k, v in params.items() if k != self.parts.stacked}
    count = jax.tree.leaves(stacked)[0].shape[0]
    return self.init_layers(rest, (jax.tree.map(lambda x, i=i: x[i], stacked)
                                   for i in range(count)))

  def init_layers(self, rest, layers: Iterable) -> tuple[HostParams,
                                                         OffloadState]:
    """From the non-stacked params and an iterable of per-layer params, each
    parked in host memory as soon as it arrives (a model larger than the
    device can be built one layer at a time)."""
    parked = []
    for layer in layers:
      parked.append(self._park(layer))
    self._num_layers = len(parked)
    stacked = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((self._num_layers,) + x.shape,
                                       x.dtype), parked[0])
    full = {**jax.eval_shape(lambda r: r, rest), self.parts.stacked: stacked}
    self._chosen = {path: LeafSelection(True) for path in leaf_paths(full)}
    self._block_size = block_elements(sum(
        math.prod(x.shape) for x in jax.tree.leaves(full)))
    state = OffloadState(keys.key_data(self.seed), jnp.zeros((), jnp.int32),
                         EstimateStats.create(2), keys.key_data(0),
                         jnp.zeros((2,), jnp.float32))
    # committed where the step's outputs live: one compilation per part
    return HostParams(self._upload(rest), parked), self._upload(state)

  # --- one step -----------------------------------------------------------
  def step(self, host: HostParams, state: OffloadState,
           batch) -> tuple[HostParams, OffloadState]:
    """One step. ``host`` is consumed like a donated buffer: each layer's
    slot in ``host.layers`` is replaced by its updated copy as soon as that
    is parked, so host memory holds the model plus one layer, not two
    models (keep no other reference to the old layers)."""
    key, step_key = keys.advance(state.key)
    sigma = checks.value_at(self.sigma, state.count)
    rest = self._rest(host.rest, state.pending_key, state.pending)
    x = self._embed(rest, batch, step_key, sigma)
    layers = host.layers  # rewritten in place, as a donated buffer would be
    upcoming = self._upload(layers[0])
    for index in range(self._num_layers):
      current = upcoming
      if index + 1 < self._num_layers:  # in flight while this layer runs
        # bounded look-ahead: once the previous layer is done (its output
        # x is ready), at most this layer and the next are on the device
        jax.block_until_ready(x)
        upcoming = self._upload(layers[index + 1])
      updated, x = self._layer(current, jnp.int32(index), x,
                               state.pending_key, state.pending, step_key,
                               sigma)
      layers[index] = self._park(updated)
    losses = self._loss(rest, x, batch, step_key, sigma)
    return HostParams(rest, layers), self._finish(state, key, step_key,
                                                  losses, sigma)

  def gather(self, host: HostParams, state: OffloadState):
    """The params on the device, stacked, with the pending update applied
    (what on-device ``mezo`` holds after the same steps)."""
    rest = self._rest(host.rest, state.pending_key, state.pending)
    update = jax.jit(self._update_layer)
    layers = [update(self._upload(layer), jnp.int32(i), state.pending_key,
                     state.pending)
              for i, layer in enumerate(host.layers)]
    return {**rest, self.parts.stacked: jax.tree.map(
        lambda *xs: jnp.stack(xs), *layers)}

  # --- the jitted parts ---------------------------------------------------
  def _perturbation(self, step_key, scale) -> Perturbation:
    return Perturbation(directions.query_key(step_key, 0), scale,
                        self._chosen, self._block_size)

  def _signs(self, sigma):
    return jnp.stack([sigma, -sigma]).astype(jnp.float32)

  def _rewrite(self, path, leaf, pending_key, pending, prefix=(), shape=None):
    return mezo_step.rewrite_leaf(
        self.config, path, leaf, LeafSelection(True), pending_key,
        pending[:1], pending[1], mezo_step.write_params, self._block_size,
        prefix, shape)

  def _update_rest(self, rest, pending_key, pending):
    leaves, treedef = jax.tree.flatten(rest)
    return jax.tree.unflatten(treedef, [
        self._rewrite(path, leaf, pending_key, pending)
        for path, leaf in zip(leaf_paths(rest), leaves)])

  def _update_layer(self, layer, index, pending_key, pending):
    leaves, treedef = jax.tree.flatten(layer)
    return jax.tree.unflatten(treedef, [
        self._rewrite(f'{self.parts.stacked}/{path}', leaf, pending_key,
                      pending, (index,), (self._num_layers,) + leaf.shape)
        for path, leaf in zip(leaf_paths(layer), leaves)])

  def _embed_pair(self, rest, batch, step_key, sigma):
    return jax.vmap(lambda s: self.parts.embed(
        rest, batch, self._perturbation(step_key, s)))(self._signs(sigma))

  def _layer_step(self, layer, index, x, pending_key, pending, step_key,
                  sigma):
    layer = self._update_layer(layer, index, pending_key, pending)

    def forward(scale, hidden):  # one draw of z for both signs
      perturbed = self._perturbation(step_key, scale).layer(
          layer, self.parts.stacked, index)
      return self.parts.layer(perturbed, hidden)

    return layer, jax.vmap(forward)(self._signs(sigma), x)

  def _loss_pair(self, rest, x, batch, step_key, sigma):
    return jax.vmap(lambda s, hidden: jnp.asarray(self.parts.loss(
        self.parts.logits(rest, hidden, self._perturbation(step_key, s)),
        batch), jnp.float32))(self._signs(sigma), x)

  def _finish_step(self, state, key, step_key, losses, sigma):
    g = (losses[0] - losses[1]) / (2 * sigma)
    finite = jnp.isfinite(g) & checks.positive(sigma)
    lr = checks.value_at(self.learning_rate, state.count)
    pending = jnp.where(finite, jnp.stack([g, lr]), 0.0).astype(jnp.float32)
    return OffloadState(key, state.count + 1,
                        state.stats.record(jnp.mean(losses), finite),
                        step_key, pending)
