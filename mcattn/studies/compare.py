"""The comparison behind ``mcattn compare``: every method on real attention, side by side.

For each registered method (:mod:`mcattn.registry`) and each value of its knob, run it
on every layer of a real-attention sample and report, next to exact attention computed
in the same run:

* the relative output error ``||O~ - O|| / ||O||`` per (layer, sequence, head), over the
  real (unpadded) query rows — median and 90th percentile;
* the method's theoretical bound on that error (median over the same cells);
* operation count and energy relative to exact attention for the same unpadded inputs;
* wall time relative to exact attention, both timed here, best of ``repeats``.

Scope: when the sample holds the value projection's inputs (``x``, ``w_v``, ``b_v``), the
compared unit is *value projection + attention*, for every method: a method that takes
``v`` gets it computed densely inside its timed run, and the dense projection's
operations are added to its count (and to the exact baseline's), so that mca, which
approximates the projection, is measured on the same footing as the others.
"""

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..cost import OpCounts
from ..posterior import relative_of
from .entries import LayerInputs, get_entries

__all__ = ["json_safe", "ComparisonRow", "layer_inputs", "relative_errors", "posterior_relative",
           "run_comparison", "format_table", "plot_pareto"]


@dataclass(frozen=True)
class ComparisonRow:
    """One (method, knob value) row of the comparison, aggregated over layers."""

    method: str
    knob: str | None
    value: object
    error_median: float
    error_p90: float
    bound_median: float | None
    ops_ratio: float
    energy_ratio: float
    time_ratio: float
    cells: int
    backend: str
    posterior_median: float | None = None

    def as_dict(self):
        """The row as strict JSON values: a non-finite number becomes None, and its key is
        listed in ``"nonfinite"`` with what it was (``{"bound_median": "inf"}`` for a vacuous
        bound), so that strict parsers (jq, JavaScript) accept the file."""
        return json_safe(asdict(self))


def json_safe(row):
    """``row`` (a dict) with non-finite floats replaced by None and recorded in ``"nonfinite"``."""
    out, nonfinite = {}, {}
    for key, value in row.items():
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            nonfinite[key] = "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
            value = None
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def layer_inputs(sample, layer):
    """The :class:`~mcattn.studies.entries.LayerInputs` of one layer of an ``AttentionSample``."""
    x = w_v = b_v = None
    v = sample.v[layer]
    if sample.has_projection:
        x, w_v, b_v = sample.x[layer], sample.w_v[layer], sample.b_v[layer]
        # One exact reference for every method: v recomputed from the stored projection
        # inputs (the stored v differs from it by float16 rounding, which would otherwise
        # floor the error of methods that approximate the projection).
        heads = sample.q.shape[2]
        v = (x @ w_v + b_v).reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
        v = np.ascontiguousarray(v, dtype=sample.q.dtype)
    return LayerInputs(q=sample.q[layer], k=sample.k[layer], v=v,
                       key_padding_mask=sample.key_padding_mask, scale=float(sample.scale),
                       x=x, w_v=w_v, b_v=b_v)


def relative_errors(out, ref, key_padding_mask):
    """``||out - ref|| / ||ref||`` per ``[B, H]`` over the real query rows.

    Parameters
    ----------
    out, ref : array, shape ``[B, H, N, dv]``
    key_padding_mask : array of bool, shape ``[B, N]``

    Returns
    -------
    numpy.ndarray, shape ``[B, H]``
    """
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    rows = np.asarray(key_padding_mask, dtype=bool)[:, None, :, None]
    num = np.sqrt((((out - ref) ** 2) * rows).sum(axis=(-1, -2)))
    den = np.sqrt(((ref**2) * rows).sum(axis=(-1, -2)))
    return num / np.where(den > 0, den, 1.0)


def _dense_values(inputs):
    """``v = x @ w_v + b_v`` split into heads ``[B, H, N, dv]`` (inputs with a projection)."""
    x, w, b = inputs.x, inputs.w_v, inputs.b_v
    heads = inputs.q.shape[1]
    v = (x @ w + b).reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(v)


