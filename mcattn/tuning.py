"""``mcattn.tune``: the cheapest attention plan for a model at a stated accuracy.

The search (docs/tune.md) runs in three steps, every figure measured on the calibration
batches with the real model:

1. **Layer curves.** Each candidate (a method and one value of its knob, e.g. latte at
   ``target_mass=0.9``) is swapped into one layer at a time, the others exact; the model
   output's loss (``1 - cosine`` of the sentence embeddings to exact, or the token states'
   relative error; the largest over the calibration batches, so that a plan must hold on
   every kind of input) and the layer's cost are recorded. A method that fits knobs on the
   model (latte's and hybrid's per-head thresholds) fits them on that layer's exact attention
   inputs of all calibration batches; the plan holds them inline.
2. **Frontier.** For a Lagrange multiplier ``lam`` each layer independently takes the option
   minimising ``cost + lam * loss``; sweeping ``lam`` over the layers' breakpoints gives a
   sequence of plans from all-exact to cheapest. Losses compound through the layers, so the
   sum of the layers' losses only orders the plans: the cheapest one whose **measured** model
   loss meets the required level is found by bisection over the sequence, then each layer
   in turn is offered its next cheaper option and keeps it if the measured loss still meets.
3. **Uniform baseline.** Each candidate in every layer at once, measured; the cheapest one
   meeting the same level is the best uniform setting the plan is compared with.

The level the calibration text must meet is stricter than the target (``margin``) so that
held-out text meets the target too (``mcattn tune`` checks it on held-out text).
"""

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .plan import TARGET_METRICS, LayerChoice, Plan

__all__ = ["DEFAULT_GRID", "Candidate", "LayerOption", "PlanPoint", "TuneResult", "TuneSession",
           "tune", "OBJECTIVES"]

#: Knob grids searched by default, per method: (knob, values from safest to cheapest).
DEFAULT_GRID = {
    "latte": ("target_mass", (0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.5)),
    "hybrid": ("target_keep", (0.5, 0.33, 0.25, 0.125)),
    "mca": ("alpha", (0.05, 0.1, 0.2, 0.4, 0.6, 1.0)),
    "rfa": ("num_features", (256, 128, 64, 32)),
}
#: What ``objective=`` may be: ``ops`` (operation count of the layer's attention and value
#: projection), ``energy`` (the same counts priced by the 45 nm table, picojoules) and
#: ``time`` (measured seconds of the layer's mcattn call).
OBJECTIVES = ("ops", "energy", "time")


@dataclass(frozen=True)
class Candidate:
    """One method at one value of its swept knob (``knob=None``: exact attention)."""

    method: str
    knob: str | None = None
    value: object = None

    @property
    def label(self):
        return self.method if self.knob is None else f"{self.method}:{self.knob}={self.value}"


EXACT = Candidate("exact")


@dataclass(frozen=True, eq=False)
class LayerOption:
    """A candidate in one layer, measured with every other layer exact.

    Attributes
    ----------
    layer : int
    candidate : Candidate
    knobs : dict
        Its ``use_method`` options as the plan holds them (fitted knobs inline).
    cost : float
        The layer's cost in the objective's unit.
    loss : float
        The model output's loss with only this layer swapped.
    bound : float or None
        Largest a-posteriori relative bound of the layer's calls (``layer_bound`` runs).
    """

    layer: int
    candidate: Candidate
    knobs: dict
    cost: float
    loss: float
    bound: float | None = None


@dataclass(frozen=True, eq=False)
class PlanPoint:
    """A whole plan measured on the calibration batches."""

    label: str
    options: tuple  # one LayerOption per layer
    cost: float
    loss: float
    meets: bool


