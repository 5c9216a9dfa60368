"""Every script in examples/ runs to completion and prints what it promises."""

import pathlib
import re
import subprocess
import sys

import pytest
from helpers import require

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))
NEEDS = {"torch_dlpack.py": "torch", "front_door.py": "dask"}


def _number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return float(match.group(1))


def _check_numpy_attention(out):
    assert "output (2, 4, 256, 64) float32 computed by numba" in out
    assert _number(r"relative difference ([0-9.e+-]+)", out) < 1e-5
    assert _number(r"energy at 45 nm: ([0-9.]+) uJ", out) > 0
    assert re.search(r"numpy +\[cpu\] available", out)


def _check_torch_dlpack(out):
    assert "Tensor (2, 8, 512, 64) torch.float32" in out
    assert _number(r"mcattn vs torch SDPA: relative difference ([0-9.e+-]+)", out) < 1e-5
    assert "bfloat16 in -> torch.bfloat16 out" in out
    assert "refused: q is a torch tensor that requires grad" in out


def _check_front_door(out):
    for name in ("exact", "mca", "rfa"):
        assert re.search(rf"^{name} ", out, re.M), name
    assert 0.05 < _number(r"relative error ([0-9.]+)", out) < 0.6
    assert "dask: Array with 4 chunks" in out
    assert "dask result equals the in-memory one: True" in out


CHECKS = {"numpy_attention.py": _check_numpy_attention, "torch_dlpack.py": _check_torch_dlpack,
          "front_door.py": _check_front_door}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    if script.name in NEEDS:
        require(NEEDS[script.name])
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert script.name in CHECKS, f"add a check of {script.name}'s output to CHECKS"
    CHECKS[script.name](result.stdout)


def test_examples_exist():
    assert len(EXAMPLES) >= 3
