"""Hybrid sparse + pooled attention (issue 26): LATTE's kept keys exact, the rest pooled.

The kept set is LATTE's (:func:`mcattn.latte.kept_mask`: the keys its 4-bit estimate ranks
highest, per head); the dropped keys of each key block are summarised by their estimated
mass and their mean value (:mod:`mcattn.hybrid.naive` defines it;
``benchmarks/hybrid_heldout.py`` measures it, with the remainders that did not earn their
place, in ``docs/hybrid.md``). Backends: ``numpy`` (the reference) and ``numba``.
"""

from .api import KERNELS, MODES, REMAINDERS, HybridInfo, attention

__all__ = ["attention", "HybridInfo", "KERNELS", "MODES", "REMAINDERS"]
