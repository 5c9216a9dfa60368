"""The methods of the library: one line each in :data:`METHODS`.

A method is a runtime spec, :class:`mcattn._plugin.Method`, defined as ``METHOD`` in
``mcattn/<method>/spec.py``; :data:`METHODS` names it in one line, and :func:`register`
adds one at run time (a plug-in outside the package, a test's toy method). The front
door, dask, the autograd adapters, ``use_method``, ``mcattn selftest`` and the CUDA
source list read the spec; none of them names a method.

The comparison (``mcattn compare``) reads a second, optional table: a method's
:class:`MethodEntry` (its swept knob, its bound in the table); a method without one is
compared at its default knobs.
"""

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._plugin import Check, Method, ModelHooks
from .cost import CallInfo

__all__ = ["METHODS", "Method", "ModelHooks", "Check", "get_method", "method_names", "register",
           "unregister", "LayerInputs", "Trial", "MethodEntry", "METHOD_ENTRIES", "get_entries"]

#: Method name -> "module:attribute" of its :class:`~mcattn._plugin.Method`. Adding a
#: method is one folder and one line here.
METHODS = {
    "exact": "mcattn.exact.spec:METHOD",
    "mca": "mcattn.mca.spec:METHOD",
    "rfa": "mcattn.rfa.spec:METHOD",
    "eatt": "mcattn.eatt.spec:METHOD",
    "latte": "mcattn.latte.spec:METHOD",
    "eigen": "mcattn.eigen.spec:METHOD",
}
_REGISTERED = {}  # name -> Method, from register()


def method_names():
    """The registered methods' names: :data:`METHODS` in order, then :func:`register`'s."""
    return list(METHODS) + [n for n in _REGISTERED if n not in METHODS]


def get_method(name):
    """The :class:`~mcattn._plugin.Method` called ``name``.

    Raises
    ------
    ValueError
        ``name`` is not a registered method (the message lists them).
    """
    if isinstance(name, str) and name in _REGISTERED:
        return _REGISTERED[name]
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are {', '.join(method_names())}")
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def register(method):
    """Add ``method`` (a :class:`~mcattn._plugin.Method`) to the library for this process.

    It is then reachable as ``mcattn.attention(..., method=method.name)``, listed by
    :func:`mcattn.methods`, swapped into models by ``use_method``, self-tested and
    compared at its default knobs. Registering a name again replaces the earlier
    registration; the built-in names cannot be replaced.

    Raises
    ------
    TypeError
        ``method`` is not a Method.
    ValueError
        ``method.name`` is a built-in method's name.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register takes a mcattn.registry.Method; got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"{method.name!r} is a built-in method; register the plug-in under another name")
    _REGISTERED[method.name] = method
    return method


def unregister(name):
    """Remove a method added by :func:`register` (no error if it is not there)."""
    _REGISTERED.pop(name, None)


@dataclass(frozen=True)
class LayerInputs:
    """Attention inputs of one layer of a real sample (float32 NumPy arrays).

    Attributes
    ----------
    q, k, v : numpy.ndarray, shape ``[B, H, N, d]``
    key_padding_mask : numpy.ndarray of bool, shape ``[B, N]``
        True = a real token.
    scale : float
    x : numpy.ndarray, shape ``[B, N, d_model]``, or None
        Input of the value projection (for methods that approximate it, like mca).
    w_v : numpy.ndarray, shape ``[d_model, H * d]``, or None
        Value weight in the ``y = x @ w_v + b_v`` convention.
    b_v : numpy.ndarray, shape ``[H * d]``, or None
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    key_padding_mask: np.ndarray
    scale: float
    x: np.ndarray | None = None
    w_v: np.ndarray | None = None
    b_v: np.ndarray | None = None

    @property
    def has_projection(self):
        return self.x is not None and self.w_v is not None


@dataclass(frozen=True)
class Trial:
    """One run of a method on one layer.

    Attributes
    ----------
    out : numpy.ndarray, shape ``[B, H, N, dv]``
    info : CallInfo
        Operation counts of the run (and the method's own figures).
    bound : numpy.ndarray, float or None
        The method's theoretical bound on the relative output error
        ``||O~ - O|| / ||O||`` per ``[B, H]`` (or one number), None if it has none.
    """

    out: np.ndarray
    info: CallInfo
    bound: np.ndarray | float | None = None


