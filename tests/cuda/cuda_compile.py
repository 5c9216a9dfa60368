"""Compile mcattn's CUDA code for real GPUs without one: NVRTC and numba.cuda.compile_ptx."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from mcattn._cupy import INCLUDE_DIR, kernel_path

ARCHITECTURES = ("sm_80", "sm_90")

#: Modules with numba.cuda kernels; each has ptx_signatures() -> [(name, pyfunc, argtypes)].
NUMBA_CUDA_MODULES = ("mcattn._random_cuda", "mcattn.exact.cuda", "mcattn.mca.cuda", "mcattn.rfa.cuda",
                      "mcattn.eatt.cuda",
                      "mcattn.latte.cuda",
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
import importlib, json, os, sys
import mcattn  # first: its NumPy 2.5 compatibility alias for numba-cuda
from numba import cuda
out_dir = sys.argv[2] if len(sys.argv) > 2 else None
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
                entry = {"module": module, "kernel": name, "cc": cc, "bytes": len(ptx),
                         "entry": ".entry" in ptx}
                if out_dir:
                    entry["ptx_path"] = os.path.join(out_dir, f"{name}_sm{cc[0]}{cc[1]}.ptx")
                    with open(entry["ptx_path"], "w") as fh:
                        fh.write(ptx)
                results.append(entry)
            except Exception as exc:  # report every failure, not only the first
                results.append({"module": module, "kernel": name, "cc": cc, "error": repr(exc)})
print(json.dumps(results))
"""


def numba_ptx_results(modules=NUMBA_CUDA_MODULES, ptx_dir=None):
    """compile_ptx of every numba.cuda kernel, run in a subprocess WITHOUT the simulator.

    (The test session runs with NUMBA_ENABLE_CUDASIM=1, under which compile_ptx is not
    available.) Returns a list of dicts, one per (kernel, compute capability); with
    ``ptx_dir`` each PTX is written there and its path is the entry ``"ptx_path"``.
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    argv = [sys.executable, "-c", _PTX_SCRIPT, ",".join(modules)] + ([str(ptx_dir)] if ptx_dir else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"compile_ptx subprocess failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- Resources per kernel: what ptxas allocates (stack, registers, static shared memory) ---

#: Per-thread stack above which a kernel fails the resource test: the driver reserves
#: the stack of every resident thread (2048 per SM), so 33 KiB per thread is ~9 GB.
MAX_STACK_BYTES = 4096
#: Registers of one SM (sm_80 and sm_90) and the static shared memory a block may use.
SM_REGISTERS = 65536
MAX_STATIC_SHARED = 48 * 1024
#: Kernels that must use no local memory (no spills, no stack): the tensor-core ones,
#: whose fragments are meant to live in registers (local memory turns register work
#: into memory traffic; a fragment array indexed in a loop the compiler did not unroll
#: lands there).
SPILL_FREE = tuple(
    [f"mcattn_exact_mma_forward_{t}_d{d}" for t in ("f16", "bf16") for d in (32, 64, 128)]
    + [f"mcattn_exact_tf32_forward_d{d}" for d in (32, 64, 128)]
    + [f"mcattn_exact_mma_backward_{p}_{t}_d{d}" for p in ("dq", "dkdv") for t in ("f16", "bf16")
       for d in (32, 64)]
    + [f"mcattn_latte_mma_forward_{t}_d{d}" for t in ("f16", "bf16") for d in (32, 64, 128)]
    + [f"mcattn_latte_mma_backward_{p}_{t}_d{d}" for p in ("dq", "dkdv") for t in ("f16", "bf16")
       for d in (32, 64)]
    + [f"mcattn_eatt_mma_hamming_{t}_dv{d}" for t in ("f16", "bf16") for d in (32, 64, 128)]
    + [f"mcattn_eatt_mma_l1_{t}_d{d}_dv{dv}" for t in ("f16", "bf16")
       for d, dv in ((32, 32), (32, 64), (32, 128), (64, 32), (64, 64))]
    + [f"mcattn_rfa_mma_{p}_{t}_dv{d}" for p in ("states", "output", "chunk_states", "causal")
       for t in ("f16", "bf16")
       for d in (32, 64, 128)])


def ptxas_resources(ptx, arch):
    """``{kernel: {"registers", "stack", "shared"}}`` that ptxas allocates for ``ptx``.

    Runs ``ptxas -v`` when the ptxas on the PATH accepts the PTX's ISA version; the PTX of
    a newer NVRTC/NVVM than the installed toolkit (``.version`` too new) goes through the
    ptxas inside nvJitLink (``cuda.bindings.nvjitlink``, ``-verbose``), which has the
    PTX producer's version. Returns ``(resources, tool)``.
    """
    ptx = ptx.rstrip("\0")  # NVRTC's PTX ends with the C string's terminator
    log, tool = None, None
    ptxas = shutil.which("ptxas")
    if ptxas:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as fh:
                fh.write(ptx)
            done = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                log, tool = done.stdout + done.stderr, ptxas
            elif "Unsupported .version" not in done.stderr:
                raise RuntimeError(f"ptxas failed for {arch}:\n{done.stderr[-3000:]}")
    if log is None:
        log, tool = _nvjitlink_verbose(ptx, arch), "nvJitLink"
    return _parse_ptxas(log), tool


def _nvjitlink_verbose(ptx, arch):
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernels.ptx")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    return log.decode(errors="replace")


def _parse_ptxas(log):
    kernels, current = {}, None
    for line in log.replace("\0", "").splitlines():
        # nvJitLink's summary ("Function properties for 'k':" then "used ... bytes smem")
        # also counts module-level shared arrays (numba.cuda's), which ptxas' line omits.
        m = re.search(r"Function properties for '([^']+)':", line)
        if m and m.group(1) in kernels:
            current = kernels[m.group(1)]
            continue
        m = re.search(r"used \d+ registers.*?(\d+) bytes smem", line)
        if m and current is not None and not line.lstrip().startswith("ptxas"):
            current["shared"] = max(current["shared"], int(m.group(1)))
            continue
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {"registers": 0, "stack": 0, "shared": 0, "spills": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame", line)
        if m:
            current["stack"] = int(m.group(1))
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spills"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            current["shared"] = max(current["shared"], int(m.group(1)) if m else 0)
    return kernels


def max_threads_for_registers(registers):
    """Largest block (a multiple of 32) whose registers fit one SM (8-register granules per thread)."""
    per_thread = -(-max(registers, 1) // 8) * 8
    return min(1024, SM_REGISTERS // (per_thread * 32) * 32)


def resource_problems(name, res, block):
    """Why a kernel's resources are unsafe for blocks of ``block`` threads (empty when fine)."""
    problems = []
    if res["stack"] > MAX_STACK_BYTES:
        problems.append(f"{name}: {res['stack']} bytes of stack per thread > {MAX_STACK_BYTES}")
    if res["registers"] * block > SM_REGISTERS or max_threads_for_registers(res["registers"]) < block:
        problems.append(f"{name}: {res['registers']} registers x {block} threads exceed the SM's "
                        f"{SM_REGISTERS}")
    if res["shared"] > MAX_STATIC_SHARED:
        problems.append(f"{name}: {res['shared']} bytes of static shared memory > {MAX_STATIC_SHARED}")
    if name.split(":")[-1].split(".")[-1] in SPILL_FREE:
        if res.get("spills", 0):
            problems.append(f"{name}: {res['spills']} bytes of register spills (stores + loads)")
        if res["stack"]:  # a local array: fragments indexed by a variable
            problems.append(f"{name}: {res['stack']} bytes of stack (local memory) in a tensor-core kernel")
    return problems


