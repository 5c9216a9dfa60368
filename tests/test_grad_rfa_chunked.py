"""rfa's O(N m) backward (chunked sweeps; numba and array kernels) against the O(N^2) reference."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import require

from mcattn.errors import BackendError, GradientNotSupportedError
from mcattn.rfa import grad

CASES = {
    "plain": {},
    "plain, Nq != Nk": {"nq": 13},
    "padding": {"padding": True},
    "per-key attn_mask, Nq != Nk": {"nq": 11, "attn_mask": True},
    "causal": {"is_causal": True},
    "causal + padding": {"is_causal": True, "padding": True},
    "gate": {"is_causal": True, "gate": True},
    "gate + padding": {"is_causal": True, "gate": True, "padding": True},
}


def _problem(case, seed=0, n=23, dtype=np.float64):
    """Inputs (a key broadcast over heads, so its gradient sums them), knobs and ``dout``."""
    spec = dict(CASES[case])
    rng = np.random.default_rng(seed)
    nq = spec.get("nq", n)
    q = rng.standard_normal((2, 3, nq, 8))
    k = rng.standard_normal((2, 1, n, 8))
    v = rng.standard_normal((2, 3, n, 5))
    kw = {"num_features": 7, "seed": seed + 1, "is_causal": spec.get("is_causal", False)}
    if spec.get("gate"):
        kw["gate"] = rng.uniform(0.3, 0.97, (2, 3, n)).astype(dtype)
    if spec.get("padding"):
        kpm = np.ones((2, n), bool)
        kpm[1, n - 6:] = False
        kpm[0, 2] = False
        kw["key_padding_mask"] = kpm
    if spec.get("attn_mask"):
        bias = np.where(rng.random((3, 1, n)) > 0.3, rng.standard_normal((3, 1, n)), -np.inf)
        kw["attn_mask"] = bias.astype(dtype)
    dout = rng.standard_normal((2, 3, nq, 5))
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype)), kw, dout.astype(dtype)


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_backward_equals_the_reference(case, chunk_size, backend):
    (q, k, v), kw, dout = _problem(case)
    kw["chunk_size"] = chunk_size  # 5 does not divide 23; 64 is one chunk
    out, res = grad.forward(q, k, v, **kw)
    fast = grad.backward(q, k, v, out, res, dout, backend=backend, **kw)
    ref = grad.reference_backward(q, k, v, out, res, dout, **kw)
    assert set(fast) == set(ref)
    for name in ref:
        assert fast[name].shape == ref[name].shape and fast[name].dtype == ref[name].dtype
        assert _rel(fast[name], ref[name]) < 1e-11, name
    if "key_padding_mask" in kw:  # padded keys get exactly zero gradient
        assert not fast["k"][1, :, -6:].any() and not fast["v"][1, :, -6:].any()
        if "gate" in kw:
            assert not fast["gate"][1, :, -6:].any()


@pytest.mark.parametrize("case", ["plain", "causal", "gate + padding"])
def test_float32_kernels_are_close_to_float64(case):
    (q, k, v), kw, dout = _problem(case, seed=4, n=200)
    kw["chunk_size"] = 48
    out, res = grad.forward(q, k, v, **kw)
    ref = grad.backward(q, k, v, out, res, dout, backend="numba", **kw)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    kw32 = {n: f32(a) if n in ("gate", "attn_mask") else a for n, a in kw.items()}
    for backend in ("numba", "numpy"):
        out32, res32 = grad.forward(f32(q), f32(k), f32(v), **kw32)
        g = grad.backward(f32(q), f32(k), f32(v), out32, res32, f32(dout), backend=backend, **kw32)
        for name in ref:
            assert g[name].dtype == np.float32
            assert _rel(g[name], ref[name]) < 2e-4, (backend, name)


def test_equals_the_reference_on_real_attention():
    from mcattn.studies.data import load_sample

    sample = load_sample()
    q, k, v = (a[3].astype(np.float64) for a in (sample.q, sample.k, sample.v))
    kpm = sample.key_padding_mask
    dout = np.random.default_rng(3).standard_normal(v.shape[:-2] + (q.shape[-2], v.shape[-1]))
    gate = np.random.default_rng(4).uniform(0.8, 0.99, q.shape[:-1])
    for kw in ({}, {"is_causal": True, "gate": gate, "chunk_size": 16}):
        kw = dict(kw, num_features=32, seed=5, key_padding_mask=kpm, scale=sample.scale)
        out, res = grad.forward(q, k, v, **kw)
        ref = grad.reference_backward(q, k, v, out, res, dout, **kw)
        for backend in ("numba", "numpy"):
            g = grad.backward(q, k, v, out, res, dout, backend=backend, **kw)
            for name in ref:
                a, b = g[name], ref[name]
                assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-11, (backend, name)


def test_backward_kernels_are_selected_like_exact():
    (q, k, v), kw, dout = _problem("gate")
    out, res = grad.forward(q, k, v, **kw)
    with pytest.raises(BackendError, match="cuda"):
        grad.backward(q, k, v, out, res, dout, backend="cuda", **kw)
    with pytest.raises(GradientNotSupportedError, match="Nq == Nk"):
        grad.backward(q[..., :5, :], k, v, out[..., :5, :], res, dout[..., :5, :], is_causal=True,
                      num_features=7, seed=1)


def test_torch_gradcheck_gated_causal_with_chunks_that_do_not_divide_n():
    torch = require("torch")
    from mcattn.frameworks.torch import attention

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 11, 4, generator=g, dtype=torch.float64).mul(0.5).requires_grad_(True)
               for _ in range(3))
    gate = torch.rand(1, 2, 11, generator=g, dtype=torch.float64).mul(0.5).add(0.45).requires_grad_(True)
    kpm = torch.ones(1, 11, dtype=torch.bool)
    kpm[0, 9:] = False
    assert torch.autograd.gradcheck(
        lambda a, b, c, gt: attention(a, b, c, method="rfa", num_features=6, seed=3, is_causal=True,
                                      gate=gt, chunk_size=4, key_padding_mask=kpm), (q, k, v, gate))


def test_causal_backward_memory_is_linear_in_n():
    """N = 8192, one head: the reference's N x N float64 matrices would be 512 MiB each."""
    code = """
import numpy as np, threading, time, resource
from mcattn.rfa import grad
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal((1, 1, 8192, 64), dtype=np.float32) for _ in range(4))
kw = dict(num_features=64, seed=0, is_causal=True, gate=np.full((1, 1, 8192), 0.9, np.float32))
small = [a[..., :64, :] for a in (q, k, v, dout)]
skw = dict(kw, gate=kw["gate"][..., :64])
out, res = grad.forward(*small[:3], **skw); grad.backward(*small[:3], out, res, small[3], **skw)
out, res = grad.forward(q, k, v, **kw)
def rss():
    with open('/proc/self/statm') as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
base, peak, stop = rss(), [0.0], []
def watch():
    while not stop:
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
t = threading.Thread(target=watch); t.start()
grad.backward(q, k, v, out, res, dout, **kw)
stop.append(1); t.join()
print(peak[0] - base)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    growth = float(done.stdout.strip().splitlines()[-1])
    assert growth < 48, f"backward grew the resident set by {growth:.1f} MiB"
