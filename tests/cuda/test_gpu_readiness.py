"""What a real GPU would reveal and the simulator hides: compile-cache keys, block limits."""

import shutil
import types

import pytest

from mcattn import _cupy, config
from mcattn.errors import ConfigError


def test_compile_options_change_with_any_header(tmp_path, monkeypatch):
    """CuPy's cache keys on source + options: an edited header must change the options."""
    package = tmp_path / "mcattn"
    shutil.copytree(_cupy.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("*.py", "*.npz", "__pycache__"))
    monkeypatch.setattr(_cupy, "PACKAGE_DIR", package)
    monkeypatch.setattr(_cupy, "INCLUDE_DIR", package / "kernels")
    for source in _cupy.KERNEL_SOURCES:
        before = _cupy.compile_options(source)
        assert f"-I{package / 'kernels'}" in before
        header = package / "kernels" / "philox.cuh"
        text = header.read_text()
        header.write_text(text + "\n// edited\n")
        after = _cupy.compile_options(source)
        header.write_text(text)
        assert before != after, source
        assert _cupy.compile_options(source) == before  # content, not time, decides
        assert any(o.startswith("-DMCATTN_HEADERS_SHA256=") for o in before)


def test_block_threads_checked_against_the_kernel(monkeypatch):
    roomy = types.SimpleNamespace(max_threads_per_block=1024, name="k")
    tight = types.SimpleNamespace(max_threads_per_block=672, name="mcattn_exact_forward_f64")
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 1024)
    assert _cupy.block_threads(roomy) == 1024
    with pytest.raises(ConfigError, match="at most 672 threads"):
        _cupy.block_threads(tight)
    assert _cupy.block_threads(tight, 128) == 128
    for bad in (0, 2048, 64.5, True, "64"):
        monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", bad)
        with pytest.raises(ConfigError):
            _cupy.block_threads(roomy)


def test_block_threads_asks_numba_dispatchers():
    class Dispatcher:  # numba.cuda's dispatcher API (one compiled signature)
        py_func = test_block_threads_asks_numba_dispatchers

        def get_max_threads_per_block(self):
            return 256

    with pytest.raises(ConfigError, match="at most 256"):
        _cupy.block_threads(Dispatcher(), 512)
    assert _cupy.block_threads(Dispatcher(), 256) == 256

    class Unspecialised(Dispatcher):  # several signatures compiled: {signature: limit}
        def get_max_threads_per_block(self):
            return {("float32",): 640, ("float64",): 384}

    with pytest.raises(ConfigError, match="at most 384"):
        _cupy.block_threads(Unspecialised(), 512)

    class Fresh(Dispatcher):  # nothing compiled yet
        def get_max_threads_per_block(self):
            return {}

    assert _cupy.block_threads(Fresh(), 1024) == 1024
