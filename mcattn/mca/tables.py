"""Compiled weight tables of the Monte-Carlo projection: the alias tables and the alias draw.

The CPU kernels (:mod:`mcattn.mca.cpu`, :mod:`mcattn.mca.shared_cpu`) and the GPU launchers
share them; :mod:`mcattn.mca.naive` holds the definitions in pure NumPy.
"""

import numpy as np

from .._jit import njit
from . import naive

__all__ = ["WeightTables", "weight_tables", "alias_tables", "alias_draw"]

_vose = njit(cache=True)(naive.vose)


def alias_tables(p):
    """:func:`mcattn.mca.naive.alias_tables` built by compiled code (the same tables)."""
    return naive.alias_tables(p, build=_vose)


class WeightTables(naive.WeightTables):
    """:class:`mcattn.mca.naive.WeightTables` with the alias tables built by compiled code
    (the same tables: a few hundred microseconds for a 384 x 384 weight, not milliseconds)."""

    _alias_tables = staticmethod(alias_tables)


def weight_tables(w, num_heads):
    """:class:`WeightTables` of a host weight ``[d_in, H * dh]``."""
    return WeightTables(w, num_heads)


@njit(nogil=True, cache=True, inline="always")
def alias_draw(bits, threshold, alias, shift, d_in):
    """Index drawn by the alias method from 64 random bits (see naive.py)."""
    c = (bits >> np.uint64(shift)) * np.uint64(d_in)
    low = np.uint64(64 - shift)
    k = np.int64(c >> low)
    if (c & ((np.uint64(1) << low) - np.uint64(1))) < threshold[k]:
        return k
    return alias[k]
