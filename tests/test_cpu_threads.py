"""The CPU kernels' task runner (mcattn._cpu.run_tasks)."""

import os
import threading

import numpy as np
import pytest

from mcattn import _cpu, config
from mcattn._cpu import map_threads, run_tasks


def _recording_kernel(calls):
    lock = threading.Lock()

    def kernel(tag, t0, t1):
        with lock:
            calls.append((tag, t0, t1, threading.get_ident()))

    return kernel


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("num_tasks,chunks", [(1, 4), (7, 1), (13, 4), (64, 3)])
def test_every_task_runs_once(monkeypatch, threads, num_tasks, chunks):
    monkeypatch.setattr(config, "NUM_THREADS", threads)
    calls = []
    run_tasks(_recording_kernel(calls), num_tasks, "a", chunks_per_thread=chunks)
    covered = np.zeros(num_tasks, int)
    for tag, t0, t1, _ in calls:
        assert tag == "a" and 0 <= t0 < t1 <= num_tasks
        covered[t0:t1] += 1
    assert np.all(covered == 1)
    used = min(threads, num_tasks)
    assert len(calls) == (1 if used == 1 else min(num_tasks, used * chunks))


def test_small_work_runs_on_the_calling_thread(monkeypatch):
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    calls = []
    run_tasks(_recording_kernel(calls), 40, "s", work=int(config.CPU_SERIAL_WORK) - 1)
    assert [(t0, t1) for _, t0, t1, _ in calls] == [(0, 40)]
    assert calls[0][3] == threading.get_ident()
    calls.clear()
    run_tasks(_recording_kernel(calls), 40, "s", work=int(config.CPU_SERIAL_WORK))
    assert len(calls) == 8


def test_the_calling_thread_takes_chunks_too(monkeypatch):
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    me = threading.get_ident()
    for _ in range(20):  # which thread takes which chunk is up to the scheduler
        calls = []

        def slow(tag, t0, t1, calls=calls):
            calls.append(threading.get_ident())
            threading.Event().wait(0.002)

        run_tasks(slow, 16, "c", chunks_per_thread=8)
        if me in calls and len(set(calls)) == 2:
            return
    pytest.fail("the calling thread never ran a chunk alongside a pool thread")


@pytest.mark.parametrize("failing_chunk", [0, 5])
def test_an_error_in_any_chunk_reaches_the_caller(monkeypatch, failing_chunk):
    monkeypatch.setattr(config, "NUM_THREADS", 2)

    def kernel(t0, t1):
        if t0 <= failing_chunk < t1:
            raise ValueError(f"chunk at {t0}")

    with pytest.raises(ValueError, match="chunk at"):
        run_tasks(kernel, 8, chunks_per_thread=4)
    run_tasks(lambda t0, t1: None, 8)  # the pool still works afterwards


def test_map_threads_keeps_order(monkeypatch):
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    assert map_threads(lambda v: v * v, range(10)) == [v * v for v in range(10)]
    run_tasks(lambda t0, t1: None, 8)  # pool sizes of both runners coexist
    assert map_threads(lambda v: -v, [3, 1]) == [-3, -1]


def test_nested_calls_from_pool_threads_finish(monkeypatch):
    """run_tasks inside run_tasks/map_threads (every pool thread busy) does not deadlock."""
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    done = []

    def inner(t0, t1):
        done.extend(range(t0, t1))

    def outer(tag, t0, t1):
        run_tasks(inner, 6, chunks_per_thread=3)

    result = []
    thread = threading.Thread(target=lambda: result.append(
        map_threads(lambda i: run_tasks(outer, 4, i, chunks_per_thread=2), range(4))))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "nested run_tasks deadlocked"
    assert len(done) == 4 * 4 * 6 and sorted(set(done)) == list(range(6))


_affinity = pytest.mark.skipif(
    _cpu._getcpu is None or not hasattr(os, "sched_getaffinity")
    or len(os.sched_getaffinity(0)) < 2, reason="needs Linux thread affinity and 2 CPUs")


