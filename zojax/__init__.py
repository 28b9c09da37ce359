"""zojax: zeroth-order gradient estimators and optimizers for JAX and optax."""

from zojax import data
from zojax import diagnostics
from zojax import federated
from zojax import flax
from zojax import masks
from zojax import models
from zojax import offload
from zojax import parallel
from zojax import sparsity
from zojax._src.aliases import forward_grad
from zojax._src.aliases import zo_adam
from zojax._src.aliases import zo_ranksgd
from zojax._src.aliases import zo_sgd
from zojax._src.aliases import zo_sgd_conservative
from zojax._src.aliases import zo_sgd_momentum
from zojax._src.aliases import zo_sign_sgd
from zojax._src.core.base import EstimatorState
from zojax._src.core.base import ZerothOrderTransform
from zojax._src.core.stats import EstimateInfo
from zojax._src.core.stats import EstimateStats
from zojax._src.core.stats import estimate_info
from zojax._src.estimators.black_box import black_box
from zojax._src.estimators.cge import cge
from zojax._src.estimators.forward_gradient import forward_gradient
from zojax._src.estimators.fzoos import FZooSState
from zojax._src.estimators.fzoos import fzoos
from zojax._src.estimators.mezo import MeZOState
from zojax._src.estimators.mezo import MeZOTransform
from zojax._src.estimators.mezo import mezo
from zojax._src.estimators.qzo import qzo
from zojax._src.estimators.rank import rank_estimator
from zojax._src.estimators.rge import rge
from zojax._src.population.cbo import CBOState
from zojax._src.population.cbo import cbo
from zojax._src.population.ga import GAState
from zojax._src.population.ga import ga
from zojax._src.selection import ConservativeState
from zojax._src.selection import RankLineSearchState
from zojax._src.selection import conservative_selection
from zojax._src.selection import rank_line_search

__version__ = '0.2.0'

__all__ = (
    'CBOState',
    'ConservativeState',
    'EstimateInfo',
    'EstimateStats',
    'EstimatorState',
    'FZooSState',
    'GAState',
    'MeZOState',
    'MeZOTransform',
    'RankLineSearchState',
    'ZerothOrderTransform',
    'black_box',
    'cbo',
    'cge',
    'conservative_selection',
    'data',
    'diagnostics',
    'estimate_info',
    'federated',
    'flax',
    'forward_grad',
    'forward_gradient',
    'fzoos',
    'ga',
    'masks',
    'mezo',
    'models',
    'offload',
    'parallel',
    'qzo',
    'rank_estimator',
    'rank_line_search',
    'rge',
    'sparsity',
    'zo_adam',
    'zo_ranksgd',
    'zo_sgd',
    'zo_sgd_conservative',
    'zo_sgd_momentum',
    'zo_sign_sgd',
)
