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


METHODS = ("exact", "mca", "rfa", "eatt", "latte", "eigen")


def _imported_names(path, package):
    """Dotted names a module imports (relative imports resolved against ``package``)."""
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and str(node.value).startswith("mcattn."):
            names.append(node.value)  # importlib.import_module("mcattn....") and entry strings
    return names


def test_method_folders_do_not_import_the_studies():
    # The evaluation wing (mcattn/studies) builds on the methods, never the reverse: a method
    # folder holds kernels, references, bounds, operation counts and gradients only.
    offenders = []
    for method in METHODS:
        for path in sorted((ROOT / "mcattn" / method).rglob("*.py")):
            package = ".".join(path.relative_to(ROOT).parts[:-1])  # __init__.py's too
            for name in _imported_names(path, package):
                if name == "mcattn.studies" or name.startswith("mcattn.studies."):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, "method folders importing mcattn.studies:\n" + "\n".join(offenders)
