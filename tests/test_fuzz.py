"""Property-based tests of the front door, for every registered method.

Hypothesis draws the shapes (zero batch, zero heads, ``N = 0``, 1, odd head dims,
``Nq != Nk``, keys shared by the heads), dtypes, array types (NumPy, nested lists, torch,
JAX), masks, flags and each method's knobs (rfa's gate, per-head thresholds and bases
included), sometimes invalid ones. Every call must either raise
the error the draw predicts — raised by mcattn itself, with a message — or return a result of
the right shape, dtype and array type, without NaN from finite input, zero on rows that see
no key; exact attention and keep-all LATTE must equal a float64 reference.

The profile is fixed (``max_examples`` per test, ``derandomize=True``, no example database,
no deadline) so that CI runs the same examples every time: about 10 s with Numba's cache
warm, 1.5 min cold (compiling the kernels) on a shared 2-core machine;
``MCATTN_FUZZ_EXAMPLES=500`` explores further on a developer machine.
"""

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
from helpers import dense_attention, require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcattn
from mcattn.errors import BackendError, DTypeError, NonFiniteError, ShapeError
from mcattn.registry import method_names

settings.register_profile(
    "mcattn-fuzz", max_examples=int(os.environ.get("MCATTN_FUZZ_EXAMPLES", "80")), derandomize=True,
    database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("mcattn-fuzz")

#: Output tolerance against the float64 reference, by the dtype the call computes in.
TOLERANCE = {"float64": 1e-9, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


@dataclass
class Case:
    """One drawn call and what it must do."""

    q: object
    k: object
    v: object
    kwargs: dict
    out_shape: tuple
    dtype: str
    kind: str = "numpy"
    expect: tuple | None = None  # the exception classes the call may raise, or None
    reference: bool = False  # the result must equal exact attention in float64
    host: dict = field(default_factory=dict)  # float64 NumPy q, k, v and masks


# ----------------------------------------------------------------------------- strategies


@functools.cache
def _basis(n):
    """An eigenbasis of rows of ``n`` keys (plain centring, so any Nq fits)."""
    rng = np.random.default_rng(n)
    rows = mcattn.eigen.score_rows(rng.standard_normal((4, n, 3)), rng.standard_normal((4, n, 3)))
    return mcattn.eigen.fit(rows, rank=min(2, n))


def _to_kind(a, kind, dtype):
    if a is None:
        return None
    if kind == "list":
        return a.tolist()
    if kind == "torch":
        torch = require("torch")
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(getattr(torch, dtype)) if t.is_floating_point() else t
    if kind == "jax":
        jnp = require("jax.numpy")
        return jnp.asarray(a, dtype=getattr(jnp, dtype)) if a.dtype.kind == "f" else jnp.asarray(a)
    return a.astype(dtype) if a.dtype.kind == "f" else a


def _sometimes_zero(draw, sizes, zero):
    """One of ``sizes``, or ``zero`` one time in eight."""
    return zero if draw(st.integers(0, 7)) == 7 else draw(st.sampled_from(sizes))


@st.composite
def shapes(draw, needs_heads=False):
    batch = _sometimes_zero(draw, [(2, 3), (1, 2), (3, 1), (1, 1)] + ([] if needs_heads else [()]),
                            draw(st.sampled_from([(0, 2), (2, 0)])))
    nq = _sometimes_zero(draw, [1, 2, 5, 7, 18], 0)
    nk = _sometimes_zero(draw, [1, 3, 6, 7, 33], 0)
    d = draw(st.sampled_from([1, 2, 3, 5, 8]))
    dv = draw(st.sampled_from([1, 3, 4]))
    # k, v [B, 1, Nk, d]: one for every head (mca takes k with its H heads: see below)
    shared_keys = bool(batch) and not needs_heads and draw(st.booleans())
    return batch, nq, nk, d, dv, shared_keys


@st.composite
def masks(draw, batch, nq, nk, per_key=False):
    """``(attn_mask, key_padding_mask)`` as NumPy arrays or None."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    attn_mask = None
    form = draw(st.sampled_from(["none", "bool", "float"]))
    rows = 1 if per_key else nq
    if form == "bool":
        attn_mask = rng.random((rows, nk)) > 0.3
    elif form == "float":
        attn_mask = np.where(rng.random((rows, nk)) > 0.25, rng.uniform(-3, 3, (rows, nk)), -np.inf)
    kpm = None
    if draw(st.booleans()):
        kpm = rng.random(batch[:1] + (nk,)) > 0.3
    return attn_mask, kpm


def _visible(host, batch, nq, nk, is_causal):
    """Bool ``batch + [Nq, Nk]``: which keys each query sees (mcattn's conventions)."""
    vis = np.ones(tuple(batch) + (nq, nk), bool)
    if host.get("attn_mask") is not None:
        m = host["attn_mask"]
        vis &= (m if m.dtype == bool else m > -np.inf)
    if host.get("key_padding_mask") is not None:
        kpm = host["key_padding_mask"]
        vis &= kpm.reshape(kpm.shape[:1] + (1,) * (len(batch) - 1) + (1, nk)) if batch else kpm
    if is_causal:
        vis &= np.tril(np.ones((nq, nk), bool))
    return vis


def _reference(case):
    """Exact attention of the case's host inputs, float64, masks as one additive bias."""
    h = case.host
    if 0 in h["k"].shape[-2:] + case.out_shape:  # no key (or nothing to compute): zeros
        return np.zeros(case.out_shape)
    bias = 0.0
    if h.get("attn_mask") is not None:
        m = h["attn_mask"]
        bias = bias + (np.where(m, 0.0, -np.inf) if m.dtype == bool else m)
    if h.get("key_padding_mask") is not None:
        kpm = h["key_padding_mask"]
        shape = kpm.shape[:1] + (1,) * (len(case.out_shape) - 3) + (1, kpm.shape[-1])
        bias = bias + np.where(kpm, 0.0, -np.inf).reshape(shape if len(case.out_shape) > 2 else kpm.shape)
    mask = None if np.isscalar(bias) else bias
    return dense_attention(h["q"], h["k"], h["v"], mask=mask, is_causal=case.kwargs.get("is_causal", False),
                           scale=case.kwargs.get("scale"))


@st.composite
def common_case(draw, method, needs_heads=False, per_key=False):
    """q, k, v (or mca's x, w_v), masks, flags and array type of one call."""
    batch, nq, nk, d, dv, shared_keys = draw(shapes(needs_heads=needs_heads))
    if method == "eigen":
        nk = draw(st.sampled_from([1, 4, 7]))  # the basis fixes Nk (>= 1)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kbatch = batch[:-1] + (1,) if shared_keys else batch
    q = rng.standard_normal(batch + (nq, d))
    k = rng.standard_normal(kbatch + (nk, d))
    v = rng.standard_normal(kbatch + (nk, dv))
    attn_mask, kpm = draw(masks(batch, nq, nk, per_key=per_key))
    kind = draw(st.sampled_from(["numpy", "numpy", "numpy", "list", "torch", "torch", "jax"]))
    if kind == "list" and 0 in batch + (nq, nk):  # nested lists cannot hold [..., 0, d]
        kind = "numpy"
    dtype = {"numpy": draw(st.sampled_from(["float64", "float32", "float16"])), "list": "float64",
             "torch": draw(st.sampled_from(["float32", "float64", "bfloat16", "float16"])),
             "jax": draw(st.sampled_from(["float32", "bfloat16"]))}[kind]
    mask_kind = "numpy" if kind == "list" else kind
    mask_dtype = "float32" if kind == "jax" else "float64"  # JAX keeps float64 off by default
    kwargs = dict(
        attn_mask=_to_kind(attn_mask, mask_kind, mask_dtype),
        key_padding_mask=_to_kind(kpm, mask_kind, mask_dtype),
        is_causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.3, 1.0, 1.7])),
        backend=draw(st.sampled_from([None, "numpy", "numba"])),
        check_finite=draw(st.booleans()),
        return_info=draw(st.booleans()),
    )
    if dtype in ("float16", "bfloat16"):  # round as the call will see them
        q, k, v = (_rounded(a, dtype) for a in (q, k, v))
    host = dict(q=q, k=k, v=v, attn_mask=attn_mask, key_padding_mask=kpm)
    case = Case(q=_to_kind(q, kind, dtype), k=_to_kind(k, kind, dtype), v=_to_kind(v, kind, dtype),
                kwargs=kwargs, out_shape=batch + (nq, dv), dtype=dtype, kind=kind, host=host)
    return case


