"""``mcattn selftest``: the table, the exit status, the JSON, GPU backends named when absent."""

import json

import numpy as np

from mcattn import selftest
from mcattn.cli import main


def test_selftest_passes_on_the_host_backends(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    assert main(["selftest", "--backends", "numpy", "numba", "--methods", "exact", "mca",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "numba   mca     float64  pass" in text
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert len(rows) == 2 * 2 * 2 and all(r["status"] == "pass" for r in rows)
    assert all(r["max_error"] <= r["tolerance"] for r in rows)
    assert payload["environment"]["mcattn"]


def test_every_registered_method_has_a_check():
    from mcattn.registry import method_names

    rows = selftest.checks()
    assert set(method_names()) <= set(rows)  # a method's own rows carry its name
    assert all(set(c.tolerance) == {"float32", "float64"} for c in rows.values())


def _replace_check(monkeypatch, name, check):
    table = dict(selftest.checks(), **{name: check})
    monkeypatch.setattr(selftest, "checks", lambda: table)


def test_unavailable_backend_is_named_not_failed(monkeypatch, capsys):
    from mcattn import _dispatch

    fake = _dispatch.BackendStatus("cupy", "cuda", False, "CuPy finds no CUDA GPU on this machine")
    monkeypatch.setattr(selftest, "backend_status", lambda name: fake if name == "cupy"
                        else _dispatch.backend_status(name))
    rows = selftest.run_selftest(["cupy"], ["exact"])
    assert [r.status for r in rows] == ["skip", "skip"]
    assert all("no CUDA GPU" in r.note for r in rows)
    bench, reason = selftest.run_bench(sizes=(8,))
    assert bench == [] and "cupy: CuPy finds no CUDA GPU" in reason


def test_a_wrong_result_fails_the_run(monkeypatch, capsys):
    check = selftest.checks()["exact"]

    def wrong(put, backend, dtype):
        out = check.run(put, backend, dtype)
        return out * 1.001 if backend == "numba" else out

    _replace_check(monkeypatch, "exact", selftest.Check(wrong, check.tolerance))
    assert main(["selftest", "--backends", "numba", "--methods", "exact"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_errors_are_reported_as_rows(monkeypatch):
    def broken(put, backend, dtype):
        if backend == "numba":
            raise RuntimeError("kernel exploded")
        return np.zeros(3, dtype)

    _replace_check(monkeypatch, "exact", selftest.Check(broken, {"float32": 1, "float64": 1}))
    rows = selftest.run_selftest(["numba"], ["exact"])
    assert [r.status for r in rows] == ["error", "error"] and "kernel exploded" in rows[0].note