@dataclass(eq=False)
class TuneResult:
    """What :func:`tune` found.

    Attributes
    ----------
    plan : mcattn.plan.Plan
        The chosen plan (the exact plan when no other meets the target).
    met : bool
        Whether a plan other than the exact one met the required level.
    message : str
        One line saying what was chosen, or why nothing was.
    chosen : PlanPoint
    exact_cost : float
    uniform : PlanPoint or None
        The cheapest uniform setting meeting the same level (None: none did, or not run).
    tried : list of PlanPoint
        Every whole plan measured (search and uniform), in order.
    layer_options : list of LayerOption
        Every single-layer measurement.
    seconds : float
        Wall-clock time of the search (layer curves included).
    """

    plan: Plan
    met: bool
    message: str
    chosen: PlanPoint
    exact_cost: float
    uniform: PlanPoint | None
    tried: list = field(default_factory=list)
    layer_options: list = field(default_factory=list)
    seconds: float = 0.0
    metric: str = "cosine"
    target: float = 0.99

    def plot(self, path):
        """Pareto plot: cost (relative to exact) against the achieved metric of every plan
        tried, the uniform settings and the chosen plan marked, the target as a line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        floor = 1e-7  # an exact plan's loss is 0: drawn at the axis floor
        for kind, marker, colour in (("search", "o", "tab:blue"), ("uniform", "s", "tab:grey")):
            points = [p for p in self.tried if p.label.startswith(kind)]
            if points:
                ax.scatter([max(p.loss, floor) for p in points], [p.cost / self.exact_cost for p in points],
                           marker=marker, c=colour, alpha=0.7, label=f"{kind} plans")
        ax.scatter([max(self.chosen.loss, floor)], [self.chosen.cost / self.exact_cost], marker="*",
                   s=220, c="tab:red", label="chosen", zorder=3)
        ax.axvline(max(_loss_of(self.metric, self.target), floor), color="k", linestyle="--",
                   linewidth=1, label="target")
        ax.set_xscale("log")
        ax.set_xlabel("1 - cosine to exact (calibration)" if self.metric == "cosine"
                      else "token-state relative error (calibration)")
        ax.set_ylabel("cost / exact")
        ax.set_title(f"{self.plan.model}: plans tried")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _achieved(metric, loss):
    return 1.0 - loss if metric == "cosine" else loss


def _loss_of(metric, value):
    return 1.0 - value if metric == "cosine" else value


def _check_options(target, metric, objective, margin, layer_bound, methods, grid):
    if metric not in TARGET_METRICS:
        raise ValueError(f"metric must be one of {', '.join(TARGET_METRICS)}, got {metric!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target must be a number, got {target!r}")
    if metric == "cosine" and not 0.0 < target <= 1.0:
        raise ValueError(f"a cosine target must be in (0, 1], got {target}")
    if metric == "token_error" and not target >= 0.0:
        raise ValueError(f"a token_error target must be >= 0, got {target}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if layer_bound is not None and not layer_bound > 0:
        raise ValueError(f"layer_bound must be > 0, got {layer_bound}")
    from .registry import get_method, method_names

    for name in methods:
        if name not in method_names():
            raise ValueError(f"unknown method {name!r}; registered: {', '.join(method_names())}")
        if name not in grid:
            raise ValueError(f"no knob grid for {name!r}: pass grid={{{name!r}: (knob, values)}}")
        hooks = get_method(name).model
        if hooks is not None and hooks.per_length:
            raise ValueError(f"{name}'s fitted knobs hold for one sequence length only; tune cannot "
                             "write them into a plan")


def _outputs(model, batches):
    """Last hidden states and attention masks of each batch (float64 torch tensors)."""
    import torch

    outs = []
    with torch.no_grad():
        for batch in batches:
            out = model(**batch)
            hidden = getattr(out, "last_hidden_state", None)
            hidden = out[0] if hidden is None else hidden
            mask = batch.get("attention_mask")
            mask = torch.ones(hidden.shape[:2]) if mask is None else mask
            outs.append((hidden.double(), mask.double()))
    return outs


def _merged(batches):
    """All batches as one: each tensor zero-padded along the sequence dim (mask 0 = padding)."""
    import torch

    n = max(int(b["input_ids"].shape[1]) for b in batches) if "input_ids" in batches[0] else None
    merged = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if n is not None and all(p.dim() == 2 for p in parts):
            parts = [torch.nn.functional.pad(p, (0, n - p.shape[1])) for p in parts]
        merged[key] = torch.cat(parts)
    return merged


def _loss(metric, outs, reference, worst_batch=False):
    """``1 - mean cosine`` of the mean-pooled states, or the states' relative error, over
    all batches together, or (``worst_batch``) the largest of the batches' own losses."""
    if worst_batch:
        return max(_loss(metric, [o], [r]) for o, r in zip(outs, reference))
    if metric == "cosine":
        cos = []
        for (h, m), (h0, _) in zip(outs, reference):
            w = m.unsqueeze(-1)
            a, b = (h * w).sum(1) / w.sum(1), (h0 * w).sum(1) / w.sum(1)
            cos.append(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).numpy())
        return float(1.0 - np.concatenate(cos).mean())
    num = sum(float((((h - h0) ** 2) * m.unsqueeze(-1)).sum()) for (h, m), (h0, _) in zip(outs, reference))
    den = sum(float(((h0 ** 2) * m.unsqueeze(-1)).sum()) for (h0, m) in reference)
    return math.sqrt(num / den)


