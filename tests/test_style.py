"""The code stays ruff-clean (rules in pyproject.toml), so lint errors fail CI, not a later review."""

import ast
import pathlib
import subprocess
import sys

import pytest
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


# --- the method folders: one shape (docs/conventions.md, "Method folders") ------------------

_FACE_LINES = 150


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


def _decorator_names(fn):
    return {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in fn.decorator_list}


def _called_names(fn):
    return {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
            for n in ast.walk(fn) if isinstance(n, ast.Call)}


@pytest.mark.parametrize("method", METHODS)
def test_method_init_is_a_thin_face(method):
    """``mcattn/<method>/__init__.py``: a docstring, re-exports and ``__all__``, nothing else."""
    path = ROOT / "mcattn" / method / "__init__.py"
    lines = path.read_text().splitlines()
    assert len(lines) <= _FACE_LINES, f"{path} has {len(lines)} lines (at most {_FACE_LINES})"
    body = _tree(path).body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), "no docstring"
    for node in body[1:]:
        is_all = (isinstance(node, ast.Assign)
                  and [getattr(t, "id", None) for t in node.targets] == ["__all__"])
        assert isinstance(node, (ast.Import, ast.ImportFrom)) or is_all, (
            f"{path}:{node.lineno}: only imports and __all__ belong in a method's __init__")


@pytest.mark.parametrize("method", METHODS)
def test_public_functions_go_through_the_door(method):
    """``attention`` calls :func:`mcattn._door.door` (no preamble of its own), and every public
    function of ``api.py`` runs on the inputs' device (``@on_input_device``)."""
    import mcattn

    path = ROOT / "mcattn" / method / "api.py"
    functions = {n.name: n for n in _tree(path).body if isinstance(n, ast.FunctionDef)}
    attention = functions["attention"]
    calls = _called_names(attention)
    assert "door" in calls, f"{method}.attention does not call mcattn._door.door"
    preamble = calls & {"import_arrays", "select_kernel"}
    assert not preamble, f"{method}.attention repeats the door's preamble: {sorted(preamble)}"
    api = getattr(mcattn, method).api
    for name in api.__all__:
        if name in functions:
            assert "on_input_device" in _decorator_names(functions[name]), (
                f"mcattn.{method}.{name} lacks @on_input_device")
    assert getattr(mcattn, method).attention is api.attention


_EXTERNAL_OK = {"numpy", "array_api_compat"}  # array_api_compat: NumPy/CuPy namespaces, no compiled code
_NOT_PURE = ("numba", "cupy", "mcattn._jit", "mcattn._cpu", "mcattn._cpu_math", "mcattn._cupy",
             "mcattn._cuda_device", "mcattn._random_cuda")


def _resolve(module, node):
    """Absolute names imported by ``node`` (an import in ``module``, a dotted name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")[: -node.level]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module
    if node.module is None:
        return [f"{prefix}.{a.name}" for a in node.names]  # from . import x: x may be a module
    return [prefix]


def _module_path(name):
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def _impure_imports(module, everywhere, seen):
    """Imports reached from ``module`` that are not NumPy, the standard library or pure package
    code: all of ``module``'s imports if ``everywhere``, else its module-level ones."""
    path = _module_path(module)
    if path is None or module in seen:
        return []
    seen.add(module)
    tree = _tree(path)
    nodes = ast.walk(tree) if everywhere else tree.body
    bad = []
    for node in nodes:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for name in _resolve(module, node):
            top = name.split(".")[0]
            if any(name == p or name.startswith(p + ".") for p in _NOT_PURE) or name.endswith(
                    (".cpu", ".cuda", ".cupy", "._gpu")):
                bad.append(f"{module} imports {name}")
            elif top == "mcattn":
                bad += _impure_imports(name, False, seen)
            elif top not in _EXTERNAL_OK and top not in sys.stdlib_module_names:
                bad.append(f"{module} imports {name}")
    return bad


@pytest.mark.parametrize("method", METHODS)
def test_naive_reference_is_pure_numpy(method):
    """``mcattn/<method>/naive.py`` (the readable definition) needs nothing but NumPy and pure
    package modules: no Numba, no CuPy, no compiled kernels, also through what it imports."""
    assert _impure_imports(f"mcattn.{method}.naive", True, set()) == []


def test_import_circles_are_only_the_one_design_md_names():
    """docs/design.md item 25: every other circle between modules is a regression."""
    import import_graph

    found = import_graph.summary(ROOT)["circles"]
    assert found == [["mcattn.rfa._inputs", "mcattn.rfa.decoding", "mcattn.rfa.features"]]


def test_import_graph_finds_a_circle(tmp_path):
    """The checker can fail: a two-module circle inside a function is found."""
    import import_graph

    pkg = tmp_path / "mcattn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert import_graph.summary(tmp_path)["circles"] == [["mcattn.a", "mcattn.b"]]
