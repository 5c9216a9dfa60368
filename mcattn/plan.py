"""Attention plans: which method, with which knobs, runs in each layer of a model.

A plan is what :func:`mcattn.tune` chooses and what
:func:`mcattn.frameworks.torch.use_method` applies with ``plan=``. On disk it is JSON in
the versioned schema ``mcattn-plan-v1``::

    {"format": "mcattn-plan-v1",
     "model": "all-MiniLM-L6-v2",
     "layers": [{"layer": 0, "method": "latte", "knobs": {"target_mass": 0.9}}, ...],
     "target": {"metric": "cosine", "min": 0.99},          # or null
     "predicted": {...}, "measured": {...}}                 # figures, free-form numbers

``knobs`` are the options ``use_method`` takes for that method. A calibrated knob is given
either by reference (``{"target_mass": 0.9}``: latte fits its thresholds on the first batch
each layer sees) or inline, as fitted on calibration text (``{"threshold": {"array": [...],
"dtype": "float32"}}``: an array knob, e.g. one threshold per head; :func:`mcattn.tune`
writes these). Layers not listed, and layers with method ``exact``, run the model's own
attention. ``target`` is ``{"metric": "cosine", "min": t}`` (mean cosine of the sentence
embeddings to exact) or ``{"metric": "token_error", "max": e}`` (relative Frobenius error of
the last hidden states over real tokens), or null.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PlanFileError

__all__ = ["PLAN_FORMAT", "TARGET_METRICS", "LayerChoice", "Plan", "load_plan", "save_plan",
           "exact_plan", "check_target"]

#: The schema version written by :func:`save_plan` and the only one :func:`load_plan` reads.
PLAN_FORMAT = "mcattn-plan-v1"
_KEYS = {"format", "model", "layers", "target", "predicted", "measured"}
#: dtypes an inline array knob may have.
_ARRAY_DTYPES = ("float16", "float32", "float64", "int32", "int64", "bool")
#: The target metrics and the side of each that is bounded.
TARGET_METRICS = {"cosine": "min", "token_error": "max"}


def _encode_knob(value):
    """A knob as JSON: arrays as ``{"array": nested list, "dtype": name}``."""
    if isinstance(value, np.ndarray):
        return {"array": value.tolist(), "dtype": value.dtype.name}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_knobs(knobs):
    return {n: _encode_knob(v) for n, v in knobs.items()}


def _decode_knob(value, where, bad):
    if not isinstance(value, dict):
        return value
    if set(value) != {"array", "dtype"} or value["dtype"] not in _ARRAY_DTYPES:
        raise bad(f"{where} must be a JSON value or {{'array': [...], 'dtype': one of "
                  f"{', '.join(_ARRAY_DTYPES)}}}, got {value!r}")
    try:
        return np.asarray(value["array"], dtype=value["dtype"])
    except (TypeError, ValueError) as exc:
        raise bad(f"{where}.array is not a {value['dtype']} array: {exc}") from None


def check_target(target, bad=ValueError):
    """Validate a plan target (see the module docstring); returns it."""
    if target is None:
        return None
    metric = target.get("metric") if isinstance(target, dict) else None
    side = TARGET_METRICS.get(metric)
    if side is None or set(target) != {"metric", side} or isinstance(target[side], bool) \
            or not isinstance(target[side], (int, float)):
        raise bad("target must be null, {'metric': 'cosine', 'min': number} or "
                  f"{{'metric': 'token_error', 'max': number}}, got {target!r}")
    return target


@dataclass(frozen=True, eq=False)
class LayerChoice:
    """The method of one self-attention layer.

    Attributes
    ----------
    layer : int
        Index of the self-attention module, in the model's module order (0 = first).
    method : str
        A registered method name.
    knobs : dict
        Its ``use_method`` options (JSON values).
    """

    layer: int
    method: str
    knobs: dict = field(default_factory=dict)

    def __eq__(self, other):  # knobs may hold arrays: compare their JSON forms
        if not isinstance(other, LayerChoice):
            return NotImplemented
        return (self.layer, self.method, _json_knobs(self.knobs)) == \
            (other.layer, other.method, _json_knobs(other.knobs))

    __hash__ = None


@dataclass(frozen=True)
class Plan:
    """Per-layer methods for one model, with the target they were chosen for.

    Attributes
    ----------
    model : str
        Name of the model the plan is for.
    layers : tuple of LayerChoice
        At most one per layer, sorted by layer.
    target : dict or None
        ``{"metric": "cosine", "min": t}`` or ``{"metric": "token_error", "max": e}``.
    predicted, measured : dict
        Figures from the search (calibration text) and the check (held-out text).
    """

    model: str
    layers: tuple
    target: dict | None = None
    predicted: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    def choice(self, layer):
        """The :class:`LayerChoice` of ``layer`` (exact when the plan does not list it)."""
        return next((c for c in self.layers if c.layer == layer), LayerChoice(layer, "exact"))

    def to_dict(self):
        return {"format": PLAN_FORMAT, "model": self.model,
                "layers": [{"layer": c.layer, "method": c.method,
                            "knobs": _json_knobs(c.knobs)}
                           for c in self.layers],
                "target": self.target, "predicted": dict(self.predicted),
                "measured": dict(self.measured)}

    @classmethod
    def from_dict(cls, data, *, source="plan"):
        """Validate ``data`` (a parsed plan file) and build the plan.

        Raises
        ------
        PlanFileError
            Naming the field at fault, what was expected and what came.
        """
        from .registry import method_names

        def bad(what):
            return PlanFileError(f"{source}: {what}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise bad(f"format must be {PLAN_FORMAT!r}, got {data.get('format')!r}")
        unknown = set(data) - _KEYS
        if unknown:
            raise bad(f"unknown fields {sorted(unknown)}; a plan has {sorted(_KEYS)}")
        if not isinstance(data.get("model"), str) or not data["model"]:
            raise bad(f"model must be a non-empty string, got {data.get('model')!r}")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise bad(f"layers must be a list, got {type(layers).__name__}")
        known = method_names()
        choices = []
        for i, entry in enumerate(layers):
            if not isinstance(entry, dict) or set(entry) - {"layer", "method", "knobs"}:
                raise bad(f"layers[{i}] must be an object with layer, method, knobs; got {entry!r}")
            layer, method, knobs = entry.get("layer"), entry.get("method"), entry.get("knobs", {})
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise bad(f"layers[{i}].layer must be an integer >= 0, got {layer!r}")
            if method not in known:
                raise bad(f"layers[{i}].method {method!r} is not a registered method "
                          f"({', '.join(known)})")
            if not isinstance(knobs, dict):
                raise bad(f"layers[{i}].knobs must be an object, got {type(knobs).__name__}")
            knobs = {n: _decode_knob(v, f"layers[{i}].knobs.{n}", bad) for n, v in knobs.items()}
            choices.append(LayerChoice(layer, method, knobs))
        seen = [c.layer for c in choices]
        if len(set(seen)) != len(seen):
            raise bad(f"a layer is listed twice: {seen}")
        target = check_target(data.get("target"), lambda what: bad(what))
        for key in ("predicted", "measured"):
            if not isinstance(data.get(key, {}), dict):
                raise bad(f"{key} must be an object, got {type(data[key]).__name__}")
        return cls(data["model"], tuple(sorted(choices, key=lambda c: c.layer)), target,
                   dict(data.get("predicted", {})), dict(data.get("measured", {})))


def exact_plan(model, num_layers, target=None, **figures):
    """The plan that runs exact attention in every layer."""
    return Plan(model, tuple(LayerChoice(i, "exact") for i in range(num_layers)), target,
                **figures)


def save_plan(plan, path):
    """Write ``plan`` as JSON (``mcattn-plan-v1``) to ``path``."""
    Path(path).write_text(json.dumps(plan.to_dict(), indent=2, allow_nan=False) + "\n")


def load_plan(path):
    """Read a plan file written by :func:`save_plan` (or by hand).

    Raises
    ------
    PlanFileError
        The file is missing, is not JSON, or does not follow ``mcattn-plan-v1``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanFileError(f"cannot read plan file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFileError(f"{path}: not JSON ({exc.msg} at line {exc.lineno} column "
                            f"{exc.colno})") from None
    return Plan.from_dict(data, source=str(path))
