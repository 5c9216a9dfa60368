"""The tensor-core exact forward (``mcattn/exact/kernels/exact_mma.cu``) against float64.

Under the host shim its warps run on the shim's warp emulation (mma.sync from the PTX
ISA's layouts, shuffles); with a GPU the same tests run the real tensor cores. The
kernel rounds q, k, v and the probabilities to float16 / bfloat16 and accumulates in
float32, so the reference is float64 attention on the rounded q, k, v: the remaining
error is the probabilities' rounding: 0.26-0.37 unit roundoffs u of the type (2^-11,
2^-8), relative (Frobenius), for shapes and masks like these tests'
(benchmarks/exact_mma_shim_errors.py, docs/measurements/exact-mma-shim-errors.txt),
held to 0.5 u; the gradients (P and dS rounded too) 0.38-0.56 u, held to 1 u. A float32
path that skipped the rounding would be more accurate against the unrounded inputs than
the rounding allows, which the last check of each case rules out (the tensor-core path
really ran). Shapes are small: the shim runs
128 host threads a block.
"""

import numpy as np
import pytest
from helpers import GPU_PRESENT, dense_attention, rel_error

import mcattn

pytestmark = pytest.mark.hostshim

UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "tf32": 2.0**-11}


def _tf32(a):
    """Nearest tf32 (10 mantissa bits), ties away from zero (cvt.rna), by float64 arithmetic."""
    m, e = np.frexp(a.astype(np.float64))
    return np.sign(m) * np.floor(np.abs(m) * 2.0**11 + 0.5) * 2.0 ** (e - 11)


def _round(a, precision):
    if precision == "float16":
        return a.astype(np.float16).astype(np.float64)
    if precision == "tf32":
        return _tf32(a)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return a.astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.fixture
def tensor_cores(cupy_or_fake):
    def run(precision, q, k, v, **mask):
        cp = cupy_or_fake
        saved = mcattn.config.EXACT_TENSOR_CORES
        mcattn.config.EXACT_TENSOR_CORES = precision
        try:
            out = mcattn.attention(*(cp.asarray(a) for a in (q, k, v)), backend="cupy",
                                   **{n: cp.asarray(m) if isinstance(m, np.ndarray) else m
                                      for n, m in mask.items()})
        finally:
            mcattn.config.EXACT_TENSOR_CORES = saved
        return out.get()
    return run


def _check(out, q, k, v, precision, mask=None, is_causal=False, scale=None):
    qr, kr, vr = (_round(a, precision) for a in (q, k, v))
    ref = dense_attention(qr, kr, vr, mask=mask, is_causal=is_causal, scale=scale)
    u = UNIT[precision]
    err = rel_error(out, ref)
    assert err < 0.5 * u, err / u
    assert np.abs(out - ref).max() < 4 * u * np.abs(vr).max()
    # the rounding is there: the unrounded float64 answer is farther than float32 would be
    exact = dense_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale)
    assert rel_error(out, exact) > 1e-2 * u
    return err


