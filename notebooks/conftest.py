"""Notebooks run in CI in quick mode (nbmake starts their kernels with this
process's environment)."""

import os

os.environ.setdefault('ZOJAX_QUICK', '1')
