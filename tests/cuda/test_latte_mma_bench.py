"""``benchmarks/gpu/latte_mma_vs_sdpa.py`` runs end to end without a GPU: mcattn's kernels
under the fake CuPy (host shim), torch SDPA on the CPU, tiny shapes, timings stubbed. So
the script on_device.sh runs is tested here: the threshold bisection reaches 15 % kept,
the tensor-core kernel's kept counts equal latte.cu's and its output is within the
16-bit tolerance of latte.cu's float32 output."""

import sys
from pathlib import Path

import pytest
from helpers import GPU_PRESENT

pytestmark = pytest.mark.hostshim

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def test_latte_bench_script_runs_and_checks(monkeypatch, capsys):
    if GPU_PRESENT:
        pytest.skip("on a GPU, tests/cuda/on_device.sh runs the script itself")
    torch = pytest.importorskip("torch")  # first, with the real cupy (or none) importable
    pytest.importorskip("torch.nn.attention")
    from fake_cupy import cupy_context

    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import latte_mma_vs_sdpa as bench

    as_tensor = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda a, device=None: as_tensor(a))  # CPU tensors
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "CPU (fake CuPy)")
    monkeypatch.setattr(bench, "CASES", [("float16", 130), ("bfloat16", 100)])
    monkeypatch.setattr(bench, "HEADS", 1)
    monkeypatch.setattr(bench, "HEAD_DIM", 32)
    monkeypatch.setattr(bench, "_time", lambda fn, sync, target=0: (fn(), sync(), 1.0)[2])
    with cupy_context():
        assert bench.main([]) == 0
    text = capsys.readouterr().out
    assert "MISMATCH" not in text
    assert text.count("summary: ") == 4  # float16 / bfloat16 x random / clustered
    assert "every kept count equal to latte.cu's" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("float16 ", "bfloat16 "))]
    assert len(rows) == 4 and all(abs(float(r[4]) - 0.15) <= 0.01 for r in rows)  # kept fraction
    sys.modules.pop("latte_mma_vs_sdpa", None)