def _launches():
    import fake_cupy

    return [r for r in fake_cupy.LAUNCHES if r["kernel"].startswith(("mcattn_exact_mma_forward",
                                                                      "mcattn_exact_tf32_forward"))]


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_forward_equals_float64_on_the_rounded_inputs(tensor_cores, precision, d):
    """Nq = 70 and Nk = 130: neither a multiple of the 64-row block or the 64-key tile."""
    rng = np.random.default_rng(d)
    q = rng.standard_normal((1, 2, 70, d)).astype(np.float32)
    k = rng.standard_normal((1, 2, 130, d)).astype(np.float32)
    v = rng.standard_normal((1, 2, 130, d)).astype(np.float32)
    if not GPU_PRESENT:
        before = len(_launches())
    out = tensor_cores(precision, q, k, v)
    _check(out, q, k, v, precision)
    if not GPU_PRESENT:
        (launch,) = _launches()[before:]
        tag = {"float16": "mma_forward_f16", "bfloat16": "mma_forward_bf16", "tf32": "tf32_forward"}
        assert launch["kernel"] == f"mcattn_exact_{tag[precision]}_d{d}"
        assert tuple(launch["grid"])[:2] == (2, 2) and tuple(launch["block"])[:1] == (128,)


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "tf32"])
def test_forward_masks(tensor_cores, precision):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 1, 75, 32)).astype(np.float32) * 2
    k = rng.standard_normal((2, 1, 90, 32)).astype(np.float32) * 2
    v = rng.standard_normal((2, 1, 90, 32)).astype(np.float32)
    kpm = rng.random((2, 90)) > 0.3
    kpm[1] = False  # a fully padded sequence: zeros, not NaN
    out = tensor_cores(precision, q, k, v, key_padding_mask=kpm)
    assert np.all(out[1] == 0) and np.all(np.isfinite(out))
    _check(out[:1], q[:1], k[:1], v[:1], precision, mask=kpm[:1, None, None, :])
    # causal with Nq < Nk and Nq > Nk (key j visible from query i iff j <= i)
    out = tensor_cores(precision, q, k, v, is_causal=True)
    _check(out, q, k, v, precision, is_causal=True)
    out = tensor_cores(precision, k[:, :, :70], q, k[:, :, :75] * 0 + v[:, :, :75], is_causal=True)
    _check(out, k[:, :, :70], q, v[:, :, :75], precision, is_causal=True)
    additive = rng.standard_normal((2, 1, 75, 90)).astype(np.float32)
    additive[0, 0, 4] = -np.inf  # a row with no visible key
    out = tensor_cores(precision, q, k, v, attn_mask=additive, scale=0.3)
    assert np.all(out[0, :, 4] == 0)
    _check(out, q, k, v, precision, mask=additive, scale=0.3)


def test_forward_causal_skips_tiles(tensor_cores):
    """Causal, Nq = Nk = 130: the first block of rows (0-63) sees one key tile only."""
    if GPU_PRESENT:
        pytest.skip("inspects the fake CuPy's launches")
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, 1, 130, 64)).astype(np.float32) for _ in range(3))
    out = tensor_cores("float16", q, k, v, is_causal=True)
    _check(out, q, k, v, "float16", is_causal=True)


def test_forward_on_real_attention(tensor_cores):
    """Two MiniLM sequences of layer 3 (head dim 32, padded keys)."""
    from mcattn.studies.data import load_sample

    s = load_sample()
    q, k, v = (a[3, :2].astype(np.float32) for a in (s.q, s.k, s.v))
    assert q.shape[-1] in (32, 64, 128)
    kpm = s.key_padding_mask[:2]
    out = tensor_cores("float16", q, k, v, key_padding_mask=kpm, scale=s.scale)
    _check(out, q, k, v, "float16", mask=kpm[:, None, None, :], scale=s.scale)


def test_lse_and_the_float32_path_stay(cupy_or_fake):
    """forward_lse: the kernel's log-sum-exp equals float64's on the rounded inputs; and
    without the knob, or for float64 or an unsupported head dim, today's kernels run."""
    from mcattn._validate import prepare_attention
    from mcattn.exact import cupy as exact_cupy

    cp = cupy_or_fake
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 67, 64)).astype(np.float32) for _ in range(3))
    inp = prepare_attention(*(cp.asarray(a) for a in (q, k, v)), is_causal=True)
    out, lse = exact_cupy._forward_mma(inp, "float16", want_lse=True)
    qr, kr = (_round(a, "float16") for a in (q, k))
    s = (qr @ np.swapaxes(kr, -1, -2)) / 8.0
    s = np.where(np.tril(np.ones((67, 67), bool)), s, -np.inf)
    top = s.max(-1)
    want = top + np.log(np.exp(s - top[..., None]).sum(-1))
    assert np.abs(lse.get().reshape(1, 2, 67) - want).max() < 2e-5
    _check(out.get().reshape(q.shape), q, k, v, "float16", is_causal=True)
    mcattn.config.EXACT_TENSOR_CORES = "float16"
    try:
        assert exact_cupy._tensor_cores(inp) == "float16"
        q48 = prepare_attention(*(cp.asarray(a[..., :48]) for a in (q, k, v)))
        assert exact_cupy._tensor_cores(q48) is None  # head dim 48: the float32 kernel
        q64 = prepare_attention(*(cp.asarray(a.astype(np.float64)) for a in (q, k, v)))
        assert exact_cupy._tensor_cores(q64) is None
        mcattn.config.EXACT_TENSOR_CORES = "tf32"  # forward only: training stays on float32
        assert exact_cupy._tensor_cores(inp) == "tf32"
        assert exact_cupy._tensor_cores(inp, exact_cupy.MMA_TRAINING_HEAD_DIMS) is None
        mcattn.config.EXACT_TENSOR_CORES = "tf16"
        with pytest.raises(mcattn.errors.ConfigError):
            exact_cupy._tensor_cores(inp)
    finally:
        mcattn.config.EXACT_TENSOR_CORES = None
    assert exact_cupy._tensor_cores(inp) is None