def _placement_kernel(seen):
    def kernel(t0, t1):
        seen.append((threading.get_ident(), frozenset(os.sched_getaffinity(0)), _cpu._getcpu()))
        threading.Event().wait(0.002)  # long enough that the pool thread takes chunks too

    return kernel


@_affinity
def test_pool_threads_run_off_the_callers_cpu(monkeypatch):
    """CPU_SPREAD_THREADS: during the call the caller is held on its CPU and the pool thread
    kept off it; afterwards the caller's affinity is what it was."""
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    monkeypatch.setattr(config, "CPU_SPREAD_THREADS", True)
    me = threading.get_ident()
    before = os.sched_getaffinity(0)
    for _ in range(20):  # until the pool thread takes a chunk (up to the scheduler)
        seen = []
        run_tasks(_placement_kernel(seen), 16, chunks_per_thread=8)
        assert os.sched_getaffinity(0) == before
        mine = {mask for ident, mask, _ in seen if ident == me}
        assert len(mine) == 1 and len(next(iter(mine))) == 1
        (held,) = next(iter(mine))
        helpers = [(mask, cpu) for ident, mask, cpu in seen if ident != me]
        for mask, cpu in helpers:
            assert held not in mask and cpu != held and mask == frozenset(before) - {held}
        if helpers:
            break
    else:
        pytest.skip("the pool thread never took a chunk")
    # map_threads runs on its own pool threads, which keep every CPU
    assert set(map_threads(lambda i: frozenset(os.sched_getaffinity(0)), range(8))) == {
        frozenset(before)}


@_affinity
def test_spread_off_leaves_affinity_alone(monkeypatch):
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    monkeypatch.setattr(config, "CPU_SPREAD_THREADS", False)
    before = frozenset(os.sched_getaffinity(0))
    seen = []
    run_tasks(_placement_kernel(seen), 16, chunks_per_thread=8)
    assert {mask for ident, mask, _ in seen if ident == threading.get_ident()} == {before}


def test_spin_until_sees_the_counter():
    state = np.array([3, 0], np.int64)
    assert _cpu._spin_until(state, 0, 3, 10, 5)
    assert not _cpu._spin_until(state, 0, 4, 1000, 5)
    assert not _cpu._spin_until(state, 1, 1, 0, 0)  # no reads: not seen


@pytest.mark.parametrize("spin", [0.0, 1e-3])
def test_helpers_that_sleep_or_spin_run_every_task(monkeypatch, spin):
    """Pool threads that sleep at once (CPU_SPIN_S = 0, and a caller that sleeps too) or
    spin first take the same chunks; errors in either come back to the caller."""
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    monkeypatch.setattr(config, "CPU_SPIN_S", spin)
    monkeypatch.setattr(config, "CPU_JOIN_SPIN_S", spin)
    for _ in range(5):
        calls = []
        run_tasks(_recording_kernel(calls), 13, "z", chunks_per_thread=4)
        covered = np.zeros(13, int)
        for _, t0, t1, _ in calls:
            covered[t0:t1] += 1
        assert np.all(covered == 1) and len(calls) == 8

    def failing(t0, t1):
        threading.Event().wait(0.001)
        if t0 >= 6:
            raise KeyError(t0)

    with pytest.raises(KeyError):
        run_tasks(failing, 8, chunks_per_thread=4)
    run_tasks(lambda t0, t1: None, 8)  # the helpers still work afterwards


def test_calls_from_two_threads_at_once(monkeypatch):
    """One caller at a time has the pool threads; another one meanwhile runs its chunks
    alone: both finish with every task done once."""
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    results = {}

    def call(tag):
        calls = []
        for _ in range(10):
            run_tasks(_placement_free_kernel(calls), 16, chunks_per_thread=4)
        covered = np.zeros(16, int)
        for t0, t1 in calls:
            covered[t0:t1] += 1
        results[tag] = covered

    threads = [threading.Thread(target=call, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert all(np.all(results[tag] == 10) for tag in "ab")


def _placement_free_kernel(calls):
    lock = threading.Lock()

    def kernel(t0, t1):
        threading.Event().wait(0.0002)
        with lock:
            calls.append((t0, t1))

    return kernel
