"""One front door: ``mcattn.attention(q, k, v, method=..., **knobs)`` and ``mcattn.methods()``.

Every method registered in :mod:`mcattn.registry` is reachable through
:func:`attention` with the same masks, causal flag, scale, backend, ``check_finite`` and
``return_info``; the method's own parameters (its *knobs*) are keyword arguments, read
from the signature of its spec's ``attention`` function
(:class:`mcattn._plugin.Method`), so a new method needs no edit here. dask arrays are
mapped over chunks of the batch and head dims (:mod:`mcattn._dask`).
"""

import functools
import inspect
from dataclasses import dataclass

from ._validate import check_bool, check_flags
from .registry import get_method, method_names

__all__ = ["attention", "methods", "MethodSpec", "COMMON_ARGUMENTS"]

#: Arguments every method takes, with the same meaning (torch SDPA's conventions).
COMMON_ARGUMENTS = ("attn_mask", "key_padding_mask", "is_causal", "scale", "backend", "check_finite",
                    "return_info")

_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class MethodSpec:
    """A method as :func:`mcattn.methods` lists it.

    Attributes
    ----------
    name : str
        The value of ``method=``.
    description : str
        One line: what the method approximates.
    knobs : dict
        Knob name -> default (:data:`REQUIRED` when the knob must be given).
    needs_values : bool
        Whether ``v`` must be given (``mca`` computes the values itself from ``x``).
    """

    name: str
    description: str
    knobs: dict
    needs_values: bool = True

    @property
    def required(self):
        """Knobs without a default."""
        return tuple(name for name, default in self.knobs.items() if default is _REQUIRED)

    def __str__(self):
        parts = [f"{k}" if d is _REQUIRED else f"{k}={d!r}" for k, d in self.knobs.items()]
        return f"{self.name:6s} {self.description}\n       knobs: {', '.join(parts) or '(none)'}"


#: The default of a knob that has none (it must be given).
REQUIRED = _REQUIRED


def _lookup(method):
    """``(Method, MethodSpec)`` of the registered method called ``method``."""
    found = get_method(method)
    return found, _listing(found)


@functools.lru_cache(maxsize=64)
def _listing(method):  # per Method object (hashed by identity): re-registering re-reads it
    params = inspect.signature(method.attention).parameters
    knobs = {name: p.default for name, p in params.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in COMMON_ARGUMENTS}
    v = params.get("v")
    needs_values = v is not None and v.default is _REQUIRED
    return MethodSpec(method.name, method.description, knobs, needs_values)


def methods():
    """The methods :func:`attention` runs, with their knobs.

    Returns
    -------
    list of MethodSpec
        In registry order (``exact`` first).

    Examples
    --------
    >>> import mcattn
    >>> [m.name for m in mcattn.methods()][:3]
    ['exact', 'mca', 'rfa']
    """
    return [_lookup(name)[1] for name in method_names()]


def check_knobs(method, knobs):
    """``(Method, MethodSpec)`` of ``method`` after checking ``knobs`` against its signature.

    Raises
    ------
    ValueError
        Unknown method (the message lists the methods).
    TypeError
        A knob the method does not take, a required knob missing, or a bool knob (one whose
        default is a bool) given anything but a bool (named).
    """
    found, spec = _lookup(method)
    unknown = sorted(set(knobs) - set(spec.knobs))
    if unknown:
        have = ", ".join(spec.knobs) or "none"
        raise TypeError(f"method {method!r} takes no knob {', '.join(map(repr, unknown))}; "
                        f"its knobs are: {have}")
    missing = [name for name in spec.required if name not in knobs]
    if missing:
        raise TypeError(f"method {method!r} needs the knob(s) {', '.join(map(repr, missing))}")
    for name, default in spec.knobs.items():
        if isinstance(default, bool) and name in knobs:
            check_bool(name, knobs[name])
    return found, spec


@check_flags
def attention(q, k, v=None, *, method="exact", attn_mask=None, key_padding_mask=None, is_causal=False,
              scale=None, backend=None, check_finite=True, return_info=False, **knobs):
    """Softmax attention, exact or approximated by ``method``.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
        Queries: NumPy, CuPy, dask, or a torch / JAX / TensorFlow tensor (through DLPack).
    k : array, shape ``[..., Nk, d]``
    v : array, shape ``[..., Nk, dv]``
        Values (leading dims of ``q``, ``k``, ``v`` broadcast). ``mca`` takes no ``v``: it
        estimates the values from the knobs ``x``, ``w_v``, ``b_v``.
    method : str, default "exact"
        One of :func:`methods` (``"exact"``, ``"mca"``, ``"rfa"``, ...).
    attn_mask : array, optional
        Boolean (True = may attend) or additive float, broadcastable to ``[..., Nq, Nk]``.
    key_padding_mask : array of bool, optional
        ``[B, Nk]``, True = a real key.
    is_causal : bool, default False
    scale : float, optional
        Default ``1/sqrt(d)``.
    backend : {None, "numpy", "numba", "cuda", "cupy"}
    check_finite : bool, default True
    return_info : bool, default False
        Also return the call's :class:`~mcattn.cost.CallInfo` (a method's own subclass).
        Not available for dask inputs.
    **knobs
        The method's parameters, e.g. ``num_features=64, seed=0`` (rfa), ``alpha=0.2,
        x=..., w_v=...`` (mca); :func:`methods` lists them.

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
        Same array type (and device) as ``q``; a lazy dask array for dask inputs.
    info : CallInfo
        Only with ``return_info=True``.

    Raises
    ------
    ValueError
        Unknown method.
    TypeError
        A knob the method does not take, a required knob missing, or a flag
        (``is_causal``, ``check_finite``, ``return_info``, a method's bool knob) that is
        not a bool.

    Examples
    --------
    >>> import numpy as np, mcattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 4, 256, 32), dtype=np.float32) for _ in range(3))
    >>> exact = mcattn.attention(q, k, v)
    >>> approx = mcattn.attention(q, k, v, method="rfa", num_features=64, seed=0)
    >>> approx.shape
    (1, 4, 256, 32)
    """
    found, spec = check_knobs(method, knobs)
    if v is None and spec.needs_values:
        raise TypeError(f"method {method!r} needs v (the values)")
    if v is not None and not spec.needs_values:
        raise TypeError(f"method {method!r} computes the values itself; pass v=None and its knobs "
                        f"({', '.join(spec.required)})")
    common = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                  scale=scale, backend=backend, check_finite=check_finite, return_info=return_info)
    from . import _dask

    if _dask.any_dask(q, k, v, attn_mask, key_padding_mask, *knobs.values()):
        return _dask.attention(found, q, k, v, common, knobs)
    return found.attention(q, k, v, **common, **knobs)
