"""LATTE's hard-mask backward on tensor cores (``mcattn/latte/kernels/latte_mma_backward.cu``).

Through the public door: :func:`mcattn.latte.grad.backward` on CuPy arrays with
``config.LATTE_TENSOR_CORES`` (without a GPU the fake CuPy runs both passes on the host
shim, whose warps emulate mma.sync from the PTX ISA's layouts). Two float64 references:

* :func:`rounded_gradients`: the same kept sets and int8 scores, with q, k, v, dO rounded
  to the 16-bit type after the quantisation (as the kernels round them), so what remains
  is the rounding of P and dS; the error over the size of the products (``|dS| |K|``,
  ``|dS|^T |Q|``, ``P^T |dO|``: a gradient can be far smaller than them, since
  ``sum_j dS_ij = 0``) measured 0.04-0.34 unit roundoffs u of the type, held to 0.5 u;
* :func:`host_gradients`: ``latte.grad.backward`` with backend ``numpy`` on float64 q, k (the
  same int8 values, so the same kept sets) and v, dO rounded: relative (Frobenius) error
  0.27-0.67 u, held to 1 u, except where the rounding of q and k itself moves the
  gradient (block-diagonal inputs, dq cancels: 5.9 u; float kept scores of q, k x 3:
  up to 3.8 u), held to 8 u; and at least 0.05 u there (float32 would be ~1e-4 u: the
  16-bit path ran).

Figures: ``benchmarks/latte_mma_backward_shim_errors.py``,
``docs/measurements/latte-mma-backward-shim-errors.txt``. Every case also asserts the two
launches and that the (block, tile) pairs the kernels computed are those of the
reference kept mask with a kept key (tiles with none are skipped).
"""

import dataclasses

import numpy as np
import pytest
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import latte
from mcattn.latte import grad, naive

pytestmark = pytest.mark.hostshim

UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
#: The bound on each gradient's relative error, in units u (measured up to 0.41 u).
BOUND = 0.5
#: The bound against the public float64 backward (latte.grad.backward, backend numpy),
#: relative (Frobenius): 1 u, but 8 u where the input rounding itself moves the
#: gradient (measured 5.9 u on the block-diagonal case, where dq = sum_j dS_ij k_j cancels
#: over similar keys, and up to 3.8 u with float kept scores of q, k x 3, where the
#: rounding of q and k moves the scores, so P, themselves).
HOST_BOUND = {"blockdiag": 8.0, "float scores": 8.0}


def _launch_count():
    if GPU_PRESENT:
        return 0
    import fake_cupy

    return len(fake_cupy.LAUNCHES)


def _launched(before):
    import fake_cupy

    return [r["kernel"] for r in fake_cupy.LAUNCHES[before:] if r["kernel"].startswith("mcattn_latte")]


def _blocks(keep, rows, cols):
    """The (block of ``rows``, tile of ``cols``) pairs of ``keep [..., Nq, Nk]`` holding a kept key."""
    nq, nk = keep.shape[-2:]
    flat = keep.reshape(-1, nq, nk)
    return sum(int(flat[:, i:i + rows, j:j + cols].any(axis=(1, 2)).sum())
               for i in range(0, nq, rows) for j in range(0, nk, cols))


def tile_gradients(cp, precision, q, k, v, dout, threshold, **kw):
    """latte.grad.backward on the tensor-core kernels: (grads on the host, tile counts)."""
    from mcattn.latte import cupy as latte_cupy

    put = {n: cp.asarray(m) if isinstance(m, np.ndarray) else m for n, m in kw.items()}
    args = [cp.asarray(a) for a in (q, k, v)]
    before = _launch_count()
    saved = mcattn.config.LATTE_TENSOR_CORES
    mcattn.config.LATTE_TENSOR_CORES = precision
    try:
        grads = grad.backward(*args, None, (), cp.asarray(dout), threshold=threshold,
                              backend="cupy", **put)
        tiles = latte_cupy.last_backward_tile_counts()
    finally:
        mcattn.config.LATTE_TENSOR_CORES = saved
    if not GPU_PRESENT:
        tag = {"float16": "f16", "bfloat16": "bf16"}[precision]
        d = q.shape[-1]
        assert _launched(before) == [f"mcattn_latte_mma_backward_dq_{tag}_d{d}",
                                     f"mcattn_latte_mma_backward_dkdv_{tag}_d{d}"]
    return {n: grads[n].get() for n in "qkv"}, tiles


