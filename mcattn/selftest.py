"""``mcattn selftest``: every method on every backend against the NumPy reference.

For a new machine: each row (:func:`checks`) runs one method on small fixed inputs
with a backend and compares the result with the float64 NumPy backend (same seed, so
the random methods draw the same samples). A backend that cannot run here gives a row
that says why (no GPU, CuPy missing...) and does not fail the run. ``bench=True`` adds
GPU timings next to ``torch.nn.functional.scaled_dot_product_attention`` on the same GPU.

The rows come from the methods' specs (``Method.checks`` in ``mcattn/<method>/spec.py``:
a function that builds the inputs with ``put``, which places a NumPy array where the
backend wants it, and runs the method, with the tolerances of its float32 and float64
results); a method without its own rows gets one on its example inputs.
"""

import json
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import __version__
from ._dispatch import BACKEND_NAMES, backend_status
from ._plugin import Check

__all__ = ["checks", "Check", "Row", "run_selftest", "run_bench", "format_rows", "main"]


def checks():
    """Every registered method's self-test rows, name -> :class:`~mcattn._plugin.Check`
    (a method's ``checks``, or one default row on its example inputs), in registry order."""
    from .registry import get_method, method_names

    rows = {}
    for name in method_names():
        rows.update(get_method(name).selftest_checks())
    return rows


def __getattr__(name):
    if name == "CHECKS":  # the rows as of now (register() may add a method at any time)
        return checks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DTYPES = ("float32", "float64")
BENCH_SIZES = (1024, 2048, 4096, 8192, 16384)


@dataclass
class Row:
    """One (backend, method, dtype) result."""

    backend: str
    method: str
    dtype: str
    status: str  # "pass", "FAIL", "skip" or "error"
    max_error: float | None = None
    tolerance: float | None = None
    note: str = ""


def _placer(backend):
    """``put``: NumPy for host backends, CuPy for GPU backends (host arrays under the simulator)."""
    status = backend_status(backend)
    if status.device == "cuda" and not status.reason.startswith("numba.cuda simulator"):
        import cupy

        return cupy.asarray
    return lambda a: a


def _host(a):
    a = a[0] if isinstance(a, tuple) else a
    return a.get() if hasattr(a, "get") else np.asarray(a)


def run_selftest(backends=None, methods=None):
    """Run every check on every backend.

    Parameters
    ----------
    backends, methods : sequence of str, optional
        Default: all of :data:`mcattn._dispatch.BACKEND_NAMES` and :func:`checks`.

    Returns
    -------
    list of Row
    """
    rows, table = [], checks()
    unknown = [m for m in methods or () if m not in table]
    if unknown:
        raise ValueError(f"no self-test called {unknown}; the rows are {', '.join(table)}")
    for backend in backends or BACKEND_NAMES:
        status = backend_status(backend)
        for method in methods or table:
            check = table[method]
            for dtype in DTYPES:
                row = Row(backend, method, dtype, "skip", tolerance=check.tolerance[dtype])
                rows.append(row)
                if not status.available:
                    row.note = status.reason
                    continue
                try:
                    ref = _host(check.run(lambda a: a, "numpy", "float64"))
                    out = _host(check.run(_placer(backend), backend, dtype))
                except Exception as exc:  # noqa: BLE001 - report, do not stop the table
                    row.status, row.note = "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    continue
                scale = float(np.max(np.abs(ref))) or 1.0
                row.max_error = float(np.max(np.abs(out.astype(np.float64) - ref))) / scale
                ok = (out.dtype == np.dtype(dtype) and np.isfinite(row.max_error)
                      and row.max_error <= row.tolerance)
                row.status = "pass" if ok else "FAIL"
                if out.dtype != np.dtype(dtype):
                    row.note = f"result dtype {out.dtype}"
    return rows


def _gpu_timer():
    import cupy

    def timed(thunk, repeats):
        thunk()  # warm-up: compiles the kernels
        cupy.cuda.Device().synchronize()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            thunk()
            cupy.cuda.Device().synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    return timed


