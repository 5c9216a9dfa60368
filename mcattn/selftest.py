"""``mcattn selftest``: every method on every backend against the NumPy reference.

For a new machine: each entry of :data:`CHECKS` runs one method on small fixed inputs
with a backend and compares the result with the float64 NumPy backend (same seed, so
the random methods draw the same samples). A backend that cannot run here gives a row
that says why (no GPU, CuPy missing...) and does not fail the run. ``bench=True`` adds
GPU timings next to ``torch.nn.functional.scaled_dot_product_attention`` on the same GPU.

Adding a method is one entry in :data:`CHECKS`: a function that builds the inputs with
``put`` (which places a NumPy array where the backend wants it) and runs the method,
and the tolerances of its float32 and float64 results.
"""

import functools
import json
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import __version__
from ._dispatch import BACKEND_NAMES, backend_status

__all__ = ["CHECKS", "Check", "Row", "run_selftest", "run_bench", "format_rows", "main"]


@dataclass(frozen=True)
class Check:
    """One method's self-test.

    Parameters
    ----------
    run : callable
        ``run(put, backend, dtype) -> array``: the method on fixed small inputs (built
        with NumPy's generator, then ``put(array)``), computed with ``backend``.
    tolerance : dict
        Largest accepted ``max|out - ref| / max|ref|`` per dtype name, ``ref`` being
        ``run`` with the ``numpy`` backend in float64.
    bench : callable, optional
        ``bench(put, backend, n) -> thunk`` for ``--bench``: a call of the method on
        ``[1, 8, n, 64]`` float32 inputs.
    bench_max_n : int, optional
        The bench's largest ``n`` (default: every size), for a variant that need not take
        the device's time at every size.
    """

    run: object
    tolerance: dict
    bench: object = None
    bench_max_n: int | None = None


def _qkv(rng, shape, dtype, put):
    return tuple(put(rng.standard_normal(shape).astype(dtype)) for _ in range(3))


def _exact(put, backend, dtype):
    import mcattn

    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, (2, 3, 37, 16), dtype, put)
    kpm = np.ones((2, 37), bool)
    kpm[1, 30:] = False
    return mcattn.attention(q, k, v, key_padding_mask=put(kpm), is_causal=True, backend=backend)


def _exact_bench(put, backend, n):
    import mcattn

    q, k, v = _qkv(np.random.default_rng(0), (1, 8, n, 64), np.float32, put)
    return lambda: mcattn.attention(q, k, v, backend=backend)


def _exact_backward(put, backend, dtype):
    """Exact attention's training pair: forward with lse, then dq, dk, dv (concatenated)."""
    from ._validate import namespace_of
    from .exact import grad

    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, (2, 3, 37, 16), dtype, put)
    dout = put(rng.standard_normal((2, 3, 37, 16)).astype(dtype))
    kpm = np.ones((2, 37), bool)
    kpm[1, 30:] = False
    mask = {"key_padding_mask": put(kpm), "is_causal": True}
    out, res = grad.forward(q, k, v, backend=backend, **mask)
    grads = grad.backward(q, k, v, out, res, dout, backend=backend, **mask)
    return namespace_of(out).concatenate([grads[n].reshape(-1) for n in "qkv"])


def _exact_backward_bench(put, backend, n):
    from .exact import grad

    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, (1, 8, n, 64), np.float32, put)
    dout = put(rng.standard_normal((1, 8, n, 64)).astype(np.float32))

    def step():
        out, res = grad.forward(q, k, v, backend=backend)
        return grad.backward(q, k, v, out, res, dout, backend=backend)

    return step


def _mca(put, backend, dtype):
    from . import mca

    rng = np.random.default_rng(1)
    q, k = (put(rng.standard_normal((2, 3, 29, 8)).astype(dtype)) for _ in range(2))
    x = put(rng.standard_normal((2, 29, 48)).astype(dtype))
    w = put(rng.standard_normal((48, 24)).astype(dtype))
    return mca.attention(q, k, x, w, num_heads=3, alpha=0.5, seed=7, sampling="optimal",
                         backend=backend)


def _mca_bench(put, backend, n, shared_draws=False):
    from . import mca

    rng = np.random.default_rng(1)
    q, k = (put(rng.standard_normal((1, 8, n, 64)).astype(np.float32)) for _ in range(2))
    x = put(rng.standard_normal((1, n, 512)).astype(np.float32))
    w = put(rng.standard_normal((512, 512)).astype(np.float32))
    tables = mca.weight_tables(w, 8)
    return lambda: mca.attention(q, k, x, w, num_heads=8, alpha=0.5, seed=7, tables=tables,
                                 shared_draws=shared_draws, backend=backend)