def _round(a, precision):
    if precision == "float16":
        return a.astype(np.float16).astype(np.float64)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return a.astype(ml_dtypes.bfloat16).astype(np.float64)


def host_gradients(q, k, v, dout, threshold, precision, **kw):
    """The float64 host backward (NumPy) on the same q, k (so the same int8 values and kept
    sets) and on v, dout rounded to the 16-bit type (as the kernels round them)."""
    f64 = {n: (m.astype(np.float64) if isinstance(m, np.ndarray) and m.dtype == np.float32 else m)
           for n, m in kw.items()}
    a64 = [q.astype(np.float64), k.astype(np.float64), _round(v, precision)]
    grads = grad.backward(*a64, None, (), _round(dout, precision), threshold=threshold,
                          backend="numpy", **f64)
    return {n: grads[n] for n in "qkv"}


def rounded_gradients(q, k, v, dout, threshold, precision, **kw):
    """Float64 hard-mask gradients with the kept sets and int8 scores of q, k and the
    operands the kernels round (q, k, v, dO) rounded: :func:`naive.reference_backward` on
    inputs whose float arrays are rounded after the int8 quantisation (so the kept sets and,
    with int8 scores, P are those of the unrounded inputs; float scores use the rounded q, k
    as the kernels do). What remains is the rounding of P and dS."""
    from mcattn.latte._inputs import prepare_latte

    f64 = {n: (m.astype(np.float64) if isinstance(m, np.ndarray) and m.dtype == np.float32 else m)
           for n, m in kw.items()}
    mode = f64.pop("mode", "relative")
    exact_scores = f64.pop("exact_scores", "int8")
    lat = prepare_latte(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                        threshold=threshold, mode=mode, attn_mask=f64.get("attn_mask"),
                        key_padding_mask=f64.get("key_padding_mask"), is_causal=f64.get("is_causal", False),
                        scale=f64.get("scale"), exact_scores=exact_scores, check_finite=True, want_mass=False)
    kept = naive.kept_mask(lat)
    inp = dataclasses.replace(lat.inp, q=_round(lat.inp.q, precision), k=_round(lat.inp.k, precision),
                              v=_round(lat.inp.v, precision))
    g = _round(dout, precision).reshape(kept.shape[0], kept.shape[1], -1)
    lat_r = dataclasses.replace(lat, inp=inp)
    dq, dk, dv, _ = naive.reference_backward(lat_r, g, kept)
    # the products with absolute values, |dS| |K|, |dS|^T |Q|, P^T |dO|: the scale of the
    # rounding errors of dS, P (the gradients themselves can be much smaller: sum_j dS_ij = 0)
    size = {n: np.zeros(a.shape) for n, a in (("q", dq), ("k", dk), ("v", dv))}
    for b in range(kept.shape[0]):
        p = naive._softmax(naive._kept_scores(lat_r, b, kept[b]))
        dp = g[b] @ inp.v[b].T
        ds = np.abs(p * (dp - (p * dp).sum(axis=-1, keepdims=True)))
        size["q"][b] = inp.scale * ds @ np.abs(inp.k[b])
        size["k"][b] = inp.scale * ds.T @ np.abs(inp.q[b])
        size["v"][b] = p.T @ np.abs(g[b])
    want = {"q": dq.reshape(q.shape), "k": dk.reshape(k.shape), "v": dv.reshape(v.shape)}
    return want, {n: size[n].reshape(want[n].shape) for n in "qkv"}


