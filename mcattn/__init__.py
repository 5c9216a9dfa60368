"""mcattn: approximate softmax attention for NumPy and CuPy arrays.

Exact attention (:func:`attention`, :func:`attention_probs`) is the baseline; the
approximations live in one subpackage each (``mcattn.mca``, ``mcattn.rfa``, ...).
Every function takes NumPy or CuPy arrays, or torch / JAX / TensorFlow tensors through
DLPack, and returns the same array type. :func:`backends` tells which kernels can run
on this machine.
"""

import numpy as _np

if not hasattr(_np, "row_stack"):
    # numba-cuda <= 0.30.4 registers an overload of np.row_stack when numba.cuda is first
    # imported; NumPy 2.5 removed that deprecated alias of vstack, so importing numba.cuda
    # fails there (seen on the H200 machine: numpy 2.5.2, numba-cuda 0.30.4). Restore the
    # alias, as NumPy itself defined it, until numba-cuda drops the overload.
    setattr(_np, "row_stack", _np.vstack)  # noqa: B010 - the removed name, restored

from . import _moved, config, cost, eatt, eigen, errors, latte, mca, random, rfa
from ._dispatch import backends
from .cost import CallInfo, OpCounts
from .exact import attention_probs
from .front import attention, methods
from .tuning import tune

_moved.install()  # the old paths of the modules now in mcattn.studies, with a warning

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_probs",
    "methods",
    "tune",
    "backends",
    "CallInfo",
    "OpCounts",
    "latte",
    "mca",
    "rfa",
    "eatt",
    "eigen",
    "config",
    "cost",
    "errors",
    "random",
    "__version__",
]
