"""Numba's on-disk cache, wherever the installation allows one.

Every CPU kernel is compiled with ``cache=True`` so that a new process loads machine
code instead of compiling it (about 0.3 s against several seconds per kernel). Numba
writes the cache next to the source (``__pycache__``), else under ``~/.cache/numba``
(or ``NUMBA_CACHE_DIR``), and raises ``RuntimeError: cannot cache function ...: no
locator available`` at *import* when none of them is writable: a read-only container,
a system-wide install used by a user whose home is read-only. The cache is only an
optimisation, so mcattn picks the first writable place, in Numba's order:

1. ``NUMBA_CACHE_DIR`` when the user set it (Numba's own setting, left alone);
2. the package's ``__pycache__`` directories;
3. Numba's per-user cache (``~/.cache/numba``);
4. a per-user directory in the temporary directory (``mcattn-numba-cache-<uid>``),
   handed to Numba as ``numba.config.CACHE_DIR``;
5. none: the kernels compile in every process, with one ``RuntimeWarning``.

:func:`njit` is ``numba.njit`` with ``cache=True`` dropped in case 5; every module of
the package imports it from here instead of from Numba. :data:`CACHE_DIR` says where
the cache went (``None`` for Numba's own choice of 1-3, ``""`` when there is none).
"""

import os
import tempfile
import warnings

import numba
from numba.core import config as _numba_config

__all__ = ["njit", "CACHE_DIR", "CACHE_ENABLED", "writable_dir", "choose_cache_dir"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def writable_dir(path):
    """True when ``path`` exists (or can be made) and a file can be created in it.

    The same test Numba applies to a cache directory (make it, then open a temporary
    file there); a permission check alone would be wrong for root and read-only mounts.
    """
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _package_cache_dirs():
    """The ``__pycache__`` directories Numba would write: one per source directory."""
    dirs = [_PACKAGE]
    for entry in sorted(os.listdir(_PACKAGE)):
        sub = os.path.join(_PACKAGE, entry)
        if os.path.isfile(os.path.join(sub, "__init__.py")):
            dirs.append(sub)
    return [os.path.join(d, "__pycache__") for d in dirs]


def _user_cache_dir():
    from numba.misc.appdirs import AppDirs

    return AppDirs(appname="numba", appauthor=False).user_cache_dir


def _temp_cache_dir():
    uid = os.getuid() if hasattr(os, "getuid") else "user"  # no uid on Windows
    return os.path.join(tempfile.gettempdir(), f"mcattn-numba-cache-{uid}")


def choose_cache_dir(user_dir, package_dirs, user_wide_dir, temp_dir):
    """Where mcattn's kernels are cached, given the candidates (see the module docstring).

    Parameters
    ----------
    user_dir : str
        ``NUMBA_CACHE_DIR`` as Numba read it (``""`` when unset).
    package_dirs : list of str
        The package's ``__pycache__`` directories (all must be writable).
    user_wide_dir, temp_dir : str
        Numba's per-user cache and mcattn's fallback in the temporary directory.

    Returns
    -------
    str or None
        ``None``: Numba's default locators work (1-3); a path: set it as Numba's cache
        directory (4); ``""``: no writable place, compile without a cache (5).
    """
    if user_dir and writable_dir(user_dir):
        return None
    if all(writable_dir(d) for d in package_dirs) or writable_dir(user_wide_dir):
        return None
    if writable_dir(temp_dir):
        return temp_dir
    return ""


def _configure():
    try:
        temp_dir = _temp_cache_dir()
    except (OSError, FileNotFoundError):  # no usable temporary directory at all
        temp_dir = ""
    choice = choose_cache_dir(_numba_config.CACHE_DIR, _package_cache_dirs(), _user_cache_dir(),
                              temp_dir)
    if choice:
        _numba_config.CACHE_DIR = choice  # Numba reads it when each kernel is decorated
    elif choice == "":
        warnings.warn(
            "mcattn: no writable directory for Numba's kernel cache (the package's __pycache__, "
            "~/.cache/numba, NUMBA_CACHE_DIR and the temporary directory all refused a file); "
            "kernels are compiled again in every process. Set NUMBA_CACHE_DIR to a writable "
            "directory to keep them.", RuntimeWarning, stacklevel=3)
    return choice


#: Where the kernels are cached: ``None`` (Numba's own place), a directory mcattn chose,
#: or ``""`` (no cache).
CACHE_DIR = _configure()
#: False when no writable cache directory exists (the kernels compile in every process).
CACHE_ENABLED = CACHE_DIR != ""


def njit(*args, **options):
    """``numba.njit`` that drops ``cache=True`` when no cache directory is writable."""
    if not CACHE_ENABLED:
        options.pop("cache", None)
    return numba.njit(*args, **options)