def _dense_projection_ops(inputs):
    """Multiply-adds of the dense value projection on the real tokens."""
    tokens = int(inputs.key_padding_mask.sum())
    d_in, width = inputs.w_v.shape
    return OpCounts({"fp32_mul": tokens * d_in * width, "fp32_add": tokens * (d_in + 1) * width})


def _run_in_scope(entry, inputs, value, seed):
    """One run of ``entry``; a method that takes ``v`` computes it here (timed too)."""
    if inputs.has_projection and not entry.needs_projection:
        inputs = replace(inputs, v=_dense_values(inputs))
    return entry.run(inputs, value, seed)


def _timed(fn, repeats):
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def posterior_relative(info, out, key_padding_mask):
    """The a-posteriori bound (``info.posterior``) on :func:`relative_errors`, per ``[B, H]``, or None.

    Over the real query rows of each ``(b, h)``: ``r / max(||O~|| - r, 0)`` with
    ``r = sqrt(sum_i row_i^2)`` (``||O|| >= ||O~|| - r``; ``inf`` where ``r >= ||O~||``).
    """
    bound = info.posterior
    if bound is None:
        return None
    rows = np.asarray(key_padding_mask, dtype=bool)[:, None, :]
    r = np.sqrt(np.where(rows, bound.row**2, 0.0).sum(-1))
    norm = np.sqrt((np.asarray(out, dtype=np.float64) ** 2 * rows[..., None]).sum(axis=(-1, -2)))
    return relative_of(r, norm)


def run_comparison(sample, methods=None, *, seed=0, repeats=3, layers=None, progress=None):
    """Run every method over its knob sweep on every layer of ``sample``.

    Parameters
    ----------
    sample : mcattn.studies.data.AttentionSample
    methods : list of str, optional
        Method names (default: every registered method).
    seed : int
        Seed of the random methods (each layer uses ``seed + layer``).
    repeats : int
        Timing repeats per run (best kept).
    layers : list of int, optional
        Layers to use (default: all).
    progress : callable, optional
        ``progress(total)`` returning an object with ``update(n)`` and ``close()``
        (e.g. ``tqdm``); None for no progress display.

    Returns
    -------
    list of ComparisonRow
        Exact attention first (errors 0), then each method and knob value.
    """
    entries = get_entries(methods)
    if not any(e.name == "exact" for e in entries):
        entries = get_entries(["exact"]) + entries
    layers = list(range(sample.num_layers)) if layers is None else list(layers)
    runnable = [e for e in entries if not (e.needs_projection and not sample.has_projection)]
    total = len(layers) * sum(len(e.values) for e in runnable)
    bar = progress(total) if progress is not None else None
    exact_entry = next(e for e in runnable if e.name == "exact")
    warm = layer_inputs(sample, layers[0])
    for entry in runnable:  # compile / load the kernels before anything is timed
        _run_in_scope(entry, warm, entry.values[0], seed)
    runs = {}  # (method, value) -> lists of per-layer results
    try:
        for layer in layers:
            inputs = layer_inputs(sample, layer)
            t_exact, exact_trial = _timed(
                lambda: _run_in_scope(exact_entry, inputs, None, seed), repeats  # noqa: B023
            )
            projection = _dense_projection_ops(inputs) if inputs.has_projection else OpCounts()
            reference = exact_trial.out
            for entry in runnable:
                for value in entry.values:
                    if entry is exact_entry:
                        t_run, trial = t_exact, exact_trial
                    else:
                        t_run, trial = _timed(
                            lambda: _run_in_scope(entry, inputs, value, seed + layer),  # noqa: B023
                            repeats,
                        )
                    errors = relative_errors(trial.out, reference, inputs.key_padding_mask)
                    bound = trial.bound
                    if entry.bound is not None:
                        bound = entry.bound(inputs, value, trial, reference)
                    posterior = posterior_relative(trial.info, trial.out, inputs.key_padding_mask)
                    record = runs.setdefault((entry.name, value), {
                        "entry": entry, "errors": [], "bounds": [], "posteriors": [], "ops": 0, "dense": 0,
                        "energy": 0.0, "dense_energy": 0.0, "time": 0.0, "exact_time": 0.0,
                        "backend": trial.info.backend})
                    record["errors"].append(errors.ravel())
                    if bound is not None:
                        record["bounds"].append(np.broadcast_to(bound, errors.shape).ravel())
                    if posterior is not None:
                        record["posteriors"].append(posterior.ravel())
                    ops, dense = trial.info.ops, trial.info.dense_ops
                    if not entry.needs_projection:  # same scope for all: projection included
                        ops, dense = ops + projection, dense + projection
                    record["ops"] += ops.total
                    record["dense"] += dense.total
                    record["energy"] += ops.energy_pj()
                    record["dense_energy"] += dense.energy_pj()
                    record["time"] += t_run
                    record["exact_time"] += t_exact
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    rows = []
    for (name, value), rec in runs.items():
        errors = np.concatenate(rec["errors"])
        bounds = np.concatenate(rec["bounds"]) if rec["bounds"] else None
        posteriors = np.concatenate(rec["posteriors"]) if rec["posteriors"] else None
        rows.append(ComparisonRow(
            method=name, knob=rec["entry"].knob, value=value,
            error_median=float(np.median(errors)), error_p90=float(np.percentile(errors, 90)),
            bound_median=None if bounds is None else float(np.median(bounds)),
            ops_ratio=rec["ops"] / rec["dense"], energy_ratio=rec["energy"] / rec["dense_energy"],
            time_ratio=rec["time"] / rec["exact_time"], cells=int(errors.size),
            backend=rec["backend"],
            posterior_median=None if posteriors is None else float(np.median(posteriors)),
        ))
    return rows