def check(cp, precision, q, k, v, dout, threshold, label="", **kw):
    """Tile gradients against float64 (:func:`rounded_gradients`, error over the size of
    the products, held to :data:`BOUND`; and :func:`host_gradients`, relative, held to
    :data:`HOST_BOUND`); the launches and tile counts. Returns the errors in u, the
    reference kept mask and the tile counts."""
    got, tiles = tile_gradients(cp, precision, q, k, v, dout, threshold, **kw)
    want = host_gradients(q, k, v, dout, threshold, precision, **kw)
    tight, size = rounded_gradients(q, k, v, dout, threshold, precision, **kw)
    u = UNIT[precision]
    errs = {}
    for n in "qkv":
        assert np.all(np.isfinite(got[n])), n
        errs[n] = np.linalg.norm(got[n] - tight[n]) / np.linalg.norm(size[n]) / u
        errs["host " + n] = rel_error(got[n], want[n]) / u
        assert errs[n] < BOUND, (n, errs)
        assert errs["host " + n] < HOST_BOUND.get(label, 1.0), (n, errs)
        assert errs["host " + n] > 0.05, (n, errs)  # the 16-bit path ran
    mask_kw = {n: m for n, m in kw.items() if n in ("attn_mask", "key_padding_mask", "is_causal", "scale",
                                                    "mode")}
    keep = latte.kept_mask(q, k, threshold=threshold, backend="numpy", **mask_kw)
    assert tiles[1] == _blocks(keep, 64, 32)  # dq pass: rows x keys
    assert tiles[3] == _blocks(np.swapaxes(keep, -1, -2), 64, 32)  # dk/dv pass: keys x queries
    assert tiles[1] <= tiles[0] and tiles[3] <= tiles[2]
    return errs, keep, tiles


def _inputs(seed, shape_q, nk, d, scale_qk=1.0):
    rng = np.random.default_rng(seed)
    b, h, nq = shape_q
    q = (rng.standard_normal((b, h, nq, d)) * scale_qk).astype(np.float32)
    k = (rng.standard_normal((b, h, nk, d)) * scale_qk).astype(np.float32)
    v = rng.standard_normal((b, h, nk, d)).astype(np.float32)
    dout = rng.standard_normal((b, h, nq, d)).astype(np.float32)
    return rng, q, k, v, dout


def grid_case(precision, d, mode):
    """Nq = 70, Nk = 90: neither a multiple of the 64-row block or the 32-key tile; two heads
    with their own thresholds."""
    _, q, k, v, dout = _inputs(d, (1, 2, 70), 90, d, scale_qk=2.0)
    threshold = np.array([2.0, 4.0]) if mode == "relative" else np.array([0.5, 1.5])
    return q, k, v, dout, threshold, {"mode": mode}


def mask_case(case):
    rng, q, k, v, dout = _inputs(3 + len(case), (2, 1, 75), 75 if case == "causal" else 90, 32, 2.0)
    if case == "causal":
        kw = {"is_causal": True}
    elif case == "padding":
        kw = {"key_padding_mask": rng.random((2, 90)) > 0.3}
    elif case == "boolean":
        kw = {"attn_mask": rng.random((2, 1, 75, 90)) > 0.4}
    else:
        additive = rng.standard_normal((2, 1, 75, 90)).astype(np.float32)
        additive[0, 0, 4] = -np.inf  # a row with no visible key: zero gradients
        kw = {"attn_mask": additive, "scale": 0.3}
    return q, k, v, dout, 3.0, kw


def block_diagonal_case():
    """Five groups of similar queries and keys: most (block, tile) pairs keep no key."""
    rng = np.random.default_rng(17)
    n, d = 130, 64
    centres = rng.standard_normal((5, d)) * 3
    group = np.arange(n) * 5 // n
    q = (centres[group] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)[None, None]
    k = (centres[group] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)[None, None]
    v = rng.standard_normal((1, 1, n, d)).astype(np.float32)
    dout = rng.standard_normal((1, 1, n, d)).astype(np.float32)
    return q, k, v, dout, 2.0, {}


