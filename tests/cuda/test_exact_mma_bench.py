"""``benchmarks/gpu/exact_mma_vs_sdpa.py`` runs end to end without a GPU: mcattn's kernels
under the fake CuPy (host shim), torch SDPA on the CPU (its flash kernel for float16 /
bfloat16), tiny shapes, timings stubbed. So the script on_device.sh runs is tested here,
and its output check compares the tensor-core kernels with an independent implementation
(torch's), forward and gradients."""

import sys
from pathlib import Path

import pytest
from helpers import GPU_PRESENT

pytestmark = pytest.mark.hostshim

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def test_bench_script_runs_and_agrees_with_torch(monkeypatch, capsys):
    if GPU_PRESENT:
        pytest.skip("on a GPU, tests/cuda/on_device.sh runs the script itself")
    # torch first, with the real cupy (or none) importable: torch probes cupy on import,
    # and a torch half-imported under the fake would break every later torch test
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch.nn.attention")
    from fake_cupy import cupy_context

    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import exact_mma_vs_sdpa as bench

    as_tensor = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda a, device=None: as_tensor(a))  # CPU tensors
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "CPU (fake CuPy)")
    monkeypatch.setattr(bench, "SHAPES", [(1, 1, 70, 32), (1, 1, 40, 128)])
    monkeypatch.setattr(bench, "FLOAT32_SHAPES", [(1, 1, 50, 64)])
    monkeypatch.setattr(bench, "TF32_SHAPES", [(1, 1, 50, 64)])
    monkeypatch.setattr(bench, "TRAIN_SHAPES", [(1, 1, 70, 64)])
    monkeypatch.setattr(bench, "FLOAT32_TRAIN_SHAPES", [(1, 1, 33, 64)])
    monkeypatch.setattr(bench, "_time", lambda fn, sync, target=0: (fn(), sync(), 1.0)[2])
    with cupy_context():
        assert bench.main([]) == 0
    text = capsys.readouterr().out
    assert "MISMATCH" not in text
    assert text.count("summary: ") == 9  # fwd: f16 / bf16 x d 32 / 128, float32, tf32; fwd+bwd: 3
    assert "every output and gradient within the tolerances" in text
    sys.modules.pop("exact_mma_vs_sdpa", None)
