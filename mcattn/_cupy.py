"""CUDA C sources shipped with mcattn and their lazy, per-device CuPy modules.

Sources live beside each method (``mcattn/<method>/kernels/*.cu``) and share the
headers in ``mcattn/kernels/`` (``common.cuh``, ``philox.cuh``). :func:`raw_module`
compiles a source with CuPy's NVRTC the first time it is needed on a device and keeps
the module for later calls. The tests compile the same sources with NVRTC for sm_80 and
sm_90 and with the host compiler under a shim (see docs/cuda-testing.md).
"""

import threading
from pathlib import Path

__all__ = ["PACKAGE_DIR", "INCLUDE_DIR", "kernel_path", "kernel_source", "raw_module",
           "KERNEL_SOURCES"]

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "kernels"

#: Every CUDA C source of the package with the extern "C" kernels it defines (the tests
#: compile each of them for every architecture).
KERNEL_SOURCES = {
    "kernels/random.cu": ("mcattn_philox_words",),
    "exact/kernels/exact.cu": ("mcattn_exact_forward_f32", "mcattn_exact_forward_f64"),
    "mca/kernels/mca.cu": (
        "mcattn_mca_projection_weight_f32", "mcattn_mca_projection_weight_f64",
        "mcattn_mca_projection_optimal_f32", "mcattn_mca_projection_optimal_f64",
    ),
    "rfa/kernels/rfa.cu": (
        "mcattn_rfa_features_f32", "mcattn_rfa_states_f32", "mcattn_rfa_scan_f32", "mcattn_rfa_output_f32",
        "mcattn_rfa_features_f64", "mcattn_rfa_states_f64", "mcattn_rfa_scan_f64", "mcattn_rfa_output_f64",
    ),
    "eigen/kernels/eigen.cu": ("mcattn_eigen_forward_f32", "mcattn_eigen_forward_f64"),
}

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


def raw_module(relative):
    """The ``cupy.RawModule`` of a source on the current device (compiled once per device)."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), relative)
    with _lock:
        module = _modules.get(key)
        if module is None:
            module = cupy.RawModule(
                code=kernel_source(relative),
                options=("--std=c++14", f"-I{INCLUDE_DIR}"),
            )
            _modules[key] = module
    return module
