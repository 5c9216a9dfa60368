"""What ``mcattn._cpu.run_tasks`` loses per call to thread wake-ups and placement, on a
synthetic compute-only kernel (12 tasks of about 20 us, 4 chunks, 2 threads; 6 calls per
"layer set", as MCA's 6 layers).

Per ``run_tasks`` call, in microseconds from its start: when the pool thread started its
first chunk, when the caller and the pool thread finished their last, and when
``run_tasks`` returned; then the CPUs each thread ran on. After a 0.15 s sleep (the ratio
harness's pause) and back to back. ``--no-spread`` / ``--no-spin`` turn off
``config.CPU_SPREAD_THREADS`` / set ``CPU_SPIN_S``, ``CPU_JOIN_SPIN_S`` to 0 (the pool thread
and the caller sleep at once, as before session s35), to compare in one run.

Usage: ``python benchmarks/cpu_wake_latency.py [--no-spread] [--no-spin] [--sets 6]``
"""

import argparse
import ctypes
import sys
import threading
import time

import numpy as np

from mcattn import _cpu, config
from mcattn._jit import njit

_getcpu = ctypes.CDLL(None).sched_getcpu


@njit(nogil=True, cache=False)
def _burn(a, reps, out, t0, t1):
    for t in range(t0, t1):
        s = 0.0
        for _ in range(reps):
            for i in range(a.shape[0]):
                s += a[i] * 1.0000001
        out[t] = s


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-spread", action="store_true")
    parser.add_argument("--no-spin", action="store_true")
    parser.add_argument("--sets", type=int, default=6)
    args = parser.parse_args(argv)
    config.NUM_THREADS = 2
    if args.no_spread:
        config.CPU_SPREAD_THREADS = False
    if args.no_spin:
        config.CPU_SPIN_S = config.CPU_JOIN_SPIN_S = 0.0
    a = np.ones(4096)
    out = np.zeros(64)
    events = []

    def timed(*kargs):
        who = "m" if threading.current_thread() is threading.main_thread() else "p"
        events.append((who, "s", time.perf_counter(), _getcpu()))
        _burn(*kargs)
        events.append((who, "e", time.perf_counter(), _getcpu()))

    def layer_set():
        rows = []
        for _ in range(6):
            events.clear()
            start = time.perf_counter()
            _cpu.run_tasks(timed, 12, a, 10, out, chunks_per_thread=2, blas=False)
            end = time.perf_counter()
            pick = lambda who, kind, f: f([t for w, k, t, _ in events if w == who and k == kind],  # noqa: E731
                                          default=float("nan"))
            cpus = {w: sorted({c for ww, _, _, c in events if ww == w}) for w in "mp"}
            rows.append((pick("p", "s", min) - start, pick("m", "e", max) - start,
                         pick("p", "e", max) - start, end - start, cpus))
        return rows

    layer_set()
    layer_set()
    print(f"# spread {config.CPU_SPREAD_THREADS}, spin {config.CPU_SPIN_S} s; per run_tasks call: "
          "pool start, caller end, pool end, return (us) [caller CPUs / pool CPUs]")
    for pause in range(2):
        time.sleep(0.15)
        for s in range(args.sets):
            rows = layer_set()
            print(f"p{pause} s{s}: " + " | ".join(
                f"{r[0] * 1e6:4.0f} {r[1] * 1e6:4.0f} {r[2] * 1e6:4.0f} {r[3] * 1e6:4.0f} "
                f"{r[4]['m']}/{r[4]['p']}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
