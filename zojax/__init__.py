"""zojax: zeroth-order gradient estimators and optimizers for JAX and optax."""

from zojax import data
from zojax import federated
from zojax import diagnostics
from zojax import flax
from zojax import masks
from zojax import models
from zojax import parallel
from zojax import sparsity
from zojax._src.base import EstimatorState
from zojax._src.base import ZerothOrderTransform
from zojax._src.black_box import black_box
from zojax._src.cbo import CBOState
from zojax._src.cbo import cbo
from zojax._src.cge import cge
from zojax._src.conservative import ConservativeState
from zojax._src.conservative import conservative_selection
from zojax._src.forward_gradient import forward_gradient
from zojax._src.fzoos import FZooSState
from zojax._src.fzoos import fzoos
from zojax._src.mezo import MeZOState
from zojax._src.mezo import MeZOTransform
from zojax._src.mezo import mezo
from zojax._src.optimizers import forward_grad
from zojax._src.optimizers import zo_adam
from zojax._src.optimizers import zo_sgd
from zojax._src.optimizers import zo_sgd_conservative
from zojax._src.optimizers import zo_sgd_momentum
from zojax._src.optimizers import zo_sign_sgd
from zojax._src.rank import RankLineSearchState
from zojax._src.rank import rank_estimator
from zojax._src.rank import rank_line_search
from zojax._src.rank import zo_ranksgd
from zojax._src.rge import rge
from zojax._src.stats import EstimateInfo
from zojax._src.stats import EstimateStats
from zojax._src.stats import estimate_info

__version__ = '0.1.0'

__all__ = (
    'CBOState',
    'ConservativeState',
    'EstimateInfo',
    'EstimateStats',
    'EstimatorState',
    'FZooSState',
    'MeZOState',
    'MeZOTransform',
    'ZerothOrderTransform',
    'black_box',
    'cbo',
    'cge',
    'conservative_selection',
    'estimate_info',
    'forward_grad',
    'forward_gradient',
    'fzoos',
    'data',
    'diagnostics',
    'federated',
    'flax',
    'masks',
    'mezo',
    'models',
    'parallel',
    'sparsity',
    'RankLineSearchState',
    'rank_estimator',
    'rank_line_search',
    'rge',
    'zo_adam',
    'zo_ranksgd',
    'zo_sgd',
    'zo_sgd_conservative',
    'zo_sgd_momentum',
    'zo_sign_sgd',
)
