"""Peak memory of one ``mca.attention`` call per N and mode, each in a fresh process.

Usage::

    python benchmarks/mca_memory.py                         # every mode, N = 2048 4096 8192
    python benchmarks/mca_memory.py --modes numba causal --sizes 8192
    python benchmarks/mca_memory.py --src /tmp/base         # another checkout's mcattn
    python benchmarks/mca_memory.py --time 4096             # streamed / dense time, one process

Inputs: B=1, H=12, d_head=32, ``x [1, N, 384]``, ``w_v [384, 384]``, float32, alpha 1.0
(about 60-80 % of the value-projection MACs kept on these random inputs: a mix of exact
and sampled tokens). Each (mode, N) runs in a new interpreter: the inputs are built, the
same mode runs once at N = 256 (Numba compilation, thread pool, BLAS buffers), then the
peak resident set is reset (``/proc/self/clear_refs``) and the call runs. Printed per
row: ``rss_MiB``, the peak resident memory during the call minus the resident memory
before it (``VmHWM`` after, ``VmRSS`` before: everything, Numba's and BLAS's buffers
included, and the output); ``numpy_MiB``, the peak of NumPy's allocations during the
call (tracemalloc). ``--time N`` times the call against the dense computation it
replaced (``attention_probs``, ``mca.budgets``, ``mca.value_projection``, ``P @ V~``: the
base commit's ``mca.attention``), interleaved in one process (best wall time of
``--rounds``, and the ratio of CPU seconds, best of two), and checks that both give the
same output bit for bit.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: mode -> keyword arguments of ``mca.attention`` (masks are built from the names below)
MODES = {
    "numba": {},
    "numpy": {"backend": "numpy"},
    "optimal": {"sampling": "optimal"},
    "shared": {"shared_draws": True},
    "shared-numpy": {"shared_draws": True, "backend": "numpy"},
    "padding": {"key_padding_mask": "padding"},
    "attn-mask": {"attn_mask": "per-key"},
    "causal": {"is_causal": True},
    "causal-padding": {"is_causal": True, "key_padding_mask": "padding"},
    "info": {"return_info": True},
    "cupy-fake": {"backend": "cupy"},
    "grad": {"grad": True},
}

def inputs(n, mode, device=None):
    """``([q, k, x, w, b], keywords)`` of ``mode`` at ``N = n`` (``device``: an ``asarray``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((1, 12, n, 32), dtype=np.float32) for _ in range(2))
    x = rng.standard_normal((1, n, 384), dtype=np.float32)
    w = (rng.standard_normal((384, 384)) / np.sqrt(384)).astype(np.float32)
    b = rng.standard_normal(384).astype(np.float32)
    kw = dict(MODES[mode])
    if kw.get("key_padding_mask") == "padding":
        kpm = np.ones((1, n), bool)
        kpm[:, n - n // 8:] = False
        kw["key_padding_mask"] = kpm
    if kw.get("attn_mask") == "per-key":
        kw["attn_mask"] = np.where(np.arange(n) % 7 == 3, -np.inf, 0.0).astype(np.float32)
    arrays = [q, k, x, w, b]
    return ([device(a) for a in arrays] if device else arrays), kw


def call(arrays, kw, alpha):
    """One ``mca.attention`` call (or, with ``grad``, the training forward and backward)."""
    from mcattn import mca

    q, k, x, w, b = arrays
    kw = dict(kw)
    if kw.pop("grad", False):
        from mcattn.mca import grad

        out, res = grad.forward(q, k, None, x=x, w_v=w, b_v=b, alpha=alpha, seed=0, **kw)
        return grad.backward(q, k, None, out, res, out, x=x, w_v=w, b_v=b, alpha=alpha, seed=0,
                             **kw)
    return mca.attention(q, k, x, w, b, num_heads=12, alpha=alpha, seed=0, **kw)


_CHILD = r"""
import gc, json, sys, tracemalloc
sys.path[:0] = [{bench!r}, {src!r}]
device = None
if {fake!r}:
    sys.path.insert(0, {tests!r})
    import fake_cupy
    fake_cupy.install()
    import cupy
    device = cupy.asarray
from mca_memory import call, inputs


def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


call(*inputs(256, {mode!r}, device), {alpha!r})  # compile and warm
arrays, kw = inputs({n}, {mode!r}, device)
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # peak RSS := current RSS
tracemalloc.start()
result = call(arrays, kw, {alpha!r})
numpy_peak = tracemalloc.get_traced_memory()[1] / 2**20
tracemalloc.stop()
print(json.dumps({{"rss_MiB": status("VmHWM") - before, "numpy_MiB": numpy_peak}}))
"""


def measure(mode, n, alpha=1.0, src=ROOT):
    """``{"rss_MiB": ..., "numpy_MiB": ...}`` of one call of ``mode`` at ``N = n``."""
    code = _CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), src=src,
                         fake=MODES[mode].get("backend") == "cupy",
                         tests=os.path.join(ROOT, "tests", "cuda"), mode=mode, alpha=alpha, n=n)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_reference(q, k, x, w, b, alpha, **kw):
    """The base commit's ``mca.attention``: the whole probability matrix, its column maxima,
    the projection, ``P @ V~`` (:func:`mcattn.mca.naive.attention`, the dense definition,
    with the projection kernel of ``kw["backend"]``)."""
    from mcattn._validate import prepare_attention
    from mcattn.mca import cpu, naive

    inp = prepare_attention(q, k, k, attn_mask=kw.get("attn_mask"),
                            key_padding_mask=kw.get("key_padding_mask"),
                            is_causal=kw.get("is_causal", False))
    projection = naive.value_projection if kw.get("backend") == "numpy" else cpu.value_projection
    out, _ = naive.attention(inp, x, w, b, q.shape[-3], alpha, 0,
                             kw.get("sampling", "weight"), kw.get("shared_draws", False), projection)
    return out.reshape(q.shape[:-1] + (-1,))


