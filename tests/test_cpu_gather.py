"""The gathered ``P V`` of the LATTE and hybrid CPU kernels (``mcattn._cpu_math.gather_axpy``,
``aligned_rows``, ``mcattn.latte.cpu.weighted_values``) and the chunked int8 score tile
(``mcattn.latte.vnni.estimate_tile_at``), against float64 / exact integer references."""

import numpy as np
import pytest
from numba import njit

from mcattn._cpu_math import aligned_rows, gather_axpy
from mcattn.latte import cpu, vnni


@njit
def _axpy_runs(acc, v, bh, idx, w, cuts):
    for i in range(acc.shape[0]):
        for r in range(cuts.shape[1] - 1):  # several runs per row: the accumulator carries over
            gather_axpy(acc, i, v, bh, idx, w, cuts[i, r], cuts[i, r + 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dv", [64, 128, 32, 80, 20, 7, 1])
def test_gather_axpy_matches_float64(dtype, dv):
    rng = np.random.default_rng(dv)
    rows, nk, kept = 9, 300, 45
    v = rng.standard_normal((3, nk, dv)).astype(dtype)
    idx = np.stack([np.sort(rng.choice(nk, kept, replace=False)) for _ in range(rows)]).astype(np.int32)
    w = rng.random((rows, kept + 3)).astype(dtype)
    cuts = np.stack([np.sort(np.r_[0, rng.integers(0, kept, 3), kept]) for _ in range(rows)])
    start = rng.standard_normal((rows, dv)).astype(dtype)
    acc = start.copy()
    _axpy_runs(acc, v, 2, idx, w, cuts)
    ref = start.astype(np.float64) + np.einsum("it,itc->ic", w[:, :kept].astype(np.float64),
                                               v[2][idx].astype(np.float64))
    tol = 2e-6 if dtype == np.float32 else 1e-13
    assert np.max(np.abs(acc - ref)) <= tol * np.max(np.abs(ref))
    # any layout (here a strided view) takes the plain loop: the same sums
    acc2 = start.copy()
    _axpy_runs(acc2, v[:, :, ::1] if dv == 1 else np.asfortranarray(v), 2, idx, w, cuts)
    assert np.max(np.abs(acc2 - ref)) <= tol * np.max(np.abs(ref))


def test_aligned_rows_start_on_a_vector_boundary():
    for dtype in (np.float32, np.float64):
        for nk in (1, 5, 4096):
            buf = aligned_rows(np.zeros((2, 3, 64), dtype), nk)
            assert buf.shape == (1, nk, 64) and buf.dtype == dtype and buf.ctypes.data % 64 == 0
            assert buf.flags.c_contiguous


def test_weighted_values_by_chunks_matches_float64():
    rng = np.random.default_rng(7)
    rows, nk, dv = 13, 1000, 64
    v = rng.standard_normal((2, nk, dv)).astype(np.float32)
    keep = rng.random((rows, nk)) < 0.15
    keep[3] = False  # a row with no kept key
    cnt = keep.sum(1).astype(np.int64)
    idxb = np.zeros((rows, nk + 16), np.int32)
    sc = rng.random((rows, nk + 1)).astype(np.float32)
    for i in range(rows):
        idxb[i, :cnt[i]] = np.flatnonzero(keep[i])
    ref = np.stack([sc[i, :cnt[i]].astype(np.float64) @ v[1, idxb[i, :cnt[i]]].astype(np.float64)
                    for i in range(rows)])
    for chunk in (64, 333, 4096):
        acc = np.full((rows, dv), np.nan, np.float32)
        cpu.weighted_values(v, 1, rows, idxb, cnt, sc, acc, np.zeros(rows, np.int64), chunk)
        assert np.max(np.abs(acc - ref)) <= 2e-6 * np.max(np.abs(ref))
        assert np.all(acc[3] == 0)


@njit
def _tile_at(est, qw, kw, corr, rows, c0, c1):
    for tj in range(c0, c1, vnni.NR):
        for ti in range(0, rows, vnni.MR):
            vnni.estimate_tile_at(est, tj - c0, qw, kw, corr, ti, tj)


def test_score_tile_of_a_key_chunk_is_the_exact_integer_product():
    rng = np.random.default_rng(3)
    nq, nk, d = 13, 300, 64
    q8 = rng.integers(-127, 128, (nq, d)).astype(np.int8)
    k8 = rng.integers(-127, 128, (nk, d)).astype(np.int8)
    d4 = d // 4
    nk_pad = -(-nk // vnni.NR) * vnni.NR
    rows_pad = -(-nq // vnni.MR) * vnni.MR
    kbytes = np.zeros(d4 * nk_pad * 4, np.int8)
    kw = kbytes.view(np.int32).reshape(d4, nk_pad)
    corr = np.zeros(nk_pad, np.int32)
    vnni.pack_keys(k8[None], 0, nk, True, kbytes.reshape(d4, nk_pad, 4), kw, corr)
    qbytes = np.zeros(rows_pad * d4 * 4, np.uint8)
    qw = qbytes.view(np.int32).reshape(rows_pad, d4)
    vnni.pack_queries(q8[None], 0, 0, nq, True, qbytes.reshape(rows_pad, 4 * d4))
    ref = q8.astype(np.int64) @ k8.astype(np.int64).T
    est = np.full((rows_pad, 128), np.nan, np.float32)
    for c0 in range(0, nk, 128):
        c1 = min(nk, c0 + 128)
        _tile_at(est, qw, kw, corr, nq, c0, c1)
        assert np.array_equal(est[:nq, :c1 - c0].astype(np.int64), ref[:, c0:c1])
