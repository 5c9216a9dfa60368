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

import importlib

from ._plugin import Check, Method, ModelHooks

__all__ = ["METHODS", "Method", "ModelHooks", "Check", "get_method", "method_names", "register",
           "unregister"]

#: Method name -> "module:attribute" of its :class:`~mcattn._plugin.Method`. Adding a
#: method is one folder and one line here.
METHODS = {
    "exact": "mcattn.exact.spec:METHOD",
    "mca": "mcattn.mca.spec:METHOD",
    "rfa": "mcattn.rfa.spec:METHOD",
    "eatt": "mcattn.eatt.spec:METHOD",
    "latte": "mcattn.latte.spec:METHOD",
    "eigen": "mcattn.eigen.spec:METHOD",
    "hybrid": "mcattn.hybrid.spec:METHOD",
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



#: Names this module had before the comparison entries moved to the evaluation wing.
_MOVED = ("LayerInputs", "Trial", "MethodEntry", "METHOD_ENTRIES", "get_entries", "parse_variant",
          "default_entry")


def __getattr__(name):
    if name in _MOVED:
        import warnings

        warnings.warn(f"mcattn.registry.{name} is deprecated: it is mcattn.studies.entries.{name} "
                      "(the comparison entries are the evaluation wing's)", DeprecationWarning,
                      stacklevel=2)
        import importlib

        # by name, not an import statement: the registry does not build on the studies
        return getattr(importlib.import_module("mcattn.studies.entries"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
