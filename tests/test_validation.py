"""Bad input gets a clear error naming the argument; dispatch explains itself."""

import numpy as np
import pytest
from helpers import dense_attention, method_knobs, rel_error, require

import mcattn
from mcattn._dispatch import Kernel, Problem, select_kernel
from mcattn.errors import BackendError, DTypeError, NonFiniteError, ShapeError
from mcattn.registry import method_names


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


# ---------------------------------------------------------------- one rule for every method
# (docs/conventions.md: zero sizes, dtypes, booleans; the front door and each method's API)
METHODS = method_names()


def _call(method, q, k, v, heads, dv, **kwargs):
    """``mcattn.attention`` of ``method`` with its sample knobs (mca: no v, values from x)."""
    knobs = method_knobs(method, heads, k.shape[-2] if hasattr(k, "shape") else len(k[0][0]), dv)
    return mcattn.attention(q, k, None if method == "mca" else v, method=method, **knobs, **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("batch, nq, nk", [((0, 2), 3, 4), ((2, 0), 3, 4), ((2, 2), 0, 4), ((2, 2), 3, 0)])
def test_zero_sizes_give_zeros_of_the_right_shape(method, backend, batch, nq, nk):
    """A zero batch or head dim, Nq = 0 or Nk = 0: zeros of ``[..., Nq, dv]``, masks and info
    included, on every backend (eigen's Nk is its basis' length, never 0; mca with no heads
    has ``d_v = d``)."""
    rng = np.random.default_rng(0)
    d, dv = 4, 3
    q, k, v = (rng.standard_normal(batch + (n, w)) for n, w in ((nq, d), (nk, d), (nk, dv)))
    masks = dict(attn_mask=rng.random((1, nk)) > 0.3, key_padding_mask=np.ones((batch[0], nk), bool))
    if method == "eigen" and nk == 0:
        with pytest.raises(ShapeError, match="basis describes rows of"):
            mcattn.attention(q, k, v, method=method, basis=method_knobs("eigen", 2, 4, dv)["basis"],
                             columns=2, backend=backend)
        return
    out, info = _call(method, q, k, v, batch[1], dv, backend=backend, return_info=True, **masks)
    width = d if method == "mca" and batch[1] == 0 else dv
    assert out.shape == batch + (nq, width) and not out.any()
    assert isinstance(info, mcattn.CallInfo) and info.method == method


def test_zero_size_gate_and_soft_mask():
    """rfa's gate and latte's soft mask with no keys or no batch (latte's numpy backend used
    to reduce over zero keys)."""
    q = np.ones((2, 3, 5, 4))
    for n in (0, 5):  # one gate per step: Nq = Nk = n
        t = q[:0, :, :n]
        out = mcattn.attention(t, t, t, method="rfa", num_features=4, seed=0, is_causal=True,
                               gate=np.full((0, 3, n), 0.5), attn_mask=np.ones((1, n), bool))
        assert out.shape == (0, 3, n, 4)
    k = np.ones((2, 3, 0, 4))
    for kw in (dict(backend="numpy"), dict(soft=True)):
        out, info = mcattn.attention(q, k, k, method="latte", threshold=1.0, return_info=True, **kw)
        assert out.shape == (2, 3, 5, 4) and not out.any() and info.kept == 0


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax", "tensorflow"])
@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_half_precision_beside_float32_is_refused(kind, low):
    """float16 / bfloat16 with float32 raises like float32 with float64, in every framework."""
    a = np.random.default_rng(1).standard_normal((1, 2, 5, 4)).astype(np.float32)
    if kind == "numpy":
        half = a.astype(require("ml_dtypes").bfloat16 if low == "bfloat16" else np.float16)
        full = a
    elif kind == "torch":
        torch = require("torch")
        full = torch.from_numpy(a)
        half = full.to(getattr(torch, low))
    elif kind == "jax":
        jnp = require("jax.numpy")
        full = jnp.asarray(a)
        half = full.astype(getattr(jnp, low))
    else:
        tf = require("tensorflow")
        full = tf.constant(a)
        half = tf.cast(full, getattr(tf, low))
    with pytest.raises(DTypeError, match=f"q, k, v must share one dtype; got q={low}, k=float32, v=float32"):
        mcattn.attention(half, full, full)
    with pytest.raises(DTypeError, match=f"k={low}"):
        mcattn.attention(full, half, full, method="rfa", num_features=4, seed=0)


def test_mca_data_share_the_dtype_of_q():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    x, w = rng.standard_normal((1, 5, 6)), rng.standard_normal((6, 8))
    with pytest.raises(DTypeError, match="x=float16"):
        mcattn.attention(q, q, method="mca", x=x.astype(np.float16), w_v=w.astype(np.float32), alpha=0.5)
    with pytest.raises(DTypeError, match="w=float16"):
        mcattn.eatt.selective_projection(np.ones((3, 6), bool), w.astype(np.float16),
                                         np.ones(8, np.float32))


def test_numpy_bfloat16_computes_in_float32_and_comes_back_as_bfloat16():
    ml_dtypes = require("ml_dtypes")
    a = np.random.default_rng(3).standard_normal((2, 3, 6, 4)).astype(ml_dtypes.bfloat16)
    out = mcattn.attention(a, a, a, is_causal=True)
    assert out.dtype == ml_dtypes.bfloat16
    ref = dense_attention(*(a.astype(np.float64) for _ in range(3)), is_causal=True)
    assert rel_error(out.astype(np.float64), ref) < 1e-2  # bfloat16 output rounding


def test_coefficients_may_have_another_float_dtype():
    """Masks, rfa's gate and latte's threshold are converted to the compute dtype (not data)."""
    torch = require("torch")
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 6, 4)).astype(np.float32)
    mask = np.where(rng.random((6, 6)) > 0.3, 0.0, -np.inf).astype(np.float16)
    assert mcattn.attention(q, q, q, attn_mask=mask).dtype == np.float32
    gate = rng.uniform(0.2, 0.8, (1, 2, 6))
    assert mcattn.attention(q, q, q, method="rfa", num_features=4, seed=0, is_causal=True,
                            gate=gate).dtype == np.float32
    from mcattn.frameworks.torch import attention

    tq = torch.from_numpy(q.astype(np.float64)).requires_grad_(True)
    theta = torch.tensor([1.0, 2.0], dtype=torch.float32, requires_grad=True)
    attention(tq, tq, tq, method="latte", threshold=theta, soft=True).sum().backward()
    assert theta.grad.dtype == torch.float32 and tq.grad.dtype == torch.float64
    tgate = torch.from_numpy(gate.astype(np.float32)).requires_grad_(True)
    attention(tq, tq, tq, method="rfa", num_features=4, seed=0, is_causal=True, gate=tgate).sum().backward()
    assert tgate.grad.dtype == torch.float32


