"""mca.attention without the [Nq, Nk] probability matrix (mcattn/mca/stream.py): the budgets,
draws and output of the dense definition (mcattn.mca.naive.attention), and memory linear in N."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import rel_error

from mcattn import config, mca
from mcattn._validate import prepare_attention
from mcattn.mca import cpu, grad, naive, stream

PROJECTIONS = {"numba": cpu.value_projection, "numpy": naive.value_projection}


def _problem(seed, batch=2, heads=3, nq=40, nk=40, d=8, d_in=48, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((batch, heads, nq, d)) * 1.5).astype(dtype)
    k = (rng.standard_normal((batch, heads, nk, d)) * 1.5).astype(dtype)
    x = rng.standard_normal((batch, nk, d_in)).astype(dtype)
    w = (rng.standard_normal((d_in, heads * d)) * np.linspace(0.3, 2, d_in)[:, None]).astype(dtype)
    b = rng.standard_normal(heads * d).astype(dtype)
    kpm = np.ones((batch, nk), bool)
    kpm[-1, nk - nk // 4:] = False
    attn_mask = rng.random((batch, 1, nq, nk)) > 0.3
    attn_mask[..., 0] = True
    return q, k, x, w, b, {"kpm": kpm, "attn": attn_mask}


MASKS = {
    "none": lambda m: {},
    "causal": lambda m: {"is_causal": True},
    "padding": lambda m: {"key_padding_mask": m["kpm"]},
    "attn_mask": lambda m: {"attn_mask": m["attn"]},
    "causal+padding": lambda m: {"is_causal": True, "key_padding_mask": m["kpm"]},
}
DRAWS = {"weight": {}, "optimal": {"sampling": "optimal"}, "shared": {"shared_draws": True}}


def _both(q, k, x, w, b, alpha, backend, seed=7, **kw):
    """``(out, budgets)`` of mca.attention and of the dense definition with the same projection."""
    heads = q.shape[1]
    out, info = mca.attention(q, k, x, w, b, num_heads=heads, alpha=alpha, seed=seed,
                              backend=backend, return_info=True, **kw)
    masks = {name: kw[name] for name in ("attn_mask", "key_padding_mask", "is_causal") if name in kw}
    inp = prepare_attention(q, k, k, **masks)
    ref, r = naive.attention(inp, x, w, b, heads, alpha, seed, kw.get("sampling", "weight"),
                             kw.get("shared_draws", False), PROJECTIONS[backend])
    return (out, info.budgets), (ref.reshape(out.shape), r)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("draws", list(DRAWS))
@pytest.mark.parametrize("masks", list(MASKS))
def test_one_block_is_the_dense_definition_bit_for_bit(backend, draws, masks):
    q, k, x, w, b, m = _problem(0, nq=30)  # cross attention: Nq = 30, Nk = 40
    kw = {**DRAWS[draws], **MASKS[masks](m)}
    if "attn_mask" in kw:
        kw["attn_mask"] = kw["attn_mask"][:, :, :30]
    (out, r), (ref, r_ref) = _both(q, k, x, w, b, 1.5, backend, **kw)
    sampled = (r > 0) & (r < 48)
    assert sampled.mean() > 0.2 and (r >= 48).any()  # sampled and exact tokens
    assert np.array_equal(r, r_ref) and np.array_equal(out, ref)


def test_blocks_cover_every_row_once_and_are_never_short(monkeypatch):
    inp = prepare_attention(*(np.zeros((2, 3, n, 4)) for n in (130, 50, 50)))
    monkeypatch.setattr(config, "MCA_BLOCK_ELEMENTS", 1 << 20)
    assert stream.blocks(inp) == [(0, 6, 0, 130)]  # fits: every batch row in one block
    monkeypatch.setattr(config, "MCA_BLOCK_ELEMENTS", 2 * 130 * 50)
    assert stream.blocks(inp) == [(0, 2, 0, 130), (2, 4, 0, 130), (4, 6, 0, 130)]
    for cap, rows in ((1, 16), (40 * 50, 40), (17 * 50, 17)):
        monkeypatch.setattr(config, "MCA_BLOCK_ELEMENTS", cap)
        blocks = stream.blocks(inp)
        for b in range(6):
            mine = [(i0, i1) for b0, b1, i0, i1 in blocks if b0 == b and b1 == b + 1]
            assert mine[0][0] == 0 and mine[-1][1] == 130
            assert all(prev[1] == nxt[0] for prev, nxt in zip(mine[:-1], mine[1:]))
            sizes = [i1 - i0 for i0, i1 in mine]
            assert sizes[:-1] == [rows] * (len(sizes) - 1) and rows <= sizes[-1] < rows + 16
    assert stream.blocks(prepare_attention(*(np.zeros((1, 0, 4)),) * 3)) == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,rows,per_head", [(130, 8, 16, 8), (600, 32, 64, 10)])
def test_blocks_have_the_dense_budgets_and_the_dense_output_to_rounding(monkeypatch, dtype, n, d,
                                                                        rows, per_head):
    """Several blocks per (batch row, head): blocks of 16 rows and of 64 rows at
    a head width of 32. The probabilities are the dense matrix's, so are the budgets and
    draws; BLAS may sum ``A @ V~`` in another order for a block than for the whole matrix
    (the last bit: both happen here), see mcattn.mca.stream."""
    q, k, x, w, b, m = _problem(2, batch=1 + (n < 600), heads=2, nq=n, nk=n - n // 3, d=d,
                                d_in=96, dtype=dtype)
    monkeypatch.setattr(config, "MCA_BLOCK_ELEMENTS", rows * k.shape[-2])
    monkeypatch.setattr(config, "MCA_KEEP_ELEMENTS", 0)  # pass 2 recomputes every block
    assert len(stream.blocks(prepare_attention(q, k, k))) == q.shape[0] * 2 * per_head
    for kw in ({}, {"is_causal": True, "key_padding_mask": m["kpm"]}, {"shared_draws": True},
               {"sampling": "optimal", "attn_mask": m["attn"]}):
        (out, r), (ref, r_ref) = _both(q, k, x, w, b, 3.0, "numba", **kw)
        assert ((r > 0) & (r < 96)).mean() > 0.1
        assert np.array_equal(r, r_ref)
        assert rel_error(out, ref) < (1e-6 if dtype == np.float32 else 1e-14)


def test_rows_with_nothing_visible_are_zero_and_nan_rows_as_dense(monkeypatch):
    q, k, x, w, b, m = _problem(3, nq=20, nk=20)
    attn = np.ones((2, 3, 20, 20), bool)
    attn[0, 1, 5] = False  # query 5 of (0, 1) sees nothing
    q[1, 2, 7, 0] = np.nan  # a NaN row (check_finite=False): zero, as in the dense matrix
    monkeypatch.setattr(config, "MCA_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(config, "MCA_KEEP_ELEMENTS", 0)
    out = mca.attention(q, k, x, w, b, num_heads=3, alpha=1.0, seed=0, attn_mask=attn,
                        check_finite=False)
    inp = prepare_attention(q, k, k, attn_mask=attn, check_finite=False)
    ref, _ = naive.attention(inp, x, w, b, 3, 1.0, 0, projection=cpu.value_projection)
    assert np.all(out[0, 1, 5] == 0) and np.all(out[1, 2, 7] == 0)
    assert rel_error(out, ref.reshape(out.shape)) < 1e-14


def test_training_forward_and_backward_by_blocks(monkeypatch):
    """mca.grad recomputes the probabilities by blocks too: the same output and gradients
    with one block kept between the passes and with blocks of 16 rows recomputed."""
    q, k, x, w, b, m = _problem(4, nq=50, nk=50)
    dout = np.random.default_rng(5).standard_normal((2, 3, 50, 8))
    kw = dict(x=x, w_v=w, b_v=b, alpha=1.5, seed=3, is_causal=True, key_padding_mask=m["kpm"])
    runs = []
    for cap, keep in ((1 << 20, 1 << 22), (1, 0)):
        monkeypatch.setattr(config, "MCA_BLOCK_ELEMENTS", cap)
        monkeypatch.setattr(config, "MCA_KEEP_ELEMENTS", keep)
        out, res = grad.forward(q, k, None, **kw)
        runs.append((out, grad.backward(q, k, None, out, res, dout, **kw)))
    (out1, g1), (out2, g2) = runs
    assert rel_error(out2, out1) < 1e-14
    for name in ("q", "k", "x", "w_v", "b_v"):
        assert rel_error(g2[name], g1[name]) < 1e-13, name


_MEMORY = r"""
import numpy as np
from mcattn import mca
from mcattn.mca import grad

