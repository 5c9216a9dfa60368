"""mcattn: approximate softmax attention for NumPy and CuPy arrays.

Exact attention (:func:`attention`, :func:`attention_probs`) is the baseline; the
approximations live in one subpackage each (``mcattn.mca``, ``mcattn.rfa``, ...).
Every function takes NumPy or CuPy arrays, or torch / JAX / TensorFlow tensors through
DLPack, and returns the same array type. :func:`backends` tells which kernels can run
on this machine.
"""

from . import config, cost, eatt, eigen, errors, latte, mca, random, rfa
from ._dispatch import backends
from .cost import CallInfo, OpCounts
from .exact import attention_probs
from .front import attention, methods

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_probs",
    "methods",
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