def format_table(rows):
    """A plain-text table of comparison rows (one line per method and knob value)."""
    width = max([8] + [len(r.method) for r in rows])  # variants: "mca:shared_draws=True"
    header = (f"{'method':<{width}} {'knob':<14} {'value':>8} {'err med':>9} {'err p90':>9} "
              f"{'bound med':>10} {'post med':>9} {'ops/exact':>10} {'energy/ex':>10} {'time/ex':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        bound = "-" if r.bound_median is None else f"{r.bound_median:.3g}"
        post = "-" if r.posterior_median is None else f"{r.posterior_median:.3g}"
        value = "-" if r.value is None else str(r.value)
        lines.append(
            f"{r.method:<{width}} {(r.knob or '-'):<14} {value:>8} {r.error_median:>9.3g} "
            f"{r.error_p90:>9.3g} {bound:>10} {post:>9} {r.ops_ratio:>10.3f} {r.energy_ratio:>10.3f} "
            f"{r.time_ratio:>8.2f}"
        )
    return "\n".join(lines)


def plot_pareto(rows, path, title="mcattn on real attention"):
    """Write an error-versus-cost plot (PNG): one line per method over its knob sweep.

    Left: median relative output error against operations relative to exact attention;
    right: against measured wall time relative to exact attention. Exact attention has
    error 0, which a log axis cannot show: it is drawn as a star on the bottom edge of the
    plot, labelled "exact (error 0)", below a dashed line that separates it from the data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    methods = [m for m in dict.fromkeys(r.method for r in rows) if m != "exact"]
    floor = min([r.error_median for r in rows if r.error_median > 0] or [1e-3]) / 3
    for ax, attr, label in ((axes[0], "ops_ratio", "operations / exact"),
                            (axes[1], "time_ratio", "wall time / exact (measured)")):
        for method in methods:
            mine = [r for r in rows if r.method == method]
            xs = [getattr(r, attr) for r in mine]
            ys = [max(r.error_median, floor) for r in mine]
            ax.plot(xs, ys, marker="o", label=method)
            for r, x, y in zip(mine, xs, ys):
                ax.annotate(str(r.value), (x, y), textcoords="offset points", xytext=(4, 3),
                            fontsize=7)
        ax.axhline(floor * 1.6, color="grey", lw=0.8, ls="--")
        ax.scatter([1.0], [floor], marker="*", s=120, color="black", label="exact (error 0)",
                   zorder=3, clip_on=False)
        ax.annotate("exact: error 0", (1.0, floor), textcoords="offset points", xytext=(6, -2),
                    fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("median relative output error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
