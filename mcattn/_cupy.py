"""CUDA C sources shipped with mcattn and their lazy, per-device CuPy modules.

Sources live beside each method (``mcattn/<method>/kernels/*.cu``) and share the
headers in ``mcattn/kernels/`` (``common.cuh``, ``philox.cuh``). :func:`raw_module`
compiles a source with CuPy's NVRTC the first time it is needed on a device and keeps
the module for later calls. CuPy's own disk cache keys on the source text and the
options but does not read the headers found through ``-I``, so the options carry a
hash of the headers (:func:`compile_options`): an edited ``philox.cuh`` recompiles. The
tests compile the same sources with NVRTC for sm_80 and sm_90 and with the host
compiler under a shim (see docs/cuda-testing.md).
"""

import hashlib
import sys
import threading
from pathlib import Path

from . import config
from .errors import ConfigError

__all__ = ["PACKAGE_DIR", "INCLUDE_DIR", "kernel_path", "kernel_source", "raw_module",
           "kernel_sources", "SHARED_SOURCES", "compile_options", "header_digest", "block_threads",
           "numba_stream"]

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "kernels"

#: CUDA C sources that belong to no method (the shared random-number kernel).
SHARED_SOURCES = {"kernels/random.cu": ("mcattn_philox_words",)}


def kernel_sources():
    """Every CUDA C source of the package with the extern "C" kernels it defines: the
    shared ones and each registered method's ``Method.kernel_sources`` (the tests compile
    each of them for every architecture)."""
    from .registry import get_method, method_names

    sources = dict(SHARED_SOURCES)
    for name in method_names():
        sources.update(get_method(name).kernel_sources)
    return sources


def __getattr__(name):
    if name == "KERNEL_SOURCES":  # as of now: read from the registered methods' specs
        return kernel_sources()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_lock = threading.Lock()
_modules = {}


def kernel_path(relative):
    """Absolute path of a source given relative to the package (``"exact/kernels/exact.cu"``)."""
    path = PACKAGE_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(f"mcattn kernel source {relative} is missing from {PACKAGE_DIR}")
    return path


def kernel_source(relative):
    """The text of a shipped CUDA C source."""
    return kernel_path(relative).read_text()


def header_digest(relative):
    """SHA-256 (hex, 16 digits) of every header a source may include.

    The headers of ``mcattn/kernels/`` and of the source's own folder, by name and content.
    """
    digest = hashlib.sha256()
    folders = sorted({INCLUDE_DIR, kernel_path(relative).parent})
    for path in sorted(p for folder in folders for p in folder.glob("*.cuh")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def compile_options(relative):
    """NVRTC options of a source: C++14, the include folders and the headers' hash."""
    return ("--std=c++14", f"-I{INCLUDE_DIR}", f"-I{kernel_path(relative).parent}",
            f"-DMCATTN_HEADERS_SHA256={header_digest(relative)}")


def raw_module(relative):
    """The ``cupy.RawModule`` of a source on the current device (compiled once per device)."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), relative)
    with _lock:
        module = _modules.get(key)
        if module is None:
            module = cupy.RawModule(code=kernel_source(relative), options=compile_options(relative))
            _modules[key] = module
    return module


def block_threads(kernel, threads=None):
    """Threads per block for a launch of ``kernel``, checked against what it can run.

    Parameters
    ----------
    kernel : cupy.RawKernel or a numba.cuda dispatcher specialised for its arguments
        Anything with ``max_threads_per_block`` (CuPy) or ``get_max_threads_per_block()``
        (numba.cuda); neither (the simulator) skips the kernel check.
    threads : int, optional
        Default ``config.CUDA_THREADS_PER_BLOCK``.

    Raises
    ------
    ConfigError
        ``threads`` is not in 1..1024, or exceeds the kernel's limit (its registers per
        thread times the block must fit the SM's register file).
    """
    threads = config.CUDA_THREADS_PER_BLOCK if threads is None else threads
    if isinstance(threads, bool) or int(threads) != threads or not 1 <= int(threads) <= 1024:
        raise ConfigError(f"CUDA_THREADS_PER_BLOCK must be an integer in 1..1024; got {threads!r}")
    threads = int(threads)
    limit = getattr(kernel, "max_threads_per_block", None)
    if limit is None and hasattr(kernel, "get_max_threads_per_block"):
        try:  # numba.cuda: one value when specialised, else {signature: value} of those compiled
            limit = kernel.get_max_threads_per_block()
        except Exception:  # noqa: BLE001 - nothing compiled yet: nothing to check
            limit = None
        if isinstance(limit, dict):
            limit = min(limit.values(), default=None)
    if limit is not None and threads > int(limit):
        py_func = getattr(kernel, "py_func", None)
        name = getattr(kernel, "name", None) or getattr(py_func, "__name__", "kernel")
        raise ConfigError(f"{name} runs at most {int(limit)} threads per block on this GPU "
                          f"(registers per thread); CUDA_THREADS_PER_BLOCK is {threads}")
    return threads


def numba_stream():
    """CuPy's current stream for a numba.cuda launch (``0``: the default stream).

    numba.cuda kernels run between CuPy operations (allocations, array code, other
    RawKernels) that CuPy queues on its current stream; launching them on numba's own
    default stream instead would race with a non-default CuPy stream. Under the
    simulator, or before CuPy was imported, there is nothing to order with.
    """
    from ._dispatch import cuda_simulator_enabled

    if cuda_simulator_enabled() or "cupy" not in sys.modules:
        return 0
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    if not ptr:  # CuPy's legacy default stream is numba's default stream
        return 0
    from numba import cuda

    return cuda.external_stream(ptr)
