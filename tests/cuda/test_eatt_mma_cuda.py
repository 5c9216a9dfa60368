"""E-Att's Hamming and L1 alignments on the tile machinery (``mcattn/eatt/kernels/eatt_mma.cu``,
``config.EATT_TENSOR_CORES``), through the public door (``backend="cupy"``; without a GPU
the fake CuPy runs the kernel on the host shim, its warps and mma.sync emulated).

The scores are the float32 numbers of eatt.cu (``-scale * popcount(qb xor kb)`` from the
same table; L1: ``-sum |q - k|`` summed in the same order), so the reference is float64
E-Att on the same q, k (the same sign codes) and v rounded to the 16-bit type: what remains
is the probabilities' rounding, 0.23-0.43 unit roundoffs u of the type (relative, Frobenius;
docs/measurements/eatt-mma-shim-errors.txt), held to half a unit roundoff as exact_mma's
test; and at least 0.1 u from the unrounded answer (0.47-0.60 u measured, 0.18 u on
MiniLM; float32 would be ~1e-4 u: the 16-bit path really ran). Shapes are small: the
shim runs 128 host threads a block.
"""

import numpy as np
import pytest
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import eatt
from mcattn.eatt.cupy import MMA_L1_SIZES

pytestmark = pytest.mark.hostshim

UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def _round(a, precision):
    if precision == "float16":
        return a.astype(np.float16).astype(np.float64)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return a.astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.fixture
def knob():
    saved = mcattn.config.EATT_TENSOR_CORES
    yield
    mcattn.config.EATT_TENSOR_CORES = saved


def _launches():
    if GPU_PRESENT:
        return []
    import fake_cupy

    return [r["kernel"] for r in fake_cupy.LAUNCHES if r["kernel"].startswith("mcattn_eatt")]


def run_mma(cp, precision, q, k, v, alignment="hamming", **mask):
    """The tensor-core kernel's output (NumPy) through ``eatt.attention(backend="cupy")``."""
    put = {n: cp.asarray(m) if isinstance(m, np.ndarray) else m for n, m in mask.items()}
    before = len(_launches())
    mcattn.config.EATT_TENSOR_CORES = precision
    try:
        out = eatt.attention(*(cp.asarray(a) for a in (q, k, v)), alignment=alignment, backend="cupy", **put)
    finally:
        mcattn.config.EATT_TENSOR_CORES = None
    if not GPU_PRESENT:
        tag, dv = {"float16": "f16", "bfloat16": "bf16"}[precision], v.shape[-1]
        name = (f"mcattn_eatt_mma_hamming_{tag}_dv{dv}" if alignment == "hamming"
                else f"mcattn_eatt_mma_l1_{tag}_d{32 if q.shape[-1] <= 32 else 64}_dv{dv}")
        assert _launches()[before:] == [name]
    return out.get()


def check(cp, precision, q, k, v, alignment="hamming", **mask):
    """Errors / u against float64 on the rounded v and on the float32 v (asserted)."""
    out = run_mma(cp, precision, q, k, v, alignment, **mask)
    f64 = {n: (m.astype(np.float64) if isinstance(m, np.ndarray) and m.dtype == np.float32 else m)
           for n, m in mask.items()}
    ref = eatt.attention(q.astype(np.float64), k.astype(np.float64), _round(v, precision),
                         alignment=alignment, backend="numpy", **f64)
    unrounded = eatt.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                               alignment=alignment, backend="numpy", **f64)
    u = UNIT[precision]
    err, far = rel_error(out, ref) / u, rel_error(out, unrounded) / u
    assert err < 0.5, err
    assert np.abs(out - ref).max() < 4 * u * np.abs(v).max()
    assert far > 0.1, far  # float32 would be ~1e-4
    return err, far


def grid_case(d, dv):
    """Nq = 70, Nk = 130 (neither a multiple of the 64-row block or the 64-key tile)."""
    rng = np.random.default_rng(d + dv)
    q = rng.standard_normal((1, 2, 70, d)).astype(np.float32)
    k = rng.standard_normal((1, 2, 130, d)).astype(np.float32)
    v = rng.standard_normal((1, 2, 130, dv)).astype(np.float32)
    return q, k, v