def resource_table(arch="sm_90", numba=True, sources=None):
    """Lines ``kernel registers stack spills shared max-block tool`` for every kernel (CUDA C
    and, with ``numba``, numba.cuda), or for the CUDA C ``sources`` given."""
    from mcattn._cupy import KERNEL_SOURCES

    rows = []
    for source in sorted(KERNEL_SOURCES if sources is None else sources):
        resources, tool = ptxas_resources(nvrtc_compile(source, arch), arch)
        rows += [(f"{source}:{name}", res, tool) for name, res in sorted(resources.items())]
    with tempfile.TemporaryDirectory() as tmp:
        for r in (numba_ptx_results(ptx_dir=tmp) if numba else ()):
            if tuple(r.get("cc", ())) == (int(arch[3]), int(arch[4])) and "ptx_path" in r:
                with open(r["ptx_path"]) as fh:
                    resources, tool = ptxas_resources(fh.read(), arch)
                rows += [(f"{r['module']}:{r['kernel']}", res, tool) for res in resources.values()]
    lines = [f"{'kernel':78s} {'regs':>4s} {'stack':>6s} {'spills':>6s} {'smem':>6s} "
             f"{'max block':>9s}  ptxas"]
    for name, res, tool in rows:
        lines.append(f"{name:78s} {res['registers']:4d} {res['stack']:6d} {res['spills']:6d} "
                     f"{res['shared']:6d} {max_threads_for_registers(res['registers']):9d}  "
                     f"{os.path.basename(tool)}")
    return lines


if __name__ == "__main__":
    # python tests/cuda/cuda_compile.py [arch] [source.cu ...]: every kernel, or those sources'
    sys.path.insert(0, os.getcwd())
    arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
    chosen = sys.argv[2:] or None
    print("\n".join(resource_table(arch, numba=chosen is None, sources=chosen)))
