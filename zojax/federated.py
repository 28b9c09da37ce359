"""Federated zeroth-order optimization simulations: FedZO (with FedProx and
SCAFFOLD corrections), FZooS (``fed_fzoos``) and FedKSeed.

Clients are a ``vmap`` axis (split over a device mesh axis when one is
given); every algorithm counts its queries and the bytes it communicates.
See :mod:`zojax._src.federated.protocol` for the conventions.
"""

from zojax._src.estimators.surrogate import FourierFeatures
from zojax._src.estimators.surrogate import QueryHistory
from zojax._src.federated.fedkseed import FedKSeedState
from zojax._src.federated.fedkseed import SeedMessages
from zojax._src.federated.fedkseed import fedkseed
from zojax._src.federated.fedkseed import reconstruct
from zojax._src.federated.fedkseed import seed_direction
from zojax._src.federated.fedkseed import seed_probabilities
from zojax._src.federated.fedzo import FedZOState
from zojax._src.federated.fedzo import fedzo
from zojax._src.federated.fedzo import orthonormal_estimate
from zojax._src.federated.fzoos import FedFZooSState
from zojax._src.federated.fzoos import fed_fzoos
from zojax._src.federated.problems import FederatedProblem
from zojax._src.federated.problems import heterogeneous_quadratic
from zojax._src.federated.protocol import BYTES_PER_NUMBER
from zojax._src.federated.protocol import Clients
from zojax._src.federated.protocol import FederatedAlgorithm
from zojax._src.federated.protocol import RoundInfo
from zojax._src.federated.protocol import run

fzoos = fed_fzoos  # the former name (it shadowed zojax.fzoos on import *)


def fedprox(local_steps: int, *, prox: float = 1.0, **kwargs):
  """FedZO with FedProx's proximal correction: ``fedzo(...,
  correction='fedprox')``."""
  return fedzo(local_steps, correction='fedprox', prox=prox, **kwargs)


def scaffold(local_steps: int, *, variant: int = 1, **kwargs):
  """FedZO with SCAFFOLD's control variates, type I (``variant=1``: the
  clients' mean local estimates) or II (``variant=2``: fresh estimates at
  the round's start)."""
  if variant not in (1, 2):
    raise ValueError(f'variant must be 1 or 2, got {variant!r}.')
  return fedzo(local_steps, correction=f'scaffold{variant}', **kwargs)


__all__ = (
    'BYTES_PER_NUMBER',
    'Clients',
    'FedFZooSState',
    'FedKSeedState',
    'FedZOState',
    'FederatedAlgorithm',
    'FederatedProblem',
    'FourierFeatures',
    'QueryHistory',
    'RoundInfo',
    'SeedMessages',
    'fedkseed',
    'fedprox',
    'fedzo',
    'fed_fzoos',
    'heterogeneous_quadratic',
    'orthonormal_estimate',
    'reconstruct',
    'run',
    'scaffold',
    'seed_direction',
    'seed_probabilities',
)
