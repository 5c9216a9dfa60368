"""Build a host-shim unit with the host compiler and load it (the shim's own self-test).

``library(unit)`` compiles ``hostshim/<unit>_host.cpp`` (the shim, then CUDA C code, then
``extern "C"`` launchers) into a shared library once per content hash and loads it with
ctypes. The package's kernels are NOT launched from here: the tests run them through
mcattn's own CuPy launchers with the fake CuPy of ``fake_cupy.py``.
"""

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

from mcattn._cupy import INCLUDE_DIR, PACKAGE_DIR

SHIM_DIR = Path(__file__).resolve().parent / "hostshim"
BUILD_DIR = Path(__file__).resolve().parent / "_build"
_LIBS = {}

_P = ctypes.c_void_p
_U = ctypes.c_uint
_I = ctypes.c_int


def _inputs(unit):
    """The launcher unit and every file it may include (for the build's content hash)."""
    files = [SHIM_DIR / f"{unit}_host.cpp", SHIM_DIR / "cuda_host_shim.h"]
    files += sorted(INCLUDE_DIR.glob("*.cuh")) + sorted(PACKAGE_DIR.glob("*/kernels/*.cu"))
    files += sorted(INCLUDE_DIR.glob("*.cu")) + sorted(SHIM_DIR.glob("*.cu"))
    return files


def library(unit):
    """The loaded shared library of ``hostshim/<unit>_host.cpp`` (compiled on first use)."""
    if unit in _LIBS:
        return _LIBS[unit]
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no host C++ compiler (g++) to build the CUDA host shim")
    digest = hashlib.sha256()
    for path in _inputs(unit):
        digest.update(path.name.encode() + path.read_bytes())
    BUILD_DIR.mkdir(exist_ok=True)
    target = BUILD_DIR / f"{unit}_{digest.hexdigest()[:16]}.so"
    if not target.exists():
        cmd = [compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC",
               "-Wno-unknown-pragmas", f"-I{SHIM_DIR}", f"-I{INCLUDE_DIR}", f"-I{PACKAGE_DIR}",
               str(SHIM_DIR / f"{unit}_host.cpp"), "-o", str(target) + ".tmp"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"host build of {unit} failed:\n{' '.join(cmd)}\n{done.stderr}")
        Path(str(target) + ".tmp").rename(target)
    _LIBS[unit] = ctypes.CDLL(str(target))
    return _LIBS[unit]


def _ptr(a):
    assert a.flags.c_contiguous, "kernel arguments must be C-contiguous"
    return ctypes.c_void_p(a.ctypes.data)


def block_sum(values, active, blocks):
    fn = library("selftest").launch_shim_block_sum
    fn.argtypes = [_U, _U, _P, _P, _I, _I]
    out = np.zeros(blocks, np.float32)
    values = np.ascontiguousarray(values, np.float32)
    fn(blocks, 64, _ptr(values), _ptr(out), values.size, active)  # 64 threads, `active` used
    return out


def atomic_sum(values, threads=16):
    fn = library("selftest").launch_shim_atomic_sum
    fn.argtypes = [_U, _U, _P, _P, _P, _I]
    values = np.ascontiguousarray(values, np.float64)
    total = np.zeros(1)
    count = np.zeros(1, np.int32)
    fn((values.size + threads - 1) // threads, threads, _ptr(values), _ptr(total), _ptr(count),
       values.size)
    return total[0], int(count[0])
