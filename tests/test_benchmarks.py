"""The benchmark harness resolves its cases (the timings themselves are never asserted)."""

import importlib
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def ratio():
    sys.path.insert(0, BENCH)
    try:
        yield importlib.import_module("ratio")
    finally:
        sys.path.remove(BENCH)


def test_every_ratio_case_resolves(ratio):
    for case, target in ratio.CASES.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), case


def test_interleaved_times_pause_between_blocks(ratio, monkeypatch):
    from benchmarks import common

    calls, sleeps = [], []
    monkeypatch.setattr(common.time, "sleep", sleeps.append)
    t_a, t_b = common.interleaved_times(lambda: calls.append("a"), lambda: calls.append("b"),
                                        rounds=2, repeats=3, settle=0.25)
    assert calls == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2
    assert sleeps == [0.25] * 4 and t_a >= 0 and t_b >= 0


def test_mca_uniform_case_runs_on_a_small_problem(ratio, monkeypatch, capsys):
    from benchmarks import common

    monkeypatch.setattr(common, "SETTLE_S", 0.0)
    assert ratio.main(["mca_uniform", "--fractions", "0.2", "--n", "256", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "shared/dense" in out and "settle 0.0 s" in out


def test_mca_packed_case_times_both_shares(ratio, monkeypatch, capsys):
    from benchmarks import common

    monkeypatch.setattr(common, "SETTLE_S", 0.0)
    assert ratio.main(["mca", "--packed", "--alphas", "1.0", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "shared/packed" in out and "batch/packed" in out and "batch_kept" in out
