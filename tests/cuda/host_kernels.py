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

import mcattn
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


def eatt_forward(inp, alignment, threads=None):
    """``mcattn_eatt_forward_f32/_f64`` on the host, arguments as ``mcattn.eatt.cupy`` passes them."""
    from mcattn.eatt import naive
    from mcattn.eatt._gpu import kernel_arrays

    threads = int(threads or mcattn.config.CUDA_THREADS_PER_BLOCK)
    bh, nq, d = inp.q.shape
    nk, dv = inp.nk, inp.value_dim
    out = np.zeros((bh, nq, dv), inp.dtype)
    if bh == 0 or nq == 0 or nk == 0:
        return out
    codes = None
    if alignment == "hamming":
        codes = (naive.pack_bits(inp.q > 0), naive.pack_bits(inp.k > 0))
    q, k, qc, kc, table = kernel_arrays(inp, alignment, codes, np)
    suffix = "f32" if inp.dtype == np.float32 else "f64"
    fn = getattr(library("eatt"), f"launch_mcattn_eatt_forward_{suffix}")
    fn.argtypes = [_U, _U, _U] + [_P] * 9 + [_I] * 9
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), inp.dtype)
    index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    fn((nq + threads - 1) // threads, bh, threads, _ptr(q), _ptr(k), _ptr(qc), _ptr(kc),
       _ptr(table), _ptr(inp.v), _ptr(out), _ptr(np.ascontiguousarray(bias)),
       _ptr(np.ascontiguousarray(index)), nq, nk, d, (d + 63) // 64, dv, int(has_bias),
       bias.shape[1], int(inp.mask.is_causal), int(alignment == "hamming"))
    return out


def latte_forward(lat, threads=16, *, do_output=True, write_mask=False):
    """``mcattn_latte_forward_f32/_f64`` on the host, arguments as ``mcattn.latte.cupy`` passes them.

    Returns ``(out, kept, dropped, mask_out)``.
    """
    from mcattn.latte.cupy import kernel_arguments

    outputs, args = kernel_arguments(lat, np, do_output=do_output, write_mask=write_mask)
    bh, nq = lat.inp.q.shape[:2]
    if bh == 0 or nq == 0 or lat.inp.nk == 0:
        return outputs
    suffix = "f32" if lat.inp.dtype == np.float32 else "f64"
    fn = getattr(library("latte"), f"launch_mcattn_latte_forward_{suffix}")
    fn.argtypes = [_U, _U, _U] + [_P] * 15 + [_I] * 4 + [ctypes.c_double] + [_I] * 8
    pointers = [_ptr(np.ascontiguousarray(a)) for a in args[:15]]
    scalars = [int(a) for a in args[15:19]] + [float(args[19])] + [int(a) for a in args[20:]]
    fn((nq + threads - 1) // threads, bh, threads, *pointers, *scalars)
    return outputs


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
