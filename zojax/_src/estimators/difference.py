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

:func:`propagate` does both at once; for many changes at one point (one per
query), :class:`Recording` evaluates the function once, keeping every
intermediate value, and :func:`changes` then repeats only the operations on
differences for each change (under ``vmap`` or a loop).
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
    deltas: the changes, like ``args``; ``None`` for an unchanged argument
      (for a non-float argument: its changed value).
    precision: of the linear and bilinear operations on differences:
      ``'highest'`` (float32), ``'default'`` (the backend's default: TF32 on
      recent NVIDIA GPUs) or ``'bfloat16'`` (operands cast to bfloat16,
      float32 accumulation). Operations on unchanged values keep fn's own.

  Returns:
    ``(value, difference)``, pytrees like ``fn``'s output (for a non-float
    output, the difference entry is its changed value, as in
    :func:`changes`).
  """
  check_precision(precision)
  if len(deltas) != len(args):
    raise ValueError(f'{len(deltas)} deltas for {len(args)} arguments.')
  flat_deltas = []
  for arg, delta in zip(args, deltas):
    if delta is None:
      flat_deltas += [None] * len(jax.tree.leaves(arg))
      continue
    if jax.tree.structure(delta) != jax.tree.structure(arg):
      raise ValueError('a delta must have the structure of its argument: '
                       f'{jax.tree.structure(delta)} vs '
                       f'{jax.tree.structure(arg)}.')
    flat_deltas += jax.tree.leaves(delta)
  recorded = Recording(fn, args)
  return recorded.value, changes(recorded, flat_deltas, precision)


def check_precision(precision: str) -> None:
  if precision not in PRECISIONS:
    raise ValueError(f'precision must be one of {PRECISIONS}, got '
                     f'{precision!r}.')


class Recording:
  """``fn(*args)`` evaluated once with every intermediate value kept, so that
  :func:`changes` propagates any number of changes (one per query, under
  ``vmap`` or a loop) without evaluating ``fn`` again: the values are
  computed once, where the recording is made, and only the operations on
  changes are repeated (and compiled) per use.

  ``value`` is ``fn``'s output; ``num_inputs`` its number of flat inputs.
  """

  def __init__(self, fn: Callable[..., Any], args: tuple):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    self.jaxpr = closed.jaxpr
    self.num_inputs = len(self.jaxpr.invars)
    self.out_tree = jax.tree.structure(out_shape)
    self.values = _record(self.jaxpr, closed.consts, jax.tree.leaves(args))
    self.value = jax.tree.unflatten(
        self.out_tree, [_read(self.values, v) for v in self.jaxpr.outvars])


def changes(recorded: Recording, flat_deltas, precision: str = 'highest'):
  """``fn(x + δ) - fn(x)`` of a recorded ``fn``, a pytree like its output.

  ``flat_deltas`` has one entry per flat input of ``fn``: ``None`` for an
  unchanged input; for a float input its change (an array, or
  :class:`OneHot`); for a non-float input (a mask, indices) its changed
  value. The output follows the same convention (float outputs: their
  change; non-float outputs: their changed value), so the output of one
  recorded stage can be fed as the change of the next one's input.
  """
  check_precision(precision)
  flat_deltas = list(flat_deltas)
  if len(flat_deltas) != recorded.num_inputs:
    raise ValueError(f'{len(flat_deltas)} deltas for '
                     f'{recorded.num_inputs} flat inputs.')
  inputs = [_read(recorded.values, v) for v in recorded.jaxpr.invars]
  flat_deltas = [d if d is None or _is_float(x) else _Changed(d)
                 for x, d in zip(inputs, flat_deltas)]
  outs = _evaluate(recorded.jaxpr, recorded.values, flat_deltas, precision)
  result = []
  for value, change in zip(jax.tree.leaves(recorded.value), outs):
    if not _is_float(value):
      result.append(_changed_value(value, change))
    else:
      result.append(jnp.zeros_like(value) if change is None else
                    _difference(value, change))
  return jax.tree.unflatten(recorded.out_tree, result)


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


class _Values:
  """The value of every variable of a jaxpr at one point, and those of the
  calls evaluated inline (by equation index)."""

  def __init__(self):
    self.env: dict[Any, Any] = {}
    self.calls: dict[int, '_Values'] = {}


def _read(values: _Values, var):
  if isinstance(var, core.Literal):
    return var.val
  return values.env[var]


def _inlined(eqn):
  """The body of a call evaluated inline (jit, custom_jvp_call, ...)."""
  if eqn.primitive.name in ('scan', 'while', 'cond'):
    return None
  return next((eqn.params[p] for p in _CALL_PARAMS if p in eqn.params
               and isinstance(eqn.params[p], core.ClosedJaxpr)), None)


def _record(jaxpr, consts, args) -> _Values:
  values = _Values()
  for var, value in zip(jaxpr.constvars, consts):
    values.env[var] = value
  for var, value in zip(jaxpr.invars, args):
    values.env[var] = value
  for index, eqn in enumerate(jaxpr.eqns):
    ins = [_read(values, v) for v in eqn.invars]
    sub = _inlined(eqn)
    if sub is not None:
      inner = _record(sub.jaxpr, sub.consts, ins)
      values.calls[index] = inner
      outs = [_read(inner, v) for v in sub.jaxpr.outvars]
    else:
      outs = _bind(eqn, ins)
    for var, out in zip(eqn.outvars, outs):
      values.env[var] = out
  return values


def _evaluate(jaxpr, values: _Values, deltas, precision):
  """The change of each of ``jaxpr``'s outputs from its inputs' changes and
  the recorded values: a difference, ``None`` (unchanged) or, for non-float
  values (e.g. comparisons), the changed value itself wrapped in
  ``_Changed``. Equations with no changed input are skipped.
  """
  delta_env: dict[Any, Any] = {}

  def read(var):
    return None if isinstance(var, core.Literal) else delta_env.get(var)

  for var, delta in zip(jaxpr.invars, deltas):
    if delta is not None:
      delta_env[var] = delta
  for index, eqn in enumerate(jaxpr.eqns):
    ins = [read(v) for v in eqn.invars]
    if all(c is None for c in ins):
      continue
    sub = _inlined(eqn)
    if sub is not None:
      outs = _evaluate(sub.jaxpr, values.calls[index], ins, precision)
    else:
      outs = _apply(eqn, [_read(values, v) for v in eqn.invars],
                    [_read(values, v) for v in eqn.outvars], ins, precision)
    for var, out in zip(eqn.outvars, outs):
      if out is not None:
        delta_env[var] = out
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


def _apply(eqn, values, base, changes, precision):
  """The changes of one equation's outputs, from its inputs' ``values`` and
  ``changes`` and its recorded outputs ``base``."""
  name = eqn.primitive.name
  if (name == 'conv_general_dilated' and changes[0] is None
      and isinstance(changes[1], OneHot)
      and eqn.params['feature_group_count'] == 1
      and eqn.params['batch_group_count'] == 1):
    return [_conv_one_kernel_entry(eqn, values[0], changes[1])]
  diffs = [_difference(v, c) for v, c in zip(values, changes)]
  exact = all(_is_float(b) for b in base) and not any(
      isinstance(c, _Changed) for c in changes)
  if exact and name in _LINEAR_UNARY and len(values) == 1:
    return [_bind(eqn, diffs)[0]]
  if exact and name in _LINEAR_FIRST and all(c is None for c in changes[1:]):
    rest = list(values[1:])
    if name == 'pad':
      rest = [jnp.zeros_like(values[1])]
    return [_bind(eqn, [diffs[0]] + rest)[0]]
  if exact and name in ('add', 'sub', 'add_any'):
    a, b = diffs
    shape = jnp.shape(base[0])
    if a is None:
      out = -b if name == 'sub' else b
    elif b is None:
      out = a
    else:
      out = a - b if name == 'sub' else a + b
    return [jnp.broadcast_to(out, shape).astype(base[0].dtype)]
  if exact and name == 'div' and changes[1] is None:
    return [_bind(eqn, [diffs[0], values[1]])[0]]
  if exact and name == 'concatenate':
    parts = [jnp.zeros_like(v) if d is None else d
             for v, d in zip(values, diffs)]
    return [_bind(eqn, parts)[0]]
  if exact and name == 'select_n' and changes[0] is None:
    cases = [jnp.zeros_like(v) if d is None else d
             for v, d in zip(values[1:], diffs[1:])]
    return [_bind(eqn, [values[0]] + cases)[0]]
  if exact and name == 'square':
    return [diffs[0] * (2 * values[0] + diffs[0])]
  if exact and name in _BILINEAR:
    return [_bilinear(eqn, values, diffs, precision)]
  # anything else: g(v + dv) - g(v), in the operation's own dtype
  changed = _bind(eqn, [_changed_value(v, c) for v, c in zip(values, changes)])
  return [(n - b) if _is_float(b) else _Changed(n)
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