def _reference_grads(q, k, v, dout, mask=None, is_causal=False, scale=None):
    """Float64 gradients of dense attention (the formulas, on the given values)."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ np.swapaxes(k, -1, -2))
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if is_causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    top = s.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(s - top)
    total = p.sum(-1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return scale * ds @ k, scale * np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ dout


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
@pytest.mark.parametrize("d,case", [(32, "plain"), (64, "plain"), (32, "causal"), (64, "padding"),
                                    (32, "bias")])
def test_training_pair_equals_float64_gradients(cupy_or_fake, precision, d, case):
    """grad.forward then grad.backward with the knob: both tensor-core passes (Nq = 70,
    Nk = 90 for all but causal, 75 and 75), against float64 gradients on the rounded
    inputs; every gradient within one unit roundoff, relative (Frobenius)."""
    from mcattn.exact import grad

    cp = cupy_or_fake
    rng = np.random.default_rng(d + len(case))
    nq, nk = (75, 75) if case == "causal" else (70, 90)
    q = rng.standard_normal((1, 2, nq, d)).astype(np.float32)
    k = rng.standard_normal((1, 2, nk, d)).astype(np.float32)
    v = rng.standard_normal((1, 2, nk, d)).astype(np.float32)
    dout = rng.standard_normal((1, 2, nq, d)).astype(np.float32)
    mask, kwargs = None, {}
    if case == "causal":
        kwargs = {"is_causal": True}
    elif case == "padding":
        kpm = rng.random((1, nk)) > 0.3
        mask, kwargs = kpm[:, None, None, :], {"key_padding_mask": cp.asarray(kpm)}
    elif case == "bias":
        mask = rng.standard_normal((1, 2, nq, nk)).astype(np.float32)
        mask[0, 1, 3] = -np.inf  # a row with no visible key: zero gradients
        kwargs = {"attn_mask": cp.asarray(mask)}
    if not GPU_PRESENT:
        import fake_cupy

        before = len(fake_cupy.LAUNCHES)
    mcattn.config.EXACT_TENSOR_CORES = precision
    try:
        args = [cp.asarray(a) for a in (q, k, v)]
        out, res = grad.forward(*args, backend="cupy", **kwargs)
        grads = grad.backward(*args, out, res, cp.asarray(dout), backend="cupy", **kwargs)
    finally:
        mcattn.config.EXACT_TENSOR_CORES = None
    if not GPU_PRESENT:
        names = [r["kernel"] for r in fake_cupy.LAUNCHES[before:]]
        tag = {"float16": "f16", "bfloat16": "bf16"}[precision]
        assert names == [f"mcattn_exact_mma_forward_{tag}_d{d}", f"mcattn_exact_mma_backward_dq_{tag}_d{d}",
                         f"mcattn_exact_mma_backward_dkdv_{tag}_d{d}"]
    qr, kr, vr, dr = (_round(a, precision) for a in (q, k, v, dout))
    want = _reference_grads(qr, kr, vr, dr, mask=mask, **({"is_causal": True} if case == "causal" else {}))
    u = UNIT[precision]
    for name, w in zip("qkv", want):
        got = grads[name].get()
        assert np.all(np.isfinite(got))
        assert rel_error(got, w) < u, (name, rel_error(got, w) / u)
    if case == "bias":
        assert np.all(grads["q"].get()[0, 1, 3] == 0)