class TuneSession:
    """The layer curves of one model on its calibration batches; searches reuse them.

    Parameters are those of :func:`tune` (``target`` and ``margin`` go to :meth:`search`),
    and ``stop_loss``: in each layer a method's sweep (its grid runs from the safest value to
    the cheapest) stops after the first value whose single-layer loss exceeds it, since a
    swap that alone misses the level cannot be part of a plan meeting it. :func:`tune` sets
    it to the required loss; a session searched for several targets takes the loosest.
    """

    def __init__(self, model, calibration_batches, *, metric="cosine", objective="ops",
                 methods=None, grid=None, layer_bound=None, seed=0, progress=None, name=None,
                 stop_loss=None):
        from .frameworks.torch import attention_modules

        grid = dict(DEFAULT_GRID, **(grid or {}))
        methods = tuple(methods) if methods is not None else ("latte", "hybrid", "mca")
        methods = tuple(m for m in methods if m != "exact")
        _check_options(0.5, metric, objective, 0.0, layer_bound, methods, grid)
        self.batches = list(calibration_batches)
        if not self.batches:
            raise ValueError("tune needs at least one calibration batch")
        self.model, self.metric, self.objective = model, metric, objective
        self.layer_bound, self.seed = layer_bound, seed
        config = getattr(model, "config", None)
        self.name = name or getattr(config, "name_or_path", "") or type(model).__name__
        self.modules = attention_modules(model)
        if not self.modules:
            raise ValueError("tune: the model has no self-attention module with query/key/value Linears")
        self.layer_of = {m: i for i, m in enumerate(self.modules)}
        self.candidates = [Candidate(m, grid[m][0], v) for m in methods for v in grid[m][1]]
        self.runs = 0
        started = time.perf_counter()
        self._bar = progress(len(self.modules) * len(self.candidates) + 1) if progress else None
        try:
            self.reference = _outputs(model, self.batches)
            self.inputs = None
            self.exact_costs = self._exact_costs()
            self.layer_options = [LayerOption(i, EXACT, {}, c, 0.0) for i, c in enumerate(self.exact_costs)]
            for layer in range(len(self.modules)):
                stopped = set()  # methods whose sweep in this layer passed stop_loss
                for cand in self.candidates:
                    if cand.method in stopped:
                        if self._bar is not None:
                            self._bar.update(1)
                        continue
                    knobs = self._knobs(layer, cand)
                    costs, loss, bound = self._run({layer: (cand, knobs)}, bounds=True)
                    self.layer_options.append(LayerOption(layer, cand, knobs, costs[layer], loss, bound))
                    if stop_loss is not None and loss > stop_loss:
                        stopped.add(cand.method)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        self.curve_seconds = time.perf_counter() - started

    # -- measuring ---------------------------------------------------------------------
    def _knobs(self, layer, cand):
        """The candidate's ``use_method`` options in ``layer``, fitted knobs inline."""
        from .frameworks.torch import layer_inputs
        from .registry import get_method

        spec = get_method(cand.method)
        options = {cand.knob: cand.value}
        if "seed" in _knob_names(cand.method):
            options["seed"] = self.seed
        hooks = spec.model
        if hooks is None or not hooks.wants_calibration(options):
            return options
        if self.inputs is None:
            self.inputs = layer_inputs(self.model, _merged(self.batches))
        fitted = hooks.calibrate(self.inputs[layer], options)
        return dict({n: v for n, v in options.items() if n not in hooks.consumes}, **fitted)

    def _exact_costs(self):
        """Each layer's cost with mcattn's exact kernel (a plan's exact layers run the
        model's own attention, which reports nothing)."""
        from .frameworks.torch import use_method

        costs = [0.0] * len(self.modules)

        def on_call(call):
            costs[self.layer_of[call.module]] += self._cost(call)

        with use_method(self.model, "exact", on_call=on_call):
            _outputs(self.model, self.batches)
        self._ran()
        return costs

    def _ran(self):
        self.runs += 1
        if self._bar is not None:
            self._bar.update(1)

    def _run(self, choices, bounds=False):
        """Measure a plan given as ``{layer: (candidate, knobs)}`` (other layers exact).

        Returns per-layer costs (exact layers at their measured exact cost), the model loss
        and, with ``bounds`` and ``layer_bound``, the largest posterior relative bound.
        """
        from .frameworks.torch import use_method

        costs = dict(enumerate(self.exact_costs))
        for i in choices:
            costs[i] = 0.0
        worst = [0.0]

        def on_call(call):
            costs[self.layer_of[call.module]] += self._cost(call)
            if bounds and self.layer_bound is not None:
                post = call.info.posterior
                worst[0] = max(worst[0], math.inf if post is None else float(post.relative))

        layers = tuple(LayerChoice(i, c.method, dict(k)) for i, (c, k) in sorted(choices.items()))
        plan = Plan(self.name, layers)
        with use_method(self.model, plan=plan, on_call=on_call):
            outs = _outputs(self.model, self.batches)
        self._ran()
        return costs, _loss(self.metric, outs, self.reference, worst_batch=True), \
            (worst[0] if bounds and self.layer_bound is not None else None)

    def _cost(self, call):
        """One call's cost in the objective's unit (with the dense value projection the
        method leaves to the model: every method but those reading the projection's input)."""
        if self.objective == "time":
            return call.seconds
        from .eatt.ops import dense_projection_ops
        from .registry import get_method

        ops = call.info.ops
        hooks = get_method(call.info.method).model
        if hooks is None or not hooks.needs_value_input:
            linear = call.module.value
            ops = ops + dense_projection_ops(call.tokens, linear.in_features, linear.out_features,
                                             linear.bias is not None)
        return float(ops.total if self.objective == "ops" else ops.energy_pj())

    def _measure_plan(self, options, label, required):
        choices = {o.layer: (o.candidate, o.knobs) for o in options if o.candidate is not EXACT}
        costs, loss, _ = self._run(choices)
        options = tuple(dataclasses.replace(o, cost=costs[o.layer]) for o in options)
        return PlanPoint(label, options, float(sum(costs.values())), loss, loss <= required)

    # -- searching ---------------------------------------------------------------------
    def search(self, target, *, margin=0.25, uniform=True, refine=True, progress=None):
        """The cheapest plan whose calibration loss meets ``target`` tightened by ``margin``.

        Parameters
        ----------
        target : float
            Cosine to exact (``metric="cosine"``) at least, or token error at most.
        margin : float
            Share of the allowed loss kept in reserve for held-out text: the calibration
            loss must be at most ``(1 - margin)`` times the target's.
        uniform : bool
            Also measure every candidate in all layers (the best uniform setting); the
            result is the cheaper of the searched plan and that setting.
        refine : bool
            After the bisection, offer each layer its next cheaper option.

        Returns
        -------
        TuneResult
        """
        _check_options(target, self.metric, self.objective, margin, self.layer_bound, (), {})
        started = time.perf_counter()
        required = _loss_of(self.metric, target) * (1.0 - margin)
        layers = range(len(self.modules))
        admissible = [self._frontier(i) for i in layers]
        sequence = _lagrange_sequence(admissible)
        tried = []
        bar = progress(None) if progress else None

        def measure(options, label):
            point = self._measure_plan(options, label, required)
            tried.append(point)
            if bar is not None:
                bar.update(1)
            return point

        exact_point = PlanPoint("search exact", tuple(a[0] for a in admissible),
                                float(sum(self.exact_costs)), 0.0, True)
        lo, hi, best = 0, len(sequence) - 1, exact_point  # sequence[-1] is all exact
        while lo < hi:  # cheapest index whose measured loss meets (losses grow as cost falls)
            mid = (lo + hi) // 2
            point = measure(sequence[mid], f"search {mid}")
            if point.meets:
                hi, best = mid, point
            else:
                lo = mid + 1
        if refine and best is not exact_point:
            best = self._refine(best, admissible, measure)
        uniform_best = None
        if uniform:
            failed = set()  # a method's grid runs safest to cheapest: past a miss, cheaper misses too
            for cand in self.candidates:
                options = tuple(self._option(i, cand) for i in layers)
                admitted = all(o is not None and self._admitted(o) for o in options)
                if cand.method in failed or not admitted:  # None: a layer's sweep stopped before
                    continue
                point = measure(options, f"uniform {cand.label}")
                if not point.meets:
                    failed.add(cand.method)
                elif point.cost < (exact_point if uniform_best is None else uniform_best).cost:
                    uniform_best = point  # exact is a uniform setting too: the others must beat it
        if bar is not None:
            bar.close()
        if uniform_best is not None and uniform_best.cost < best.cost:
            best = uniform_best  # a uniform setting is a plan too; the search missed it
        met = best is not exact_point
        exact_cost = float(sum(self.exact_costs))
        side = TARGET_METRICS[self.metric]
        if met:
            message = (f"plan at {best.cost / exact_cost:.3f}x exact {self.objective}, calibration "
                       f"{self.metric} {_achieved(self.metric, best.loss):.5f} (required "
                       f"{_achieved(self.metric, required):.5f} for target {target})")
        else:
            swaps = [o for o in self.layer_options if o.candidate is not EXACT]
            allowed = [o for front in admissible for o in front if o.candidate is not EXACT]
            cheapest = min(allowed, key=lambda o: o.loss, default=None)
            message = (f"no plan of {', '.join(sorted({c.method for c in self.candidates}))} meets "
                       f"{self.metric} {side} {target} with margin {margin} on the calibration text "
                       f"(required {_achieved(self.metric, required):.6f}); "
                       + (f"the safest single-layer swap cheaper than exact reaches "
                          f"{_achieved(self.metric, cheapest.loss):.6f} ({cheapest.candidate.label}, "
                          f"layer {cheapest.layer})" if cheapest
                          else "no single-layer swap is both admitted and cheaper than exact")
                       + (f"; layer_bound {self.layer_bound} admitted {len(allowed)} of {len(swaps)} "
                          "single-layer swaps" if self.layer_bound is not None else "")
                       + "; returning the exact plan")
            warnings.warn(f"mcattn.tune: {message}", RuntimeWarning, stacklevel=2)
        plan = self._result_plan(best, target, required, exact_cost, uniform_best, margin)
        return TuneResult(plan, met, message, best, exact_cost, uniform_best, tried,
                          list(self.layer_options), self.curve_seconds + time.perf_counter() - started,
                          self.metric, target)

    def _option(self, layer, cand):
        return next((o for o in self.layer_options if o.layer == layer and o.candidate == cand), None)

    def _admitted(self, option):
        """Whether ``layer_bound`` admits the option (exact always)."""
        return option.candidate is EXACT or self.layer_bound is None \
            or (option.bound is not None and option.bound <= self.layer_bound)

    def _frontier(self, layer):
        """The layer's admissible options on the cost/loss Pareto front, exact first."""
        options = [o for o in self.layer_options if o.layer == layer and self._admitted(o)]
        front = []
        for o in sorted(options, key=lambda o: (o.loss, o.cost)):
            if not front or o.cost < front[-1].cost:
                front.append(o)
        return front  # loss increasing, cost decreasing; front[0] is exact (loss 0)

    def _refine(self, best, admissible, measure):
        """Offer each layer its next cheaper frontier option, keeping what still meets."""
        current = list(best.options)
        for layer in sorted(range(len(current)), key=lambda i: -current[i].cost):
            front = admissible[layer]
            place = next(j for j, o in enumerate(front) if o.candidate == current[layer].candidate)
            for cheaper in front[place + 1:]:
                trial = list(current)
                trial[layer] = cheaper
                point = measure(tuple(trial), f"search refine layer {layer}")
                if not point.meets:
                    break
                current, best = list(point.options), point
        return best

    def _result_plan(self, best, target, required, exact_cost, uniform_best, margin):
        side = TARGET_METRICS[self.metric]
        layers = tuple(LayerChoice(o.layer, o.candidate.method, dict(o.knobs)) for o in best.options)
        predicted = {
            "objective": self.objective, "cost": best.cost, "exact_cost": exact_cost,
            "cost_ratio": best.cost / exact_cost,
            f"calibration_{self.metric}": _achieved(self.metric, best.loss),
            "required": _achieved(self.metric, required), "margin": margin,
            "calibration_batches": len(self.batches),
            "layers": [{"layer": o.layer, "candidate": o.candidate.label,
                        "cost_ratio": o.cost / self.exact_costs[o.layer],
                        "alone_" + self.metric: _achieved(self.metric, o.loss)} for o in best.options],
        }
        if uniform_best is None:  # exact attention in every layer is the cheapest uniform setting
            predicted["best_uniform"] = {"candidate": "exact", "cost_ratio": 1.0,
                                         f"calibration_{self.metric}": _achieved(self.metric, 0.0)}
        else:
            predicted["best_uniform"] = {
                "candidate": uniform_best.label.removeprefix("uniform "),
                "cost_ratio": uniform_best.cost / exact_cost,
                f"calibration_{self.metric}": _achieved(self.metric, uniform_best.loss)}
        return Plan(self.name, layers, {"metric": self.metric, side: float(target)}, predicted)