def _rounded(a, dtype):
    return a.astype(np.float16 if dtype == "float16" else require("ml_dtypes").bfloat16).astype(np.float64)


def _spoil(draw, case):
    """Make ``case`` an invalid call and record the error it must raise."""
    mistake = draw(st.sampled_from(["dtype", "flag", "nan", "scale", "rank", "library", "kpm"]))
    if mistake == "library" and case.kind in ("torch", "jax"):  # a NumPy k beside framework q
        case.k = np.asarray(case.host["k"], dtype=np.float32)
        _expect(case, TypeError)
    elif mistake == "kpm" and case.kwargs["key_padding_mask"] is not None:  # 0/1 floats, not bools
        case.kwargs["key_padding_mask"] = case.host["key_padding_mask"].astype(np.float64)
        _expect(case, DTypeError)
    elif mistake == "dtype" and case.kind != "list":  # float32 k beside another dtype
        other = "float32" if case.dtype != "float32" else "float64"
        if case.kind == "jax":  # JAX keeps float64 off by default
            other = "bfloat16" if case.dtype != "bfloat16" else "float32"
        case.k = _to_kind(case.host["k"], case.kind, other)
        _expect(case, DTypeError)
    elif mistake == "flag":
        name = draw(st.sampled_from(["is_causal", "return_info", "check_finite"]))
        case.kwargs[name] = draw(st.sampled_from(["yes", "no", 1, None]))
        _expect(case, TypeError)
    elif mistake == "nan" and np.size(case.host["q"]):
        q = np.array(case.host["q"])
        q.flat[0] = np.nan
        case.q = _to_kind(q, case.kind, case.dtype)
        case.kwargs["check_finite"] = True
        _expect(case, NonFiniteError)
    elif mistake == "scale":
        case.kwargs["scale"] = draw(st.sampled_from([float("inf"), float("nan"), "big"]))
        _expect(case, (TypeError, ValueError))
    else:  # q without its sequence dim
        case.q = _to_kind(np.zeros(3), case.kind if case.kind != "list" else "numpy", case.dtype)
        _expect(case, ShapeError)


