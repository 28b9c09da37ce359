"""Test configuration (set before jax is imported): 8 simulated CPU devices,
and XLA:CPU's backend optimisation off. The tests' problems are tiny, so
their time is mostly compilation (about 3/4 of the suite on 2 cores); at
level 0 it compiles about 30% faster. The benchmarks and experiments run at
XLA's default level."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8'
    ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
