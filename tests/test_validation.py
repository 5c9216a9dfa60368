"""Bad input gets a clear error naming the argument; dispatch explains itself."""

import numpy as np
import pytest

import mcattn
from mcattn._dispatch import Kernel, Problem, select_kernel
from mcattn.errors import BackendError, DTypeError, NonFiniteError, ShapeError


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, 3, 5, 4)) for _ in range(3))


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda q, k, v: (q[..., :3], k, v), ShapeError, "head_dim"),
        (lambda q, k, v: (q, k, v[..., :4, :]), ShapeError, "number of keys"),
        (lambda q, k, v: (q, k[:1, :2], v), ShapeError, "do not broadcast"),
        (lambda q, k, v: (q[0, 0, 0], k, v), ShapeError, "at least 2 dims"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v), ShapeError, ">= 1"),
        (lambda q, k, v: (q.astype(np.int32), k, v), DTypeError, "floating-point"),
        (lambda q, k, v: (q.astype(np.float32), k, v), DTypeError, "share one dtype"),
        (lambda q, k, v: (q.astype(np.complex128), k, v), DTypeError, "complex128"),
    ],
)
def test_bad_shapes_and_dtypes(qkv, change, error, words):
    with pytest.raises(error, match=words):
        mcattn.attention(*change(*qkv))


def test_non_finite_inputs(qkv):
    q, k, v = (a.copy() for a in qkv)
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="k contains NaN"):
        mcattn.attention(q, k, v)
    v[1, 1, 1, 1] = np.inf
    k[0, 0, 0, 0] = 0.0
    with pytest.raises(NonFiniteError, match="v contains"):
        mcattn.attention(q, k, v)
    out = mcattn.attention(q, k, v, check_finite=False)  # the caller's choice
    assert out.shape == (2, 3, 5, 4)


def test_bad_masks(qkv):
    q, k, v = qkv
    with pytest.raises(ShapeError, match="attn_mask must be broadcastable"):
        mcattn.attention(q, k, v, attn_mask=np.ones((5, 6), bool))
    with pytest.raises(DTypeError, match="attn_mask must be boolean"):
        mcattn.attention(q, k, v, attn_mask=np.ones((5, 5), np.int64))
    with pytest.raises(ShapeError, match="key_padding_mask must have shape"):
        mcattn.attention(q, k, v, key_padding_mask=np.ones((3, 5), bool))
    with pytest.raises(DTypeError, match="key_padding_mask must be boolean"):
        mcattn.attention(q, k, v, key_padding_mask=np.ones((2, 5)))
    nan_mask = np.zeros((5, 5))
    nan_mask[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="attn_mask"):
        mcattn.attention(q, k, v, attn_mask=nan_mask)
    neg_inf = np.zeros((5, 5))
    neg_inf[0, 1] = -np.inf  # -inf is how an additive mask masks: allowed
    assert np.all(np.isfinite(mcattn.attention(q, k, v, attn_mask=neg_inf)))


def test_bad_scale(qkv):
    with pytest.raises(ValueError, match="scale must be finite"):
        mcattn.attention(*qkv, scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be a real number"):
        mcattn.attention(*qkv, scale="big")


def test_unknown_and_incapable_backends(qkv):
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        mcattn.attention(*qkv, backend="tpu")
    with pytest.raises(BackendError) as excinfo:
        mcattn.attention(*qkv, backend="cupy")
    assert "cupy" in excinfo.value.reasons
    assert any("cuda arrays" in r or "GPU" in r for r in excinfo.value.reasons["cupy"])


def test_backends_report():
    statuses = {s.name: s for s in mcattn.backends()}
    assert set(statuses) == {"numpy", "numba", "cuda", "cupy"}
    assert statuses["numpy"].available and statuses["numba"].available
    for status in statuses.values():
        assert status.reason  # either what it runs on or why it cannot run
    assert not statuses["cupy"].available or statuses["cupy"].device == "cuda"


def test_dispatch_lists_every_reason():
    kernels = (
        Kernel("numba", "x", "y", dtypes=("float32",), features=frozenset({"mask"})),
        Kernel("numpy", "x", "y", max_head_dim=8),
    )
    problem = Problem("cpu", "float64", 16, 16, frozenset({"causal"}))
    with pytest.raises(BackendError) as excinfo:
        select_kernel("demo", kernels, problem)
    reasons = excinfo.value.reasons
    assert any("float32" in r for r in reasons["numba"])
    assert any("causal" in r for r in reasons["numba"])
    assert any("head dims up to 8" in r for r in reasons["numpy"])
    ok = Problem("cpu", "float64", 8, 8, frozenset())
    assert select_kernel("demo", kernels, ok).backend == "numpy"
    with pytest.raises(BackendError, match="has no cuda kernel"):
        select_kernel("demo", kernels, ok, backend="cuda")
