"""The test environment that conftest.py promises (DESIGN.md section 3)."""

import jax


def test_eight_simulated_cpu_devices():
  assert jax.default_backend() == 'cpu'
  assert jax.device_count() == 8
