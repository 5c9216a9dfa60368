"""Non-causal rfa on the tile machinery (``mcattn/rfa/kernels/rfa_mma.cu``,
``config.RFA_TENSOR_CORES``), through the public door (``backend="cupy"``; without a GPU
the fake CuPy runs the kernels on the host shim, warps and mma.sync emulated).

The reference is float64 rfa on the CPU (``backend="numpy"``) with the same features.
The 16-bit path rounds the key features, v, the query features and the state over the
mass: relative (Frobenius) errors of about half a unit roundoff u of the type
(0.50-0.55 u, docs/measurements/rfa-mma-shim-errors.txt), held to 1.5 u; and at least
0.1 u (float32 would be ~1e-4 u: the 16-bit path really ran). Shapes are small: the shim runs 128 host
threads a block.
"""

import numpy as np
import pytest
from helpers import GPU_PRESENT, rel_error

import mcattn
from mcattn import rfa
from mcattn.rfa.features import RandomFeatures

pytestmark = pytest.mark.hostshim

UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.fixture
def knob():
    saved = mcattn.config.RFA_TENSOR_CORES
    yield
    mcattn.config.RFA_TENSOR_CORES = saved


def _launches():
    if GPU_PRESENT:
        return []
    import fake_cupy

    return [r["kernel"] for r in fake_cupy.LAUNCHES if r["kernel"].startswith("mcattn_rfa")]


def run_mma(cp, precision, q, k, v, feats, **kw):
    """The tensor-core path's output (NumPy) through ``rfa.attention(backend="cupy")``."""
    put = {n: cp.asarray(m) if isinstance(m, np.ndarray) else m for n, m in kw.items()}
    before = len(_launches())
    mcattn.config.RFA_TENSOR_CORES = precision
    try:
        out = rfa.attention(*(cp.asarray(a) for a in (q, k, v)), features=feats, backend="cupy", **put)
    finally:
        mcattn.config.RFA_TENSOR_CORES = None
    if not GPU_PRESENT:
        tag = {"float16": "f16", "bfloat16": "bf16"}[precision]
        name = f"{tag}_dv{v.shape[-1]}"
        assert _launches()[before:] == ["mcattn_rfa_features_f32"] * 2 + [
            f"mcattn_rfa_mma_states_{name}", f"mcattn_rfa_mma_output_{name}"]
    return out.get()


def check(cp, precision, q, k, v, feats, **kw):
    """Error / u against float64 rfa (asserted), returned."""
    out = run_mma(cp, precision, q, k, v, feats, **kw)
    ref = rfa.attention(*(a.astype(np.float64) for a in (q, k, v)), features=feats, backend="numpy", **kw)
    err = rel_error(out, ref) / UNIT[precision]
    assert 0.1 < err < 1.5, err
    return err


def grid_case(d, dv, m, seed=0):
    """Nq = 70, Nk = 130: neither a multiple of the 64-row block or the 64-key tile."""
    rng = np.random.default_rng(seed + d + dv + m)
    q = (0.5 * rng.standard_normal((1, 2, 70, d))).astype(np.float32)
    k = (0.5 * rng.standard_normal((1, 2, 130, d))).astype(np.float32)
    v = rng.standard_normal((1, 2, 130, dv)).astype(np.float32)
    return q, k, v, RandomFeatures(d, m, num_heads=2, seed=seed + 1)


#: (d, dv, features, type): every value dim; feature counts below, at and above one
#: 64-row tile (m = 24 pads a tile, m = 80 takes two).
CASES = [(16, 32, 24, "float16"), (32, 64, 64, "bfloat16"), (32, 128, 80, "float16"),
         (16, 128, 32, "bfloat16")]


@pytest.mark.parametrize("d,dv,m,precision", CASES)
def test_equals_float64_rfa(cupy_or_fake, knob, d, dv, m, precision):
    check(cupy_or_fake, precision, *grid_case(d, dv, m))


def test_kinds_padding_and_real_attention(cupy_or_fake, knob):
    """sincos features, a key padding mask (a fully padded row: zeros), MiniLM layer 3."""
    from mcattn.studies.data import load_sample

    cp = cupy_or_fake
    q, k, v, _ = grid_case(16, 32, 32, seed=5)
    check(cp, "float16", q, k, v, RandomFeatures(16, 16, kind="sincos", num_heads=2, seed=7))
    kpm = np.ones((1, 130), bool)
    kpm[0, 100:] = False
    check(cp, "bfloat16", q, k, v, RandomFeatures(16, 32, num_heads=2, seed=8), key_padding_mask=kpm)
    s = load_sample()
    q, k, v = (a[3, :2].astype(np.float32) for a in (s.q, s.k, s.v))
    assert q.shape[-1] == 32
    feats = RandomFeatures(32, 64, num_heads=q.shape[1], seed=9)
    check(cp, "float16", q, k, v, feats, scale=s.scale)


def test_runs_only_where_it_applies(cupy_or_fake, knob):
    """Causal and float64 calls stay on rfa.cu; an unknown type is an error."""
    cp = cupy_or_fake
    q, k, v, feats = grid_case(16, 32, 16)
    mcattn.config.RFA_TENSOR_CORES = "float16"
    before = len(_launches())
    rfa.attention(*(cp.asarray(a) for a in (q, k[:, :, :70], v[:, :, :70])), features=feats, is_causal=True,
                  chunk_size=32, backend="cupy")
    rfa.attention(*(cp.asarray(a.astype(np.float64)) for a in (q, k, v)), features=feats, backend="cupy")
    if not GPU_PRESENT:
        assert not [n for n in _launches()[before:] if "mma" in n]
    mcattn.config.RFA_TENSOR_CORES = "float8"
    with pytest.raises(mcattn.errors.ConfigError):
        rfa.attention(*(cp.asarray(a) for a in (q, k, v)), features=feats, backend="cupy")


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_has_the_16_bit_mma(arch):
    from cuda_compile import nvrtc_compile

    ptx = nvrtc_compile("rfa/kernels/rfa_mma.cu", arch)
    for part in ("states", "output"):
        for tag in ("f16", "bf16"):
            for dv in (32, 64, 128):
                body = ptx[ptx.index(f".entry mcattn_rfa_mma_{part}_{tag}_dv{dv}("):]
                body = body[:body.find(".entry", 10)] if ".entry" in body[10:] else body
                assert f"mma.sync.aligned.m16n8k16.row.col.f32.{tag}.{tag}.f32" in body
