"""The warp-level device API (``mcattn/kernels/warp.cuh``) against NumPy.

Under the host shim each primitive runs in its emulation (the warp's lanes are host
threads that meet at a per-warp barrier); through NVRTC the same kernels compile to the
PTX a GPU runs. The fragment layouts are written here a second time, from the PTX ISA's
tables ("Matrix fragments for mma.m16n8k16 / m16n8k8 / m16n8k32"), in the tables' own
form (sets of element indices), independently of the shim's arithmetic; a layout that
differs from the shim's makes the products disagree with NumPy's (the last test proves
that such a mistake is caught).
"""

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import GPU_PRESENT

SOURCE = Path(__file__).resolve().parent / "hostshim" / "warp_selftest.cu"


def _lane(lane):
    return lane >> 2, lane % 4  # groupID, threadID_in_group


# --- The PTX ISA's layouts, element i of a lane <-> (row, col) ------------------------
def a_16bit(lane, i):  # m16n8k16 A (f16/bf16), a0..a7
    g, t = _lane(lane)
    row = g if i in (0, 1, 4, 5) else g + 8
    col = t * 2 + (i & 1) if i < 4 else t * 2 + (i & 1) + 8
    return row, col


def b_16bit(lane, i):  # m16n8k16 B, b0..b3
    g, t = _lane(lane)
    return (t * 2 + (i & 1) if i < 2 else t * 2 + (i & 1) + 8), g


def a_tf32(lane, i):  # m16n8k8 A (tf32), a0..a3
    g, t = _lane(lane)
    return (g if i in (0, 2) else g + 8), (t if i in (0, 1) else t + 4)


def b_tf32(lane, i):  # m16n8k8 B, b0..b1
    g, t = _lane(lane)
    return (t if i == 0 else t + 4), g


def a_8bit(lane, i):  # m16n8k32 A (s8), a0..a15
    g, t = _lane(lane)
    row = g if (i < 4 or 8 <= i < 12) else g + 8
    col = t * 4 + (i & 3) if i < 8 else t * 4 + (i & 3) + 16
    return row, col


def b_8bit(lane, i):  # m16n8k32 B, b0..b7
    g, t = _lane(lane)
    return (t * 4 + (i & 3) if i < 4 else t * 4 + (i & 3) + 16), g


