r"""A black box inside an autodiff graph: its VJP is a zeroth-order estimate."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from zojax._src import checks

DIRECTIONS = ('gaussian', 'sphere', 'coordinates')
DIFFERENCES = ('forward', 'central')


def black_box(
    fn: Callable[[jax.Array], jax.Array],
    sigma: float,
    *,
    num_queries: int | None = None,
    directions: str = 'gaussian',
    difference: str = 'forward',
    batch_size: int | None = None,
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

  with :math:`u \sim N(0, I)` (``'gaussian'``, :math:`\phi = 1`), uniform on
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
                               directions='sphere')
    def loss(params, key, images, labels):
      latent = encoder.apply(params, denoiser.apply(params, images))
      return jnp.mean(classify(key, latent))   # grads flow to params

  Args:
    fn: ``(B, ...) -> (B,)``, queried only.
    sigma: finite-difference step (> 0).
    num_queries: random directions per example (required unless
      ``directions='coordinates'``).
    directions: ``'gaussian'``, ``'sphere'`` or ``'coordinates'``.
    difference: ``'forward'`` or ``'central'``.
    batch_size: perturbed copies of the batch evaluated at once; ``None`` =
      all.

  Returns:
    ``g(key, x) -> fn(x)`` with a zeroth-order VJP with respect to ``x``.

  References:
    Zhang et al., How to Robustify Black-Box ML Models? A Zeroth-Order
    Optimization Perspective (ZO-AE-DS), ICLR 2022.
  """
  checks.validate_sigma(sigma)
  checks.validate_choice('directions', directions, DIRECTIONS)
  checks.validate_choice('difference', difference, DIFFERENCES)
  checks.validate_positive_int('batch_size', batch_size, allow_none=True)
  if directions == 'coordinates':
    if num_queries is not None:
      raise ValueError("num_queries is set by directions='coordinates' (one "
                       'query per coordinate); leave it None.')
  else:
    checks.validate_positive_int('num_queries', num_queries)

  def values(x):
    out = jnp.asarray(fn(x))
    if out.shape != x.shape[:1]:
      raise ValueError(
          f'black_box: fn must return one value per example, shape '
          f'{x.shape[:1]}; it returned shape {out.shape}.')
    return out.astype(jnp.float32)

  def per_example_gradient(key, x, base):
    batch, example_shape = x.shape[0], x.shape[1:]
    dim = math.prod(example_shape)
    count = dim if directions == 'coordinates' else num_queries
    phi = dim if directions == 'sphere' else 1.0
    scale = 1.0 if directions == 'coordinates' else phi / count

    def direction(index):
      if directions == 'coordinates':
        return jnp.broadcast_to(
            jax.nn.one_hot(index, dim, dtype=jnp.float32).reshape(
                example_shape), x.shape)
      u = jax.random.normal(jax.random.fold_in(key, index), x.shape,
                            jnp.float32)
      if directions == 'sphere':
        norms = jnp.sqrt(jnp.sum(jnp.square(u.reshape(batch, -1)), axis=1))
        u = u / norms.reshape((batch,) + (1,) * len(example_shape))
      return u

    def contribution(index):
      u = direction(index)
      shifted = lambda s: values((x + s * sigma * u).astype(x.dtype))
      if difference == 'forward':
        slope = (shifted(1.0) - base) / sigma
      else:
        slope = (shifted(1.0) - shifted(-1.0)) / (2 * sigma)
      return slope.reshape((batch,) + (1,) * len(example_shape)) * u

    return scale * _chunked_sum(contribution, count, batch_size,
                                jnp.zeros(x.shape, jnp.float32))

  @jax.custom_vjp
  def wrapped(key, x):
    del key
    return values(x)

  def forward(key, x):
    base = values(x)
    return base, (key, x, base)

  def backward(residuals, cotangent):
    key, x, base = residuals
    grad = per_example_gradient(key, x, base)
    cotangent = cotangent.reshape((-1,) + (1,) * (x.ndim - 1))
    return None, (cotangent * grad).astype(x.dtype)

  wrapped.defvjp(forward, backward)
  return wrapped


def _chunked_sum(term, count, batch_size, zero):
  """``sum_i term(i)`` for ``i < count``, ``batch_size`` terms (one ``vmap``)
  at a time under ``lax.scan``: memory holds one chunk, not all terms."""
  chunk = min(batch_size or count, count)
  num_full, remainder = divmod(count, chunk)
  add_chunk = lambda total, indices: (
      total + jnp.sum(jax.vmap(term)(indices), axis=0), None)
  total, _ = jax.lax.scan(
      add_chunk, zero, jnp.arange(num_full * chunk).reshape(num_full, chunk))
  if remainder:
    total, _ = add_chunk(total, jnp.arange(num_full * chunk, count))
  return total
