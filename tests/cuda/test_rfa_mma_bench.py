"""``benchmarks/gpu/rfa_mma_vs_sdpa.py`` runs end to end without a GPU: mcattn's kernels
under the fake CuPy (host shim), torch SDPA on the CPU, tiny shapes, timings stubbed; its
check compares the tensor-core rfa path with rfa.cu's float32 output."""

import sys
from pathlib import Path

import pytest
from helpers import GPU_PRESENT

pytestmark = pytest.mark.hostshim

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def test_rfa_bench_script_runs_and_checks(monkeypatch, capsys):
    if GPU_PRESENT:
        pytest.skip("on a GPU, tests/cuda/on_device.sh runs the script itself")
    torch = pytest.importorskip("torch")  # first, with the real cupy (or none) importable
    pytest.importorskip("torch.nn.attention")
    from fake_cupy import cupy_context

    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import rfa_mma_vs_sdpa as bench

    as_tensor = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda a, device=None: as_tensor(a))  # CPU tensors
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "CPU (fake CuPy)")
    monkeypatch.setattr(bench, "CASES", [("float16", 130), ("bfloat16", 16384 // 128)])
    monkeypatch.setattr(bench, "HEADS", 1)
    monkeypatch.setattr(bench, "FEATURES", 32)
    monkeypatch.setattr(bench, "_time", lambda fn, sync, target=0: (fn(), sync(), 1.0)[2])
    with cupy_context():
        assert bench.main([]) == 0
    text = capsys.readouterr().out
    assert "MISMATCH" not in text
    assert text.count("summary: ") == 2
    assert "every output within the tolerances of rfa.cu's" in text
    sys.modules.pop("rfa_mma_vs_sdpa", None)
