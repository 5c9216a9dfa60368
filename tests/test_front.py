"""The front door: mcattn.attention(..., method=...), mcattn.methods(), dask arrays."""

import numpy as np
import pytest
from helpers import dense_attention, method_knobs, rel_error, require

import mcattn
from mcattn import mca, rfa
from mcattn.mca.spec import row_seed


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((3, 4, 10, 8)) for _ in range(3))


def test_methods_lists_every_registered_method_with_its_knobs():
    from mcattn.registry import method_names

    specs = {m.name: m for m in mcattn.methods()}
    assert list(specs) == method_names()
    assert specs["exact"].knobs == {}
    assert {"num_features", "seed", "kind", "gate", "features"} <= set(specs["rfa"].knobs)
    assert set(specs["mca"].required) == {"x", "w_v", "alpha"} and not specs["mca"].needs_values
    for spec in specs.values():
        assert spec.description and not set(spec.knobs) & set(mcattn.front.COMMON_ARGUMENTS)


def test_exact_through_the_door_is_exact_attention(qkv):
    q, k, v = qkv
    kpm = np.ones((3, 10), bool)
    kpm[1, 7:] = False
    out, info = mcattn.attention(q, k, v, key_padding_mask=kpm, is_causal=True, return_info=True)
    assert rel_error(out, dense_attention(q, k, v, mask=kpm[:, None, None, :], is_causal=True)) < 1e-12
    assert info.method == "exact" and isinstance(info, mcattn.CallInfo)


def test_rfa_and_mca_through_the_door_equal_their_own_apis(qkv):
    q, k, v = qkv
    out, info = mcattn.attention(q, k, v, method="rfa", num_features=16, seed=5, return_info=True)
    feats = rfa.RandomFeatures(8, 16, num_heads=4, seed=5)
    assert np.array_equal(out, rfa.attention(q, k, v, features=feats))
    assert info.seed == 5 and isinstance(info, rfa.RFAInfo)
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 10, 12)), rng.standard_normal((12, 32)) / 4
    out, info = mcattn.attention(q, k, method="mca", x=x, w_v=w, alpha=0.5, seed=2, return_info=True)
    assert np.array_equal(out, mca.attention(q, k, x, w, num_heads=4, alpha=0.5, seed=2))
    assert isinstance(info, mca.MCAInfo) and info.seed == 2


def test_seed_none_draws_fresh_and_reports_it(qkv):
    q, k, v = qkv
    a, ia = mcattn.attention(q, k, v, method="rfa", num_features=8, return_info=True)
    b, ib = mcattn.attention(q, k, v, method="rfa", num_features=8, return_info=True)
    assert ia.seed != ib.seed and not np.array_equal(a, b)
    assert np.array_equal(a, mcattn.attention(q, k, v, method="rfa", num_features=8, seed=ia.seed))


def test_door_errors_name_the_problem(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="unknown method 'magic'; the methods are exact, mca, rfa"):
        mcattn.attention(q, k, v, method="magic")
    with pytest.raises(TypeError, match="method 'exact' takes no knob 'alpha'; its knobs are: none"):
        mcattn.attention(q, k, v, alpha=0.1)
    with pytest.raises(TypeError, match="takes no knob 'alfa'.*num_features"):
        mcattn.attention(q, k, v, method="rfa", alfa=0.1)
    with pytest.raises(TypeError, match="needs the knob"):
        mcattn.attention(q, k, method="mca", x=q[:, 0], w_v=np.ones((8, 32)))
    with pytest.raises(TypeError, match="computes the values itself"):
        mcattn.attention(q, k, v, method="mca", x=q[:, 0], w_v=np.ones((8, 32)), alpha=1)
    with pytest.raises(TypeError, match="needs v"):
        mcattn.attention(q, k)
    with pytest.raises(TypeError, match="either features= or num_features="):
        mcattn.attention(q, k, v, method="rfa", num_features=4,
                         features=rfa.RandomFeatures(8, 4, seed=0))


@pytest.mark.parametrize("method", mcattn.registry.method_names())
def test_every_method_takes_nested_lists(method, qkv):
    """Lists (inputs and array knobs) are imported at the boundary, as NumPy arrays: the
    result is the NumPy one (rfa and mca's door read ``q.shape`` before importing)."""
    q, k, v = (a[:1, :2, :6] for a in qkv)
    knobs = method_knobs(method, 2, 6, 8)
    if method == "mca":
        v = None
    arrays = mcattn.attention(q, k, v, method=method, **knobs)
    lists = {n: a.tolist() if n in ("x", "w_v") else a for n, a in knobs.items()}
    out = mcattn.attention(q.tolist(), k.tolist(), None if v is None else v.tolist(), method=method,
                           key_padding_mask=[[True] * 6], **lists)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert np.array_equal(out, arrays)


