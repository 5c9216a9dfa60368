"""The comparison entries: how ``mcattn compare`` and ``mcattn evaluate`` sweep a method.

A method's runtime spec (:class:`mcattn.registry.Method`) says how to run it; its
:class:`MethodEntry` (conventionally ``ENTRY`` in ``mcattn/studies/<method>/compare.py``,
named by one line of :data:`METHOD_ENTRIES`) says how the studies measure it: the knob
swept and its values, the bound computed after the timed run, what the table says about
it, the options ``use_method`` gets inside the real model, and its fine-tuning hooks. A
registered method without an entry is compared once at its default knobs
(:func:`default_entry`).
"""

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..cost import CallInfo
from ..registry import get_method, method_names

__all__ = ["LayerInputs", "Trial", "MethodEntry", "METHOD_ENTRIES", "get_entries", "parse_variant",
           "default_entry", "finetune_hooks"]


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
    model_options : callable ``(value) -> dict``, optional
        The ``use_method`` options of knob value ``value`` inside the real model
        (``mcattn evaluate``, ``mcattn finetune``); default ``{knob: value}``. eigen adds
        its held-out calibration text, latte its thresholds calibrated on the sample.
    energy : str, optional
        Module with the method's ``mcattn energy`` rows (``BLOCKS``: label -> function of
        an :class:`~mcattn.studies.energy.EnergyConfig` returning the block's counts by
        stage) and, optionally, its paper's claims (``claims(cfg, table, lengths, mca)
        -> dict``, ``report(claims) -> list of lines``).
    finetune : str, optional
        Module with the method's fine-tuning hooks (its own trainable parameters, see
        :func:`finetune_hooks`), None for a method that trains the model's weights only.
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
    model_options: Callable | None = None
    energy: str | None = None
    finetune: str | None = None
    table_note: str = ""
    supplied: tuple = ()
    fixed: tuple = ()
    method: str = ""

    def __post_init__(self):
        if not self.method:
            object.__setattr__(self, "method", self.name)

    def options(self, value):
        """``use_method`` options of knob value ``value`` (with the variant's fixed knobs)."""
        if self.model_options is not None:
            return dict(self.model_options(value), **dict(self.fixed))
        return dict(dict(self.fixed) if self.knob is None else {self.knob: value}, **dict(self.fixed))


#: Method name -> "module:attribute" of its entry. Adding a method is one line here.
METHOD_ENTRIES = {
    "exact": "mcattn.studies.exact.compare:ENTRY",
    "mca": "mcattn.studies.mca.compare:ENTRY",
    "rfa": "mcattn.studies.rfa.compare:ENTRY",
    "eatt": "mcattn.studies.eatt.compare:ENTRY",
    "latte": "mcattn.studies.latte.compare:ENTRY",
    "eigen": "mcattn.studies.eigen.compare:ENTRY",
    "hybrid": "mcattn.studies.hybrid.compare:ENTRY",
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
    from ..front import _lookup

    allowed = _lookup(entry.method)[1].knobs
    free = [k for k in allowed if k != entry.knob and k not in entry.supplied]
    bad = [k for k in knobs if k not in free]
    if bad:
        raise ValueError(f"{spec!r}: {bad} cannot be fixed; the knobs of {entry.name} that can "
                         f"are {free} ({entry.knob} is swept)")

    def run(inputs, value, seed):
        return entry.run(inputs, value, seed, **knobs)

    return dataclasses.replace(entry, name=spec, run=run, fixed=tuple(knobs.items()), method=entry.name)


def default_entry(method):
    """The comparison entry of a method that has none of its own: one run at its default
    knobs (a plug-in without a sweep), no bound."""
    def run(inputs, value, seed):
        out, info = method.attention(inputs.q, inputs.k, inputs.v, key_padding_mask=inputs.key_padding_mask,
                                     scale=inputs.scale, return_info=True)
        return Trial(out=out, info=info)

    return MethodEntry(name=method.name, knob=None, values=(None,), run=run,
                       bound_note=f"{method.name}: no bound (no comparison entry)")


def finetune_hooks(entry):
    """The fine-tuning hooks module of ``entry`` (None: the method has no parameters of its own).

    The module gives ``FLAGS`` (config flags it understands, e.g. rfa's ``"gate"``),
    ``supplies(config) -> tuple`` (knobs its parameters give each call),
    ``parameters(config, bert, knobs) -> (torch module or None, knobs)`` (the parameters
    per layer, and the knobs with what they replace removed), ``layer_knobs(module,
    attention_module) -> dict`` (one layer's knobs) and ``DEPLOY`` (overrides for the
    deployed form, scored after training as ``after_hard``; empty for none).
    """
    return None if entry.finetune is None else importlib.import_module(entry.finetune)


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