def run_bench(sizes=BENCH_SIZES, repeats=3, max_seconds=2.0):
    """GPU timings (best of ``repeats``, milliseconds) next to torch SDPA on the same GPU.

    Returns ``(rows, reason)``: a list of dicts, and why nothing ran (``None`` when it did).
    Sizes stop growing for a (backend, method) once one call takes over ``max_seconds``.
    """
    gpu = [b for b in ("cupy", "cuda") if backend_status(b).available
           and not backend_status(b).reason.startswith("numba.cuda simulator")]
    if not gpu:
        return [], "; ".join(f"{b}: {backend_status(b).reason}" for b in ("cupy", "cuda"))
    import cupy

    rows = []
    torch = _torch_cuda()
    for n in sizes:
        if torch is not None:
            q, k, v = (torch.randn(1, 8, n, 64, device=f"cuda:{cupy.cuda.runtime.getDevice()}")
                       for _ in range(3))
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def thunk(q=q, k=k, v=v, sdpa=sdpa):
                return sdpa(q, k, v)

            ms = _gpu_timer()(thunk, repeats) * 1e3
            rows.append({"backend": "torch", "method": "sdpa", "n": n, "ms": ms})
    stopped = set()
    for backend in gpu:
        for method, check in checks().items():
            if check.bench is None:
                continue
            for n in sizes:
                if (backend, method) in stopped or (check.bench_max_n is not None
                                                     and n > check.bench_max_n):
                    break
                try:
                    seconds = _gpu_timer()(check.bench(cupy.asarray, backend, n), repeats)
                except Exception as exc:  # noqa: BLE001
                    rows.append({"backend": backend, "method": method, "n": n, "ms": None,
                                 "note": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]})
                    stopped.add((backend, method))
                    continue
                rows.append({"backend": backend, "method": method, "n": n, "ms": seconds * 1e3})
                if seconds > max_seconds:
                    stopped.add((backend, method))
    sdpa = {r["n"]: r["ms"] for r in rows if r["method"] == "sdpa"}
    for r in rows:
        if r["ms"] is not None and r["n"] in sdpa and r["method"] != "sdpa":
            r["vs_sdpa"] = r["ms"] / sdpa[r["n"]]
    return rows, None


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def environment():
    """Versions and the GPU, for the JSON report."""
    env = {"mcattn": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "backends": {b: str(backend_status(b)) for b in BACKEND_NAMES}}
    for name in ("numba", "cupy", "torch"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            env[name] = None
    if backend_status("cupy").available and not backend_status("cupy").reason.startswith("numba"):
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
            env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            env["driver"] = cupy.cuda.runtime.driverGetVersion()
            env["runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        except Exception as exc:  # noqa: BLE001
            env["gpu"] = f"unknown ({exc})"
    return env


def format_rows(rows):
    """The self-test table as text."""
    wm = max([7] + [len(r.method) for r in rows])  # "mca-shared" is wider than the methods
    lines = [f"{'backend':7s} {'method':{wm}s} {'dtype':8s} {'status':6s} {'max error':>10s} "
             f"{'tolerance':>9s}  note"]
    for r in rows:
        err = "" if r.max_error is None else f"{r.max_error:.2e}"
        lines.append(f"{r.backend:7s} {r.method:{wm}s} {r.dtype:8s} {r.status:6s} {err:>10s} "
                     f"{r.tolerance:9.0e}  {r.note}")
    return lines


def main(args):
    """The ``mcattn selftest`` command; returns the exit code (1 on any FAIL or error)."""
    rows = run_selftest(args.backends, args.methods)
    print(f"mcattn {__version__} selftest: each method against the float64 NumPy backend "
          "(max |out - ref| / max |ref|)")
    print("\n".join(format_rows(rows)))
    payload = {"environment": environment(), "rows": [asdict(r) for r in rows]}
    if args.bench:
        bench, reason = run_bench()
        payload["bench"] = bench
        if reason:
            print(f"bench skipped: no GPU backend can run here ({reason})")
        else:
            print("bench: [1, 8, N, 64] float32, best of 3 after a warm-up, ms (x = time / torch SDPA)")
            for r in bench:
                extra = f"  x{r['vs_sdpa']:.2f}" if "vs_sdpa" in r else ""
                ms = "failed: " + r.get("note", "") if r["ms"] is None else f"{r['ms']:.3f}"
                print(f"  {r['backend']:6s} {r['method']:6s} N={r['n']:6d} {ms}{extra}")
    failed = [r for r in rows if r.status in ("FAIL", "error")]
    skipped = [r for r in rows if r.status == "skip"]
    print(f"selftest: {len(rows) - len(failed) - len(skipped)} ok, {len(failed)} failing, "
          f"{len(skipped)} not run here (backend unavailable)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2, default=str)
        print(f"wrote {args.json}")
    return 1 if failed else 0

