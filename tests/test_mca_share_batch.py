"""MCA's shared draws with ``share="batch"``: one draw sequence per head for every batch row
(mcattn.mca.naive reference, mcattn.mca.shared_cpu compiled pieces)."""

import numpy as np
import pytest
from helpers import rel_error

import mcattn
from mcattn import config, mca
from mcattn import random as mrandom
from mcattn.errors import BackendError
from mcattn.mca import bounds, naive, shared, shared_cpu


def _problem(rng, batch=3, heads=3, n=40, d_in=24, dh=8):
    x = rng.standard_normal((batch, n, d_in))
    w = rng.standard_normal((d_in, heads * dh)) / np.sqrt(d_in)
    b = rng.standard_normal(heads * dh) * 0.1
    r = rng.integers(0, d_in + 6, (batch, heads, n))  # masked, sampled and exact tokens
    x[1, 3] = 0.0  # a zero input row: exactly the bias
    return x, w, b, r


def test_reference_is_one_prefix_sequence_per_head_for_the_whole_batch():
    rng = np.random.default_rng(0)
    x, w, b, r = _problem(rng)
    ref = naive.value_projection(x, w, b, 3, r, 17, shared_draws=True, share="batch")
    tables = naive.weight_tables(w, 3)
    w64 = w.reshape(24, 3, 8)
    for bb, h, j in ((0, 0, 5), (2, 1, 7), (1, 2, 30), (2, 2, 39)):
        rj = int(r[bb, h, j])
        if not 0 < rj < 24:
            continue
        bits = mrandom.sample_bits(17, np.uint64(naive.SHARED_BATCH_STREAM_BASE + h), np.arange(rj))
        k = naive.alias_draw(bits, tables.threshold[h], tables.alias[h], tables.shift)
        want = b.reshape(3, 8)[h] + (x[bb, j, k] / tables.p_weight[h, k]) @ w64[k, h] / rj
        assert np.allclose(ref[bb, h, j], want, rtol=1e-12, atol=1e-12)
    # Draws differ from share="row" (another stream), the masked keys get the bias.
    row = naive.value_projection(x, w, b, 3, r, 17, shared_draws=True)
    sampled = (r > 0) & (r < 24)
    assert rel_error(ref[sampled], row[sampled]) > 0.1
    assert np.array_equal(ref[r <= 0], np.broadcast_to(b.reshape(3, 1, 8), r.shape + (8,))[r <= 0])


def test_equal_tokens_of_different_sequences_get_equal_estimates():
    rng = np.random.default_rng(1)
    x, w, b, r = _problem(rng)
    x[2, 11] = x[0, 4]
    r[2, :, 11] = r[0, :, 4] = 9
    batch = shared_cpu.value_projection(x, w, b, 3, r, 5, share="batch")
    row = shared_cpu.value_projection(x, w, b, 3, r, 5)
    assert rel_error(batch[2, :, 11], batch[0, :, 4]) < 1e-14  # the same draws
    assert rel_error(row[2, :, 11], row[0, :, 4]) > 1e-3  # another sequence per row


@pytest.mark.parametrize("piece", [1, 3, 64])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_pieces_equal_the_reference(monkeypatch, piece, dtype):
    monkeypatch.setattr(shared_cpu, "BATCH_PIECE", piece)
    rng = np.random.default_rng(piece)
    x, w, b, r = _problem(rng)
    r = naive.shared_budgets(r, 24, False, shared.round_budgets, "batch")
    ref = naive.value_projection(x, w, b, 3, r, 17, shared_draws=True, share="batch")
    out = shared_cpu.value_projection(*(a.astype(dtype) for a in (x, w, b)), 3, r, 17, share="batch")
    assert out.dtype == dtype and out.shape == ref.shape and out.flags.c_contiguous
    assert rel_error(out, ref) < (1e-13 if dtype == np.float64 else 3e-6)
    no_bias = shared_cpu.value_projection(x, w, None, 3, r, 17, share="batch")
    want = naive.value_projection(x, w, None, 3, r, 17, shared_draws=True, share="batch")
    assert rel_error(no_bias, want) < 1e-13
    outs = []
    for threads in (1, 2):  # one task per head: the threads do not change a bit
        monkeypatch.setattr(config, "NUM_THREADS", threads)
        outs.append(shared_cpu.value_projection(x, w, b, 3, r, 17, share="batch"))
    assert np.array_equal(outs[0], outs[1])


