"""Parameter selection for zeroth-order estimators (``mask=``).

Every function here returns a *mask rule*: a callable ``params -> mask`` that
the estimators' ``mask=`` accepts (as does ``optax.masked``). A mask is a
pytree like ``params`` whose leaves are Python bools (a whole leaf in or out,
known when tracing, so frozen leaves cost nothing) or boolean arrays
(coordinate-wise selection).

Example::

  only_head = zojax.masks.by_path(r'Dense_2')
  small = zojax.masks.by_magnitude(keep_fraction=0.2, keep='smallest')
  both = zojax.masks.intersect(only_head, small)
  tx = zojax.rge(16, 1e-3, mask=both)
"""

from zojax._src.core.masks import MagnitudeThresholds
from zojax._src.core.masks import by_magnitude
from zojax._src.core.masks import by_path
from zojax._src.core.masks import count_selected
from zojax._src.core.masks import intersect
from zojax._src.core.masks import sparse_mezo

__all__ = ('MagnitudeThresholds', 'by_magnitude', 'by_path',
           'count_selected', 'intersect', 'sparse_mezo')
