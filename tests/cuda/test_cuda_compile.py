"""Every CUDA source and numba.cuda kernel compiles for sm_80 and sm_90."""

import importlib

import pytest
from cuda_compile import ARCHITECTURES, NUMBA_CUDA_MODULES, numba_ptx_results, nvrtc_compile

from mcattn._cupy import KERNEL_SOURCES

pytestmark = pytest.mark.nvrtc


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("source", sorted(KERNEL_SOURCES))
def test_nvrtc_compiles_every_kernel(source, arch):
    ptx = nvrtc_compile(source, arch)
    assert f".target {arch}" in ptx
    for kernel in KERNEL_SOURCES[source]:
        assert f".entry {kernel}(" in ptx or f".entry {kernel} (" in ptx, kernel


def test_nvrtc_reports_errors():
    from mcattn import _cupy

    bad = "kernels/does_not_exist.cu"
    with pytest.raises(FileNotFoundError):
        _cupy.kernel_path(bad)


@pytest.fixture(scope="module")
def ptx_results():
    return numba_ptx_results()


def test_numba_cuda_kernels_compile_to_ptx(ptx_results):
    failures = [r for r in ptx_results if "error" in r]
    assert not failures, failures
    compiled = {(r["module"], r["kernel"]) for r in ptx_results}
    for module in NUMBA_CUDA_MODULES:
        expected = {(module, name) for name, _, _ in importlib.import_module(module).ptx_signatures()}
        assert expected and expected <= compiled
    assert all(r["entry"] and r["bytes"] > 1000 for r in ptx_results)
    assert {tuple(r["cc"]) for r in ptx_results} == {(8, 0), (9, 0)}
