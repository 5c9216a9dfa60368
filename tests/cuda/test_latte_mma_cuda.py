"""LATTE's tensor-core kernel (``mcattn/latte/kernels/latte_mma.cu``, ``config.LATTE_TENSOR_CORES``).

Through the public door (``backend="cupy"``; without a GPU the fake CuPy runs the kernel
on the host shim, whose warps emulate mma.sync from the PTX ISA's layouts):

* kept sets key for key equal to the NumPy reference (:func:`mcattn.latte.naive.keep_rows`)
  and to the Numba CPU kernel, and the kept counts per row; the estimate is an exact
  int8 product, so anything but equality is a bug;
* the output against float64 LATTE on the same kept sets with v rounded to the 16-bit
  type (the kernel rounds v and the probabilities): what remains is the probabilities'
  rounding, 0.07-0.19 unit roundoffs u of the type, relative (Frobenius), on the grid
  and mask cases (docs/measurements/latte-mma-shim-errors.txt) and 0.32 u on the
  block-diagonal inputs of the skip test (a few keys of similar weight per row), held to
  0.5 u as the exact and E-Att kernels; and at least 0.2 u from the unrounded answer
  (measured 0.42-0.47 u; float32 would be ~1e-4 u: the 16-bit path really ran);
* tiles with no kept key are skipped: the kernel's counts of (query block, key tile)
  pairs computed equal the number of 64 x 64 blocks of the reference kept mask with a
  kept key.

Shapes are small (the shim runs 128 host threads a block).
"""

import numpy as np
import pytest
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import latte
from mcattn.latte import naive

pytestmark = pytest.mark.hostshim

UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def _round(a, precision):
    if precision == "float16":
        return a.astype(np.float16).astype(np.float64)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return a.astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.fixture
def knob():
    saved = mcattn.config.LATTE_TENSOR_CORES
    yield
    mcattn.config.LATTE_TENSOR_CORES = saved


def _launched(before):
    import fake_cupy

    return [r["kernel"] for r in fake_cupy.LAUNCHES[before:] if r["kernel"].startswith("mcattn_latte")]


def _launch_count():
    if GPU_PRESENT:
        return 0
    import fake_cupy

    return len(fake_cupy.LAUNCHES)


def _on_gpu(cp, precision, q, k, v, threshold, mode, **mask):
    """(out, kept mask, kept counts per row, tile counts) of the tensor-core kernel."""
    from mcattn.latte import cupy as latte_cupy
    from mcattn.latte._inputs import prepare_latte

    put = {n: cp.asarray(m) if isinstance(m, np.ndarray) else m for n, m in mask.items()}
    thr = cp.asarray(threshold) if isinstance(threshold, np.ndarray) else threshold
    qc, kc, vc = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    before = _launch_count()
    mcattn.config.LATTE_TENSOR_CORES = precision
    try:
        out = latte.attention(qc, kc, vc, threshold=thr, mode=mode, backend="cupy", **put)
        tiles = latte_cupy.last_tile_counts()
        keep = latte.kept_mask(qc, kc, threshold=thr, mode=mode, backend="cupy", **put)
        lat = prepare_latte(qc, kc, vc, threshold=thr, mode=mode, attn_mask=put.get("attn_mask"),
                            key_padding_mask=put.get("key_padding_mask"),
                            is_causal=put.get("is_causal", False), scale=put.get("scale"),
                            exact_scores="int8", check_finite=True, want_mass=False)
        assert latte_cupy.tensor_cores(lat) == precision
        _, kept_rows, _ = latte_cupy.forward(lat)
    finally:
        mcattn.config.LATTE_TENSOR_CORES = None
    if not GPU_PRESENT:
        tag = {"float16": "f16", "bfloat16": "bf16"}[precision]
        name = f"mcattn_latte_mma_forward_{tag}_d{q.shape[-1]}"
        assert _launched(before) == [name] * 3
    return out.get(), keep.get(), kept_rows.get(), tiles


