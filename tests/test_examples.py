"""Every script in examples/ runs to completion, so the examples cannot rot."""

import pathlib
import subprocess
import sys

import pytest
from helpers import require

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))
NEEDS = {"torch_dlpack.py": "torch"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    if script.name in NEEDS:
        require(NEEDS[script.name])
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()


def test_examples_exist():
    assert len(EXAMPLES) >= 2
