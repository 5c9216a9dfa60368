"""Attention plans: which method, with which knobs, runs in each layer of a model.

A plan is what :func:`mcattn.tune` chooses and what
:func:`mcattn.frameworks.torch.use_method` applies with ``plan=``. On disk it is JSON in
the versioned schema ``mcattn-plan-v1``::

    {"format": "mcattn-plan-v1",
     "model": "all-MiniLM-L6-v2",
     "layers": [{"layer": 0, "method": "latte", "knobs": {"target_mass": 0.9}}, ...],
     "target": {"metric": "cosine", "min": 0.99},          # or null
     "predicted": {...}, "measured": {...}}                 # figures, free-form numbers

``knobs`` are the options ``use_method`` takes for that method (calibrated knobs such as
latte's thresholds are fitted on the first batch each layer sees, so ``target_mass``
stands for them by reference). Layers not listed, and layers with method ``exact``, run
the model's own attention.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PlanFileError

__all__ = ["PLAN_FORMAT", "LayerChoice", "Plan", "load_plan", "save_plan", "exact_plan"]

#: The schema version written by :func:`save_plan` and the only one :func:`load_plan` reads.
PLAN_FORMAT = "mcattn-plan-v1"
_KEYS = {"format", "model", "layers", "target", "predicted", "measured"}


@dataclass(frozen=True)
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
        ``{"metric": "cosine", "min": t}`` (cosine of the final embeddings to exact).
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
                "layers": [{"layer": c.layer, "method": c.method, "knobs": dict(c.knobs)}
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
            choices.append(LayerChoice(layer, method, dict(knobs)))
        seen = [c.layer for c in choices]
        if len(set(seen)) != len(seen):
            raise bad(f"a layer is listed twice: {seen}")
        target = data.get("target")
        if target is not None and (not isinstance(target, dict) or target.get("metric") != "cosine"
                                   or not isinstance(target.get("min"), (int, float))):
            raise bad(f"target must be null or {{'metric': 'cosine', 'min': number}}, got {target!r}")
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
