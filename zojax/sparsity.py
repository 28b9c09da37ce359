"""DeepZero's sparsity-induced ZO training: ZO-GraSP layer ratios, random
masks for ``zojax.cge(mask=...)`` (see ``zojax/_src/sparsity.py``)."""

from zojax._src.sparsity import cge_grasp_scores
from zojax._src.sparsity import layer_sparsity
from zojax._src.sparsity import random_mask
from zojax._src.sparsity import weight_leaves
from zojax._src.sparsity import zo_grasp_scores

__all__ = ('cge_grasp_scores', 'layer_sparsity', 'random_mask',
           'weight_leaves', 'zo_grasp_scores')