def time_rows(n, alpha, modes, rounds):
    """Streamed ``mca.attention`` / :func:`dense_reference`, interleaved, per mode."""
    import numpy as np

    sys.path.insert(0, ROOT)  # this checkout's mcattn
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchmarks.common import interleaved_times

    for mode in modes:
        if MODES[mode].get("backend") == "cupy" or MODES[mode].get("grad"):
            continue
        arrays, kw = inputs(n, mode)
        kw.pop("return_info", None)
        stream = lambda: call(arrays, kw, alpha)  # noqa: E731, B023
        dense = lambda: dense_reference(*arrays, alpha, **kw)  # noqa: E731, B023
        same = bool(np.array_equal(stream(), dense()))
        t_s, t_d = interleaved_times(stream, dense, rounds=rounds, repeats=1)
        c_s, c_d = (min(_cpu_seconds(fn) for _ in range(2)) for fn in (stream, dense))
        yield {"mode": mode, "N": n, "stream_s": t_s, "dense_s": t_d, "ratio": t_s / t_d,
               "cpu_ratio": c_s / c_d, "identical": same}


def _cpu_seconds(fn):
    """CPU seconds of ``fn()``, all threads (less sensitive than wall time to a busy machine)."""
    import time

    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mca_memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--src", default=ROOT, help="checkout whose mcattn is measured")
    parser.add_argument("--time", type=int, metavar="N", help="time streamed / dense at this N")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    if args.time:
        print(f"# mca.attention (streamed) / the dense computation, B=1 H=12 d=32 d_in=384 "
              f"float32, alpha {args.alpha}, interleaved, best of {args.rounds}")
        for row in time_rows(args.time, args.alpha, args.modes, args.rounds):
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()), flush=True)
            rows.append(row)
    else:
        print(f"# peak memory growth of one mca.attention call (MiB), B=1 H=12 d=32 d_in=384 "
              f"float32, alpha {args.alpha}, src {args.src}")
        print(f"{'mode':>16} {'N':>6} {'rss_MiB':>9} {'numpy_MiB':>10}")
        for mode in args.modes:
            for n in args.sizes:
                row = {"mode": mode, "N": n, **measure(mode, n, args.alpha, args.src)}
                if "error" in row:
                    print(f"{mode:>16} {n:>6} error: {row['error']}", flush=True)
                else:
                    print(f"{mode:>16} {n:>6} {row['rss_MiB']:>9.1f} {row['numpy_MiB']:>10.1f}",
                          flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"alpha": args.alpha, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
