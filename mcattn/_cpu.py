"""Shared machinery of the Numba CPU kernels: the thread pool and BLAS threads.

Kernels are ``@njit(nogil=True)`` functions that process a range ``[t0, t1)`` of
independent tasks; :func:`run_tasks` cuts the task range into chunks and runs them on
``config.num_threads()`` Python threads (the GIL is released inside the kernel). Why
not ``prange``: the kernels call BLAS (``np.dot``) on small blocks, and OpenBLAS called
from inside an OpenMP parallel region either warns and risks hanging or oversubscribes
the cores; with plain threads and BLAS held to one thread during the call, each core
runs exactly one kernel thread. Results never depend on the number of threads: a task
always computes the same rows in the same order.

The pool threads of :func:`run_tasks` are its own (:class:`_Helper`: they spin briefly,
without the GIL, before they sleep) and are kept off the caller's CPU during a call
(:func:`_hold_cpu`); :func:`map_threads` uses a ``ThreadPoolExecutor``.
"""

import contextlib
import ctypes
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

from . import config
from ._jit import njit

__all__ = ["run_tasks", "map_threads"]

_lock = threading.Lock()
_pool = None
_pool_size = 0
_controller = None


def _load_getcpu():
    """libc's ``sched_getcpu`` (the CPU the calling thread runs on), or None off Linux."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return fn


_getcpu = _load_getcpu()
_placed = threading.local()  # a helper thread's affinity as last set by _keep_off


def _hold_cpu():
    """Where to keep the calling thread: ``(cpu, its affinity)`` for :func:`_pin`,
    :func:`_keep_off` and :func:`_release`, or None (not Linux, one CPU allowed, or
    ``config.CPU_SPREAD_THREADS`` off).

    Why: a kernel that packs wake-ups onto busy CPUs (some virtual machines', to leave idle
    vCPUs asleep) wakes the pool thread on the caller's CPU, and the caller, woken by the
    pool thread at the end of the call, on the pool thread's: after a pause both then share
    one core until the load balancer separates them, tens of milliseconds later (the first
    6-layer MCA calls after 0.15 s of sleep took 1.5x as long; docs/mca.md, "Speed on the
    CPU"). Moving only the pool thread does not help: the two chase each other.
    """
    if _getcpu is None or not config.CPU_SPREAD_THREADS:
        return None
    try:
        allowed = os.sched_getaffinity(0)
    except OSError:
        return None
    cpu = _getcpu()
    if len(allowed) < 2 or cpu not in allowed:
        return None
    return cpu, allowed


def _pin(held):
    """Keep the calling thread on CPU ``held[0]`` until :func:`_release` (after the pool
    threads are started: threads inherit the affinity of the thread that starts them)."""
    if held is None:
        return None
    try:
        os.sched_setaffinity(0, (held[0],))
    except OSError:  # (a sandbox may forbid it: placement is left to the scheduler)
        return None
    return held


def _keep_off(held):
    """Keep the calling pool thread off the caller's CPU ``held[0]`` (moved at once if it
    is there). The thread keeps that affinity after the call: set again only when the
    caller's CPU changes, one system call of about 2 microseconds."""
    cpu, allowed = held
    want = allowed - {cpu}
    if getattr(_placed, "mask", None) == want:
        return
    try:
        os.sched_setaffinity(0, want)
        _placed.mask = want
    except OSError:
        pass


def _release(held):
    """Give the calling thread back the affinity :func:`_hold_cpu` found."""
    if held is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, held[1])


@intrinsic
def _load_acquire(typingctx, state, index):
    """``state[index]`` (int64) read with acquire ordering: a load the compiler keeps
    inside a spin loop (a plain one would be hoisted out of it)."""
    if not (isinstance(state, types.Array) and state.dtype == types.int64 and state.ndim == 1):
        return None
    sig = types.int64(state, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@njit(nogil=True, cache=True)
def _spin_until(state, index, target, spins, linger):
    """Read ``state[index]`` until it is ``>= target``, at most ``spins`` times, without the
    GIL; once it is, ``linger`` more reads (see :class:`_Helper`). Returns whether it was."""
    for _ in range(spins):
        if _load_acquire(state, index) >= target:
            seen = 0
            for _ in range(linger):
                seen += _load_acquire(state, index) >= target
            return seen >= 0
    return False


_spin_ns = None  # nanoseconds per read of _spin_until, measured once


def _spins(seconds):
    """How many reads of :func:`_spin_until` take about ``seconds``."""
    global _spin_ns
    if _spin_ns is None:
        probe = np.zeros(1, np.int64)
        _spin_until(probe, 0, 1, 1000, 0)  # (compile or load)
        start = time.perf_counter()
        _spin_until(probe, 0, 1, 200_000, 0)
        _spin_ns = max(0.05, (time.perf_counter() - start) * 1e9 / 200_000)
    return max(0, int(seconds * 1e9 / _spin_ns))


class _Helper:
    """One pool thread of :func:`run_tasks` that spins a little before it sleeps.

    Why: on a virtual machine whose idle vCPUs halt at once, every futex wake-up of a
    sleeping thread costs 60-90 microseconds (the host has to run the vCPU again), twice
    per call (the pool thread's start and the caller's wait for it) — 6 of MCA's 6-layer
    calls of about 4 ms each. So the thread, done with a job, reads its job counter
    without the GIL for ``config.CPU_SPIN_S`` before it sleeps on a condition, and the
    caller likewise reads the done counter for up to ``config.CPU_JOIN_SPIN_S`` before it
    sleeps. Seen, each side keeps reading a little longer (``config.CPU_LINGER_S``,
    ``CPU_JOIN_LINGER_S``): the other still holds the GIL for a while, and a thread that
    has to wait for the GIL sleeps on a futex too.

    ``state[0]`` counts the jobs posted, ``state[1]`` those done.
    """

    def __init__(self):
        self.state = np.zeros(2, np.int64)
        self.cv = threading.Condition()
        self.job = None
        self.error = None
        self.thread = threading.Thread(target=self._loop, name="mcattn-helper", daemon=True)
        self.thread.start()

    def post(self, job):
        """Start ``job()`` on the thread; returns the number to :meth:`join`."""
        self.job = job
        with self.cv:
            self.state[0] += 1
            self.cv.notify()
            return int(self.state[0])

    def join(self, ticket):
        """Wait until job ``ticket`` is done; raise what it raised."""
        linger = _spins(config.CPU_JOIN_LINGER_S)
        if not _spin_until(self.state, 1, ticket, _spins(config.CPU_JOIN_SPIN_S), linger):
            with self.cv:
                while self.state[1] < ticket:
                    self.cv.wait()
        error, self.error = self.error, None
        if error is not None:
            raise error

    def _loop(self):
        done = 0
        while True:
            if not _spin_until(self.state, 0, done + 1, _spins(config.CPU_SPIN_S),
                               _spins(config.CPU_LINGER_S)):
                with self.cv:
                    while self.state[0] <= done:
                        self.cv.wait()
            try:
                self.job()
            except BaseException as exc:  # noqa: BLE001 - re-raised by join in the caller
                self.error = exc
            self.job = None
            done += 1
            with self.cv:
                self.state[1] = done
                self.cv.notify_all()


_helpers = []
_helpers_busy = threading.Lock()  # one caller at a time: the others run alone


def _reset_helpers():
    """After ``fork`` the child has none of the parent's threads."""
    global _helpers_busy
    _helpers.clear()
    _helpers_busy = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_helpers)