def _bad(draw, case, error, **knobs):
    """Give ``case`` invalid ``knobs``: it must raise ``error`` (or the error it already had)."""
    case.kwargs.update(knobs)
    _expect(case, error)


def _expect(case, error):
    errors = error if isinstance(error, tuple) else (error,)
    case.expect = errors if case.expect is None else tuple(set(case.expect) | set(errors))


@st.composite
def exact_case(draw):
    case = draw(common_case("exact"))
    case.reference = True
    return case


@st.composite
def rfa_case(draw):
    case = draw(common_case("rfa", per_key=True))
    knobs = dict(num_features=draw(st.sampled_from([1, 4, 8])), seed=draw(st.integers(0, 5)),
                 kind=draw(st.sampled_from(["positive", "sincos", "arccos"])),
                 normalize=draw(st.sampled_from([None, None, "unit"])))
    if knobs["normalize"] == "unit":
        case.kwargs["scale"] = None
    nq, nk = case.out_shape[-2], case.host["k"].shape[-2]
    if case.kwargs["is_causal"] and nq == nk and draw(st.booleans()):  # recency gate in (0, 1)
        rng = np.random.default_rng(nq)
        gate = rng.uniform(0.05, 0.95, case.out_shape[:-2] + (nk,))
        knobs["gate"] = _to_kind(gate, "numpy" if case.kind == "list" else case.kind,
                                 draw(st.sampled_from(["float32"] if case.kind == "jax" else
                                                      ["float64", "float32"])))
        knobs["chunk_size"] = draw(st.sampled_from([None, 1, 4]))
    case.kwargs.update(knobs)
    if draw(st.integers(0, 5)) == 0:
        bad = draw(st.sampled_from(["num_features", "kind", "normalize", "chunk_size", "eps"]))
        value = {"num_features": 0, "kind": "cosine", "normalize": "l2", "chunk_size": 0, "eps": 2.0}[bad]
        _bad(draw, case, (TypeError, ValueError), **{bad: value})
    return case