def test_backends_and_knob_checks():
    rng = np.random.default_rng(2)
    x, w, b, r = _problem(rng, n=5)  # short sequences: still the reduced GEMMs (15 tokens)
    ref = naive.value_projection(x, w, b, 3, r, 3, shared_draws=True, share="batch")
    for backend in ("numba", "numpy"):
        got = mca.value_projection(x, w, b, num_heads=3, budgets=r, seed=3, shared_draws=True,
                                   share="batch", backend=backend)
        assert rel_error(got, ref) < 1e-13, backend
    with pytest.raises(BackendError):
        mca.value_projection(x, w, b, num_heads=3, budgets=r, seed=3, shared_draws=True,
                             share="batch", backend="cuda")
    with pytest.raises(ValueError, match="needs shared_draws=True"):
        mca.value_projection(x, w, b, num_heads=3, budgets=r, seed=3, share="batch")
    with pytest.raises(ValueError, match="share must be one of"):
        mca.value_projection(x, w, b, num_heads=3, budgets=r, seed=3, shared_draws=True,
                             share="head")
    assert mca.value_projection(x[:0], w, b, num_heads=3, budgets=r[:0], seed=3, shared_draws=True,
                                share="batch").shape == (0, 3, 5, 8)


def test_rounding_is_per_head_across_the_batch():
    rng = np.random.default_rng(3)
    r = rng.integers(0, 400, (4, 2, 100))
    got = naive.shared_budgets(r, 384, False, shared.round_budgets, "batch")
    one = shared.round_budgets(r.transpose(1, 0, 2).reshape(1, 2, 400), 384, 0.25)
    assert np.array_equal(got, one.reshape(2, 4, 100).transpose(1, 0, 2))
    assert np.all(got >= r)
    for h in range(2):  # few distinct values per head over the whole batch
        assert len(np.unique(got[:, h])) < len(np.unique(r[:, h])) / 3


