"""MCA's shared draws as compiled reduced GEMMs on the CPU (mcattn.mca.shared_cpu)."""

import numpy as np
import pytest
from helpers import rel_error

from mcattn import config, mca
from mcattn import random as mrandom
from mcattn.mca import naive, shared, shared_cpu


def _problem(rng, batch=2, heads=3, n=50, d_in=24, dh=8):
    x = rng.standard_normal((batch, n, d_in))
    w = rng.standard_normal((d_in, heads * dh)) / np.sqrt(d_in)
    b = rng.standard_normal(heads * dh) * 0.1
    r = rng.integers(0, d_in + 6, (batch, heads, n))  # masked, sampled and exact tokens
    x[1, 3] = 0.0  # a zero input row: exactly the bias
    return x, w, b, r


@pytest.mark.parametrize("block", [256, 7])  # one block per sequence, or many
@pytest.mark.parametrize("blas_min", [0, 1 << 40])  # every group by BLAS, or by the loop
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_gemms_equal_the_per_draw_reference(monkeypatch, block, blas_min, dtype):
    monkeypatch.setattr(shared_cpu, "TOKEN_BLOCK", block)
    monkeypatch.setattr(shared_cpu, "MAX_TOKEN_BLOCK", block)
    monkeypatch.setattr(shared_cpu, "BLAS_MIN_MACS", blas_min)
    rng = np.random.default_rng(block + (blas_min > 0))
    x, w, b, r = _problem(rng)
    ref = naive.value_projection(x, w, b, 3, r, 17, shared_draws=True)
    out = shared_cpu.value_projection(*(a.astype(dtype) for a in (x, w, b)), 3, r, 17)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_error(out, ref) < (1e-13 if dtype == np.float64 else 3e-6)
    no_bias = shared_cpu.value_projection(x, w, None, 3, r, 17)
    assert rel_error(no_bias, naive.value_projection(x, w, None, 3, r, 17, shared_draws=True)) < 1e-13
    masked = r <= 0
    assert np.array_equal(no_bias[masked], np.zeros_like(no_bias[masked]))


def test_rounded_budgets_agree_with_the_array_version_and_threads_do_not_matter(monkeypatch):
    rng = np.random.default_rng(5)
    x, w, b, r = _problem(rng, batch=3, heads=4, n=300, d_in=64, dh=16)
    r = shared.round_budgets(r, 64, 0.25)
    ref = shared.value_projection(x, w, b, 4, r, 9)
    monkeypatch.setattr(shared_cpu, "TOKEN_BLOCK", 64)
    monkeypatch.setattr(shared_cpu, "MAX_TOKEN_BLOCK", 64)
    outs = []
    for threads in (1, 2):
        monkeypatch.setattr(config, "NUM_THREADS", threads)
        outs.append(shared_cpu.value_projection(x, w, b, 4, r, 9))
    assert np.array_equal(outs[0], outs[1])
    assert rel_error(outs[0], ref) < 1e-13
    got = mca.value_projection(x, w, b, num_heads=4, budgets=r, seed=9, shared_draws=True,
                               backend="numba")  # 300 tokens: routed to shared_cpu
    assert rel_error(got, ref) < 1e-13


def test_token_block_grows_with_the_groups_per_head(monkeypatch):
    monkeypatch.setattr(shared_cpu, "TOKEN_BLOCK", 128)
    monkeypatch.setattr(shared_cpu, "MAX_TOKEN_BLOCK", 1024)
    assert shared_cpu.token_block(4096, 1.0) == 128  # uniform budgets
    assert shared_cpu.token_block(4096, 0.0) == 128
    assert shared_cpu.token_block(4096, 3.5) == 448
    assert shared_cpu.token_block(4096, 40.0) == 1024
    assert shared_cpu.token_block(512, 18.0) == 512  # one block per sequence
    assert shared_cpu.token_block(50, 1.0) == 50


def test_exact_tokens_in_runs_and_scattered_with_large_blocks(monkeypatch):
    """Exact tokens: a run of rows of x used in place, or gathered; every block size."""
    rng = np.random.default_rng(8)
    x, w, b, r = _problem(rng, batch=2, heads=3, n=200, d_in=24, dh=8)
    r[0, :, 20:90] = 24  # a run of exact tokens
    r[1, 1, ::3] = 30  # scattered exact tokens
    ref = naive.value_projection(x, w, b, 3, r, 4, shared_draws=True)
    for block in (16, 128, 1024):
        monkeypatch.setattr(shared_cpu, "TOKEN_BLOCK", block)
        monkeypatch.setattr(shared_cpu, "MAX_TOKEN_BLOCK", block)
        assert rel_error(shared_cpu.value_projection(x, w, b, 3, r, 4), ref) < 1e-13, block