def _check(cp, precision, q, k, v, threshold, mode="relative", **mask):
    out, keep, kept_rows, tiles = _on_gpu(cp, precision, q, k, v, threshold, mode, **mask)
    ref_keep = latte.kept_mask(q, k, threshold=threshold, mode=mode, backend="numpy", **mask)
    cpu_keep = latte.kept_mask(q, k, threshold=threshold, mode=mode, backend="numba", **mask)
    assert np.array_equal(ref_keep, cpu_keep)
    assert np.array_equal(keep, ref_keep)  # key for key
    assert np.array_equal(kept_rows.reshape(ref_keep.shape[:-1]), ref_keep.sum(-1))
    # float64 LATTE on the same q, k (the same int8 values and kept sets) and rounded v
    f64 = {n: (m.astype(np.float64) if isinstance(m, np.ndarray) and m.dtype == np.float32 else m)
           for n, m in mask.items()}
    ref = latte.attention(q.astype(np.float64), k.astype(np.float64), _round(v, precision),
                          threshold=threshold, mode=mode, backend="numpy", **f64)
    u = UNIT[precision]
    err = rel_error(out, ref)
    assert err < 0.5 * u, err / u
    assert np.abs(out - ref).max() < 4 * u * np.abs(v).max()
    unrounded = latte.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                threshold=threshold, mode=mode, backend="numpy", **f64)
    far = rel_error(out, unrounded)
    assert far > 0.2 * u  # the 16-bit path ran
    return {"err": err / u, "unrounded": far / u, "keep": ref_keep, "tiles": tiles}


def _nonempty_tiles(keep):
    """(query block of 64, key tile of 64) pairs of a kept mask ``[..., Nq, Nk]`` with a kept key."""
    nq, nk = keep.shape[-2:]
    flat = keep.reshape(-1, nq, nk)
    return sum(int(flat[:, i:i + 64, j:j + 64].any(axis=(1, 2)).sum())
               for i in range(0, nq, 64) for j in range(0, nk, 64))


CASES = [(m, d, p) for m in ("relative", "absolute") for d in (32, 64) for p in ("float16", "bfloat16")]
CASES += [("relative", 128, "float16"), ("absolute", 128, "bfloat16")]  # d = 128 twice: the shim is slow


def grid_case(mode, d):
    """q, k, v, per-head thresholds of the main grid: Nq = 70, Nk = 130 (neither a multiple of
    the 64-row block or the 64-key tile)."""
    rng = np.random.default_rng(d + len(mode))
    q = rng.standard_normal((1, 2, 70, d)).astype(np.float32) * 1.5
    k = rng.standard_normal((1, 2, 130, d)).astype(np.float32) * 1.5
    v = rng.standard_normal((1, 2, 130, d)).astype(np.float32)
    theta = np.array([2.0, 4.0]) if mode == "relative" else np.array([0.5, 1.5])
    return q, k, v, theta


