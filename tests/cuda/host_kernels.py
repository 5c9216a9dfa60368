"""Build mcattn's CUDA C sources with the host compiler under the shim and call them.

``library(unit)`` compiles ``hostshim/<unit>_host.cpp`` (which includes the shim, then a
kernel source of the package, then ``extern "C"`` launchers) into a shared library once
per content hash and loads it with ctypes. The ``run_*`` functions mirror the CuPy
launchers of the package (same grid, same arguments), so a test runs the very kernel
CuPy would run; with a real GPU the tests call the CuPy launchers instead.
"""

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

import mcattn
from mcattn import random as mrandom
from mcattn._cupy import INCLUDE_DIR, PACKAGE_DIR

SHIM_DIR = Path(__file__).resolve().parent / "hostshim"
BUILD_DIR = Path(__file__).resolve().parent / "_build"
_LIBS = {}

_P = ctypes.c_void_p
_U = ctypes.c_uint
_I = ctypes.c_int
_U64 = ctypes.c_ulonglong
_I64 = ctypes.c_longlong


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


def philox_words(seed, stream, first_index, n, threads=32):
    """``mcattn_philox_words`` on the host: ``(words [n, 4] uint32, uniforms [n])``."""
    fn = library("random").launch_mcattn_philox_words
    fn.argtypes = [_U, _U, _U, _U, _U64, _U64, _I64, _P, _P]
    words = np.zeros((n, 4), np.uint32)
    uniforms = np.zeros(n)
    k0, k1 = mrandom.seed_to_key(seed)
    fn((n + threads - 1) // threads, threads, int(k0), int(k1), stream, first_index, n,
       _ptr(words), _ptr(uniforms))
    return words, uniforms


def exact_forward(inp, threads=None):
    """``mcattn_exact_forward_f32/_f64`` on the host for canonical inputs (NumPy)."""
    threads = int(threads or mcattn.config.CUDA_THREADS_PER_BLOCK)
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk, dv = inp.nk, inp.value_dim
    out = np.zeros((bh, nq, dv), q.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    suffix = "f32" if q.dtype == np.float32 else "f64"
    scalar = ctypes.c_float if suffix == "f32" else ctypes.c_double
    fn = getattr(library("exact"), f"launch_mcattn_exact_forward_{suffix}")
    fn.argtypes = [_U, _U, _U, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, scalar, _I, _I, _I]
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), q.dtype)
    index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    fn((nq + threads - 1) // threads, bh, threads, _ptr(q), _ptr(k), _ptr(v), _ptr(out),
       _ptr(np.ascontiguousarray(bias)), _ptr(np.ascontiguousarray(index)), nq, nk, d, dv,
       inp.scale, int(has_bias), bias.shape[1], int(inp.mask.is_causal))
    return out


def mca_projection(x, w, bias, num_heads, budgets, seed, sampling="weight", threads=32):
    """``mcattn_mca_projection_*`` on the host, arguments as ``mcattn.mca.cupy`` passes them."""
    from mcattn.mca.naive import weight_tables

    batch, n, d_in = x.shape
    dh = w.shape[1] // num_heads
    t = weight_tables(w, num_heads)
    bias64 = np.zeros(1) if bias is None else np.ascontiguousarray(bias, dtype=np.float64)
    k0, k1 = mrandom.seed_to_key(seed)
    out = np.zeros((batch, num_heads, n, dh), x.dtype)
    total = batch * num_heads * n
    suffix = "f32" if x.dtype == np.float32 else "f64"
    fn = getattr(library("mca"), f"launch_mcattn_mca_projection_{sampling}_{suffix}")
    fn.argtypes = [_U, _U, _P, _P, _P, _I, _P, _P, _P, _I, _P, _P, _U, _U, _P, _I, _I, _I, _I, _I]
    fn((total + threads - 1) // threads, threads, _ptr(np.ascontiguousarray(x)), _ptr(t.wh),
       _ptr(bias64), int(bias is not None), _ptr(np.ascontiguousarray(budgets, dtype=np.int64)),
       _ptr(t.threshold), _ptr(t.alias), t.shift, _ptr(t.p_weight), _ptr(t.row_norms),
       int(k0), int(k1), _ptr(out), batch, num_heads, n, d_in, dh)
    return out


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


def eigen_forward(inp, plan, threads=None):
    """``mcattn_eigen_forward_f32/_f64`` on the host, arguments as ``mcattn.eigen.cupy`` passes them."""
    from mcattn.eigen._gpu import plan_arrays

    threads = int(threads or mcattn.config.CUDA_THREADS_PER_BLOCK)
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, d = q.shape
    nk, dv = inp.nk, inp.value_dim
    out = np.zeros((bh, nq, dv), q.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    cols, weights, base, bias, index, has_bias = plan_arrays(inp, plan, np)
    suffix = "f32" if q.dtype == np.float32 else "f64"
    scalar = ctypes.c_float if suffix == "f32" else ctypes.c_double
    fn = getattr(library("eigen"), f"launch_mcattn_eigen_forward_{suffix}")
    fn.argtypes = [_U, _U, _U] + [_P] * 9 + [_I] * 8 + [scalar, _I, _I, _I]
    fn((nq + threads - 1) // threads, bh, threads, _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(cols),
       _ptr(weights), _ptr(base), _ptr(bias), _ptr(index), nq, nk, d, dv, plan.num_heads,
       plan.num_fixed, base.shape[1], plan.per_query, inp.scale, int(has_bias), bias.shape[1],
       int(inp.mask.is_causal))
    return out