def mask_cases():
    """(label, q, k, v, mask arguments)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 1, 75, 64)).astype(np.float32)
    k = rng.standard_normal((2, 1, 90, 64)).astype(np.float32)
    v = rng.standard_normal((2, 1, 90, 32)).astype(np.float32)
    kpm = rng.random((2, 90)) > 0.3
    additive = rng.standard_normal((2, 1, 75, 90)).astype(np.float32)
    additive[0, 0, 4] = -np.inf  # a row with no visible key: zeros
    return [("padding", q, k, v, {"key_padding_mask": kpm}),
            ("causal Nq<Nk", q, k, v, {"is_causal": True}),
            ("causal Nq>Nk", k[:, :, :80], q, v[:, :, :75], {"is_causal": True}),
            ("bias", q, k, v, {"attn_mask": additive, "scale": 0.3})]


#: (d, dv, type): one and two 64-bit code words (d = 100: padding bits), every value dim.
CASES = [(32, 32, "float16"), (64, 64, "bfloat16"), (100, 64, "float16"), (128, 128, "float16"),
         (64, 32, "bfloat16"), (128, 128, "bfloat16")]


@pytest.mark.parametrize("d,dv,precision", CASES)
def test_hamming_equals_float64_on_the_rounded_v(cupy_or_fake, knob, d, dv, precision):
    check(cupy_or_fake, precision, *grid_case(d, dv))


#: (d, dv, type) of the L1 kernels: both head-dim buckets (d = 20, 50: padding dims), every
#: value dim a bucket takes.
L1_CASES = [(32, 32, "float16"), (20, 64, "bfloat16"), (32, 128, "float16"), (50, 32, "bfloat16"),
            (64, 64, "float16")]


@pytest.mark.parametrize("d,dv,precision", L1_CASES)
def test_l1_equals_float64_on_the_rounded_v(cupy_or_fake, knob, d, dv, precision):
    check(cupy_or_fake, precision, *grid_case(d, dv), alignment="l1")


@pytest.mark.parametrize("alignment", ["hamming", "l1"])
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_masks_causal_and_sizes(cupy_or_fake, knob, precision, alignment):
    for _, q, k, v, mask in mask_cases():
        check(cupy_or_fake, precision, q, k, v, alignment, **mask)


def test_padded_rows_give_zeros_and_real_attention(cupy_or_fake, knob):
    """A fully padded sequence gives zeros; two MiniLM sequences of layer 3 (head dim 32)."""
    from mcattn.studies.data import load_sample

    cp = cupy_or_fake
    q, k, v = mask_cases()[0][1:4]
    kpm = np.ones((2, 90), bool)
    kpm[1] = False
    out = run_mma(cp, "float16", q, k, v, key_padding_mask=kpm)
    assert np.all(out[1] == 0) and np.all(np.isfinite(out)) and np.abs(out[0]).max() > 0
    s = load_sample()
    q, k, v = (a[3, :2].astype(np.float32) for a in (s.q, s.k, s.v))
    assert q.shape[-1] == 32
    check(cp, "float16", q, k, v, key_padding_mask=s.key_padding_mask[:2], scale=s.scale)


def test_the_tensor_core_kernel_runs_only_where_it_applies(cupy_or_fake, knob):
    from mcattn._validate import prepare_attention
    from mcattn.eatt import cupy as eatt_cupy

    cp = cupy_or_fake
    rng = np.random.default_rng(5)
    q, k, v = (cp.asarray(rng.standard_normal((1, 1, 20, 32)).astype(np.float32)) for _ in range(3))
    mcattn.config.EATT_TENSOR_CORES = "bfloat16"
    inp = prepare_attention(q, k, v)
    assert eatt_cupy.tensor_cores(inp, "hamming") == "bfloat16"
    assert eatt_cupy.tensor_cores(inp, "l1") == "bfloat16"
    assert eatt_cupy.tensor_cores(prepare_attention(q, k, v[..., :16]), "hamming") is None
    wide = cp.asarray(rng.standard_normal((1, 1, 20, 100)).astype(np.float32))
    assert eatt_cupy.tensor_cores(prepare_attention(wide, wide, v), "l1") is None  # d > 64
    v128 = cp.asarray(rng.standard_normal((1, 1, 20, 128)).astype(np.float32))
    assert eatt_cupy.tensor_cores(prepare_attention(wide[..., :64], wide[..., :64], v128), "l1") is None
    assert eatt_cupy.tensor_cores(prepare_attention(*(a.astype(np.float64) for a in (q, k, v))),
                                  "hamming") is None
    if not GPU_PRESENT:
        before = len(_launches())
        eatt.attention(wide, wide, v, alignment="l1", backend="cupy")
        assert _launches()[before:] == ["mcattn_eatt_forward_f32"]
    mcattn.config.EATT_TENSOR_CORES = "int8"
    with pytest.raises(mcattn.errors.ConfigError):
        eatt_cupy.tensor_cores(inp, "hamming")


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_has_popc_and_mma(arch):
    """The Hamming scores are 32-bit popcounts (popc.b32), the L1 ones abs.f32; P V runs on mma.sync."""
    from cuda_compile import nvrtc_compile

    ptx = nvrtc_compile("eatt/kernels/eatt_mma.cu", arch)
    for tag in ("f16", "bf16"):
        for dv in (32, 64, 128):
            name = f"mcattn_eatt_mma_hamming_{tag}_dv{dv}"
            body = ptx[ptx.index(f".entry {name}("):]
            body = body[:body.find(".entry", 10)] if ".entry" in body[10:] else body
            assert "popc.b32" in body and f"mma.sync.aligned.m16n8k16.row.col.f32.{tag}.{tag}.f32" in body
    for tag in ("f16", "bf16"):
        for d, dv in MMA_L1_SIZES:
            name = f"mcattn_eatt_mma_l1_{tag}_d{d}_dv{dv}"
            body = ptx[ptx.index(f".entry {name}("):]
            body = body[:body.find(".entry", 10)] if ".entry" in body[10:] else body
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{tag}.{tag}.f32" in body and "abs.f32" in body