def test_batch_shared_draws_are_unbiased():
    rng = np.random.default_rng(4)
    x, w, b, r = _problem(rng, n=24)
    r = naive.shared_budgets(np.maximum(r // 3, 1), 24, False, shared.round_budgets, "batch")
    assert len(np.unique(r)) > 3
    exact = naive.value_projection(x, w, b, 3, np.full_like(r, 24), 0)
    outs = np.stack([shared_cpu.value_projection(x, w, b, 3, r, s, share="batch")
                     for s in range(500)])
    sem = outs.std(0, ddof=1) / np.sqrt(len(outs))
    varied = sem > 1e-12
    z = (outs.mean(0) - exact)[varied] / sem[varied]
    assert varied.mean() > 0.5
    assert np.abs(z).max() < 5.5 and abs(z.mean()) < 0.1
    zb = (1.2 * outs.mean(0) - exact)[varied] / (1.2 * sem[varied])  # power: a 20 % bias is seen
    assert np.abs(zb).max() > 5.5
    # Each token's variance is that of r_j independent draws (the bound's s_j^2 estimates it).
    var_row = np.stack([shared_cpu.value_projection(x, w, b, 3, r, s) for s in range(500)]).var(0)
    ratio = outs.var(0)[varied].sum() / var_row[varied].sum()
    assert 0.85 < ratio < 1.15


def _piece_macs(r1, seed, tables, piece, dh):
    """The pieces' multiply-adds recomputed in Python from the plan."""
    plan = shared_cpu.make_plan(r1, seed, tables, naive.SHARED_BATCH_STREAM_BASE)
    total = 0
    for h in range(r1.shape[1]):
        g0, g1 = plan.group_ptr[h], plan.group_ptr[h + 1]
        gof = plan.group_of[0, h]
        widths = np.concatenate([np.full((gof == g).sum(), plan.width[g0 + g]) for g in range(g1 - g0)]
                                or [np.zeros(0, int)])
        for lo in range(0, widths.size, piece):
            part = widths[lo:lo + piece]
            total += part.size * int(part.max()) * dh
    return total


def test_op_count_is_what_the_pieces_multiply(monkeypatch):
    monkeypatch.setattr(shared_cpu, "BATCH_PIECE", 8)
    rng = np.random.default_rng(6)
    x, w, _, r = _problem(rng, n=60)
    r = naive.shared_budgets(r, 24, False, shared.round_budgets, "batch")
    x[1, 3] = 0.5  # every row nonzero: the recount below does not skip zero rows
    tables = mca.weight_tables(w, 3)
    macs, merge = shared_cpu.reduced_macs(r, 24, 8, 4, tables, x.any(-1), "batch")
    _, r1 = naive.batch_as_one_row(x, r)
    assert macs == _piece_macs(r1, 4, tables, 8, 8)
    useful, _ = shared.reduced_macs(r, 24, 8, 4, tables, x.any(-1), "batch")  # merged, no zeros
    sampled = (r > 0) & (r < 24)
    assert useful <= macs <= int(r[sampled].sum()) * 8
    assert 0 < merge <= int(r[sampled].sum())


def test_attention_on_real_attention_bound_and_info(sample):
    layer, heads = 4, sample.num_heads
    q, k, x = sample.q[layer], sample.k[layer], sample.x[layer]
    w, b, kpm = sample.w_v[layer], sample.b_v[layer], sample.key_padding_mask
    v = (x @ w + b).reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
    exact = mcattn.attention(*(np.asarray(a, np.float64) for a in (q, k, v)), key_padding_mask=kpm,
                             scale=sample.scale)
    rows = np.broadcast_to(kpm[:, None, :], exact.shape[:-1])
    probs = mcattn.attention_probs(q, k, key_padding_mask=kpm, scale=sample.scale)
    plain = mca.budgets(probs, 0.4, x.shape[-1], key_padding_mask=kpm)
    errors, covered, total = [], 0, 0
    for seed in range(4):
        out, info = mca.attention(q, k, x, w, b, num_heads=heads, alpha=0.4, key_padding_mask=kpm,
                                  scale=sample.scale, seed=seed, shared_draws=True, share="batch",
                                  return_info=True)
        err = np.linalg.norm(out - exact, axis=-1)
        errors.append(err[rows].mean())
        ok = rows & (err > 0)
        covered += int((info.posterior.row[ok] >= err[ok]).sum())
        total += int(ok.sum())
    assert info.share == "batch" and info.shared_draws and 0 < info.macs_kept < 1
    assert np.all(info.budgets >= plain) and np.any(info.budgets > plain)
    assert np.array_equal(info.budgets, naive.shared_budgets(plain, x.shape[-1], False,
                                                             shared.round_budgets, "batch"))
    assert covered / total >= 0.95  # the shared-draw bound (Minkowski over tokens) still covers
    theorem = bounds.alpha_error_bound(x, w, heads, 0.4, key_padding_mask=kpm)
    assert np.mean(errors) < theorem.mean()
    # info.ops prices the pieces: as many multiply-adds as the compiled count says.
    tables = mca.weight_tables(w, heads)
    macs, _ = shared_cpu.reduced_macs(info.budgets, x.shape[-1], 32, info.seed,
                                      tables, x.any(-1), "batch")
    exact_macs = int(((info.budgets >= x.shape[-1]) & x.any(-1)[:, None, :]).sum()) * x.shape[-1] * 32
    assert info.projection_ops["fp32_add"] == macs + exact_macs
    # Through the front door too (the knob of use_method and compare).
    front = mcattn.attention(q, k, method="mca", x=x, w_v=w, b_v=b, alpha=0.4, seed=info.seed,
                             shared_draws=True, share="batch", key_padding_mask=kpm,
                             scale=sample.scale)
    assert np.array_equal(front, out)


@pytest.fixture(scope="module")
def sample():
    from mcattn.studies.data import load_sample

    return load_sample()


def test_training_forward_uses_the_same_draws():
    from mcattn.mca import grad

    rng = np.random.default_rng(7)
    q, k = (rng.standard_normal((3, 2, 30, 8)) for _ in range(2))
    x = rng.standard_normal((3, 30, 24))
    w = rng.standard_normal((24, 16)) / 5
    kpm = np.ones((3, 30), bool)
    kpm[1, 20:] = False
    kw = dict(alpha=0.5, seed=4, shared_draws=True, share="batch", key_padding_mask=kpm)
    out = mca.attention(q, k, x, w, num_heads=2, **kw)
    fwd, (_, values, c) = grad.forward(q, k, x=x, w_v=w, **kw)
    assert rel_error(fwd, out) < 1e-13
    row, _ = grad.forward(q, k, x=x, w_v=w, **dict(kw, share="row"))
    assert rel_error(row, out) > 1e-3  # other draws
