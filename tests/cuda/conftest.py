"""Fixtures of the CUDA test lanes: ``cupy_or_fake`` (real CuPy on a GPU, else the fake)."""

from fake_cupy import cupy_or_fake  # noqa: F401 - a fixture, made visible to every test here
