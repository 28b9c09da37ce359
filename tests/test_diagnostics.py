"""Tests for zojax.diagnostics."""

import numpy as np

import zojax
from tests.objectives import quadratic_problem


def test_cge_agrees_with_the_gradient_and_rge_improves_with_queries():
  params, obj_fn = quadratic_problem()
  cge = zojax.diagnostics.compare_with_gradient(
      zojax.cge(1e-2, difference='central'), obj_fn, params, num_trials=4)
  assert cge.cosine_mean > 0.9999
  assert cge.relative_error_mean < 1e-3
  assert cge.variance < 1e-8  # deterministic
  assert cge.queries_per_estimate == 24

  few = zojax.diagnostics.compare_with_gradient(
      zojax.rge(2, 1e-3), obj_fn, params, num_trials=400)
  many = zojax.diagnostics.compare_with_gradient(
      zojax.rge(32, 1e-3), obj_fn, params, num_trials=400)
  assert few.queries_per_estimate == 3 and many.queries_per_estimate == 33
  assert many.cosine_mean > few.cosine_mean + 0.2
  # variance of an average of q i.i.d. estimates falls as 1/q
  np.testing.assert_allclose(few.variance / many.variance, 16.0, rtol=0.25)
  assert many.mean_relative_error < 0.1