def float_scores_case():
    """Large scores (q, k x 3): the int8 and float kept scores give different gradients."""
    _, q, k, v, dout = _inputs(23, (1, 2, 70), 90, 32, scale_qk=3.0)
    return q, k, v, dout, 4.0, {"exact_scores": "float"}


def real_case():
    """Two MiniLM sequences of layer 3 (head dim 32, padded keys)."""
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = (a[3, :2].astype(np.float32) for a in (s.q, s.k, s.v))
    dout = np.random.default_rng(2).standard_normal(q.shape[:-1] + (v.shape[-1],)).astype(np.float32)
    return q, k, v, dout, 3.0, {"key_padding_mask": s.key_padding_mask[:2], "scale": s.scale}


#: (label, precision, case builder): every case the tests check (and the error script prints).
CASES = ([(f"grid d{d} {m}", p, (lambda p=p, d=d, m=m: grid_case(p, d, m)))
          for p, d, m in (("float16", 32, "relative"), ("float16", 64, "absolute"),
                          ("bfloat16", 64, "relative"), ("bfloat16", 32, "absolute"))]
         + [(c, "float16", (lambda c=c: mask_case(c))) for c in ("causal", "padding", "boolean", "additive")]
         + [("blockdiag", "float16", block_diagonal_case), ("float scores", "float16", float_scores_case),
            ("MiniLM", "float16", real_case)])


@pytest.mark.parametrize("label,precision,build", CASES, ids=[c[0] for c in CASES])
def test_gradients_equal_the_float64_host_backward(cupy_or_fake, label, precision, build):
    q, k, v, dout, threshold, kw = build()
    errs, keep, tiles = check(cupy_or_fake, precision, q, k, v, dout, threshold, label, **kw)
    assert 0.02 < keep.mean() < 0.98  # keys really dropped, and kept
    if label == "blockdiag":
        assert tiles[1] < tiles[0] and tiles[3] < tiles[2]  # tiles were skipped


def test_a_row_with_no_visible_key_has_zero_gradients(cupy_or_fake):
    q, k, v, dout, threshold, kw = mask_case("additive")
    got, _ = tile_gradients(cupy_or_fake, "float16", q, k, v, dout, threshold, **kw)
    assert np.all(got["q"][0, 0, 4] == 0)
    assert np.any(got["q"][0, 0, 3] != 0)


def test_causal_with_more_queries_than_keys(cupy_or_fake):
    q, k, v, dout, threshold, _ = block_diagonal_case()
    check(cupy_or_fake, "float16", q, k[:, :, :100], v[:, :, :100], dout, threshold, "blockdiag",
          is_causal=True)


def test_float_kept_scores_are_not_the_int8_ones(cupy_or_fake):
    """exact_scores='float': P from scale q.k, not from the int8 products: on this case the
    two host backwards differ by far more than the bound, and the kernel follows its own."""
    q, k, v, dout, threshold, kw = float_scores_case()
    u = UNIT["float16"]
    int8 = host_gradients(q, k, v, dout, threshold, "float16")
    flt = host_gradients(q, k, v, dout, threshold, "float16", **kw)
    got, _ = tile_gradients(cupy_or_fake, "float16", q, k, v, dout, threshold, **kw)
    got8, _ = tile_gradients(cupy_or_fake, "float16", q, k, v, dout, threshold)
    for n in "qkv":
        own, other = rel_error(got[n], flt[n]), rel_error(got[n], int8[n])
        assert own < HOST_BOUND["float scores"] * u
        assert other > 5 * own, (n, own / u, other / u)  # far from the int8 gradient (measured 38-87 u)
        assert rel_error(got8[n], int8[n]) < u  # and the int8 kernel follows the int8 one


