"""mcattn on a read-only installation: import works and kernels run (issue 20, item 3).

The package is copied to a directory that is then made read-only, together with a
``HOME`` whose ``.cache`` cannot be written, and a fresh interpreter imports the copy and
runs a kernel. Read-only is real where it can be: ``chmod`` for an ordinary user, a
read-only bind mount in a private mount namespace (``unshare -m``) for root, whom
permission bits do not stop. Only where neither works does an audit hook refuse the
writes (a simulation, said so in the test's output).
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mcattn import _jit

PACKAGE = os.path.dirname(os.path.abspath(_jit.__file__))

# Runs in the child: import the copy, run exact attention (Numba kernels, cached ones
# included), report where the cache went and every warning seen.
CHILD = textwrap.dedent("""
    import sys, tempfile, warnings
    root, temp = sys.argv[1], sys.argv[2]
    if sys.argv[3] == "audit":  # simulate a read-only file system under `root`
        import os
        def refuse(event, args):
            if event == "open" and isinstance(args[0], str) and args[0].startswith(root):
                mode, flags = args[1] or "", args[2] or 0
                if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    raise PermissionError(13, "read-only (simulated)", args[0])
            if event == "os.mkdir" and str(args[0]).startswith(root):
                raise PermissionError(13, "read-only (simulated)", args[0])
        sys.addaudithook(refuse)
    if temp:
        tempfile.tempdir = temp
    sys.path.insert(0, root)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        import numpy as np
        import mcattn
        from mcattn import _jit
        assert mcattn.__file__.startswith(root), mcattn.__file__
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 2, 33, 8)) for _ in range(3))
        out = mcattn.attention(q, k, v, backend="numba", is_causal=True)
        s = q @ k.swapaxes(-1, -2) / np.sqrt(8) + np.triu(np.full((33, 33), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = (p / p.sum(-1, keepdims=True)) @ v
        assert np.abs(out - ref).max() < 1e-12
    print("CACHE_DIR=" + repr(_jit.CACHE_DIR))
    for w in seen:
        print("WARNING:", w.category.__name__, str(w.message).splitlines()[0])
""")


def _read_only_copy(tmp_path):
    """``(root, how)``: the package and an empty HOME under ``root``, to be made read-only."""
    root = tmp_path / "ro"
    shutil.copytree(PACKAGE, root / "mcattn", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "home" / ".cache").mkdir(parents=True)
    (root / "tmp").mkdir()
    if os.geteuid() != 0:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return root, "chmod"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {root} {root}"],
                           capture_output=True)
    return root, "mount" if probe.returncode == 0 else "audit"


def _run(root, how, temp, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH")}
    env.update(HOME=str(root / "home"), TMPDIR=str(tmp_path / "writable-tmp"))
    (tmp_path / "writable-tmp").mkdir(exist_ok=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    argv = [sys.executable, str(script), str(root), temp, how]
    if how == "mount":
        quoted = " ".join(f"'{a}'" for a in argv)  # paths from tmp_path: no quotes inside
        argv = ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {root} {root} && exec {quoted}"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    cache = next(line for line in lines if line.startswith("CACHE_DIR="))
    return cache.split("=", 1)[1], [line for line in lines if line.startswith("WARNING:")]


def _undo_chmod(root):
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)


def test_import_and_run_on_read_only_install_caches_in_temp(tmp_path):
    root, how = _read_only_copy(tmp_path)
    try:
        cache, warnings = _run(root, how, "", tmp_path)
    finally:
        if how == "chmod":
            _undo_chmod(root)
    # The fallback: a per-user directory in the (writable) temporary directory, no warning.
    assert cache.startswith(repr(str(tmp_path / "writable-tmp" / "mcattn-numba-cache-"))[:-1]), cache
    assert warnings == [], warnings
    written = list((tmp_path / "writable-tmp").rglob("*.nbi"))
    assert written, "no Numba index file was written to the fallback cache"
    print(f"read-only by {how}")


def test_import_and_run_with_no_writable_place_at_all(tmp_path):
    root, how = _read_only_copy(tmp_path)
    try:
        cache, warnings = _run(root, how, str(root / "tmp"), tmp_path)  # temp dir read-only too
    finally:
        if how == "chmod":
            _undo_chmod(root)
    assert cache == "''"
    assert len(warnings) == 1 and "RuntimeWarning" in warnings[0] and "cache" in warnings[0], warnings
    print(f"read-only by {how}")


def test_choose_cache_dir_order(tmp_path):
    """Numba's order first (user's NUMBA_CACHE_DIR, in-tree, per-user), then temp, then none."""
    (tmp_path / "file").write_text("")
    never = str(tmp_path / "file" / "sub")  # below a regular file: never writable, even for root
    ok = str(tmp_path / "ok")
    temp = str(tmp_path / "temp")
    assert _jit.writable_dir(ok) and not _jit.writable_dir(never)
    assert _jit.choose_cache_dir(ok, [never], never, temp) is None
    assert _jit.choose_cache_dir("", [ok, ok], never, temp) is None
    assert _jit.choose_cache_dir("", [ok, never], ok, temp) is None
    assert _jit.choose_cache_dir(never, [ok, never], never, temp) == temp
    assert _jit.choose_cache_dir("", [never], never, never) == ""


@pytest.mark.parametrize("cache_enabled", [True, False])
def test_njit_drops_cache_only_without_a_cache_dir(monkeypatch, cache_enabled):
    monkeypatch.setattr(_jit, "CACHE_ENABLED", cache_enabled)

    def twice(x):
        return 2 * x

    compiled = _jit.njit(cache=True)(twice)
    assert compiled(3) == 6
    assert (compiled._cache.__class__.__name__ != "NullCache") == cache_enabled


def test_every_kernel_module_compiles_through_mcattn_jit():
    """A module decorating with numba's own njit would bring the import error back."""
    import re

    offenders = []
    for path, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py") and name != "_jit.py":
                text = open(os.path.join(path, name)).read()
                if re.search(r"from numba import[^\n]*\bnjit\b|numba\.njit|\bnumba\.jit\(", text):
                    offenders.append(os.path.relpath(os.path.join(path, name), PACKAGE))
    assert offenders == [], f"use `from mcattn._jit import njit` in {offenders}"