@st.composite
def mca_case(draw):
    case = draw(common_case("mca", needs_heads=True))
    batch, h = case.out_shape[:-3], case.out_shape[-3]
    nk = case.host["k"].shape[-2]
    d = case.host["q"].shape[-1]
    d_in = draw(st.sampled_from([1, 3, 6]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dv = case.out_shape[-1] if h else d  # zero heads: d_v is taken as d_head
    x = rng.standard_normal(batch + (nk, d_in))
    w = rng.standard_normal((d_in, h * dv)) / np.sqrt(d_in)
    if case.dtype in ("float16", "bfloat16"):
        x, w = _rounded(x, case.dtype), _rounded(w, case.dtype)
    case.v = None
    case.out_shape = case.out_shape[:-1] + (dv,)
    case.host["v"] = None
    if draw(st.booleans()):
        b = rng.standard_normal(h * dv) if case.dtype not in ("float16", "bfloat16") else \
            _rounded(rng.standard_normal(h * dv), case.dtype)
        case.kwargs["b_v"] = _to_kind(b, case.kind, case.dtype)
    case.kwargs.update(x=_to_kind(x, case.kind, case.dtype), w_v=_to_kind(w, case.kind, case.dtype),
                       alpha=draw(st.sampled_from([0.05, 0.5, 2.0])), seed=draw(st.integers(0, 5)),
                       sampling=draw(st.sampled_from(["weight", "optimal"])))
    if case.kwargs["sampling"] == "weight":
        case.kwargs["shared_draws"] = draw(st.booleans())
        if nk == 0 and case.kwargs["return_info"]:  # see test_mca_shared_draws_info_without_keys
            case.kwargs["shared_draws"] = False
    if draw(st.integers(0, 5)) == 0:
        bad = draw(st.sampled_from(["alpha0", "alpha-", "sampling", "shared_draws"]))
        knobs = {"alpha0": dict(alpha=0.0), "alpha-": dict(alpha=-1.0), "sampling": dict(sampling="best"),
                 "shared_draws": dict(shared_draws="no", sampling="weight")}[bad]
        _bad(draw, case, (TypeError, ValueError), **knobs)
    return case


@st.composite
def eatt_case(draw):
    case = draw(common_case("eatt"))
    case.kwargs["alignment"] = draw(st.sampled_from(["l1", "hamming"]))
    if draw(st.integers(0, 5)) == 0:
        bad = draw(st.sampled_from([dict(alignment="cosine"), dict(scale=-1.0)]))
        _bad(draw, case, ValueError, **bad)
    return case


@st.composite
def latte_case(draw):
    case = draw(common_case("latte"))
    mode = draw(st.sampled_from(["relative", "absolute", "topk", "safe"]))
    threshold = {"relative": draw(st.sampled_from([0.0, 1.0, 3.0, np.inf])),
                 "safe": draw(st.sampled_from([0.5, 2.0])),
                 "absolute": draw(st.sampled_from([-1.0, 0.0, 0.5])),
                 "topk": draw(st.sampled_from([1, 2, 10]))}[mode]
    heads = case.out_shape[-3] if len(case.out_shape) > 2 else 1
    if draw(st.booleans()):  # one threshold per head
        threshold = np.full(heads, threshold)
        threshold = threshold.tolist() if draw(st.booleans()) else threshold
    case.kwargs.update(threshold=threshold, mode=mode,
                       exact_scores=draw(st.sampled_from(["int8", "float"])))
    if mode == "relative" and draw(st.booleans()):
        case.kwargs.update(soft=True, temperature=draw(st.sampled_from([0.5, 1.0])))
        if case.kwargs["backend"] == "numba":
            _expect(case, BackendError)  # the soft mask runs on numpy only
    nk = case.host["k"].shape[-2]
    t = np.min(threshold) if np.size(threshold) else np.inf
    keeps_all = (mode == "relative" and t == np.inf) or (mode == "topk" and t >= nk)
    case.reference = (keeps_all and case.kwargs["exact_scores"] == "float"
                      and not case.kwargs.get("soft"))
    if case.kwargs["scale"] is not None and draw(st.integers(0, 7)) == 0:
        _bad(draw, case, ValueError, scale=-case.kwargs["scale"])  # thresholds need scale > 0
    if draw(st.integers(0, 5)) == 0:
        bad = draw(st.sampled_from([dict(threshold=None), dict(threshold="3"),
                                    dict(threshold=-1.0, mode="relative"),
                                    dict(mode="topk", threshold=1.5), dict(mode="nearest"),
                                    dict(soft=1), dict(soft=True, mode="relative", temperature=0)]))
        _bad(draw, case, (TypeError, ValueError), **bad)
    return case


@st.composite
def eigen_case(draw):
    case = draw(common_case("eigen"))
    nk = case.host["k"].shape[-2]
    basis = _basis(nk)
    columns = draw(st.one_of(st.integers(basis.rank, nk), st.just(np.arange(nk)[::2][: max(1, nk // 2)])))
    heads = case.out_shape[-3] if len(case.out_shape) > 2 else 0
    if heads > 1 and draw(st.booleans()):
        basis = (basis,) * heads  # one per head
    case.kwargs.update(basis=basis, columns=columns,
                       estimator=draw(st.sampled_from(["conditional", "deim"])))
    rank = _basis(nk).rank
    if case.kwargs["estimator"] == "deim" and not isinstance(columns, int) and len(columns) < rank:
        case.kwargs["estimator"] = "conditional"
    if draw(st.integers(0, 5)) == 0:
        bad = draw(st.sampled_from([dict(columns=3.5), dict(columns=None), dict(basis=None),
                                    dict(rank=0), dict(estimator="mean")]))
        _bad(draw, case, (TypeError, ValueError), **bad)
    return case


@st.composite
def hybrid_case(draw):
    case = draw(common_case("hybrid"))
    mode = draw(st.sampled_from(["relative", "absolute", "topk"]))
    threshold = {"relative": draw(st.sampled_from([0.0, 1.0, 3.0, np.inf])),
                 "absolute": draw(st.sampled_from([-1.0, 0.0, 0.5])),
                 "topk": draw(st.sampled_from([1, 2, 10]))}[mode]
    case.kwargs.update(threshold=threshold, mode=mode,
                       remainder=draw(st.sampled_from(["pooled", "none"])),
                       block=draw(st.integers(1, 9)))
    nk = case.host["k"].shape[-2]
    case.reference = (mode == "relative" and threshold == np.inf) or (mode == "topk" and threshold >= nk)
    if draw(st.integers(0, 5)) == 0:
        bad = draw(st.sampled_from([dict(remainder="rfa"), dict(block=0), dict(mode="safe"),
                                    dict(threshold=None), dict(mode="topk", threshold=1.5)]))
        _bad(draw, case, (TypeError, ValueError), **bad)
    return case


CASES = {"exact": exact_case, "rfa": rfa_case, "mca": mca_case, "eatt": eatt_case,
         "latte": latte_case, "eigen": eigen_case, "hybrid": hybrid_case}


# ----------------------------------------------------------------------------- checks


def _raised_by_mcattn(exc):
    """The innermost frame of the traceback is mcattn's own code (not NumPy's, torch's)."""
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}mcattn{os.sep}" in tb.tb_frame.f_code.co_filename


def _as_float64(out, kind):
    if kind == "torch":
        return out.detach().to(require("torch").float64).numpy()
    return np.asarray(out).astype(np.float64)


def _check(case, method):
    call = dict(case.kwargs)
    try:
        result = mcattn.attention(case.q, case.k, case.v, method=method, **call)
    except Exception as exc:
        assert case.expect is not None, f"{type(exc).__name__}: {exc}"
        assert isinstance(exc, case.expect), f"expected {case.expect}, got {type(exc).__name__}: {exc}"
        assert _raised_by_mcattn(exc) and str(exc), f"not mcattn's own error: {exc!r}"
        return
    assert case.expect is None, f"expected {case.expect}, got a result"
    out = result[0] if call["return_info"] else result
    if call["return_info"]:
        assert isinstance(result[1], mcattn.CallInfo) and result[1].method == method
    if case.kind == "torch":
        torch = require("torch")
        assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, case.dtype)
    elif case.kind == "jax":
        jax = require("jax")
        assert isinstance(out, jax.Array) and out.dtype == getattr(jax.numpy, case.dtype)
    else:
        assert isinstance(out, np.ndarray) and out.dtype == np.dtype(case.dtype)
    assert tuple(out.shape) == case.out_shape
    out64 = _as_float64(out, case.kind)
    assert not np.isnan(out64).any(), "NaN from finite input"
    batch, nq = case.out_shape[:-2], case.out_shape[-2]
    nk = case.host["k"].shape[-2]
    vis = _visible(case.host, batch, nq, nk, call["is_causal"])
    blind = ~vis.any(-1)  # rows that see no key: zeros
    assert not np.any(out64[blind]), "a row with no visible key is not zero"
    if case.reference:
        tol = TOLERANCE[case.dtype]
        np.testing.assert_allclose(out64, _reference(case), rtol=tol, atol=tol)


@pytest.mark.parametrize("method", method_names())
def test_every_method_has_a_strategy(method):
    assert method in CASES, f"add a hypothesis strategy for the new method {method!r}"


@pytest.mark.parametrize("method", list(CASES))
@settings(FUZZ)
@given(data=st.data())
def test_fuzz_front_door(method, data):
    case = data.draw(CASES[method]())
    if data.draw(st.integers(0, 9)) == 0:  # one in ten: a generic mistake every method refuses
        _spoil(data.draw, case)
    _check(case, method)


# ----------------------------------------------------------------------------- found by the fuzz


def test_mca_shared_draws_info_without_keys():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((2, 3, 0, 2))
    out, info = mcattn.attention(q, k, method="mca", x=np.zeros((2, 0, 5)), w_v=rng.standard_normal((5, 6)),
                                 alpha=0.5, seed=0, shared_draws=True, return_info=True)
    assert out.shape == (2, 3, 4, 2) and not out.any() and info.budgets.shape == (2, 3, 0)


def test_mca_keys_shared_by_the_heads():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((2, 1, 5, 2))
    x, w = rng.standard_normal((2, 5, 4)), rng.standard_normal((4, 6))
    out = mcattn.attention(q, k, method="mca", x=x, w_v=w, alpha=1e-9, seed=0)
    full = mcattn.attention(q, np.broadcast_to(k, (2, 3, 5, 2)), method="mca", x=x, w_v=w, alpha=1e-9, seed=0)
    np.testing.assert_allclose(out, full, rtol=1e-12, atol=1e-12)