def problem(n):
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((1, 2, n, 16), dtype=np.float32) for _ in range(2))
    x = rng.standard_normal((1, n, 32), dtype=np.float32)
    w = rng.standard_normal((32, 32), dtype=np.float32) / 6
    kpm = np.ones((1, n), bool)
    kpm[:, -n // 8:] = False
    return q, k, x, w, kpm

def calls(q, k, x, w, kpm):
    yield lambda: mca.attention(q, k, x, w, None, num_heads=2, alpha=1.0, seed=0)
    yield lambda: mca.attention(q, k, x, w, None, num_heads=2, alpha=1.0, seed=0, is_causal=True,
                                key_padding_mask=kpm, return_info=True)
    yield lambda: mca.attention(q, k, x, w, None, num_heads=2, alpha=1.0, seed=0, shared_draws=True)
    def train():
        kw = dict(x=x, w_v=w, alpha=1.0, seed=0, key_padding_mask=kpm)
        out, res = grad.forward(q, k, None, **kw)
        return grad.backward(q, k, None, out, res, out, **kw)
    yield train

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field + ":")) / 1024

for call in calls(*problem(256)):  # compile, warm
    call()
growth = []
for call in calls(*problem(4096)):
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # peak := now
    result = call()
    growth.append(status("VmHWM") - before)
    del result
