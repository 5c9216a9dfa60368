"""The old import paths of the modules now in mcattn.studies (mcattn/_moved.py)."""

import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

import mcattn
from mcattn._moved import MOVED, new_name

# Every entry of the table, plus submodules that a package entry covers.
OLD_NAMES = sorted(MOVED) + ["mcattn.data.windows", "mcattn.data.capture"]


def _forget(old):
    """Drop an old name (and its submodules) from the import caches, as in a fresh process."""
    for name in [n for n in sys.modules if n == old or n.startswith(old + ".")]:
        del sys.modules[name]
    parent, _, child = old.rpartition(".")
    module = sys.modules.get(parent)
    # the attribute the alias import bound on the old parent (not the new parent's own)
    if module is not None and module.__name__ == parent and hasattr(module, child):
        delattr(module, child)


@pytest.mark.parametrize("old", OLD_NAMES)
def test_old_path_warns_once_and_is_the_new_module(old):
    new = new_name(old)
    assert new.startswith("mcattn.studies.")
    new_module = importlib.import_module(new)
    _forget(old)
    with pytest.warns(DeprecationWarning) as record:
        module = importlib.import_module(old)
    assert module is new_module
    mine = [w for w in record if str(w.message).startswith(f"{old} moved to ")]
    assert len(mine) == 1, [str(w.message) for w in record]
    assert f"moved to {new};" in str(mine[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert importlib.import_module(old) is new_module  # cached: no second warning
    assert sys.modules[old] is new_module
    assert new_module.__name__ == new and new_module.__spec__.name == new  # the alias left it as it was


def test_import_statements_and_attributes():
    import mcattn.studies.data.windows
    import mcattn.studies.eigen.heldout

    _forget("mcattn.data")
    _forget("mcattn.eigen.heldout")
    _forget("mcattn.compare")
    with pytest.warns(DeprecationWarning) as record:
        import mcattn.data.windows
        import mcattn.eigen.heldout
        from mcattn.compare import run_comparison
    assert mcattn.data is mcattn.studies.data
    assert mcattn.data.windows is mcattn.studies.data.windows
    assert mcattn.eigen.heldout is mcattn.studies.eigen.heldout
    assert run_comparison is mcattn.studies.compare.run_comparison
    # each warning points at the line that imported the old name, not at the import machinery
    assert {w.filename for w in record} == {__file__}
    assert sorted(str(w.message).partition(" ")[0] for w in record) == [
        "mcattn.compare", "mcattn.data", "mcattn.data.windows", "mcattn.eigen.heldout"]


@pytest.mark.parametrize("name", ["mcattn.eigen.nothing", "mcattn.data.nothing", "mcattn.nothing"])
def test_a_name_not_in_the_table_is_not_found(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModuleNotFoundError, match=name.replace(".", r"\.")):
            importlib.import_module(name)


def test_new_name_only_maps_the_table_and_its_submodules():
    assert new_name("mcattn.data") == "mcattn.studies.data"
    assert new_name("mcattn.data.windows") == "mcattn.studies.data.windows"
    assert new_name("mcattn.eigen.heldout") == "mcattn.studies.eigen.heldout"
    assert new_name("mcattn.eigen") is None
    assert new_name("mcattn.eigen.plan") is None
    assert new_name("mcattn.database") is None
    assert new_name("mcattn.studies.data") is None


def test_the_finder_is_installed_once():
    import mcattn._moved

    mcattn._moved.install()
    assert sum(getattr(f, "mcattn_moved", False) for f in sys.meta_path) == 1


def test_python_m_old_path_runs_the_new_module():
    done = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "mcattn.eigen.heldout",
                           "--help"], capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(mcattn.__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: python -m mcattn.studies.eigen.heldout" in done.stdout
    assert "mcattn.eigen.heldout moved to mcattn.studies.eigen.heldout" in done.stderr