FLAGS = [(m, f) for m in METHODS for f in ("is_causal", "check_finite", "return_info")] + [
    ("mca", "shared_draws"), ("latte", "soft")]


@pytest.mark.parametrize("method, flag", FLAGS)
@pytest.mark.parametrize("value", ["no", 1])
def test_flags_take_bools_only(method, flag, value):
    """A truthy string or a number is refused, naming the flag; numpy.bool_ is a bool."""
    q = np.random.default_rng(5).standard_normal((1, 2, 6, 4))
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):
        _call(method, q, q, q, 2, 4, **{flag: value})
    _call(method, q, q, q, 2, 4, **{flag: np.bool_(False)})


def test_flags_of_each_methods_own_api():
    q = np.random.default_rng(6).standard_normal((1, 2, 6, 4))
    x, w = q[:, 0], np.ones((4, 8))
    for call in (lambda: mcattn.rfa.attention(q, q, q, num_features=4, return_info="no"),
                 lambda: mcattn.mca.attention(q, q, x, w, num_heads=2, alpha=1, shared_draws="no"),
                 lambda: mcattn.latte.attention(q, q, q, threshold=1.0, soft="yes"),
                 lambda: mcattn.eatt.attention(q, q, q, is_causal="yes"),
                 lambda: mcattn.exact.attention_probs(q, q, check_finite=None)):
        with pytest.raises(TypeError, match="must be True or False"):
            call()


def test_knob_errors_name_the_knob():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 3, 8, 4))
    basis = method_knobs("eigen", 3, 8, 4)["basis"]
    cases = [
        (dict(method="eigen", basis=basis, columns=3.5), TypeError, "columns must be an int.*got 3.5"),
        (dict(method="eigen", basis=basis, columns=None), TypeError, "columns must be an int.*got None"),
        (dict(method="eigen", basis=None, columns=4), TypeError, "basis must be an EigenBasis.*got None"),
        (dict(method="latte", threshold=None), TypeError, "threshold must be a number.*got None"),
        (dict(method="latte", threshold="2"), TypeError, "threshold must be a number.*got '2'"),
        (dict(method="latte", threshold=1.0, soft=True, temperature=None), TypeError,
         "temperature must be a positive real number; got None"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=words):
            mcattn.attention(q, q, q, **kwargs)
    with pytest.raises(ValueError, match="must be >= 0"):  # checked as given, even with no heads
        mcattn.attention(q[:, :0], q[:, :0], q[:, :0], method="latte", threshold=-1.0)