def _lagrange_sequence(fronts):
    """Plans (one option per layer) minimising ``cost + lam * loss`` over every ``lam`` from
    infinity (all exact) to 0 (each layer's cheapest); sorted by cost, cheapest first.

    Each layer's minimiser changes only where two of its options tie, at
    ``lam = -d(cost) / d(loss)`` of some pair; one ``lam`` strictly between each pair of
    consecutive such values (and one beyond each end) visits every distinct plan.
    """
    ties = sorted({(a.cost - b.cost) / (b.loss - a.loss) for front in fronts
                   for i, a in enumerate(front) for b in front[i + 1:]})
    probes = [math.inf] + ([2.0 * ties[-1]] if ties else []) \
        + [math.sqrt(lo * hi) for lo, hi in zip(ties, ties[1:])] + ([0.5 * ties[0]] if ties else [0.0])
    plans, seen = [], set()
    for lam in probes:
        if math.isinf(lam):
            choice = tuple(front[0] for front in fronts)
        else:
            choice = tuple(min(front, key=lambda o: o.cost + lam * o.loss) for front in fronts)
        key = tuple(id(o) for o in choice)
        if key not in seen:
            seen.add(key)
            plans.append(choice)
    return sorted(plans, key=lambda p: (sum(o.cost for o in p), sum(o.loss for o in p)))


