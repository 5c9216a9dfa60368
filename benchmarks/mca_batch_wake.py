"""Where the first calls after a pause lose their time with ``share="batch"`` (issue 22):
each ``run_tasks`` call of the 6-layer projection, instrumented.

Per call after a 0.15 s sleep (as the ratio harness's settle pause) and then back to back:
the whole call, the time inside ``run_tasks`` (threadpoolctl's BLAS limit included), the
delay until the pool thread starts its first chunk after the submit ("wake"), and the
busy time of the chunks on the calling thread and on the pool thread (if the chunks
themselves run slower after the pause, it is the cores, not the hand-off).

Usage: ``python benchmarks/mca_batch_wake.py [--calls 12] [--pauses 3]``
"""

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmarks.bench_mca import real_problem, sampled_projection  # noqa: E402

from mcattn import _cpu  # noqa: E402
from mcattn.mca import shared_cpu  # noqa: E402

_records = []


def _instrumented(real):
    def run_tasks(kernel, num_tasks, *args, **kwargs):
        main = threading.get_ident()
        rec = {"enter": time.perf_counter(), "main": 0.0, "pool": 0.0, "wake": None, "cpu": 0.0}
        _records.append(rec)

        def timed(*a):
            start = time.perf_counter()
            cpu = time.thread_time()
            if threading.get_ident() != main and rec["wake"] is None:
                rec["wake"] = start - rec["enter"]
            kernel(*a)
            rec["cpu"] += time.thread_time() - cpu
            rec["main" if threading.get_ident() == main else "pool"] += time.perf_counter() - start

        real(timed, num_tasks, *args, **kwargs)
        rec["exit"] = time.perf_counter()
    return run_tasks


def _steal():
    """The machine's steal time so far (all CPUs, in USER_HZ ticks, /proc/stat)."""
    with open("/proc/stat") as fh:
        return int(fh.readline().split()[8])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--pauses", type=int, default=3)
    args = parser.parse_args(argv)
    heads, layers, _ = real_problem(args.alpha)
    shared_cpu.run_tasks = _instrumented(_cpu.run_tasks)
    call = lambda: sampled_projection(layers, heads, True, share="batch")  # noqa: E731
    call()
    print("# per call (6 layers), ms: total, in run_tasks, mean pool wake delay (us), "
          "busy on calling thread, busy on pool thread, CPU time of the\n# chunks (both threads; "
          "busy minus this = preempted), steal ticks since the pause")
    print(f"# load average: {open('/proc/loadavg').read().strip()}")
    for p in range(args.pauses):
        time.sleep(0.15)
        steal0 = _steal()
        for c in range(args.calls):
            _records.clear()
            start = time.perf_counter()
            call()
            total = time.perf_counter() - start
            inside = sum(r["exit"] - r["enter"] for r in _records)
            wakes = [r["wake"] for r in _records if r["wake"] is not None]
            wake = sum(wakes) / len(wakes) * 1e6 if wakes else float("nan")
            main_busy = sum(r["main"] for r in _records)
            pool_busy = sum(r["pool"] for r in _records)
            cpu = sum(r["cpu"] for r in _records)
            steal = _steal() - steal0 if c == 0 else _steal() - steal0
            print(f"pause {p} call {c:2d}: {total * 1e3:6.2f} {inside * 1e3:6.2f} {wake:7.1f} "
                  f"{main_busy * 1e3:6.2f} {pool_busy * 1e3:6.2f} {cpu * 1e3:6.2f} {steal:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
