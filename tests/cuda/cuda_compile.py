"""Compile mcattn's CUDA code for real GPUs without one: NVRTC and numba.cuda.compile_ptx."""

import json
import os
import subprocess
import sys

from mcattn._cupy import INCLUDE_DIR, kernel_path

ARCHITECTURES = ("sm_80", "sm_90")

#: Modules with numba.cuda kernels; each has ptx_signatures() -> [(name, pyfunc, argtypes)].
NUMBA_CUDA_MODULES = ("mcattn._random_cuda", "mcattn.exact.cuda", "mcattn.mca.cuda", "mcattn.rfa.cuda",
                      "mcattn.eigen.cuda")


def nvrtc_compile(relative_source, arch):
    """PTX of a shipped source compiled by NVRTC (``cuda.bindings.nvrtc``) for ``arch``."""
    from cuda.bindings import nvrtc

    path = kernel_path(relative_source)
    err, prog = nvrtc.nvrtcCreateProgram(path.read_bytes(), path.name.encode(), 0, [], [])
    _check(nvrtc, err, "nvrtcCreateProgram")
    options = [f"--gpu-architecture={arch}".encode(), b"--std=c++14",
               f"-I{INCLUDE_DIR}".encode(), f"-I{path.parent}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC failed on {relative_source} for {arch}:\n{log.decode()}")
    err, size = nvrtc.nvrtcGetPTXSize(prog)
    _check(nvrtc, err, "nvrtcGetPTXSize")
    ptx = b" " * size
    (err,) = nvrtc.nvrtcGetPTX(prog, ptx)
    _check(nvrtc, err, "nvrtcGetPTX")
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx.decode(errors="replace")


def _check(nvrtc, err, what):
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")


_PTX_SCRIPT = r"""
import importlib, json, sys
from numba import cuda
results = []
for module in sys.argv[1].split(","):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        results.append({"module": module, "error": f"import failed: {exc}"})
        continue
    for name, func, args in mod.ptx_signatures():
        for cc in ((8, 0), (9, 0)):
            try:
                ptx, _ = cuda.compile_ptx(func, args, cc=cc)
                results.append({"module": module, "kernel": name, "cc": cc, "bytes": len(ptx),
                                "entry": ".entry" in ptx})
            except Exception as exc:  # report every failure, not only the first
                results.append({"module": module, "kernel": name, "cc": cc, "error": repr(exc)})
print(json.dumps(results))
"""


def numba_ptx_results(modules=NUMBA_CUDA_MODULES):
    """compile_ptx of every numba.cuda kernel, run in a subprocess WITHOUT the simulator.

    (The test session runs with NUMBA_ENABLE_CUDASIM=1, under which compile_ptx is not
    available.) Returns a list of dicts, one per (kernel, compute capability).
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, ",".join(modules)], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"compile_ptx subprocess failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