def _knob_names(method):
    from .front import methods

    return next(m.knobs for m in methods() if m.name == method)


def tune(model, calibration_batches, *, target=0.99, metric="cosine", objective="ops", methods=None,
         grid=None, margin=0.25, layer_bound=None, seed=0, progress=None, name=None):
    """The cheapest attention plan for ``model`` meeting ``target``, per layer.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model :func:`mcattn.frameworks.torch.use_method` swaps into (BERT-like encoders).
    calibration_batches : list of dict
        Model inputs (``input_ids``, ``attention_mask``, ...). Fitted knobs (latte's and
        hybrid's per-head thresholds) are fitted on all of them (one zero-padded batch); a
        plan meets the level only if it meets it on **every** batch (the loss is the largest
        of the batches' losses), so give batches of each kind of input the model will see
        (``mcattn tune`` batches long documents and single sentences apart).
    target : float, default 0.99
        ``metric="cosine"``: mean cosine of the mean-pooled final states (sentence
        embeddings) to the exact model's, at least ``target``. ``metric="token_error"``:
        relative Frobenius error of the final states over real tokens, at most ``target``.
    metric : {"cosine", "token_error"}
    objective : {"ops", "energy", "time"}
        What the plan minimises, per layer: the operation count of the layer's attention
        plus its value projection (which mca replaces; the other methods run the dense one),
        the same counts priced by the 45 nm table (:mod:`mcattn.cost`), or the measured time
        of the layer's mcattn call.
    methods : sequence of str, optional
        Methods to choose from (default latte, hybrid, mca); exact is always allowed.
    grid : dict, optional
        ``{method: (knob, values)}`` overriding :data:`DEFAULT_GRID` entries.
    margin : float, default 0.25
        The calibration loss must be at most ``(1 - margin)`` times the target's.
    layer_bound : float, optional
        Admit a candidate in a layer only if the a-posteriori relative bound of each of its
        calls (``info.posterior.relative``, certified for latte, eigen and rfa's positive
        features) is at most this; a method without a bound is then not admitted.
    seed : int
        Seed of the random methods (mca, rfa), written into the plan.
    progress : callable, optional
        ``progress(total)`` -> object with ``update(n)`` and ``close()`` (e.g. tqdm).
    name : str, optional
        Model name written into the plan.

    Returns
    -------
    TuneResult
        ``.plan`` is the chosen :class:`mcattn.plan.Plan` (``use_method(model, plan=...)``
        applies it); when no plan but the exact one meets the level, ``.met`` is False,
        ``.message`` says why (also as a RuntimeWarning) and ``.plan`` is the exact plan.

    Raises
    ------
    ValueError
        Bad target, metric, objective, margin or methods (before any model run).
    """
    methods_t = tuple(methods) if methods is not None else ("latte", "hybrid", "mca")
    _check_options(target, metric, objective, margin, layer_bound,
                   tuple(m for m in methods_t if m != "exact"), dict(DEFAULT_GRID, **(grid or {})))
    session = TuneSession(model, calibration_batches, metric=metric, objective=objective,
                          methods=methods_t, grid=grid, layer_bound=layer_bound, seed=seed,
                          progress=progress, name=name,
                          stop_loss=_loss_of(metric, target) * (1.0 - margin))
    return session.search(target, margin=margin, progress=progress)
