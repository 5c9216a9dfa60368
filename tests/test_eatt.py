"""E-Att (mcattn.eatt): binary codes, selective projection, L1/Hamming attention, op counts."""

import numpy as np
import pytest
from helpers import rel_error

import mcattn
from mcattn import eatt
from mcattn.errors import DTypeError, ShapeError

BACKENDS = ["numpy", "numba"]


def l1_reference(q, k, v, *, mask=None, is_causal=False, scale=None):
    """Float64 E-Att, independent of mcattn: full L1 score matrix, then softmax."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = -scale * np.abs(q[..., :, None, :] - k[..., None, :, :]).sum(-1)
    if mask is not None:
        mask = np.asarray(mask)
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if is_causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    total = p.sum(-1, keepdims=True)
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0) @ v


def hamming_reference(q, k, v, **kwargs):
    """Hamming alignment = L1 alignment of the 0/1 sign codes."""
    return l1_reference((q > 0).astype(float), (k > 0).astype(float), v, **kwargs)


REFERENCES = {"l1": l1_reference, "hamming": hamming_reference}


def _qkv(rng, batch, nq, nk, d, dv, dtype=np.float64):
    return (rng.standard_normal(batch + (nq, d)).astype(dtype),
            rng.standard_normal(batch + (nk, d)).astype(dtype),
            rng.standard_normal(batch + (nk, dv)).astype(dtype))


# ----------------------------------------------------------------------------- codes


@pytest.mark.parametrize("d", [1, 7, 63, 64, 65, 130])
def test_pack_unpack_round_trip_and_bit_order(d):
    rng = np.random.default_rng(d)
    b = rng.random((3, 4, d)) > 0.5
    words = eatt.pack_bits(b)
    assert words.dtype == np.uint64 and words.shape == (3, 4, (d + 63) // 64)
    assert np.array_equal(eatt.unpack_bits(words, d), b)
    # bit i of word w is element 64 w + i
    expected = np.zeros(words.shape, np.uint64)
    for i in np.flatnonzero(b[1, 2]):
        expected[1, 2, i // 64] |= np.uint64(1) << np.uint64(i % 64)
    assert np.array_equal(words[1, 2], expected[1, 2])
    # 0/1 integers and floats pack like booleans; pack(unpack(w)) = w
    assert np.array_equal(eatt.pack_bits(b.astype(np.int8)), words)
    assert np.array_equal(eatt.pack_bits(b.astype(np.float32)), words)
    assert np.array_equal(eatt.pack_bits(eatt.unpack_bits(words, d)), words)


def test_binarize():
    x = np.array([[-1.0, 0.0, 2.5, -0.0, 1e-30]], np.float32)
    b = eatt.binarize(x)
    assert b.dtype == bool and b.tolist() == [[False, False, True, False, True]]


def test_bad_codes_are_refused():
    with pytest.raises(ValueError, match="only 0 and 1"):
        eatt.pack_bits(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        eatt.pack_bits(np.array([0.0, 0.5]))
    with pytest.raises(DTypeError):
        eatt.pack_bits(np.array(["a"]))
    with pytest.raises(ShapeError, match="2 uint64 words"):
        eatt.unpack_bits(np.zeros((3, 1), np.uint64), 70)
    with pytest.raises(DTypeError, match="uint64"):
        eatt.unpack_bits(np.zeros((3, 2), np.int64), 70)
    with pytest.raises(ValueError, match="beyond code 70"):
        eatt.unpack_bits(np.full((1, 2), 2**63, np.uint64), 70)


# ----------------------------------------------------------------------------- projection


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_in,d_out", [(1, 1), (5, 3), (64, 7), (100, 33)])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 1e-6)])
def test_selective_projection_is_a_binary_matmul(backend, d_in, d_out, dtype, tol):
    rng = np.random.default_rng(d_in * d_out)
    b = rng.random((2, 9, d_in)) > 0.5
    w = rng.standard_normal((d_in, d_out)).astype(dtype)
    bias = rng.standard_normal(d_out).astype(dtype)
    ref = b.astype(np.float64) @ w.astype(np.float64) + bias
    for codes in (b, b.astype(np.int32), eatt.pack_bits(b)):  # dense 0/1 and packed
        out = eatt.selective_projection(codes, w, bias, backend=backend)
        assert out.shape == (2, 9, d_out) and out.dtype == dtype
        assert rel_error(out, ref) < tol
    out, info = eatt.selective_projection(b, w, backend=backend, return_info=True)
    assert rel_error(out, b @ w.astype(np.float64)) < tol
    assert info.ops.multiplies == 0
    assert info.ops["select"] == 18 * d_in * d_out
    assert info.ops["fp32_add"] == int(b.sum()) * d_out
    assert info.dense_ops["fp32_mul"] == 18 * d_in * d_out


def test_selective_projection_errors():
    w = np.ones((70, 4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        eatt.selective_projection(np.full((2, 70), 3), w)
    with pytest.raises(ShapeError, match="d_in=70"):
        eatt.selective_projection(np.ones((2, 69), bool), w)
    with pytest.raises(ShapeError, match="2 uint64 words"):
        eatt.selective_projection(np.zeros((2, 3), np.uint64), w)
    with pytest.raises(ValueError, match="beyond code 70"):
        eatt.selective_projection(np.full((2, 2), 2**63, np.uint64), w)
    with pytest.raises(ShapeError, match="bias"):
        eatt.selective_projection(np.ones((2, 70), bool), w, np.ones(3))
    with pytest.raises(DTypeError):
        eatt.selective_projection(np.ones((2, 70), bool), np.ones((70, 4), np.int64))


# ----------------------------------------------------------------------------- scores


def test_l1_and_hamming_scores_match_numpy():
    rng = np.random.default_rng(3)
    q, k, _ = _qkv(rng, (2, 3), 5, 7, 70, 1)
    s = eatt.l1_scores(q, k)
    ref = -np.abs(q[..., :, None, :] - k[..., None, :, :]).sum(-1) / np.sqrt(70)
    assert s.shape == (2, 3, 5, 7) and np.allclose(s, ref, rtol=1e-14, atol=0)
    assert np.allclose(eatt.l1_scores(q, k, scale=0.5), ref * np.sqrt(70) * 0.5, rtol=1e-14)
    qb, kb = eatt.pack_bits(q > 0), eatt.pack_bits(k > 0)
    h = eatt.hamming_scores(qb, kb)
    expected = ((q > 0)[..., :, None, :] != (k > 0)[..., None, :, :]).sum(-1)
    assert h.dtype == np.int64 and np.array_equal(h, expected)
    assert np.array_equal(h, np.bitwise_count(qb[..., :, None, :] ^ kb[..., None, :, :]).sum(-1))
    with pytest.raises(ShapeError, match="same number of words"):
        eatt.hamming_scores(qb, kb[..., :1])
    with pytest.raises(DTypeError, match="uint64"):
        eatt.hamming_scores(q, k)
    with pytest.raises(ValueError, match="positive"):
        eatt.l1_scores(q, k, scale=-1.0)


# ----------------------------------------------------------------------------- attention


SHAPES = {
    "plain": ((2, 3), 11, 13, 8, 5),
    "one-token": ((1,), 1, 1, 4, 3),
    "odd": ((3,), 37, 45, 5, 3),
    "wide": ((1,), 9, 20, 70, 6),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alignment", eatt.ALIGNMENTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_matches_reference(backend, alignment, shape, is_causal):
    batch, nq, nk, d, dv = SHAPES[shape]
    rng = np.random.default_rng(nq * nk + d)
    q, k, v = _qkv(rng, batch, nq, nk, d, dv)
    out = eatt.attention(q, k, v, alignment=alignment, is_causal=is_causal, backend=backend)
    ref = REFERENCES[alignment](q, k, v, is_causal=is_causal)
    assert out.shape == batch + (nq, dv) and out.dtype == np.float64
    assert rel_error(out, ref) < 1e-13
    out32 = eatt.attention(*(a.astype(np.float32) for a in (q, k, v)), alignment=alignment,
                           is_causal=is_causal, backend=backend)
    assert out32.dtype == np.float32 and rel_error(out32, ref) < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alignment", eatt.ALIGNMENTS)
def test_attention_masks_and_fully_masked_rows(backend, alignment):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, (2, 2), 9, 9, 6, 4)
    kpm = rng.random((2, 9)) > 0.4
    kpm[1] = False
    ref_fn = REFERENCES[alignment]
    out = eatt.attention(q, k, v, alignment=alignment, key_padding_mask=kpm, backend=backend)
    assert np.all(out[1] == 0)
    assert rel_error(out, ref_fn(q, k, v, mask=kpm[:, None, None, :])) < 1e-13
    additive = rng.standard_normal((9, 9))
    out = eatt.attention(q, k, v, alignment=alignment, attn_mask=additive, is_causal=True,
                         backend=backend, scale=0.3)
    assert rel_error(out, ref_fn(q, k, v, mask=additive, is_causal=True, scale=0.3)) < 1e-13
    boolean = rng.random((2, 1, 9, 9)) > 0.3
    out = eatt.attention(q, k, v, alignment=alignment, attn_mask=boolean, backend=backend)
    assert rel_error(out, ref_fn(q, k, v, mask=boolean)) < 1e-13


def test_backends_agree_and_hamming_is_l1_of_signs():
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, (2, 4), 33, 40, 16, 8, np.float32)
    for alignment in eatt.ALIGNMENTS:
        a = eatt.attention(q, k, v, alignment=alignment, backend="numpy")
        b = eatt.attention(q, k, v, alignment=alignment, backend="numba")
        assert rel_error(b, a) < 1e-6
    signs = [(x > 0).astype(np.float32) for x in (q, k)]
    assert rel_error(eatt.attention(q, k, v, alignment="hamming"),
                     eatt.attention(*signs, v, alignment="l1")) < 1e-6


def test_real_sample():
    from mcattn.studies.data import load_sample

    sample = load_sample()
    layer = sample.layer(2)
    q, k, v = layer["q"], layer["k"], layer["v"]
    kpm = layer["key_padding_mask"]
    for alignment in eatt.ALIGNMENTS:
        out = eatt.attention(q, k, v, alignment=alignment, key_padding_mask=kpm,
                             scale=sample.scale, backend="numba")
        ref = REFERENCES[alignment](q, k, v, mask=kpm[:, None, None, :], scale=sample.scale)
        assert rel_error(out, ref) < 2e-6
    # A model trained with dot products does not work with L1 alignment swapped in.
    dot = mcattn.attention(q, k, v, key_padding_mask=kpm, scale=sample.scale)
    l1 = eatt.attention(q, k, v, key_padding_mask=kpm, scale=sample.scale)
    assert rel_error(l1, dot) > 0.1


def test_attention_errors():
    q = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="alignment"):
        eatt.attention(q, q, q, alignment="dot")
    with pytest.raises(ValueError, match="positive"):
        eatt.attention(q, q, q, scale=0.0)
    with pytest.raises(ShapeError):
        eatt.attention(q, np.zeros((1, 3, 5)), q)
    with pytest.raises(DTypeError):
        eatt.attention(q.astype(np.int64), q, q)
    with pytest.raises(mcattn.errors.NonFiniteError):
        eatt.attention(q + np.nan, q, q)


# ----------------------------------------------------------------------------- op counts


def test_op_counts_by_hand():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, (1, 1), 3, 5, 4, 2)
    # 15 visible pairs, 3 rows, d = 4, dv = 2
    _, info = eatt.attention(q, k, v, alignment="l1", return_info=True)
    assert dict(info.alignment_ops) == {"fp32_mul": (3 + 5) * 4, "fp32_add": 2 * 15 * 4}
    assert dict(info.ops) == {"fp32_mul": 32 + 15 * 2 + 3 * 2, "fp32_add": 120 + 15 * 4,
                              "fp32_cmp": 15, "fp32_exp": 15, "fp32_div": 3}
    assert info.dense_ops == mcattn.exact.exact_ops(_inputs(q, k, v))
    _, info = eatt.attention(q, k, v, alignment="l1", scale=1.0, return_info=True)
    assert info.alignment_ops.multiplies == 0
    _, info = eatt.attention(q, k, v, alignment="hamming", return_info=True)
    assert dict(info.alignment_ops) == {"fp32_cmp": 32, "bit_xor64": 15, "popcount64": 15,
                                        "int32_add": 15, "fp32_mul": 5}
    # causal: 1 + 2 + 3 pairs
    _, info = eatt.attention(q, k[..., :3, :], v[..., :3, :], is_causal=True, return_info=True)
    assert info.alignment_ops["fp32_add"] == 2 * 6 * 4


def _inputs(q, k, v):
    from mcattn._validate import prepare_attention

    return prepare_attention(q, k, v)


def test_exact_counts_split_into_dot_alignment_and_softmax():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, (2,), 6, 7, 5, 3)
    inp = _inputs(q, k, v)
    split = eatt.alignment_ops("dot", 2 * 42, 12, 14, 5) + eatt.softmax_value_ops(2 * 42, 12, 3)
    assert split == mcattn.exact.exact_ops(inp)


@pytest.mark.parametrize("alignment", eatt.ALIGNMENTS)
def test_layer_matches_composition_and_counts(alignment):
    rng = np.random.default_rng(11)
    batch, n, d_model, heads = 2, 7, 70, 2
    x = rng.standard_normal((batch, n, d_model))
    w_q, w_k = (rng.standard_normal((d_model, 10)) for _ in range(2))
    w_v, w_o = rng.standard_normal((d_model, 12)), rng.standard_normal((12, 5))
    b_q, b_k, b_v, b_o = (rng.standard_normal(s) for s in (10, 10, 12, 5))
    kpm = np.ones((batch, n), bool)
    kpm[1, 5:] = False
    out, info = eatt.layer(x, w_q, w_k, w_v, num_heads=heads, b_q=b_q, b_k=b_k, b_v=b_v,
                           w_o=w_o, b_o=b_o, alignment=alignment, key_padding_mask=kpm,
                           return_info=True)
    b = (x > 0).astype(float)

    def split(t):
        return t.reshape(batch, n, heads, -1).transpose(0, 2, 1, 3)

    ref = REFERENCES[alignment](split(b @ w_q + b_q), split(b @ w_k + b_k), split(x @ w_v + b_v),
                                mask=kpm[:, None, None, :])
    ref = ref.transpose(0, 2, 1, 3).reshape(batch, n, 12) @ w_o + b_o
    assert out.shape == (batch, n, 5) and rel_error(out, ref) < 1e-13
    tokens, ones = batch * n, int(b.sum())
    assert info.alignment_ops["select"] == 2 * tokens * d_model * 10
    sel_adds = 2 * (ones * 10 + tokens * 10)
    if alignment == "l1":  # scaling of q, k rows only: nothing per pair, nothing in projections
        assert info.alignment_ops["fp32_mul"] == 2 * batch * heads * n * 5
    assert info.alignment_ops["fp32_add"] >= sel_adds
    assert info.dense_alignment_ops["fp32_mul"] > 20 * info.alignment_ops["fp32_mul"]
    assert info.energy_ratio < 1
    for backend in BACKENDS:
        again = eatt.layer(x, w_q, w_k, w_v, num_heads=heads, b_q=b_q, b_k=b_k, b_v=b_v, w_o=w_o,
                           b_o=b_o, alignment=alignment, key_padding_mask=kpm, backend=backend)
        assert rel_error(again, ref) < 1e-13


def test_layer_errors():
    x = np.zeros((1, 3, 8))
    w = np.zeros((8, 4))
    with pytest.raises(ShapeError, match="num_heads"):
        eatt.layer(x, w, w, w, num_heads=3)
    with pytest.raises(ShapeError, match="same width"):
        eatt.layer(x, w, np.zeros((8, 2)), w, num_heads=2)
    with pytest.raises(ShapeError, match="x must have shape"):
        eatt.layer(x[0], w, w, w, num_heads=2)
    with pytest.raises(ShapeError, match=r"\[8, width\]"):
        eatt.layer(x, np.zeros((7, 4)), w, w, num_heads=2)


def test_compare_table_says_eatt_needs_training(capsys):
    from mcattn.cli import main

    assert main(["compare", "--methods", "eatt", "--layers", "0", "--repeats", "1",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "eatt needs training" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("eatt ")]
    assert [r[2] for r in rows] == ["l1", "hamming"]
    assert all(float(r[3]) > 0.1 for r in rows)  # large error: untrained


def test_torch_tensors_in_torch_tensors_out():
    from helpers import require

    torch = require("torch")
    x = torch.randn(2, 3, 70)
    b = eatt.binarize(x)
    assert isinstance(b, torch.Tensor) and b.dtype == torch.bool
    words = eatt.pack_bits(b)
    assert isinstance(words, torch.Tensor) and tuple(words.shape) == (2, 3, 2)
    assert bool((eatt.unpack_bits(words, 70) == b).all())
    w = torch.randn(70, 5)
    y = eatt.selective_projection(words, w)
    assert isinstance(y, torch.Tensor) and rel_error(y.numpy(), (b.float() @ w).numpy()) < 1e-6
    q = torch.randn(1, 2, 5, 8)
    out = eatt.attention(q, q, q, alignment="hamming")
    assert isinstance(out, torch.Tensor)
    assert rel_error(out.numpy(), hamming_reference(q.numpy(), q.numpy(), q.numpy())) < 2e-6
    assert eatt.attention(q.half(), q.half(), q.half()).dtype == torch.float16
