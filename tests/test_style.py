"""The code stays ruff-clean (rules in pyproject.toml), so lint errors fail CI, not a later review."""

import pathlib
import subprocess
import sys

from helpers import require

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    require("ruff")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "mcattn", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
