"""Old import paths of modules that moved, kept working for a while with a warning.

The evaluation modules left the method folders and the package top level for
:mod:`mcattn.studies` (docs/design.md, "Evaluation wing"). :data:`MOVED` maps each old
dotted name to its new one; an entry also covers the old name's submodules
(``mcattn.data`` -> ``mcattn.studies.data`` takes ``mcattn.data.windows`` along).
:func:`install` (called by ``mcattn/__init__.py``) puts a finder first on
``sys.meta_path``: importing an old name emits one :class:`DeprecationWarning` naming the
new path, imports the new module and binds it under the old name too, so ``import
mcattn.eigen.heldout``, ``from mcattn.compare import X`` and ``mcattn.data`` after
``import mcattn.data`` all give the very module object the new path gives.
``python -m <old name>`` runs the new module. Names outside the table are left to the
other finders (a missing one still raises ``ModuleNotFoundError``).
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "new_name", "install"]

MOVED = {
    "mcattn.compare": "mcattn.studies.compare",
    "mcattn.evaluate": "mcattn.studies.evaluate",
    "mcattn.energy": "mcattn.studies.energy",
    "mcattn.finetune": "mcattn.studies.finetune",
    "mcattn.data": "mcattn.studies.data",
    "mcattn.exact.compare": "mcattn.studies.exact.compare",
    "mcattn.mca.compare": "mcattn.studies.mca.compare",
    "mcattn.mca.report": "mcattn.studies.mca.report",
    "mcattn.rfa.compare": "mcattn.studies.rfa.compare",
    "mcattn.rfa.evaluate": "mcattn.studies.rfa.evaluate",
    "mcattn.eatt.compare": "mcattn.studies.eatt.compare",
    "mcattn.latte.compare": "mcattn.studies.latte.compare",
    "mcattn.latte.evaluate": "mcattn.studies.latte.evaluate",
    "mcattn.eigen.compare": "mcattn.studies.eigen.compare",
    "mcattn.eigen.evaluate": "mcattn.studies.eigen.evaluate",
    "mcattn.eigen.heldout": "mcattn.studies.eigen.heldout",
    "mcattn.eigen.onnx_bert": "mcattn.studies.eigen.onnx_bert",
    "mcattn.eigen.realdata": "mcattn.studies.eigen.realdata",
    "mcattn.eigen.torch_adapter": "mcattn.studies.eigen.calibration",
}


def new_name(old):
    """The new dotted name of ``old`` (itself or a submodule of a moved module), else None."""
    head, rest = old, ""
    while head:
        if head in MOVED:
            return MOVED[head] + rest
        head, _, tail = head.rpartition(".")
        rest = f".{tail}{rest}"
    return None


def _caller_stacklevel():
    # The warning should point at the line that imported the old name. warnings.warn
    # counts only frames outside importlib._bootstrap, so count the frames of this file
    # between (from the caller, _Alias._warn) and skip the import machinery's.
    level, frame = 1, sys._getframe(2)
    while frame is not None:
        internal = "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename
        if not internal:
            level += 1
            if frame.f_code.co_filename != __file__:
                break
        frame = frame.f_back
    return level


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module of its new name (imported first)."""

    def __init__(self, old, new):
        self.old, self.new = old, new

    def _warn(self):
        warnings.warn(f"{self.old} moved to {self.new}; import it from there "
                      f"(the old path will be removed)", DeprecationWarning,
                      stacklevel=_caller_stacklevel())

    def create_module(self, spec):
        self._warn()
        module = importlib.import_module(self.new)
        self._spec = module.__spec__  # the import system writes the alias spec over it
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # already executed under its new name

    def get_code(self, fullname):
        # ``python -m <old name>``: runpy runs this code as __main__, which runs the new one.
        self._warn()
        source = f"import runpy\nrunpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{self.old}: moved to {self.new}>", "exec")


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the names of :data:`MOVED` (and their submodules) and only those."""

    mcattn_moved = True  # marks the finder so a reload of mcattn installs no second one

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname) if fullname.startswith("mcattn.") else None
        if new is None or importlib.util.find_spec(new) is None:
            return None  # e.g. mcattn.data.nothing: "No module named 'mcattn.data.nothing'"
        return importlib.machinery.ModuleSpec(fullname, _Alias(fullname, new))


def install():
    """Put the finder of the moved names first on ``sys.meta_path`` (once)."""
    if not any(getattr(finder, "mcattn_moved", False) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
