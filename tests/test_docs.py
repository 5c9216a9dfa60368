"""The API reference builds without a warning and covers every public name.

Runs the build line the README shows (README "API reference"), into a temporary folder.
"""

import importlib
import importlib.util
import pathlib
import pkgutil
import re
import shlex
import subprocess
import sys
import types

import pytest

import mcattn
import mcattn.studies
from mcattn import registry

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"


def _api_modules():
    """The modules docs/api.rst lists for autosummary."""
    text = (DOCS / "api.rst").read_text()
    return re.findall(r"^   (mcattn[\w.]*)$", text, re.M)


def _readme_build_command():
    match = re.search(r"^python -m sphinx -W .*$", (ROOT / "README.md").read_text(), re.M)
    assert match, "README.md has no 'python -m sphinx -W ...' line"
    return shlex.split(match.group(0))


def test_api_lists_every_public_module():
    listed = set(_api_modules())
    expected = {"mcattn", "mcattn.front", "mcattn.registry", "mcattn.errors", "mcattn.cost",
                "mcattn.config", "mcattn.random", "mcattn.frameworks.torch",
                "mcattn.frameworks.jax", "mcattn.frameworks.tensorflow", "mcattn._plugin"}
    expected |= {f"mcattn.{name}" for name in mcattn.__all__
                 if isinstance(getattr(mcattn, name), types.ModuleType)}
    for method in registry.method_names():
        package = importlib.import_module(f"mcattn.{method}")
        expected.add(package.__name__)
        for sub in ("bounds", "grad"):
            if importlib.util.find_spec(f"{package.__name__}.{sub}") is not None:
                expected.add(f"{package.__name__}.{sub}")
    # The evaluation wing: every module of mcattn.studies but the private ones and the
    # per-method folders' empty package faces.
    for info in pkgutil.walk_packages(mcattn.studies.__path__, "mcattn.studies."):
        module = importlib.import_module(info.name)
        if "._" not in info.name and (not info.ispkg or hasattr(module, "__all__")):
            expected.add(info.name)
    expected.add("mcattn.studies")
    assert expected - listed == set(), "public modules missing from docs/api.rst"


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    for package in ("sphinx", "numpydoc", "myst_parser"):
        pytest.importorskip(package)
    command = _readme_build_command()
    assert command[-2:] == ["docs", "docs/_build/html"], command
    command = [sys.executable] + command[1:-1] + [str(tmp_path / "html")]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    # Every name in a listed module's __all__ got a page (a submodule: its own entry).
    generated = DOCS / "api" / "generated"
    for name in _api_modules():
        module = importlib.import_module(name)
        assert (generated / f"{name}.rst").is_file(), name
        for member in getattr(module, "__all__", ()):
            if isinstance(getattr(module, member), types.ModuleType):
                assert getattr(module, member).__name__ in _api_modules(), (name, member)
            else:
                assert (generated / f"{name}.{member}.rst").is_file(), (name, member)
        assert (tmp_path / "html" / "api" / "generated" / f"{name}.html").is_file(), name