def mask_cases():
    """(label, q, k, v, threshold, mask arguments) with masks, causal, Nq != Nk, keep-all."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 1, 75, 32)).astype(np.float32) * 2
    k = rng.standard_normal((2, 1, 90, 32)).astype(np.float32) * 2
    v = rng.standard_normal((2, 1, 90, 32)).astype(np.float32)
    kpm = rng.random((2, 90)) > 0.3
    additive = rng.standard_normal((2, 1, 75, 90)).astype(np.float32)
    additive[0, 0, 4] = -np.inf  # a row with no visible key: zeros
    additive[1, 0, :, 7] = 0.0
    return [("padding", q, k, v, 3.0, {"key_padding_mask": kpm}),
            ("causal Nq<Nk", q, k, v, 3.0, {"is_causal": True}),
            ("causal Nq>Nk", k[:, :, :80], q, v[:, :, :75], 3.0, {"is_causal": True}),
            ("bias", q, k, v, 2.0, {"attn_mask": additive, "scale": 0.3}),
            ("keep all", q, k, v, np.inf, {})]


@pytest.mark.parametrize("mode,d,precision", CASES)
def test_kept_sets_key_for_key_and_output(cupy_or_fake, knob, precision, d, mode):
    q, k, v, theta = grid_case(mode, d)
    keep = _check(cupy_or_fake, precision, q, k, v, theta, mode)["keep"]
    assert 0.02 < keep.mean() < 0.9  # the filter kept some keys and dropped others


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_masks_causal_and_sizes(cupy_or_fake, knob, precision):
    for _, q, k, v, theta, mask in mask_cases():
        _check(cupy_or_fake, precision, q, k, v, theta, **mask)


def test_a_fully_padded_sequence_gives_zeros(cupy_or_fake, knob):
    cp = cupy_or_fake
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 1, 40, 32)).astype(np.float32) for _ in range(3))
    kpm = np.ones((2, 40), bool)
    kpm[1] = False
    out, keep, kept_rows, _ = _on_gpu(cp, "float16", q, k, v, 2.0, "relative", key_padding_mask=kpm)
    assert np.all(out[1] == 0) and not keep[1].any() and np.all(kept_rows.reshape(2, 40)[1] == 0)
    assert np.all(np.isfinite(out)) and keep[0].any()


def test_real_attention(cupy_or_fake, knob):
    """Two MiniLM sequences of layer 3 (head dim 32, padded keys), thresholds calibrated to
    keep 95 % of the attention mass per head."""
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = (a[3, :2].astype(np.float32) for a in (s.q, s.k, s.v))
    assert q.shape[-1] == 32
    kpm = s.key_padding_mask[:2]
    theta = latte.calibrate(q, k, target_mass=0.95, key_padding_mask=kpm, scale=s.scale)
    keep = _check(cupy_or_fake, "float16", q, k, v, np.asarray(theta, np.float64),
                  key_padding_mask=kpm, scale=s.scale)["keep"]
    assert keep.sum() < 0.9 * np.broadcast_to(kpm[:, None, None, :], keep.shape).sum()


def block_diagonal_case():
    """q, k, v ``[1, 1, 160, 32]``: the tokens of each 64-token block near one direction of three."""
    rng = np.random.default_rng(9)
    n, d = 160, 32
    centres = rng.standard_normal((3, d)).astype(np.float32) * 3
    q = (centres[np.arange(n) // 64] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)[None, None]
    k = (centres[np.arange(n) // 64] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)[None, None]
    v = rng.standard_normal((1, 1, n, d)).astype(np.float32)
    return q, k, v


def test_tiles_with_no_kept_key_are_skipped(cupy_or_fake, knob):
    """Block-diagonal attention (queries and keys of each 64-token block share a direction):
    the kernel computes exactly the tiles whose 64 x 64 block of the kept mask has a kept key."""
    cp = cupy_or_fake
    q, k, v = block_diagonal_case()
    r = _check(cp, "float16", q, k, v, 8.0)
    assert r["tiles"] == (9, _nonempty_tiles(r["keep"]))
    assert r["tiles"][1] == 3  # the diagonal
    assert _check(cp, "float16", q, k, v, np.inf)["tiles"] == (9, 9)


def test_the_tensor_core_kernel_runs_only_where_it_applies(cupy_or_fake, knob):
    """topk, safe, float kept scores, dropped mass, float64, head dim 48 or d != dv: latte.cu."""
    from mcattn.latte import cupy as latte_cupy
    from mcattn.latte._inputs import prepare_latte

    cp = cupy_or_fake
    rng = np.random.default_rng(5)
    q, k, v = (cp.asarray(rng.standard_normal((1, 1, 20, 32)).astype(np.float32)) for _ in range(3))

    def lat(q=q, k=k, v=v, mode="relative", exact_scores="int8", want_mass=False):
        return prepare_latte(q, k, v, threshold=4 if mode == "topk" else 1.0, mode=mode, attn_mask=None,
                             key_padding_mask=None, is_causal=False, scale=None,
                             exact_scores=exact_scores, check_finite=True, want_mass=want_mass)

    mcattn.config.LATTE_TENSOR_CORES = "bfloat16"
    assert latte_cupy.tensor_cores(lat()) == "bfloat16"
    assert latte_cupy.tensor_cores(lat(mode="absolute")) == "bfloat16"
    for off in (lat(mode="topk"), lat(mode="safe"), lat(exact_scores="float"), lat(want_mass=True),
                lat(q=q.astype(np.float64), k=k.astype(np.float64), v=v.astype(np.float64)),
                lat(q=q[..., :16], k=k[..., :16], v=v[..., :16]), lat(v=v[..., :16])):
        assert latte_cupy.tensor_cores(off) is None
    assert latte_cupy.tensor_cores(lat(v=v[..., :16]), do_output=False) == "bfloat16"  # kept sets only
    if not GPU_PRESENT:
        before = _launch_count()
        latte.attention(q, k, v, threshold=4, mode="topk", backend="cupy")
        latte.attention(q, k, v, threshold=1.0, backend="cupy", return_info=True)  # dropped mass
        assert _launched(before) == ["mcattn_latte_forward_f32"] * 2
    mcattn.config.LATTE_TENSOR_CORES = "float8"
    with pytest.raises(mcattn.errors.ConfigError):
        latte_cupy.tensor_cores(lat())
    mcattn.config.LATTE_TENSOR_CORES = None
    assert latte_cupy.tensor_cores(lat()) is None


def test_skip_count_is_checked_against_a_different_mask():
    """The tile counter of the skip test can fail: a mask shifted by one tile differs."""
    keep = np.zeros((1, 1, 160, 160), bool)
    for b in range(3):
        keep[..., 64 * b:64 * b + 64, 64 * b:64 * b + 64] = True
    assert _nonempty_tiles(keep) == 3
    assert _nonempty_tiles(np.roll(keep, 1, axis=-1)) == 6  # one column more per block row
    assert naive.MODES["relative"] == 0 and naive.MODES["absolute"] == 1  # the kernel's mode codes


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_has_the_int8_and_16_bit_mma(arch):
    """Each kernel: the estimate and kept scores on mma.sync m16n8k32 s8, P V on m16n8k16."""
    from cuda_compile import nvrtc_compile

    ptx = nvrtc_compile("latte/kernels/latte_mma.cu", arch)
    for tag in ("f16", "bf16"):
        for d in (32, 64, 128):
            body = ptx[ptx.index(f".entry mcattn_latte_mma_forward_{tag}_d{d}("):]
            body = body[:body.find(".entry", 10)] if ".entry" in body[10:] else body
            assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in body
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{tag}.{tag}.f32" in body


def near_tie_case():
    """Two keys whose estimates round to the same float32 but differ in float64.

    Query rows ``[1, 0, ...]`` (hi nibble 7 on dim 0); key A ``[48 / 127, 1] * M_A`` (int8
    ``[48, 127]``, hh = 21), key B ``[16 / 127, 1] * M_B`` (hh = 7) with ``M_B`` near 3 M_A,
    searched so that ``float32(21) * 256 s_A == float32(7) * 256 s_B`` (what the kernel's
    float32 pre-test computes) while ``21 s_A != 7 s_B`` in float64: the cut equals the
    larger, and only the float64 comparison drops the other. Filler keys have hh = 0.
    """
    rng = np.random.default_rng(12)
    d, nk = 32, 70
    for _ in range(4000):
        m_a = np.float32(rng.uniform(1.0, 2.0))
        m_b = np.float32(3 * m_a) + np.float32(rng.integers(-40, 41)) * np.spacing(np.float32(3 * m_a))
        k = np.zeros((nk, d), np.float32)
        k[:, 1] = 1.0
        k[5, :2] = [48 / 127 * m_a, m_a]
        k[66, :2] = [16 / 127 * m_b, m_b]
        k8, s = naive.quantize_rows(k)
        if k8[5, 0] != 48 or k8[66, 0] != 16:
            continue
        sa, sb = np.float32(256) * s[5, 0], np.float32(256) * s[66, 0]
        fa, fb = np.float32(21) * sa, np.float32(7) * sb
        ua, ub = 21 * np.float64(sa), 7 * np.float64(sb)
        if fa == fb and ua != ub:
            q = np.zeros((1, 1, 3, d), np.float32)
            q[..., 0] = 1.0
            v = rng.standard_normal((1, 1, nk, d)).astype(np.float32)
            return q, k[None, None], v
    raise AssertionError("no near tie found")


@pytest.mark.parametrize("mode,theta", [("relative", 0.0), ("absolute", 1e30)])
def test_float32_pre_test_defers_near_ties_to_float64(cupy_or_fake, knob, mode, theta):
    """The cut is the row maximum; the other key of the near tie rounds to it in float32 and
    must still be dropped (a kernel keeping float32 ties keeps both)."""
    q, k, v = near_tie_case()
    keep = _check(cupy_or_fake, "float16", q, k, v, theta, mode)["keep"]
    assert keep.sum(-1).tolist() == [[[1, 1, 1]]]
