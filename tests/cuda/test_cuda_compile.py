"""Every CUDA source and numba.cuda kernel compiles for sm_80 and sm_90."""

import importlib
import re

import pytest
from cuda_compile import (
    ARCHITECTURES,
    NUMBA_CUDA_MODULES,
    SPILL_FREE,
    numba_ptx_results,
    nvrtc_compile,
    ptxas_resources,
    resource_problems,
)

from mcattn import config
from mcattn._cupy import KERNEL_SOURCES

#: The block size the resource test holds every kernel to: the largest any launcher uses
#: by default (mca's 128; config.CUDA_THREADS_PER_BLOCK is 64), with a factor 2 of margin.
#: A larger configured block is checked at launch against the compiled kernel's
#: max_threads_per_block (mcattn._gpu_launch).
RESOURCE_BLOCK = 2 * max(128, config.CUDA_THREADS_PER_BLOCK)

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
def ptx_results(tmp_path_factory):
    return numba_ptx_results(ptx_dir=tmp_path_factory.mktemp("ptx"))


def test_numba_cuda_kernels_compile_to_ptx(ptx_results):
    failures = [r for r in ptx_results if "error" in r]
    assert not failures, failures
    compiled = {(r["module"], r["kernel"]) for r in ptx_results}
    for module in NUMBA_CUDA_MODULES:
        expected = {(module, name) for name, _, _ in importlib.import_module(module).ptx_signatures()}
        assert expected and expected <= compiled
    assert all(r["entry"] and r["bytes"] > 1000 for r in ptx_results)
    assert {tuple(r["cc"]) for r in ptx_results} == {(8, 0), (9, 0)}


@pytest.mark.parametrize("source", sorted(KERNEL_SOURCES))
def test_cuda_c_kernel_resources_for_sm90(source):
    """ptxas -v for sm_90: stack <= 4 KiB per thread, registers x block within the SM."""
    resources, tool = ptxas_resources(nvrtc_compile(source, "sm_90"), "sm_90")
    assert set(KERNEL_SOURCES[source]) <= set(resources), (tool, resources)
    problems = [p for name, res in resources.items() for p in resource_problems(name, res, RESOURCE_BLOCK)]
    assert not problems, f"{tool}: {problems}"


#: The sources of the tensor-core kernels (cuda_compile.SPILL_FREE), held to no local
#: memory on sm_80 (A100) too: ptxas for sm_80 allocates more registers than for sm_90.
TENSOR_CORE_SOURCES = ("exact/kernels/exact_mma.cu", "exact/kernels/exact_mma_backward.cu",
                       "latte/kernels/latte_mma.cu", "latte/kernels/latte_mma_backward.cu",
                       "eatt/kernels/eatt_mma.cu", "rfa/kernels/rfa_mma.cu")


@pytest.mark.parametrize("source", TENSOR_CORE_SOURCES)
def test_tensor_core_kernels_have_no_spills_for_sm80(source):
    """ptxas -v for sm_80: the tile kernels (launched with 128 threads) spill nothing."""
    resources, tool = ptxas_resources(nvrtc_compile(source, "sm_80"), "sm_80")
    tiles = [name for name in KERNEL_SOURCES[source] if name in SPILL_FREE]
    assert tiles and set(tiles) <= set(resources), (tool, resources)
    problems = [p for name in tiles for p in resource_problems(name, resources[name], 128)]
    assert not problems, f"{tool}: {problems}"


def test_numba_cuda_kernel_resources_for_sm90(ptx_results):
    checked, problems = 0, []
    for r in ptx_results:
        if tuple(r["cc"]) != (9, 0) or "ptx_path" not in r:
            continue
        with open(r["ptx_path"]) as fh:
            resources, tool = ptxas_resources(fh.read(), "sm_90")
        assert len(resources) == 1, (r["kernel"], resources)
        (res,) = resources.values()
        problems += resource_problems(f"{r['module']}.{r['kernel']}", res, RESOURCE_BLOCK)
        checked += 1
    assert checked == sum(len(importlib.import_module(m).ptx_signatures()) for m in NUMBA_CUDA_MODULES)
    assert not problems, problems


def test_resource_check_catches_a_large_stack():
    """The check fails a kernel like MCA's former per-thread CDF (double cdf[4096])."""
    from cuda_compile import _parse_ptxas

    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
           "ptxas         .     33792 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 0 barriers, 49664 bytes smem\n")
    res = _parse_ptxas(log)["k"]
    assert res == {"registers": 255, "stack": 33792, "shared": 49664, "spills": 0}
    problems = resource_problems("k", res, 512)
    assert len(problems) == 3, problems
    # nvJitLink's summary counts module-level shared arrays (numba.cuda) that ptxas' line omits
    linked = log.replace(", 49664 bytes smem", "") + (
        "info    : Function properties for 'k':\n"
        "info    : used 255 registers, used 1 barriers, 33792 stack, 50000 bytes smem, 0 bytes lmem\n")
    assert _parse_ptxas(linked)["k"]["shared"] == 50000
    # a tensor-core kernel must not spill
    spilled = _parse_ptxas(log.replace("0 bytes spill stores", "8 bytes spill stores"))["k"]
    assert spilled["spills"] == 8
    assert not resource_problems("mcattn_exact_mma_forward_f16_d64", {**res, "stack": 0, "shared": 0}, 128)
    assert resource_problems("mcattn_exact_mma_forward_f16_d64", {**spilled, "stack": 0, "shared": 0}, 128)
    assert resource_problems("mcattn_exact_mma_forward_f16_d64", {**res, "stack": 128, "shared": 0}, 128)


#: A float32 value widened to float64: the mark of float64 arithmetic on float32 data.
#: (libdevice's sinf/cosf reduce huge arguments with int64 -> float64 steps; those stay.)
_F32_TO_F64 = re.compile(r"^\s*cvt(\.\w+)*\.f64\.f32\b", re.M)


def test_numba_float32_kernels_compute_in_float32(ptx_results):
    """No float64 arithmetic in float32 kernels (a bare 0.0 or math.inf literal promotes)."""
    offenders = {}
    for r in ptx_results:
        module = importlib.import_module(r["module"])
        # FLOAT64_ACCUMULATION: True exempts the module, a collection of names those kernels.
        exempt = getattr(module, "FLOAT64_ACCUMULATION", False)
        if "float32" not in r["kernel"] or exempt is True or (exempt and r["kernel"] in exempt):
            continue
        with open(r["ptx_path"]) as fh:
            hits = _F32_TO_F64.findall(fh.read())
        if hits:
            offenders[f"{r['module']}.{r['kernel']} cc{r['cc']}"] = len(hits)
    assert not offenders, f"float64 instructions in float32 kernels: {offenders}"
