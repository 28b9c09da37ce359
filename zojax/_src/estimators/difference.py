r"""Exact finite differences by propagating the difference through a program.

For a function :math:`f` and an input change :math:`\delta`,
:func:`propagate` returns :math:`f(x)` and :math:`\Delta = f(x + \delta) -
f(x)`, computed operation by operation on the pair :math:`(v, \Delta v)`:

* operations linear in their varying operand (sums, reshapes, slices, pads,
  gathers, reductions by summation, division by an unchanged value) map
  :math:`\Delta v` directly;
* bilinear ones (``mul``, ``dot_general``, convolutions) use
  :math:`(a + \Delta a)(b + \Delta b) - ab = \Delta a\, b + a\, \Delta b +
  \Delta a\, \Delta b`;
* ``square``: :math:`\Delta(v^2) = \Delta v\,(2v + \Delta v)`;
* every other operation (``max``, ``exp``, ``rsqrt``, comparisons, ...)
  evaluates :math:`g(v + \Delta v) - g(v)` elementwise in the input dtype.

A change given as :class:`OneHot` (one entry of one array, as a coordinate
perturbation) enters a convolution kernel without a dense copy: its effect
is one input channel convolved with a one-entry spatial kernel, placed in
one output channel.

This is the same number as evaluating :math:`f` twice and subtracting, up to
rounding, but the rounding is relative to :math:`\Delta` rather than to the
values: the linear and bilinear operations on differences may therefore run
at a lower matmul precision (TF32, bfloat16 tensor cores) without drowning a
small finite difference, which is what makes them cheap for
coordinate-wise estimates (see :func:`zojax.flax.feature_reuse_cge`).
Operations whose operands have no difference are evaluated once, as given.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

PRECISIONS = ('highest', 'default', 'bfloat16')

_LINEAR_UNARY = frozenset((
    'neg', 'reshape', 'broadcast_in_dim', 'transpose', 'squeeze',
    'expand_dims', 'slice', 'reduce_sum', 'copy', 'copy_p', 'rev',
    'stop_gradient', 'reduce_precision', 'real', 'imag', 'conj'))
# linear in their first operand when the others (indices, fill) are unchanged
_LINEAR_FIRST = frozenset(('pad', 'gather', 'dynamic_slice'))
_BILINEAR = frozenset(('mul', 'dot_general', 'conv_general_dilated'))
_CALL_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')


def propagate(fn: Callable[..., Any], args: tuple, deltas: tuple,
              precision: str = 'highest') -> tuple[Any, Any]:
  """``(fn(*args), fn(*(args + deltas)) - fn(*args))`` by propagation.

  Args:
    fn: a function of arrays (pytrees allowed) returning float arrays.
    args: the point :math:`x` (a tuple of fn's arguments).
    deltas: the changes, like ``args``; ``None`` for an unchanged argument.
    precision: of the linear and bilinear operations on differences:
      ``'highest'`` (float32), ``'default'`` (the backend's default: TF32 on
      recent NVIDIA GPUs) or ``'bfloat16'`` (operands cast to bfloat16,
      float32 accumulation). Operations on unchanged values keep fn's own.

  Returns:
    ``(value, difference)``, pytrees like ``fn``'s output.
  """
  if precision not in PRECISIONS:
    raise ValueError(f'precision must be one of {PRECISIONS}, got '
                     f'{precision!r}.')
  closed = jax.make_jaxpr(fn)(*args)
  flat_args = jax.tree.leaves(args)
  flat_deltas = []
  if len(deltas) != len(args):
    raise ValueError(f'{len(deltas)} deltas for {len(args)} arguments.')
  for arg, delta in zip(args, deltas):
    if delta is None:
      flat_deltas += [None] * len(jax.tree.leaves(arg))
      continue
    if jax.tree.structure(delta) != jax.tree.structure(arg):
      raise ValueError('a delta must have the structure of its argument: '
                       f'{jax.tree.structure(delta)} vs '
                       f'{jax.tree.structure(arg)}.')
    flat_deltas += jax.tree.leaves(delta)
  out_tree = jax.tree.structure(jax.eval_shape(fn, *args))
  results = _evaluate(closed.jaxpr, closed.consts, flat_args, flat_deltas,
                      precision)
  values = [v for v, _ in results]
  differences = [_difference(v, c) for v, c in results]
  differences = [jnp.zeros_like(v) if d is None else d
                 for v, d in zip(values, differences)]
  return (jax.tree.unflatten(out_tree, values),
          jax.tree.unflatten(out_tree, differences))


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _evaluate(jaxpr, consts, args, deltas, precision):
  """``[(value, change)]`` of ``jaxpr``'s outputs, from its inputs' values
  and changes: a difference, ``None`` (unchanged) or, for non-float values
  (e.g. comparisons), the changed value itself wrapped in ``_Changed``.
  """
  env: dict[Any, tuple[Any, Any]] = {}

  def read(var):
    if isinstance(var, core.Literal):
      return var.val, None
    return env[var]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = (value, None)
  for var, value, delta in zip(jaxpr.invars, args, deltas):
    env[var] = (value, delta)
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    values = [v for v, _ in ins]
    changes = [c for _, c in ins]
    outs = _apply(eqn, values, changes, precision)
    for var, out in zip(eqn.outvars, outs):
      env[var] = out
  return [read(v) for v in jaxpr.outvars]


class _Changed:
  """The changed value of a non-float variable (e.g. a comparison)."""

  def __init__(self, value):
    self.value = value


class OneHot:
  """A change that is zero but for ``value`` at the flat ``index`` of an
  array of ``shape`` (a coordinate perturbation). Operations without a rule
  for it see it as a dense array; a convolution whose kernel changes by one
  entry computes the change of its output from one input channel."""

  def __init__(self, index: jax.Array, value: jax.Array, shape, dtype):
    self.index, self.value = index, value
    self.shape, self.dtype = tuple(shape), dtype

  def dense(self) -> jax.Array:
    size = 1
    for n in self.shape:
      size *= n
    flat = jnp.zeros(size, self.dtype).at[self.index].set(
        jnp.asarray(self.value, self.dtype), mode='drop')
    return flat.reshape(self.shape)


def _changed_value(value, change):
  if change is None:
    return value
  if isinstance(change, _Changed):
    return change.value
  return value + _difference(value, change)


def _difference(value, change):
  if change is None:
    return None
  if isinstance(change, _Changed):
    return change.value - value if _is_float(value) else None
  if isinstance(change, OneHot):
    return change.dense()
  return change


def _bind(eqn, values, **overrides):
  params = dict(eqn.params, **overrides)
  out = eqn.primitive.bind(*values, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _apply(eqn, values, changes, precision):
  """``[(value, change)]`` for the outputs of one equation."""
  name = eqn.primitive.name
  sub = next((eqn.params[p] for p in _CALL_PARAMS if p in eqn.params
              and isinstance(eqn.params[p], core.ClosedJaxpr)), None)
  if sub is not None and name not in ('scan', 'while', 'cond'):
    # jit, custom_jvp_call, custom_vjp_call, ...: evaluate the body inline
    return _evaluate(sub.jaxpr, sub.consts, values, changes, precision)
  base = _bind(eqn, values)
  if all(c is None for c in changes):
    return [(b, None) for b in base]
  if (name == 'conv_general_dilated' and changes[0] is None
      and isinstance(changes[1], OneHot)
      and eqn.params['feature_group_count'] == 1
      and eqn.params['batch_group_count'] == 1):
    return [(base[0], _conv_one_kernel_entry(eqn, values[0], changes[1]))]
  diffs = [_difference(v, c) for v, c in zip(values, changes)]
  exact = all(_is_float(b) for b in base) and not any(
      isinstance(c, _Changed) for c in changes)
  if exact and name in _LINEAR_UNARY and len(values) == 1:
    return [(base[0], _bind(eqn, diffs)[0])]
  if exact and name in _LINEAR_FIRST and all(c is None for c in changes[1:]):
    rest = list(values[1:])
    if name == 'pad':
      rest = [jnp.zeros_like(values[1])]
    return [(base[0], _bind(eqn, [diffs[0]] + rest)[0])]
  if exact and name in ('add', 'sub', 'add_any'):
    a, b = diffs
    shape = jnp.shape(base[0])
    if a is None:
      out = -b if name == 'sub' else b
    elif b is None:
      out = a
    else:
      out = a - b if name == 'sub' else a + b
    return [(base[0], jnp.broadcast_to(out, shape).astype(base[0].dtype))]
  if exact and name == 'div' and changes[1] is None:
    return [(base[0], _bind(eqn, [diffs[0], values[1]])[0])]
  if exact and name == 'concatenate':
    parts = [jnp.zeros_like(v) if d is None else d
             for v, d in zip(values, diffs)]
    return [(base[0], _bind(eqn, parts)[0])]
  if exact and name == 'select_n' and changes[0] is None:
    cases = [jnp.zeros_like(v) if d is None else d
             for v, d in zip(values[1:], diffs[1:])]
    return [(base[0], _bind(eqn, [values[0]] + cases)[0])]
  if exact and name == 'square':
    return [(base[0], diffs[0] * (2 * values[0] + diffs[0]))]
  if exact and name in _BILINEAR:
    return [(base[0], _bilinear(eqn, values, diffs, precision))]
  # anything else: g(v + dv) - g(v), in the operation's own dtype
  changed = _bind(eqn, [_changed_value(v, c) for v, c in zip(values, changes)])
  return [(b, (n - b) if _is_float(b) else _Changed(n))
          for b, n in zip(base, changed)]


def _conv_one_kernel_entry(eqn, lhs, change: OneHot) -> jax.Array:
  """``conv(lhs, change)`` for a kernel change at one entry ``(o, i, k...)``:
  input channel ``i`` convolved with a one-entry spatial kernel, placed in
  output channel ``o`` (a depthwise product instead of a full convolution).
  """
  lhs_spec, rhs_spec, out_spec = eqn.params['dimension_numbers']
  position = jnp.unravel_index(change.index, change.shape)
  out_channel, in_channel = position[rhs_spec[0]], position[rhs_spec[1]]
  channel = lax.dynamic_slice_in_dim(lhs, in_channel, 1, axis=lhs_spec[1])
  kernel_shape = list(change.shape)
  kernel_shape[rhs_spec[0]] = kernel_shape[rhs_spec[1]] = 1
  entry = list(position)
  entry[rhs_spec[0]] = entry[rhs_spec[1]] = 0
  kernel = jnp.zeros(kernel_shape, lhs.dtype).at[tuple(entry)].set(
      jnp.asarray(change.value, lhs.dtype))
  out = _bind(eqn, [channel, kernel],
              precision=(lax.Precision.HIGHEST, lax.Precision.HIGHEST))[0]
  num_out = change.shape[rhs_spec[0]]
  selector_shape = [1] * out.ndim
  selector_shape[out_spec[1]] = num_out
  selector = (jnp.arange(num_out) == out_channel).astype(out.dtype)
  return out * selector.reshape(selector_shape)


def _bilinear(eqn, values, diffs, precision):
  """``da*b + a*db + da*db`` of a bilinear operation at ``precision``."""
  a, b = values
  da, db = diffs
  overrides = {}
  cast = lambda x: x
  if 'precision' in eqn.params:
    if precision == 'highest':
      overrides['precision'] = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
    elif precision == 'default':
      overrides['precision'] = (lax.Precision.DEFAULT, lax.Precision.DEFAULT)
    else:
      overrides['precision'] = (lax.Precision.DEFAULT, lax.Precision.DEFAULT)
      overrides['preferred_element_type'] = jnp.result_type(a, b)
      cast = lambda x: x.astype(jnp.bfloat16)
  terms = []
  if da is not None:
    terms.append((da, b))
  if db is not None:
    terms.append((a, db))
  if da is not None and db is not None:
    terms.append((da, db))
  out = None
  for x, y in terms:
    term = _bind(eqn, [cast(x), cast(y)], **overrides)[0]
    out = term if out is None else out + term
  return out