def test_uniform_budgets_and_edges():
    rng = np.random.default_rng(1)
    x, w, b, _ = _problem(rng, n=33)
    for value in (1, 5, 23, 24, 0):
        r = np.full((2, 3, 33), value)
        ref = naive.value_projection(x, w, b, 3, r, 3, shared_draws=True)
        assert rel_error(shared_cpu.value_projection(x, w, b, 3, r, 3), ref) < 1e-13
    assert shared_cpu.value_projection(x[:, :0], w, b, 3, np.zeros((2, 3, 0), int), 3).shape == (
        2, 3, 0, 8)


def test_compiled_round_budgets_equal_the_reference():
    rng = np.random.default_rng(2)
    for d_in, slack in ((384, 0.25), (24, 0.5), (64, 0.0), (100, 3.0), (7, 0.1)):
        r = rng.integers(0, d_in + 3, (3, 4, 200))
        r[0, 0] = 0  # all masked
        r[0, 1] = 5 % d_in  # one value
        got = shared.round_budgets(r, d_in, slack)
        assert np.array_equal(got, shared.round_budgets_reference(r, d_in, slack)), (d_in, slack)
        assert np.all(got >= r)  # never fewer samples
        sampled = (r > 0) & (r < d_in)
        assert np.array_equal(got[~sampled], r[~sampled])
        assert np.all(got[sampled] <= np.maximum(np.floor(r[sampled] * (1 + slack)), r[sampled]))


def test_compiled_gemms_are_unbiased_with_mixed_rounded_budgets():
    rng = np.random.default_rng(3)
    x, w, b, r = _problem(rng, n=24)
    r = shared.round_budgets(np.maximum(r // 3, 1), 24, 0.5)
    assert len(np.unique(r)) > 3
    exact = naive.value_projection(x, w, b, 3, np.full_like(r, 24), 0)
    outs = np.stack([shared_cpu.value_projection(x, w, b, 3, r, s) for s in range(500)])
    sem = outs.std(0, ddof=1) / np.sqrt(len(outs))
    varied = sem > 1e-12
    z = (outs.mean(0) - exact)[varied] / sem[varied]
    assert varied.mean() > 0.5
    assert np.abs(z).max() < 5.5 and abs(z.mean()) < 0.1
    # The test has the power to see a 20 % bias (e.g. a weight divided by the wrong budget).
    zb = (1.2 * outs.mean(0) - exact)[varied] / (1.2 * sem[varied])
    assert np.abs(zb).max() > 5.5


def test_reduced_macs_count_the_merged_rows():
    rng = np.random.default_rng(6)
    x, w, _, r = _problem(rng, n=80)
    tables = mca.weight_tables(w, 3)
    nonzero = x.any(-1)
    macs, merge = shared.reduced_macs(r, 24, 8, 4, tables, nonzero)
    sampled = (r > 0) & (r < 24) & nonzero[:, None, :]
    assert 0 < macs <= int(r[sampled].sum()) * 8  # never more than one per draw
    # Uniform budgets: one group per (batch row, head), its rows the distinct first draws.
    uniform = np.full_like(r, 10)
    macs_u, merge_u = shared.reduced_macs(uniform, 24, 8, 4, tables, nonzero)
    want_macs = want_merge = 0
    for b in range(2):
        for h in range(3):
            bits = mrandom.sample_bits(4, np.uint64(naive.SHARED_STREAM_BASE + b * 3 + h),
                                       np.arange(10))
            distinct = np.unique(naive.alias_draw(bits, tables.threshold[h], tables.alias[h],
                                                  tables.shift)).size
            want_macs += int(nonzero[b].sum()) * distinct * 8
            want_merge += distinct * 8
    assert (macs_u, merge_u) == (want_macs, want_merge)
    # The compiled count (what mca.attention reports) equals the reference.
    for budgets in (r, uniform, shared.round_budgets(r, 24, 0.5)):
        assert shared_cpu.reduced_macs(budgets, 24, 8, 4, tables, nonzero) == shared.reduced_macs(
            budgets, 24, 8, 4, tables, nonzero)