print(*growth)
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_the_probability_matrix():
    """N = 4096, 2 heads, in a fresh process: the probabilities alone would be 128 MiB (the
    base commit's calls grew by 300-1100 MiB); inputs are 1.5 MiB."""
    result = subprocess.run([sys.executable, "-c", _MEMORY], capture_output=True, text=True,
                            check=True)
    growth = [float(g) for g in result.stdout.split()]
    assert len(growth) == 4
    for what, mib, limit in zip(("attention", "causal + padding + info", "shared draws",
                                 "training"), growth, (32, 32, 32, 64)):
        # training: float64 blocks (dA, dS) of 2**20 numbers each, whatever N
        assert mib < limit, f"{what}: peak RSS grew by {mib:.0f} MiB during the call"


def test_small_matrices_are_kept_between_the_passes(monkeypatch):
    q, k, x, w, b, m = _problem(6, nq=40, nk=40)
    inp = prepare_attention(q, k, k)
    monkeypatch.setattr(config, "MCA_BLOCK_ELEMENTS", 16 * 40)
    stats, _ = stream.row_stats(inp)
    assert sorted(stats[2]) == stream.blocks(inp)  # 6 x 2 blocks kept: pass 2 computes none
    monkeypatch.setattr(config, "MCA_KEEP_ELEMENTS", 6 * 40 * 40 - 1)
    assert stream.row_stats(inp)[0][2] is None


def test_causal_visible_keys_of_a_padding_mask_need_no_query_by_key_array():
    """The valid keys and per-row counts of ``is_causal`` with a key padding mask (mask rows
    broadcast): as the [Nq, Nk] formula, without building it (64 MiB of booleans here)."""
    import tracemalloc

    n = 8192
    kpm = np.random.default_rng(7).random((2, n)) > 0.2
    spec = prepare_attention(*(np.zeros((2, 1, n, 1), np.float32),) * 3, key_padding_mask=kpm,
                             is_causal=True).mask
    tracemalloc.start()
    valid, per_row = spec.visible_keys(n, n), spec.allowed_per_row(n, n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.0f} MiB"
    small = prepare_attention(np.zeros((2, 1, 9, 1)), *(np.zeros((2, 1, 7, 1)),) * 2,
                              key_padding_mask=kpm[:, :7], is_causal=True).mask
    finite = kpm[:, None, :7] & (np.arange(7)[None, :] <= np.arange(9)[:, None])[None]  # [2, 9, 7]
    assert np.array_equal(small.visible_keys(9, 7), finite.any(1))
    assert np.array_equal(small.allowed_per_row(9, 7), finite.sum(-1))
    assert np.array_equal(valid, kpm) and np.array_equal(per_row[:, -1], kpm.sum(-1))
