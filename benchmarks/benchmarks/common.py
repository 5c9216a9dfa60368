"""Shared pieces of the asv suites: inputs, baselines and same-process ratios.

This machine is shared and noisy, so besides asv's own ``time_*`` figures every suite
has ``track_*_ratio`` benchmarks: the time of an mcattn call divided by the time of a
baseline (torch SDPA on the CPU, or NumPy) measured in the same process, interleaved,
taking the best of several rounds. Only such ratios are comparable between runs.
"""

import time

import numpy as np

import mcattn


def qkv(n, *, batch=1, heads=12, head_dim=64, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, heads, n, head_dim)
    return tuple(rng.standard_normal(shape, dtype=dtype) for _ in range(3))


def sdpa(q, k, v, is_causal=False):
    """torch.nn.functional.scaled_dot_product_attention on the CPU (the baseline)."""
    import torch

    with torch.no_grad():
        return torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), is_causal=is_causal
        )


def best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ratio(candidate, baseline, rounds=3, repeats=2):
    """Best-of time of ``candidate`` over best-of time of ``baseline``, interleaved."""
    t_cand, t_base = interleaved_times(candidate, baseline, rounds, repeats)
    return t_cand / t_base


def rss_growth_mib(fn, interval=0.0005):
    """Peak resident memory during ``fn()`` minus the resident memory before, in MiB.

    A thread samples ``/proc/self/statm`` while ``fn`` runs (mcattn's kernels release the
    GIL), so temporary buffers freed before ``fn`` returns are seen too.
    """
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    base = rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss())
    return (peak[0] - base) / 2**20


def exact(q, k, v, backend, is_causal=False):
    return mcattn.attention(q, k, v, backend=backend, is_causal=is_causal, check_finite=False)


def peak_growth_in_subprocess(setup, call, warmup):
    """Peak RSS growth (MiB) of ``call`` in a fresh interpreter.

    ``setup``, ``call`` and ``warmup`` are Python source lines run after
    ``from benchmarks.common import *``; inputs are built in ``setup`` (not counted) and
    ``warmup`` compiles/warms the code on small inputs first.
    """
    import os
    import subprocess
    import sys

    bench_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "\n".join([
        "import sys", f"sys.path.insert(0, {bench_dir!r})",
        "from benchmarks.common import *", setup, warmup,
        f"print(rss_growth_mib(lambda: {call}))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


#: Seconds to wait before each timed block of :func:`interleaved_times`: OpenBLAS's worker
#: threads spin for 2^28 cycles (about 0.1 s here, OPENBLAS_THREAD_TIMEOUT) after each
#: multi-threaded GEMM, so on two cores whatever runs next shares a core with a spinning
#: thread (measured: 103 ms of CPU burnt during a 0.3 s sleep after one ``x @ w``).
SETTLE_S = 0.15


def interleaved_times(candidate, baseline, rounds=3, repeats=3, settle=None):
    """Best-of times ``(t_candidate, t_baseline)`` measured alternately after a warm-up.

    Each timed block starts ``settle`` seconds (default :data:`SETTLE_S`) after the
    previous one ended, so neither runs while the other's idle threads still spin.
    """
    settle = SETTLE_S if settle is None else settle
    candidate()
    baseline()
    t_cand = t_base = float("inf")
    for _ in range(rounds):
        time.sleep(settle)
        t_cand = min(t_cand, best_time(candidate, repeats))
        time.sleep(settle)
        t_base = min(t_base, best_time(baseline, repeats))
    return t_cand, t_base