def c_layout(lane, i):  # C/D 16x8, c0..c3 (every shape)
    g, t = _lane(lane)
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def pack(matrix_bits, layout, elements, width):
    """Registers [32, elements * width / 32] (uint32) holding ``matrix_bits`` (unsigned codes)."""
    per = 32 // width
    regs = np.zeros((32, elements // per), np.uint32)
    for lane in range(32):
        for i in range(elements):
            r, c = layout(lane, i)
            regs[lane, i // per] |= np.uint32(int(matrix_bits[r, c]) << (width * (i % per)))
    return regs


def scatter_c(values):
    return np.array([[values[r, c] for i in range(4) for r, c in [c_layout(lane, i)]]
                     for lane in range(32)])


def gather_c(regs, dtype):
    out = np.zeros((16, 8), dtype)
    for lane in range(32):
        for i in range(4):
            out[c_layout(lane, i)] = regs[lane, i]
    return out


@pytest.fixture
def module(cupy_or_fake):
    if GPU_PRESENT:
        pytest.skip("checks the host shim's emulation (the NVRTC tests below cover the GPU)")
    from mcattn._cupy import INCLUDE_DIR

    return cupy_or_fake, cupy_or_fake.RawModule(code=SOURCE.read_text(), options=(f"-I{INCLUDE_DIR}",))


def _run_mma(module, kernel, a_regs, b_regs, acc):
    cp, mod = module
    acc_dev = cp.asarray(acc)
    mod.get_function(kernel)((1,), (32,), (cp.asarray(a_regs), cp.asarray(b_regs), acc_dev))
    return acc_dev.get()


def _float_case(rng, dtype_name):
    """Random A [16, 16], B [16, 8] in the 16-bit type: (codes, float64 values)."""
    if dtype_name == "f16":
        a = (rng.standard_normal((16, 16)) * 3).astype(np.float16)
        b = (rng.standard_normal((16, 8)) * 3).astype(np.float16)
        return a.view(np.uint16), b.view(np.uint16), a.astype(np.float64), b.astype(np.float64)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = (rng.standard_normal((16, 16)) * 1e3).astype(ml_dtypes.bfloat16)
    b = (rng.standard_normal((16, 8)) * 1e-3).astype(ml_dtypes.bfloat16)
    return a.view(np.uint16), b.view(np.uint16), a.astype(np.float64), b.astype(np.float64)


@pytest.mark.hostshim
@pytest.mark.parametrize("dtype_name", ["f16", "bf16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mma_m16n8k16_equals_numpy(module, dtype_name, seed):
    rng = np.random.default_rng(seed)
    a_bits, b_bits, a, b = _float_case(rng, dtype_name)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    got = _run_mma(module, f"shim_mma_{dtype_name}", pack(a_bits, a_16bit, 8, 16),
                   pack(b_bits, b_16bit, 4, 16), scatter_c(c).astype(np.float32))
    want = (c.astype(np.float64) + a @ b).astype(np.float32)
    # the shim rounds the exact sum once; NumPy's float64 sum may sit 1 ulp away after rounding
    np.testing.assert_array_max_ulp(gather_c(got, np.float32), want, maxulp=1)


@pytest.mark.hostshim
@pytest.mark.parametrize("seed", [0, 1])
def test_mma_m16n8k8_tf32_reads_the_top_19_bits(module, seed):
    """Raw float32 words: the tensor core ignores the 13 low mantissa bits (it truncates)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal((8, 8)).astype(np.float32)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    got = _run_mma(module, "shim_mma_tf32", pack(a.view(np.uint32), a_tf32, 4, 32),
                   pack(b.view(np.uint32), b_tf32, 2, 32), scatter_c(c).astype(np.float32))
    trunc = [(x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64) for x in (a, b)]
    want = (c.astype(np.float64) + trunc[0] @ trunc[1]).astype(np.float32)
    np.testing.assert_array_max_ulp(gather_c(got, np.float32), want, maxulp=1)
    full = (c.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    assert not np.array_equal(gather_c(got, np.float32), full)  # the truncation is visible


@pytest.mark.hostshim
@pytest.mark.parametrize("seed", [0, 1])
def test_mma_m16n8k32_s8_is_exact(module, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    b = rng.integers(-128, 128, (32, 8)).astype(np.int8)
    c = rng.integers(-2**20, 2**20, (16, 8)).astype(np.int32)
    got = _run_mma(module, "shim_mma_s8", pack(a.view(np.uint8), a_8bit, 16, 8),
                   pack(b.view(np.uint8), b_8bit, 8, 8), scatter_c(c).astype(np.int32))
    want = c.astype(np.int64) + a.astype(np.int64) @ b.astype(np.int64)
    assert np.array_equal(gather_c(got, np.int64), want)


@pytest.mark.hostshim
def test_a_wrong_layout_fails(module):
    """The test above can fail: fragments packed with a layout that swaps a1 and a2 (rows
    g+8 and columns +8: a classic mistake) or that transposes B give wrong products."""
    rng = np.random.default_rng(5)
    a_bits, b_bits, a, b = _float_case(rng, "f16")
    c = np.zeros((16, 8), np.float32)
    want = a @ b

    def swapped(lane, i):
        return a_16bit(lane, {2: 4, 3: 5, 4: 2, 5: 3}.get(i, i))

    def b_transposed(lane, i):  # (col, row) read as (row, col), restricted to the 8 columns
        r, col = b_16bit(lane, i)
        return (col * 2 + (r >= 8)) % 16, r % 8

    for a_lay, b_lay in [(swapped, b_16bit), (a_16bit, b_transposed)]:
        got = gather_c(_run_mma(module, "shim_mma_f16", pack(a_bits, a_lay, 8, 16),
                                pack(b_bits, b_lay, 4, 16), scatter_c(c).astype(np.float32)), np.float64)
        assert np.abs(got - want).max() > 1.0
    right = gather_c(_run_mma(module, "shim_mma_f16", pack(a_bits, a_16bit, 8, 16),
                              pack(b_bits, b_16bit, 4, 16), scatter_c(c).astype(np.float32)), np.float64)
    assert np.abs(right - want).max() < 1e-4 * np.abs(want).max()


def _reference_shuffles(v, src, xor_mask, delta, width):
    n = v.size
    out = np.zeros((n, 4), np.float32)
    ballot = np.zeros(n, np.uint32)
    for t in range(n):
        warp0, lane = t - t % 32, t % 32
        base = lane & ~(width - 1)
        x = lane ^ xor_mask
        out[t, 0] = v[t] if x >= base + width else v[warp0 + x]
        out[t, 1] = v[warp0 + base + src[t] % width]
        d = lane + delta
        out[t, 2] = v[t] if d >= base + width else v[warp0 + d]
        out[t, 3] = np.float32(np.float64(out[t, 0]) * 3.0)
        ballot[t] = sum(1 << i for i in range(32) if v[warp0 + i] > 0)
    return out, ballot


@pytest.mark.hostshim
@pytest.mark.parametrize("xor_mask,delta,width", [(1, 1, 32), (2, 3, 32), (16, 5, 32), (4, 1, 8), (1, 2, 4)])
def test_shuffles_and_ballot_equal_numpy(module, xor_mask, delta, width):
    cp, mod = module
    rng = np.random.default_rng(xor_mask * 10 + delta)
    v = rng.standard_normal(64).astype(np.float32)  # two warps
    src = rng.integers(0, 64, 64).astype(np.int32)
    out, ballot = cp.zeros((64, 4), cp.float32), cp.zeros(64, cp.uint32)
    args = (cp.asarray(v), cp.asarray(src), out, ballot, np.int32(xor_mask), np.int32(delta), np.int32(width))
    mod.get_function("shim_warp_shuffles")((1,), (64,), args)
    want, want_ballot = _reference_shuffles(v, src, xor_mask, delta, width)
    assert np.array_equal(out.get()[:, :3], want[:, :3])
    np.testing.assert_allclose(out.get()[:, 3], want[:, 3], rtol=1e-7)
    assert np.array_equal(ballot.get(), want_ballot)


@pytest.mark.hostshim
def test_a_mask_without_a_running_lane_is_refused(module):
    cp, mod = module
    v = cp.asarray(np.arange(32, dtype=np.float32))
    out = cp.zeros(32, cp.float32)
    kernel = mod.get_function("shim_warp_partial")
    with pytest.raises(Exception, match="mask"):  # lanes 0-3 returned: a full mask is wrong
        kernel((1,), (32,), (v, out, np.uint32(0xFFFFFFFF), np.int32(4)))
    kernel((1,), (32,), (v, out, np.uint32(0xFFFFFFF0), np.int32(4)))
    assert np.array_equal(out.get()[4:], np.arange(32, dtype=np.float32)[4:].reshape(-1, 2)[:, ::-1].ravel())


def _tf32_reference(x):
    """Nearest tf32 (10 mantissa bits), ties away from zero, by float64 arithmetic."""
    m, e = np.frexp(x.astype(np.float64))  # x = m 2^e, 0.5 <= |m| < 1
    scaled = np.abs(m) * 2.0**11
    r = np.floor(scaled + 0.5)  # ties away from zero on the magnitude
    return (np.sign(m) * r * 2.0 ** (e - 11)).astype(np.float32)


@pytest.mark.hostshim
def test_conversions_round_to_nearest_even(module):
    cp, mod = module
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(9)
    x = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 6, 2000),
        [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.0, 65520.0, -65520.0, 1e6, 2.0**-24, 2.0**-25,
         3 * 2.0**-26, 2.0**-14, 2.0**-14 * (1 - 2.0**-11), 1 + 2.0**-11, 1 + 3 * 2.0**-11,
         1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4e38],
    ]).astype(np.float32)
    n = x.size
    f16, bf16 = cp.zeros(n, cp.uint16), cp.zeros(n, cp.uint16)
    tf32, f16_back, bf16_back = cp.zeros(n, cp.uint32), cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
    mod.get_function("shim_convert")((2,), (64,), (cp.asarray(x), f16, bf16, tf32, f16_back, bf16_back,
                                                   np.int32(n)))
    assert np.array_equal(f16.get(), x.astype(np.float16).view(np.uint16))
    assert np.array_equal(f16_back.get(), x.astype(np.float16).astype(np.float32))
    assert np.array_equal(bf16.get(), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.array_equal(bf16_back.get(), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    normal = np.isfinite(x) & (np.abs(x) >= np.finfo(np.float32).tiny) & (np.abs(x) < 3e38)
    assert np.array_equal(tf32.get().view(np.float32)[normal], _tf32_reference(x[normal]))


# --- The GPU side: the same kernels through NVRTC ------------------------------------
_MMA = {"shim_mma_f16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
        "shim_mma_bf16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
        "shim_mma_tf32": "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
        "shim_mma_s8": "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32"}


def _entries(ptx):
    """PTX text of each .entry (up to the next one)."""
    parts = re.split(r"(?=\.visible \.entry )", ptx)
    return {re.match(r"\.visible \.entry (\w+)", p).group(1): p for p in parts if p.startswith(".visible")}


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_emits_mma_sync_and_shuffles(arch):
    from cuda_compile import nvrtc_compile

    entries = _entries(nvrtc_compile(SOURCE, arch))
    for kernel, instruction in _MMA.items():
        assert entries[kernel].count(instruction) == 1, kernel
    assert re.search(r"shfl\.sync\.bfly\.b32", entries["shim_warp_shuffles"])
    assert re.search(r"shfl\.sync\.idx\.b32", entries["shim_warp_shuffles"])
    assert re.search(r"shfl\.sync\.down\.b32", entries["shim_warp_shuffles"])
    assert re.search(r"vote\.sync\.ballot\.b32", entries["shim_warp_shuffles"])
    for cvt in ("cvt.rn.f16.f32", "cvt.rn.bf16.f32", "cvt.rna.tf32.f32"):
        assert cvt in entries["shim_convert"]
