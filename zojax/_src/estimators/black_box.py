r"""A black box inside an autodiff graph: its VJP is a zeroth-order estimate."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from zojax._src.core import checks
from zojax._src.core import keys
from zojax._src.query import directions as directions_lib
from zojax._src.query import engine
from zojax._src.query import probes

DISTRIBUTIONS = ('gaussian', 'sphere', 'coordinates')


def black_box(
    fn: Callable[[jax.Array], jax.Array],
    sigma: float,
    *,
    num_queries: int | None = None,
    distribution: str = 'gaussian',
    difference: str = 'forward',
    batch_size: int | None = None,
    directions: str | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  r"""Makes a query-only function differentiable with ZO estimates.

  ``fn`` maps a batch of inputs ``x`` (shape ``(B, ...)``) to one value per
  example (shape ``(B,)``) and may only be *queried* (a deployed model behind
  an API, a simulator, a non-differentiable metric). The returned function
  ``g(key, x)`` equals ``fn(x)``, and JAX differentiates through it with a
  per-example gradient estimate with respect to the *input*:

  .. math::
    \hat\nabla_{x_b} = \frac{\phi}{q}\sum_{i=1}^{q}
      \frac{f(x_b + \sigma u_{bi}) - f(x_b)}{\sigma}\,u_{bi}
    \quad\text{(forward; central: } \tfrac{f(x_b+\sigma u) -
      f(x_b-\sigma u)}{2\sigma}\text{)},

  with :math:`u \sim N(0, I)` (``distribution='gaussian'``,
  :math:`\phi = 1`), uniform on
  the unit sphere (``'sphere'``, :math:`\phi = d`, :math:`d` the size of one
  example, as in ZO-AE-DS), or the :math:`d` unit vectors
  (``'coordinates'``: CGE, :math:`\phi = q = 1` per coordinate, exact to
  :math:`O(\sigma)` / :math:`O(\sigma^2)`). The VJP of a cotangent
  :math:`c` is :math:`c_b \hat\nabla_{x_b}`, so ``jax.grad`` of a loss built
  on ``g`` chains the estimate through everything differentiable around the
  box (ZO-AE-DS: a decoder after the ZO estimate in the latent space, an
  encoder and denoiser before it, all by autodiff).

  Cost of one backward pass: ``fn`` is called on ``num_queries`` (``d`` for
  coordinates; twice that for central differences) perturbed copies of the
  batch, ``batch_size`` copies at a time (one ``vmap`` of ``fn`` over them);
  i.e. :math:`B\,q` (or :math:`2Bq`) example queries, plus the forward pass.
  The key must be passed explicitly (a fresh one per step).

  Usage::

    classify = zojax.black_box(black_box_loss, 5e-3, num_queries=20,
                               distribution='sphere')
    def loss(params, key, images, labels):
      latent = encoder.apply(params, denoiser.apply(params, images))
      return jnp.mean(classify(key, latent))   # grads flow to params

  Args:
    fn: ``(B, ...) -> (B,)``, queried only.
    sigma: finite-difference step (> 0).
    num_queries: random directions per example (required unless
      ``distribution='coordinates'``).
    distribution: ``'gaussian'``, ``'sphere'`` or ``'coordinates'``.
    difference: ``'forward'`` or ``'central'``.
    batch_size: perturbed copies of the batch evaluated at once; ``None`` =
      all.
    directions: the former name of ``distribution`` (still accepted).

  Returns:
    ``g(key, x) -> fn(x)`` with a zeroth-order VJP with respect to ``x``.

  References:
    Zhang et al., How to Robustify Black-Box ML Models? A Zeroth-Order
    Optimization Perspective (ZO-AE-DS), ICLR 2022.
  """
  if directions is not None:
    distribution = directions
  checks.validate_sigma(sigma)
  checks.validate_choice('distribution', distribution, DISTRIBUTIONS)
  checks.validate_choice('difference', difference, probes.DIFFERENCES)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  if distribution == 'coordinates':
    if num_queries is not None:
      raise ValueError("num_queries is set by distribution='coordinates' "
                       '(one query per coordinate); leave it None.')
  else:
    checks.validate_positive_int('num_queries', num_queries)

  def values(x):
    out = jnp.asarray(fn(x))
    if out.shape != x.shape[:1]:
      raise ValueError(
          f'black_box: fn must return one value per example, shape '
          f'{x.shape[:1]}; it returned shape {out.shape}.')
    return out.astype(jnp.float32)

  def direction(key, index, x):
    """Direction ``index`` for every example of ``x`` (one leaf, path 'x')."""
    batch, example_shape = x.shape[0], x.shape[1:]
    if distribution == 'coordinates':
      dim = math.prod(example_shape)
      return jnp.broadcast_to(jax.nn.one_hot(index, dim, dtype=jnp.float32)
                              .reshape(example_shape), x.shape)
    leaf = directions_lib.leaf_key(directions_lib.query_key(key, index), 'x')
    u = directions_lib.leaf_normal(leaf, x.shape)
    if distribution == 'sphere':
      norms = jnp.sqrt(jnp.sum(jnp.square(u.reshape(batch, -1)), axis=1))
      u = u / norms.reshape((batch,) + (1,) * len(example_shape))
    return u

  def per_example_gradient(key, x, base):
    batch, example_shape = x.shape[0], x.shape[1:]
    dim = math.prod(example_shape)
    count = dim if distribution == 'coordinates' else int(num_queries)
    phi = dim if distribution == 'sphere' else 1.0
    scale = 1.0 if distribution == 'coordinates' else phi / count
    steps = probes.offsets(difference, sigma)

    def contributions(total, indices):
      def one(index):
        u = direction(key, index, x)
        along = jax.vmap(
            lambda s: values((x + s * u).astype(x.dtype)))(steps)   # (S, B)
        slope = probes.difference_quotient(difference, sigma, along.T, base)
        return slope.reshape((batch,) + (1,) * len(example_shape)) * u
      return total + jnp.sum(jax.vmap(one)(indices), axis=0), ()

    total, _ = engine.chunked(contributions, jnp.arange(count), batch_size,
                              jnp.zeros(x.shape, jnp.float32))
    return scale * total

  @jax.custom_vjp
  def wrapped(key, x):
    del key
    return values(x)

  def forward(key, x):
    base = values(x)
    return base, (key, x, base)

  def backward(residuals, cotangent):
    key, x, base = residuals
    grad = per_example_gradient(keys.key_data(key), x, base)
    cotangent = cotangent.reshape((-1,) + (1,) * (x.ndim - 1))
    return None, (cotangent * grad).astype(x.dtype)

  wrapped.defvjp(forward, backward)
  return wrapped