@dataclass(frozen=True)
class MethodEntry:
    """How ``mcattn compare`` runs a method.

    Attributes
    ----------
    name : str
        Name on the command line and in the tables.
    knob : str or None
        The parameter swept (``"alpha"``, ``"num_features"``), None for exact.
    values : tuple
        Default sweep of the knob.
    run : callable ``(inputs: LayerInputs, value, seed: int) -> Trial``
        What is timed.
    bound : callable ``(inputs, value, trial, exact_out) -> array or None``, optional
        Computes the bound after the timed run (so that its cost is not timed); it
        overrides ``trial.bound``.
    needs_projection : bool
        The method needs ``x`` and ``w_v`` (a sample without them skips it).
    eval_values : tuple, optional
        Knob values for ``mcattn evaluate`` (inside the model); default ``values``.
    bound_note : str
        What the bound column means for this method (expected error, 1 - delta, ...).
    attention : callable, optional
        What ``mcattn.attention(q, k, v, method=name, **knobs)`` calls: a function
        ``(q, k, v, *, attn_mask, key_padding_mask, is_causal, scale, backend,
        check_finite, return_info, **knobs)``. Its other keyword-only parameters are the
        method's knobs (listed by :func:`mcattn.methods`).
    description : str
        One line for ``mcattn.methods()`` and ``mcattn methods``.
    grad : str, optional
        Module with the method's training functions (``forward``, ``backward``,
        ``TRAINABLE``; see ``mcattn/exact/grad.py``), used by the autograd adapters of
        :mod:`mcattn.frameworks`. None: the method has no backward yet.
    dask_plan : callable ``(knobs, batch_shape) -> mcattn._dask.DaskPlan``, optional
        How the method runs on dask chunks; default: the same knobs for every chunk
        (right for deterministic methods). Random methods key their draws by the global
        batch/head indices here, so chunking changes nothing.
    table_note : str
        A line printed under the ``mcattn compare`` table when the method ran (e.g. that
        the method needs training), empty for none.
    supplied : tuple of str
        Knobs that ``run`` fills itself (from the layer's inputs, the seed, the swept
        value): a variant cannot fix them.
    fixed : tuple of (str, object)
        Knobs held fixed for every run (a *variant*, from ``"name:knob=value,..."``; see
        :func:`get_entries`); ``run`` receives them as keyword arguments.
    method : str
        The registered method (``name`` without the variant's knobs).
    """

    name: str
    knob: str | None
    values: tuple
    run: Callable
    bound: Callable | None = None
    needs_projection: bool = False
    eval_values: tuple | None = None
    bound_note: str = ""
    attention: Callable | None = None
    description: str = ""
    grad: str | None = None
    dask_plan: Callable | None = None
    table_note: str = ""
    supplied: tuple = ()
    fixed: tuple = ()
    method: str = ""

    def __post_init__(self):
        if not self.method:
            object.__setattr__(self, "method", self.name)


#: Method name -> "module:attribute" of its entry. Adding a method is one line here.
METHOD_ENTRIES = {
    "exact": "mcattn.studies.exact.compare:ENTRY",
    "mca": "mcattn.studies.mca.compare:ENTRY",
    "rfa": "mcattn.studies.rfa.compare:ENTRY",
    "eatt": "mcattn.studies.eatt.compare:ENTRY",
    "latte": "mcattn.studies.latte.compare:ENTRY",
    "eigen": "mcattn.studies.eigen.compare:ENTRY",
}


def parse_variant(spec):
    """``"mca:shared_draws=True,sampling=optimal"`` -> ``("mca", {"shared_draws": True, ...})``.

    Values are Python literals where they parse as one (``True``, ``0.5``), strings
    otherwise; a plain method name gives no knobs.
    """
    import ast

    name, _, rest = str(spec).partition(":")
    knobs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"a variant's knobs are knob=value pairs; got {item!r} in {spec!r}")
        try:
            knobs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            knobs[key.strip()] = value.strip()
    return name, knobs


def _variant(entry, spec, knobs):
    from .front import _lookup

    allowed = _lookup(entry.name)[1].knobs
    free = [k for k in allowed if k != entry.knob and k not in entry.supplied]
    bad = [k for k in knobs if k not in free]
    if bad:
        raise ValueError(f"{spec!r}: {bad} cannot be fixed; the knobs of {entry.name} that can "
                         f"are {free} ({entry.knob} is swept)")

    def run(inputs, value, seed):
        return entry.run(inputs, value, seed, **knobs)

    attention = None if entry.attention is None else functools.partial(entry.attention, **knobs)
    return dataclasses.replace(entry, name=spec, run=run, attention=attention,
                               fixed=tuple(knobs.items()), method=entry.name)


def default_entry(method):
    """The comparison entry of a method that has none of its own: one run at its default
    knobs (a plug-in without a sweep), no bound."""
    def run(inputs, value, seed):
        out, info = method.attention(inputs.q, inputs.k, inputs.v, key_padding_mask=inputs.key_padding_mask,
                                     scale=inputs.scale, return_info=True)
        return Trial(out=out, info=info)

    return MethodEntry(name=method.name, knob=None, values=(None,), run=run,
                       bound_note=f"{method.name}: no bound (no comparison entry)")


def get_entries(names=None):
    """The entries of ``names`` (all when None), in registry order, then variants in order.

    A name may be a *variant* ``"method:knob=value,knob=value"``: the method's entry with
    those knobs fixed in every run (``mcattn compare --methods mca mca:shared_draws=True``
    runs MCA with independent and with shared draws); its ``name`` is the whole string.
    A registered method without an entry in :data:`METHOD_ENTRIES` gets
    :func:`default_entry`.

    Raises
    ------
    ValueError
        An unknown method name (the message lists the known ones), or a variant that fixes
        a knob the method does not have (or the knob it sweeps).
    """
    known = method_names()
    if names is None:
        names = known
    names = list(names)
    parsed = [(n, *parse_variant(n)) for n in names]
    unknown = [n for n, base, _ in parsed if base not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; the methods are {known}")

    def load(name):
        if name not in METHOD_ENTRIES:
            return default_entry(get_method(name))
        module, attr = METHOD_ENTRIES[name].split(":")
        return getattr(importlib.import_module(module), attr)

    entries = [load(name) for name in known if name in names]
    for spec, base, knobs in parsed:
        if spec not in known and spec not in [e.name for e in entries]:
            entries.append(_variant(load(base), spec, knobs))
    return entries