def _mca_shared(put, backend, dtype):
    """MCA with shared draws (one draw sequence per (batch row, head)): on the GPU backends
    the compiled host plan applied by one kernel launch. 29 keys, so the CPU also takes the
    reduced-GEMM path and every backend rounds the budgets alike."""
    from . import mca

    rng = np.random.default_rng(8)
    q, k = (put(rng.standard_normal((2, 3, 29, 8)).astype(dtype)) for _ in range(2))
    x = put(rng.standard_normal((2, 29, 48)).astype(dtype))
    w = put(rng.standard_normal((48, 24)).astype(dtype))
    b = put(rng.standard_normal(24).astype(dtype))
    return mca.attention(q, k, x, w, b, num_heads=3, alpha=0.5, seed=9, shared_draws=True,
                         backend=backend)


def _rfa(put, backend, dtype):
    from . import rfa

    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, (2, 2, 31, 8), dtype, put)
    q, k = q * 0.5, k * 0.5
    feats = rfa.RandomFeatures(8, 16, num_heads=2, seed=3)
    return rfa.attention(q, k, v, features=feats, is_causal=True, chunk_size=8, backend=backend)


def _rfa_bench(put, backend, n):
    from . import rfa

    q, k, v = _qkv(np.random.default_rng(2), (1, 8, n, 64), np.float32, put)
    feats = rfa.RandomFeatures(64, 128, num_heads=8, seed=3)
    return lambda: rfa.attention(q, k, v, features=feats, backend=backend)


def _eatt(put, backend, dtype):
    from . import eatt

    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, (2, 2, 33, 16), dtype, put)
    l1 = eatt.attention(q, k, v, alignment="l1", is_causal=True, backend=backend)
    hamming = eatt.attention(q, k, v, alignment="hamming", backend=backend)
    from ._validate import namespace_of

    return namespace_of(l1).concatenate([l1, hamming], axis=-1)


def _eatt_bench(put, backend, n):
    from . import eatt

    q, k, v = _qkv(np.random.default_rng(4), (1, 8, n, 64), np.float32, put)
    return lambda: eatt.attention(q, k, v, alignment="l1", backend=backend)


def _latte(put, backend, dtype):
    from . import latte

    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, (2, 3, 29, 16), dtype, put)
    theta = put(np.array([1.0, 2.5, 4.0], dtype))  # per head, logit units
    return latte.attention(q, k, v, threshold=theta, is_causal=True, backend=backend)


def _latte_bench(put, backend, n):
    from . import latte

    q, k, v = _qkv(np.random.default_rng(5), (1, 8, n, 64), np.float32, put)
    return lambda: latte.attention(q, k, v, threshold=4.0, backend=backend)


def _eigen(put, backend, dtype):
    from . import eigen

    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 40, 8)) for _ in range(3))
    basis = eigen.fit(eigen.score_rows(q, k), rank=6)  # fitted on the host, float64
    q, k, v = (put(a.astype(dtype)) for a in (q, k, v))
    return eigen.attention(q, k, v, basis=basis, columns=12, backend=backend)


#: method -> Check. One entry per method (and ``exact-bwd``, exact attention's training
#: forward and backward); every backend is tried with each.
CHECKS = {
    "exact": Check(_exact, {"float32": 1e-5, "float64": 1e-12}, _exact_bench),
    # Not a method: exact attention's training kernels (forward with lse + backward).
    "exact-bwd": Check(_exact_backward, {"float32": 1e-5, "float64": 1e-12}, _exact_backward_bench),
    "mca": Check(_mca, {"float32": 1e-5, "float64": 1e-12}, _mca_bench),
    # Not a method: MCA's shared-draw path (its own GPU kernels; benched up to n = 4096).
    "mca-shared": Check(_mca_shared, {"float32": 1e-5, "float64": 1e-12},
                        functools.partial(_mca_bench, shared_draws=True), 4096),
    "rfa": Check(_rfa, {"float32": 1e-4, "float64": 1e-11}, _rfa_bench),
    "eatt": Check(_eatt, {"float32": 1e-5, "float64": 1e-12}, _eatt_bench),
    "latte": Check(_latte, {"float32": 1e-5, "float64": 1e-12}, _latte_bench),
    "eigen": Check(_eigen, {"float32": 1e-5, "float64": 1e-12}),
}

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
        Default: all of :data:`mcattn._dispatch.BACKEND_NAMES` and :data:`CHECKS`.

    Returns
    -------
    list of Row
    """
    rows = []
    for backend in backends or BACKEND_NAMES:
        status = backend_status(backend)
        for method in methods or CHECKS:
            check = CHECKS[method]
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
        for method, check in CHECKS.items():
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

