"""Which code path suits the backend the computation is traced for."""

import jax


def on_accelerator() -> bool:
  """True on GPU/TPU, where random numbers and fused reductions are cheap
  next to memory traffic; False on CPU, where drawing a normal costs more
  than a forward pass per parameter and reductions over a leading axis
  compile to slow loops."""
  return jax.default_backend() != 'cpu'