def test_what_stays_on_the_array_code(cupy_or_fake):
    """topk / safe modes, head dim 128, float64 and no knob: the array-code backward."""
    from mcattn.latte import cupy as latte_cupy
    from mcattn.latte._inputs import prepare_latte

    cp = cupy_or_fake
    rng = np.random.default_rng(4)
    q, k, v = (cp.asarray(rng.standard_normal((1, 1, 40, 64)).astype(np.float32)) for _ in range(3))

    def lat(qq=q, kk=k, vv=v, mode="relative"):
        return prepare_latte(qq, kk, vv, threshold=3 if mode == "topk" else 2.0, mode=mode,
                             attn_mask=None, key_padding_mask=None, is_causal=False, scale=None,
                             exact_scores="int8", check_finite=False, want_mass=False)

    saved = mcattn.config.LATTE_TENSOR_CORES
    try:
        mcattn.config.LATTE_TENSOR_CORES = None
        assert latte_cupy.backward_tensor_cores(lat()) is None
        mcattn.config.LATTE_TENSOR_CORES = "bfloat16"
        assert latte_cupy.backward_tensor_cores(lat()) == "bfloat16"
        assert latte_cupy.backward_tensor_cores(lat(mode="topk")) is None
        assert latte_cupy.backward_tensor_cores(lat(mode="safe")) is None
        wide = cp.asarray(rng.standard_normal((1, 1, 40, 128)).astype(np.float32))
        assert latte_cupy.backward_tensor_cores(lat(wide, wide, wide)) is None
        f64 = [a.astype(np.float64) for a in (q, k, v)]
        assert latte_cupy.backward_tensor_cores(lat(*f64)) is None
        mcattn.config.LATTE_TENSOR_CORES = "tf32"
        with pytest.raises(mcattn.errors.ConfigError):
            latte_cupy.backward_tensor_cores(lat())
    finally:
        mcattn.config.LATTE_TENSOR_CORES = saved


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_has_the_int8_and_16_bit_mma(arch):
    """Each kernel: the estimate (and int8 kept scores) on mma.sync m16n8k32 s8, the
    gradient products on m16n8k16 of its 16-bit type."""
    from cuda_compile import nvrtc_compile

    ptx = nvrtc_compile("latte/kernels/latte_mma_backward.cu", arch)
    for part in ("dq", "dkdv"):
        for tag in ("f16", "bf16"):
            for d in (32, 64):
                body = ptx[ptx.index(f".entry mcattn_latte_mma_backward_{part}_{tag}_d{d}("):]
                body = body[:body.find(".entry", 10)] if ".entry" in body[10:] else body
                assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in body
                assert f"mma.sync.aligned.m16n8k16.row.col.f32.{tag}.{tag}.f32" in body


@pytest.mark.parametrize("mode,theta", [("relative", 0.0), ("absolute", 1e30)])
def test_near_ties_keep_the_forwards_key(cupy_or_fake, mode, theta):
    """The forward kernel's near-tie case (two keys whose estimates round to the same
    float32): one key kept per row, so dV is dO on that key and 0 on the other (a backward
    keeping float32 ties would split it, and give dq, dk != 0)."""
    from test_latte_mma_cuda import near_tie_case

    q, k, v = near_tie_case()
    assert q.shape[-1] in (32, 64)
    dout = np.random.default_rng(8).standard_normal(q.shape).astype(np.float32)
    got, _ = tile_gradients(cupy_or_fake, "float16", q, k, v, dout, theta, mode=mode)
    want = host_gradients(q, k, v, dout, theta, "float16", mode=mode)
    keep = latte.kept_mask(q, k, threshold=theta, mode=mode, backend="numpy")
    assert keep.sum(-1).tolist() == [[[1, 1, 1]]]
    assert rel_error(got["v"], want["v"]) < UNIT["float16"]
    kept_keys = keep.any(axis=-2)[0, 0]
    assert np.all(got["v"][0, 0, ~kept_keys] == 0) and np.all(got["v"][0, 0, kept_keys] != 0)
    assert np.all(got["q"] == 0) and np.all(got["k"] == 0)  # one kept key: P = 1, dS = 0
