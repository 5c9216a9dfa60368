"""The GPU benchmark scripts ``tests/cuda/on_device.sh`` runs (``benchmarks/gpu/*_mma_vs_sdpa.py``)
run end to end without a GPU: mcattn's kernels under the fake CuPy (host shim), torch SDPA on
the CPU (its flash kernel for float16 / bfloat16), tiny shapes, timings stubbed. So each script
is tested here, and its own output check compares the tensor-core kernels with an independent
result (torch's for exact, forward and gradients; latte.cu's kept counts; eatt.cu's and rfa.cu's
float32 outputs)."""

import sys
from pathlib import Path

import pytest
from helpers import GPU_PRESENT

pytestmark = pytest.mark.hostshim

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def _run(monkeypatch, capsys, name, **overrides):
    """Run ``benchmarks/gpu/<name>.py`` with module constants ``overrides``; its output."""
    if GPU_PRESENT:
        pytest.skip("on a GPU, tests/cuda/on_device.sh runs the script itself")
    # torch first, with the real cupy (or none) importable: torch probes cupy on import,
    # and a torch half-imported under the fake would break every later torch test
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch.nn.attention")
    from fake_cupy import cupy_context

    monkeypatch.syspath_prepend(str(BENCH_DIR))
    bench = __import__(name)
    as_tensor = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda a, device=None: as_tensor(a))  # CPU tensors
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "CPU (fake CuPy)")
    for constant, value in overrides.items():
        monkeypatch.setattr(bench, constant, value)
    monkeypatch.setattr(bench, "_time", lambda fn, sync, target=0: (fn(), sync(), 1.0)[2])
    try:
        with cupy_context():
            assert bench.main([]) == 0
    finally:
        sys.modules.pop(name, None)
    text = capsys.readouterr().out
    assert "MISMATCH" not in text
    return text


def test_exact_bench_script_runs_and_agrees_with_torch(monkeypatch, capsys):
    text = _run(monkeypatch, capsys, "exact_mma_vs_sdpa",
        SHAPES=[(1, 1, 70, 32), (1, 1, 40, 128)],
        FLOAT32_SHAPES=[(1, 1, 50, 64)],
        TF32_SHAPES=[(1, 1, 50, 64)],
        TRAIN_SHAPES=[(1, 1, 70, 64)],
        FLOAT32_TRAIN_SHAPES=[(1, 1, 33, 64)])
    assert text.count("summary: ") == 9  # fwd: f16 / bf16 x d 32 / 128, float32, tf32; fwd+bwd: 3
    assert "every output and gradient within the tolerances" in text


def test_latte_bench_script_runs_and_checks(monkeypatch, capsys):
    text = _run(monkeypatch, capsys, "latte_mma_vs_sdpa",
        CASES=[("float16", 130), ("bfloat16", 100)],
        HEADS=1,
        HEAD_DIM=32)
    assert text.count("summary: ") == 4  # float16 / bfloat16 x random / clustered
    assert "every kept count equal to latte.cu's" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("float16 ", "bfloat16 "))]
    assert len(rows) == 4 and all(abs(float(r[4]) - 0.15) <= 0.01 for r in rows)  # kept fraction


def test_eatt_bench_script_runs_and_checks(monkeypatch, capsys):
    text = _run(monkeypatch, capsys, "eatt_mma_vs_sdpa",
        CASES=[("float16", 130), ("bfloat16", 8192 // 64), ("float16", 70, "l1")],
        HEADS=1)
    assert text.count("summary: ") == 3 and "summary: eatt_mma l1 float16" in text
    assert "every output within the tolerances of eatt.cu's" in text


def test_rfa_bench_script_runs_and_checks(monkeypatch, capsys):
    text = _run(monkeypatch, capsys, "rfa_mma_vs_sdpa",
        CASES=[("float16", 130, False), ("bfloat16", 16384 // 128, False), ("float16", 130, True),
               ("bfloat16", 16384 // 128, True)],
        HEADS=1,
        FEATURES=32)
    assert text.count("summary: ") == 4  # float16 / bfloat16 x non-causal / causal
    assert "every output within the tolerances of rfa.cu's" in text


def test_eigen_bench_script_runs_and_checks(monkeypatch, capsys):
    text = _run(monkeypatch, capsys, "eigen_gemm_vs_sdpa", CASES=[300], HEADS=2, HEAD_DIM=72)
    assert "summary: eigen (cupy GEMM path)" in text
    assert "every output within 1e-4 of the float64 reference" in text


def test_rfa_decode_bench_script_runs_and_checks(monkeypatch, capsys):
    text = _run(monkeypatch, capsys, "rfa_decode_gpu", CASES=[(1, 5), (2, 9)], HEADS=2, HEAD_DIM=8,
                FEATURES=12)
    assert "summary: rfa decode step on the GPU" in text
    assert "every step within 1e-5 of the array-code step" in text


def test_mca_shared_bench_script_runs_and_checks(monkeypatch, capsys):
    text = _run(monkeypatch, capsys, "mca_shared_vs_dense",
        CASES=[("uniform", 40), ("mixed", 40)],
        D_IN=32,
        HEADS=2,
        DH=8)
    assert text.count("summary: ") == 2  # uniform / mixed budgets
    assert "both paths equal to the CPU path's estimate" in text


def test_on_device_script_fits_its_eight_minutes_and_runs_every_bench_script():
    """tests/cuda/on_device.sh: the fixed steps' limits sum to at most 480 s (the optional
    ones run only while they fit in 470 s), and every script of benchmarks/gpu with a shim
    test here is one of its steps."""
    import re

    text = (BENCH_DIR.parents[1] / "tests" / "cuda" / "on_device.sh").read_text()
    fixed = [int(n) for n in re.findall(r'^\s*step "[^"]+" (\d+) ', text, re.M)]
    optional = re.findall(r'^if_time_left "[^"]+" (\d+) ', text, re.M)
    assert len(fixed) >= 8 and sum(fixed) <= 480, fixed
    assert optional and all(int(n) <= 470 - sum(fixed[:2]) for n in optional)
    tested = set(re.findall(r'_run\(monkeypatch, capsys, "(\w+)"', Path(__file__).read_text()))
    run = set(re.findall(r"benchmarks/gpu/(\w+)\.py", text))
    assert tested <= run, tested - run