def test_budgets_return_the_array_type_they_were_given(qkv):
    torch = require("torch")
    q, k, _ = qkv
    probs = mcattn.attention_probs(q, k)
    r = mca.budgets(probs, 0.5, 16)
    assert isinstance(r, np.ndarray) and r.dtype == np.int64
    rt = mca.budgets(torch.from_numpy(probs), 0.5, 16)
    assert isinstance(rt, torch.Tensor) and np.array_equal(rt.numpy(), r)


def test_attention_probs_reports_its_operations(qkv):
    q, k, _ = qkv
    p, info = mcattn.attention_probs(q, k, is_causal=True, return_info=True)
    pairs = 3 * 4 * 55  # causal 10 x 10: 55 visible pairs per head
    assert info.ops["fp32_exp"] == pairs and info.ops["fp32_mul"] == pairs * 8 + 3 * 4 * 10 * 8 + pairs
    assert np.allclose(p.sum(-1), 1)


# ---------------------------------------------------------------- dask


@pytest.fixture
def da():
    require("dask")
    import dask.array

    return dask.array


def test_dask_exact_is_lazy_and_equal(qkv, da):
    q, k, v = qkv
    kpm = np.ones((3, 10), bool)
    kpm[2, 4:] = False
    mask = np.random.default_rng(3).random((4, 10, 10)) > 0.3  # per head, broadcast over batch
    ref = mcattn.attention(q, k, v, key_padding_mask=kpm, attn_mask=mask, is_causal=True)
    dq, dk, dv = (da.from_array(a, chunks=(2, 3, 5, 4)) for a in (q, k, v))  # seq/feature split too
    out = mcattn.attention(dq, dk, dv, key_padding_mask=da.from_array(kpm, chunks=(1, 10)),
                           attn_mask=mask, is_causal=True)
    assert isinstance(out, da.Array) and out.chunks == ((2, 1), (3, 1), (10,), (8,))
    assert np.array_equal(out.compute(), ref)


@pytest.mark.parametrize("chunks", [(1, 1, 10, 8), (3, 2, 10, 8), (2, 4, 5, 8)])
def test_dask_random_methods_do_not_depend_on_the_chunking(qkv, da, chunks):
    q, k, v = qkv
    ref = mcattn.attention(q, k, v, method="rfa", num_features=16, seed=7, is_causal=True)
    out = mcattn.attention(*(da.from_array(a, chunks=chunks) for a in (q, k, v)), method="rfa",
                           num_features=16, seed=7, is_causal=True)
    assert np.array_equal(out.compute(), ref)  # rfa: features by global head index
    gate = np.random.default_rng(4).uniform(0.5, 0.99, (3, 4, 10))
    ref = mcattn.attention(q, k, v, method="rfa", num_features=16, seed=7, is_causal=True, gate=gate)
    out = mcattn.attention(da.from_array(q, chunks=chunks), k, v, method="rfa", num_features=16, seed=7,
                           is_causal=True, gate=da.from_array(gate, chunks=chunks[:2] + (10,)))
    assert np.array_equal(out.compute(), ref)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((3, 10, 12)), rng.standard_normal((12, 32)) / 4
    outs = [mcattn.attention(da.from_array(q, chunks=c), k, method="mca", x=x, w_v=w, alpha=0.5,
                             seed=11).compute() for c in (chunks, (3, 4, 10, 8))]
    assert np.array_equal(outs[0], outs[1])  # mca: draws keyed by global batch row
    one_row = mcattn.attention(q[1:2], k[1:2], method="mca", x=x[1:2], w_v=w, alpha=0.5,
                               seed=row_seed(11, 1))
    assert np.array_equal(outs[0][1:2], one_row)


def test_dask_on_a_distributed_local_cluster(qkv, da):
    require("distributed")
    from distributed import Client, LocalCluster

    q, k, v = qkv
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dq, dk, dv = (da.from_array(a, chunks=(1, 2, 10, 8)) for a in (q, k, v))
        exact = mcattn.attention(dq, dk, dv, is_causal=True)
        approx = mcattn.attention(dq, dk, dv, method="rfa", num_features=16, seed=3)
        got_exact, got_rfa = client.compute([exact, approx], sync=True)
    assert rel_error(got_exact, dense_attention(q, k, v, is_causal=True)) < 1e-12
    assert np.array_equal(got_rfa, mcattn.attention(q, k, v, method="rfa", num_features=16, seed=3))


def test_dask_errors(qkv, da):
    q, k, v = qkv
    dq = da.from_array(q, chunks=(1, 4, 10, 8))
    with pytest.raises(ValueError, match="return_info=True is not available with dask"):
        mcattn.attention(dq, k, v, return_info=True)
    with pytest.raises(TypeError, match="no knob"):
        mcattn.attention(dq, k, v, method="rfa", alpha=1)