def _get_pool(n):
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:  # one pool, grown to the largest request
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="mcattn")
            _pool_size = n
        return _pool


def _blas_one_thread():
    global _controller
    with _lock:
        if _controller is None:
            # Numba's np.dot calls SciPy's BLAS: load it first so the controller sees it.
            import scipy.linalg.cython_blas  # noqa: F401

            _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def run_tasks(kernel, num_tasks, *args, chunks_per_thread=4, work=None, blas=True):
    """Run ``kernel(*args, t0, t1)`` over ``[0, num_tasks)`` on the CPU threads.

    Parameters
    ----------
    kernel : numba dispatcher compiled with ``nogil=True``
        Processes tasks ``t0 <= t < t1``; tasks must be independent.
    num_tasks : int
    *args
        Passed to every call before ``t0, t1``.
    chunks_per_thread : int
        Chunks per thread, for load balance when tasks differ in cost (causal rows).
    work : int, optional
        An estimate of the call's scalar operations: below ``config.CPU_SERIAL_WORK`` the
        kernel runs on the calling thread alone (waking the pool costs tens of
        microseconds per call, more than a small phase of a kernel costs).
    blas : bool, default True
        The kernel may call BLAS (``np.dot``): BLAS is held to one thread during the call.
        False skips that (about 10 microseconds of threadpoolctl per call) for kernels
        without BLAS calls.

    Notes
    -----
    The calling thread works too: it and ``threads - 1`` pool threads take chunks, in
    order, from a shared counter until none is left. So a descheduled thread (a busy
    machine) delays only the chunk it holds, and one wake-up per call is saved. With
    ``config.CPU_SPREAD_THREADS`` (Linux) the calling thread is held on its CPU for the
    call and the pool threads are kept off it (:func:`_hold_cpu` says why).
    """
    if num_tasks <= 0:
        return
    threads = min(config.num_threads(), num_tasks)
    if work is not None and work < int(config.CPU_SERIAL_WORK):
        threads = 1
    with _blas_one_thread() if blas else contextlib.nullcontext():
        if threads == 1:
            kernel(*args, 0, num_tasks)
            return
        n_chunks = min(num_tasks, threads * chunks_per_thread)
        bounds = [num_tasks * c // n_chunks for c in range(n_chunks + 1)]
        chunks = iter(range(n_chunks))
        take = threading.Lock()
        held = _hold_cpu()

        def worker(helper=True):
            if helper and held is not None:
                _keep_off(held)
            while True:
                with take:
                    c = next(chunks, None)
                if c is None:
                    return
                kernel(*args, bounds[c], bounds[c + 1])

        if not _helpers_busy.acquire(blocking=False):
            # Another thread's call (or the one this call is nested in) has the helpers:
            # this one takes every chunk itself.
            worker(False)
            return
        try:
            with _lock:
                while len(_helpers) < threads - 1:
                    _helpers.append(_Helper())
            tickets = [(h, h.post(worker)) for h in _helpers[: threads - 1]]
            pinned = _pin(held)
            try:
                worker(False)
            finally:
                try:
                    errors = []
                    for h, ticket in tickets:
                        try:
                            h.join(ticket)
                        except BaseException as exc:  # noqa: BLE001 - the first one is raised
                            errors.append(exc)
                    if errors:
                        raise errors[0]
                finally:
                    _release(pinned)
        finally:
            _helpers_busy.release()


def map_threads(fn, items):
    """``[fn(item) for item in items]`` on the CPU threads, BLAS held to one thread each.

    For tasks made of NumPy calls that release the GIL (small BLAS products, gathers):
    one task per thread at a time instead of one multi-threaded BLAS call after another,
    which on small products spends its time waking threads (and waits for a descheduled
    one on a busy machine).
    """
    items = list(items)
    if not items:
        return []
    threads = min(config.num_threads(), len(items))
    with _blas_one_thread():
        if threads == 1:
            return [fn(item) for item in items]
        return list(_get_pool(threads).map(fn, items))

