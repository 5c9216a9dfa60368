"""Monte-Carlo attention's public functions: :func:`attention` and its pieces
(:func:`sampling_probs`, :func:`weight_tables`, :func:`budgets`, :func:`value_projection`)."""

from dataclasses import dataclass, field

import numpy as np

from .._array import host_copy, import_arrays
from .._device import on_input_device
from .._dispatch import Kernel, Problem, select_kernel
from .._door import door
from .._validate import check_flags, namespace_of
from ..cost import CallInfo, OpCounts
from ..errors import DTypeError, ShapeError
from ..exact.ops import exact_ops
from ..posterior import from_rows, gaussian_factor
from ..random import resolve_seed
from . import stream
from ._inputs import check_sampling, check_tables, check_weight, prepare_mca
from .cpu import weight_tables as cpu_weight_tables
from .naive import budgets_from_probs, budgets_from_top, check_share, shared_budgets, weight_probs
from .ops import projection_ops, shared_projection_ops
from .posterior import rounding_allowance, token_variances

__all__ = ["sampling_probs", "weight_tables", "budgets", "value_projection", "attention", "MCAInfo",
           "PROJECTION_KERNELS"]

_GPU_MAX_D_IN = 4096

#: The sampled value-projection kernels, one per backend.
PROJECTION_KERNELS = (
    Kernel("numba", "mcattn.mca.cpu", "value_projection",
           features=frozenset({"optimal", "shared_draws", "share_batch"})),
    Kernel("numpy", "mcattn.mca.naive", "value_projection",
           features=frozenset({"optimal", "shared_draws", "share_batch"})),
    Kernel("cupy", "mcattn.mca.cupy", "value_projection", max_head_dim=128,
           features=frozenset({"optimal", "shared_draws"}), max_sizes=(("d_in", _GPU_MAX_D_IN),)),
    Kernel("cuda", "mcattn.mca.cuda", "value_projection", max_head_dim=128,
           features=frozenset({"optimal", "shared_draws"}), max_sizes=(("d_in", _GPU_MAX_D_IN),)),
)


@dataclass(frozen=True)
class MCAInfo(CallInfo):
    """What an MCA call did (``return_info=True``).

    Attributes
    ----------
    budgets : array of int, shape ``[..., H, Nk]``
        Samples per key token and head (``>= d_in`` = computed exactly, 0 = masked).
    macs_kept : float
        The paper's "FLOPs kept": value-projection multiply-adds done over those of the
        dense projection, on valid tokens (``mean(min(r_j, d_in)) / d_in``).
    exact_fraction : float
        Fraction of valid (token, head) pairs computed exactly.
    projection_ops, dense_projection_ops : OpCounts
        The sampled projection's operations (sampling work included) and the dense one's.
    seed : int
        The seed used (record it to reproduce a ``seed=None`` call).
    alpha : float or None
    sampling : str
    shared_draws : bool
    share : str
        ``"row"`` or ``"batch"`` (what one shared draw sequence serves).
    posterior : mcattn.posterior.PosteriorBound
        Per-row error bound at confidence ``1 - delta`` (:mod:`mcattn.mca.posterior`).
    """

    budgets: object = None
    macs_kept: float = float("nan")
    exact_fraction: float = float("nan")
    projection_ops: OpCounts = None
    dense_projection_ops: OpCounts = None
    seed: int = 0
    alpha: float | None = None
    sampling: str = "weight"
    shared_draws: bool = False
    share: str = "row"
    posterior_source: object = field(default=None, repr=False, compare=False)


@on_input_device
def sampling_probs(w, num_heads):
    """Weight-norm sampling probabilities of each head (cache them per weight).

    Parameters
    ----------
    w : array, shape ``[d_in, num_heads * d_head]``
        Value weight in the ``y = x @ w + b`` convention (torch's ``Linear.weight.T``).
    num_heads : int

    Returns
    -------
    array, shape ``[num_heads, d_in]``, float64
        ``p_h(k) = ||w[k, cols_h]||^2 / ||w[:, cols_h]||_F^2``.
    """
    def prepare(a):
        check_weight(a["w"], None, num_heads)
        return a["w"], None

    def run(w, _):
        xp = namespace_of(w)
        host = np.asarray(w.get() if xp is not np else w)
        return xp.asarray(weight_probs(host, num_heads)), None

    return door("mca sampling_probs", {"w": w}, None, prepare, run)


@on_input_device
def weight_tables(w, num_heads):
    """Precompute what the kernels need from a value weight (cache it per weight).

    Building the tables (weight-norm probabilities, alias tables, head-major blocks, row
    norms) costs a few hundred microseconds for a 384 x 384 weight; a model calls MCA
    with the same weights over and over, so build them once and pass ``tables=``.

    Parameters
    ----------
    w : array, shape ``[d_in, num_heads * d_head]``
    num_heads : int

    Returns
    -------
    WeightTables
    """
    _, a = import_arrays({"w": w})
    check_weight(a["w"], None, num_heads)
    host = a["w"].get() if namespace_of(a["w"]) is not np else a["w"]
    return cpu_weight_tables(host, num_heads)


@on_input_device
@check_flags
def budgets(probs_attn, alpha, d_in, *, attn_mask=None, key_padding_mask=None, is_causal=False):
    """Samples per key token: ``r_j = min(d_in, ceil((n * max_i A[i, j] / alpha)^2))``.

    Parameters
    ----------
    probs_attn : array, shape ``[..., H, Nq, Nk]``
        Attention probabilities (e.g. :func:`mcattn.attention_probs`).
    alpha : float
        Error knob, > 0: smaller is more accurate (``alpha -> 0`` computes every token
        exactly).
    d_in : int
        Inner dimension of the value projection (the cap: ``r_j = d_in`` means exact).
    attn_mask : array, optional
        The attention mask the probabilities were computed with, broadcastable to
        ``[..., H, Nq, Nk]`` (boolean True = may attend, or additive float with ``-inf``):
        a key no query may attend is masked.
    key_padding_mask : array of bool, optional
        ``[..., Nk]`` (broadcast against the leading dims of ``probs_attn`` without
        ``H``): True = real key.
    is_causal : bool, default False
        The probabilities were computed with a causal mask: a key that no query may see
        (``j >= Nq``, or allowed by ``attn_mask`` only for queries before it) is masked.
        With the masks and ``is_causal`` of an :func:`attention` call, the budgets equal
        the ones that call used (``info.budgets``).

    ``n`` is the number of unmasked keys (``Nk`` without masks); masked keys get 0.

    Returns
    -------
    array of int64, shape ``[..., H, Nk]``
        Of the array type of ``probs_attn`` (NumPy, CuPy, torch, ...).
    """
    arrays = {"probs_attn": probs_attn, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}

    def prepare(a):
        p = a["probs_attn"]
        if p.ndim < 3:
            raise ShapeError(f"probs_attn must have shape [..., H, Nq, Nk]; got {p.shape}")
        xp = namespace_of(p)
        valid = None
        kpm = a["key_padding_mask"]
        if kpm is not None:
            if kpm.dtype != bool:
                raise DTypeError(f"key_padding_mask must be boolean (True = real key); got {kpm.dtype}")
            if kpm.shape[-1] != p.shape[-1]:
                raise ShapeError(f"key_padding_mask must end in Nk={p.shape[-1]}; got {kpm.shape}")
            valid = kpm[..., None, :]  # over heads
        mask = a["attn_mask"]
        nq, nk = p.shape[-2], p.shape[-1]
        if mask is not None or is_causal:
            allowed = xp.ones((1, 1), bool) if mask is None else (
                mask if mask.dtype == bool else mask > -np.inf)
            if is_causal:  # top-left aligned, as attention's is_causal
                allowed = allowed & (xp.arange(nk)[None, :] <= xp.arange(nq)[:, None])
            try:
                allowed = xp.broadcast_to(allowed, p.shape)
            except ValueError:
                raise ShapeError(f"attn_mask must be broadcastable to {p.shape}; got {mask.shape}") from None
            seen = allowed.any(axis=-2)  # a key is valid if some query may attend to it
            valid = seen if valid is None else valid & seen
        return (p, valid), None

    def run(call, _):
        p, valid = call
        return budgets_from_probs(p, alpha, d_in, valid), None

    return door("mca budgets", arrays, ("probs_attn",), prepare, run)


@on_input_device
@check_flags
def value_projection(x, w, b=None, *, num_heads, budgets, seed, sampling="weight",
                     shared_draws=False, share="row", backend=None, tables=None):
    """The importance-sampled estimate of ``x @ w + b``, split into heads.

    Parameters
    ----------
    x : array, shape ``[..., N, d_in]``
    w : array, shape ``[d_in, num_heads * d_head]``
    b : array, shape ``[num_heads * d_head]``, optional
    num_heads : int
    budgets : array of int, shape ``[..., num_heads, N]``
        Samples per token and head; ``>= d_in`` computes the token exactly, 0 gives ``b``.
    seed : int or numpy.random.Generator
    sampling : {"weight", "optimal"}
        ``"weight"``: ``p_h(k)`` proportional to ``||w[k, cols_h]||^2`` (the paper);
        ``"optimal"``: per token, proportional to ``|x_jk| ||w[k, cols_h]||`` (the
        variance-minimising choice of Drineas et al.; O(d_in) more work per token).
    shared_draws : bool
        One draw sequence per (batch row, head), tokens use its prefixes — the authors'
        kernel; correlated errors across tokens, still unbiased.
    share : {"row", "batch"}, default "row"
        With ``shared_draws=True``: ``"batch"`` draws one sequence per head for the tokens
        of every batch row (``[...]`` flattened), so tokens of equal budget in different
        sequences form one product (the CPU backends; docs/mca.md). Its draws differ from
        ``"row"``'s; still unbiased, errors now correlated across sequences too.
    backend : {None, "numpy", "numba", "cuda", "cupy"}
    tables : WeightTables, optional
        :func:`weight_tables` of ``w``, computed once and reused (faster).

    Returns
    -------
    array, shape ``[..., num_heads, N, d_head]``
        Unbiased: its expectation over seeds is ``(x @ w + b)`` split into heads.
    """
    def prepare(a):
        x, w, b, r = a["x"], a["w"], a["b"], a["budgets"]
        check_sampling(sampling, shared_draws)
        check_share(share, shared_draws)
        if x.ndim < 2:
            raise ShapeError(f"x must have shape [..., N, d_in]; got {x.shape}")
        check_weight(w, b, num_heads, x.shape[-1])
        check_tables(tables, w, num_heads)
        lead, n, d_in = x.shape[:-2], x.shape[-2], x.shape[-1]
        if r.dtype.kind not in "iu":
            raise DTypeError(f"budgets must hold integers; got {r.dtype}")
        if r.shape != lead + (num_heads, n):
            raise ShapeError(f"budgets must have shape {lead + (num_heads, n)} ([..., H, N]); "
                             f"got {r.shape}")
        if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            raise DTypeError(f"x, w, b must share one dtype (as in attention); got x={x.dtype}, "
                             f"w={w.dtype}" + ("" if b is None else f", b={b.dtype}"))
        batch = int(np.prod(lead, dtype=np.int64))
        return (x.reshape(batch, n, d_in), w, b, r.reshape(batch, num_heads, n), lead), None

    def run(call, _):
        x3, w, b, r3, lead = call
        out, _ = _run_projection(x3, w, b, num_heads, r3, resolve_seed(seed), sampling,
                                 shared_draws, backend, tables, share)
        return out.reshape(lead + out.shape[1:]), None

    return door("mca value projection", {"x": x, "w": w, "b": b, "budgets": budgets},
                ("x", "w", "b"), prepare, run)


def _shared_budgets(r, on_gpu, d_in, share="row"):
    """:func:`mcattn.mca.naive.shared_budgets` with the compiled rounding."""
    from .shared import round_budgets

    if share == "batch" and on_gpu:  # no GPU kernel: fail in the backend choice, not here
        return r
    return shared_budgets(r, d_in, on_gpu, round_budgets, share)


def _run_projection(x3, w, b, num_heads, r3, seed, sampling, shared_draws, backend, tables=None,
                    share="row"):
    features = set()
    if sampling == "optimal":
        features.add("optimal")
    if shared_draws:
        features.add("shared_draws")
    if share == "batch":
        features.add("share_batch")
    xp = namespace_of(x3)
    problem = Problem(
        device="cpu" if xp is np else "cuda", dtype=x3.dtype.name,
        head_dim=w.shape[1] // num_heads, value_dim=w.shape[1] // num_heads,
        features=frozenset(features), sizes=(("d_in", x3.shape[-1]),),
    )
    kernel = select_kernel("mca value projection", PROJECTION_KERNELS, problem, backend)
    if share == "batch":  # (the GPU kernels, without it, keep their signature)
        return kernel(x3, w, b, num_heads, r3, seed, sampling, shared_draws, tables=tables,
                      share=share), kernel.backend
    out = kernel(x3, w, b, num_heads, r3, seed, sampling, shared_draws, tables=tables)
    return out, kernel.backend


@on_input_device
@check_flags
def attention(q, k, x, w_v, b_v=None, *, num_heads, alpha, attn_mask=None, key_padding_mask=None,
              is_causal=False, scale=None, seed=None, sampling="weight", shared_draws=False,
              share="row", backend=None, check_finite=True, return_info=False, tables=None,
              delta=0.05):
    """Monte-Carlo attention: exact probabilities, sampled values, exact ``A @ V~``.

    The probabilities are never held as an ``[Nq, Nk]`` matrix: they are computed twice by
    blocks of query rows, for the budgets and for ``A @ V~`` (:mod:`mcattn.mca.stream`;
    the budgets, draws and output of the dense :func:`mcattn.mca.naive.attention`), so
    memory grows as ``O(N d)``.

    Parameters
    ----------
    q : array, shape ``[..., H, Nq, d_head]``
    k : array, shape ``[..., H, Nk, d_head]`` or ``[..., 1, Nk, d_head]`` (shared by the heads)
    x : array, shape ``[..., Nk, d_in]``
        Input of the value projection (hidden states of the key tokens).
    w_v : array, shape ``[d_in, H * d_v]``
        Value weight, ``v = x @ w_v + b_v`` (torch's ``Linear.weight.T``).
    b_v : array, shape ``[H * d_v]``, optional
    num_heads : int
        ``H``; must equal ``q.shape[-3]`` and divide ``w_v.shape[1]``.
    alpha : float
        Error knob (> 0); see :func:`budgets` and :mod:`mcattn.mca.bounds`.
    attn_mask, key_padding_mask, is_causal, scale
        As in :func:`mcattn.attention` (``key_padding_mask`` ``[B, Nk]``, True = real key).
    seed : None, int or numpy.random.Generator
        ``None`` draws a fresh seed (reported in ``info.seed``).
    sampling : {"weight", "optimal"}
    shared_draws : bool
        One draw sequence per (batch row, head), tokens use its prefixes: computed as a few
        GEMMs over the distinct drawn rows (:mod:`mcattn.mca.shared`) for sequences of at
        least ``config.MCA_SHARED_GEMM_MIN_TOKENS`` tokens on the CPU, and on a GPU by one
        kernel launch that applies the host-built plan of those GEMMs; there the budgets
        are first rounded up so that each head has few distinct values
        (``config.MCA_SHARED_SLACK``: a group spans at most that relative width; 0 keeps
        them as computed). ``info.budgets`` reports the budgets used, ``info.ops`` the work.
    share : {"row", "batch"}, default "row"
        With ``shared_draws=True``: ``"batch"`` draws one sequence per head for the keys of
        every batch row, budgets rounded per head across the batch, and the reduced GEMMs
        gather tokens of equal budget from all sequences (padding keys take no part): what
        makes shared draws fast on short, padded batches on the CPU (docs/mca.md). CPU
        backends only.
    backend : {None, "numpy", "numba", "cuda", "cupy"}
        Backend of the sampled projection (probabilities and ``A @ V~`` use NumPy/CuPy).
    check_finite : bool
    return_info : bool
        Also return an :class:`MCAInfo`.
    tables : WeightTables, optional
        :func:`weight_tables` of ``w_v``, computed once and reused (faster).
    delta : float, default 0.05
        Failure probability of ``info.posterior``, the per-row error bound computed with
        ``return_info`` (:mod:`mcattn.mca.posterior`), in ``(0, 1)``.

    Returns
    -------
    out : array, shape ``[..., H, Nq, d_v]``
    info : MCAInfo
        Only with ``return_info=True``.
    """
    arrays = {"q": q, "k": k, "x": x, "w_v": w_v, "b_v": b_v, "attn_mask": attn_mask,
              "key_padding_mask": key_padding_mask}

    def prepare(a):
        gaussian_factor(delta)  # a bad delta fails before any work
        call = prepare_mca(a, num_heads=num_heads, sampling=sampling, shared_draws=shared_draws,
                           tables=tables, is_causal=is_causal, scale=scale,
                           check_finite=check_finite)
        check_share(share, shared_draws)
        return call, None  # the projection's kernel is chosen once the budgets are known

    def run(call, _):
        inp, x, w, b = call
        if not num_heads:
            return _without_heads(inp, w, b, x.shape[-1], alpha, backend)
        return _with_heads(inp, x, w, b, num_heads, alpha, seed, sampling, shared_draws, backend,
                           return_info, tables, delta, share)

    def info(call, _, extra):
        if not num_heads:
            return _zero_heads_info(call[0], extra, alpha, seed, sampling, shared_draws)
        return _info(call, extra, num_heads, alpha, sampling, shared_draws, share)

    return door("mca attention", arrays, ("q", "k", "x", "w_v", "b_v"), prepare, run, info,
                return_info=return_info)


def _with_heads(inp, x, w, b, num_heads, alpha, seed, sampling, shared_draws, backend, return_info,
                tables, delta=0.05, share="row"):
    """The output ``[..., H, Nq, d_v]`` of checked inputs, and what the info needs."""
    nk, d_in = x.shape[-2], x.shape[-1]
    batch_shape = tuple(inp.batch_shape)  # [..., H]
    lead = batch_shape[:-1]
    if x.shape[:-2] != lead:
        x = namespace_of(x).broadcast_to(x, lead + (nk, d_in))
    batch = int(np.prod(lead, dtype=np.int64))
    xp = inp.xp
    # The probabilities by blocks, never the [Nq, Nk] matrix (mcattn.mca.stream): pass 1
    # gives each key's largest probability, pass 2 multiplies by the sampled values.
    stats, top = stream.row_stats(inp)
    valid = inp.mask.visible_keys(inp.nq, nk)  # [BH or 1, Nk]
    valid = np.broadcast_to(valid, (batch * num_heads, nk)).reshape(batch, num_heads, nk)
    r = budgets_from_top(top.reshape(batch, num_heads, nk), alpha, d_in, xp.asarray(valid))
    if shared_draws:
        r = _shared_budgets(r, xp is not np, d_in, share)
    seed = resolve_seed(seed)
    if shared_draws and return_info and tables is None and xp is np:
        tables = weight_tables(w, num_heads)  # built once for the projection and its op count
    x3 = x.reshape(batch, nk, d_in)
    values, used = _run_projection(xp.ascontiguousarray(x3), w, b, num_heads, r, seed, sampling,
                                   shared_draws, backend, tables, share)
    flat = values.reshape(batch * num_heads, nk, values.shape[-1])
    bound = None
    if return_info:  # the a-posteriori bound's variances ride on the same probability blocks
        var = token_variances(x3, w, b, num_heads, r, flat, sampling).reshape(batch * num_heads, nk, 1)
        second = xp.asarray(var if not shared_draws else np.sqrt(var))
        out, spread = stream.apply(inp, stats, flat, second=second, squared=not shared_draws)
        spread = np.asarray(host_copy(spread))[..., 0]
        rows = gaussian_factor(delta) * (np.sqrt(spread) if not shared_draws else spread)
        rows = rows + rounding_allowance(flat, d_in)
        out = out.reshape(batch_shape + (inp.nq, out.shape[-1]))
        bound = from_rows(rows.reshape(batch_shape + (inp.nq,)), host_copy(out), certified=False,
                          delta=delta)
        return out, (r, used, valid, x3, seed, tables, bound)
    out = stream.apply(inp, stats, flat)
    return out.reshape(batch_shape + (inp.nq, out.shape[-1])), (r, used, valid, x3, seed, tables, bound)


def _info(call, extra, num_heads, alpha, sampling, shared_draws, share="row"):
    """The :class:`MCAInfo` of a call with heads."""
    inp, _, w, _ = call
    r, used, valid, x3, seed, tables, bound = extra
    batch_shape = tuple(inp.batch_shape)
    d_in, nk = x3.shape[-1], x3.shape[-2]
    dv = w.shape[1] // num_heads
    r_host = np.asarray(r.get() if hasattr(r, "get") else r)
    proj_ops, dense_proj = projection_ops(r_host, d_in, dv, sampling, valid)
    if shared_draws:
        proj_ops = shared_projection_ops(r_host, x3, w, num_heads, seed, tables, share)
    attn_ops = exact_ops(inp, value_dim=dv)
    budget_ops = OpCounts({"fp32_cmp": attn_ops["fp32_exp"], "fp32_mul": 3 * int(valid.sum())})
    kept = np.minimum(r_host, d_in)[valid]
    return MCAInfo(
        method="mca", backend=used, ops=attn_ops + budget_ops + proj_ops,
        dense_ops=attn_ops + dense_proj, budgets=r_host.reshape(batch_shape + (nk,)),
        macs_kept=float(kept.mean() / d_in) if kept.size else float("nan"),
        exact_fraction=float((r_host[valid] >= d_in).mean()) if kept.size else float("nan"),
        projection_ops=proj_ops, dense_projection_ops=dense_proj, seed=seed, alpha=float(alpha),
        sampling=sampling, shared_draws=bool(shared_draws), share=share, posterior_source=bound,
    )


def _without_heads(inp, w, b, d_in, alpha, backend):
    """:func:`attention` with ``num_heads=0`` (checked inputs ``inp``): nothing to sample
    (docs/conventions.md, zero sizes). ``w_v`` must have ``H * d_v = 0`` columns; the result
    is zeros ``[..., 0, Nq, d_head]`` (``d_v`` is taken as ``d_head``: no input names it)."""
    if w.shape != (d_in, 0) or (b is not None and b.shape != (0,)):
        got = f"w_v {w.shape}" + ("" if b is None else f" and b_v {b.shape}")
        raise ShapeError(f"with num_heads=0, w_v must have shape ({d_in}, 0) ([d_in, H * d_v]) and "
                         f"b_v shape (0,); got {got}")
    problem = Problem(device="cpu" if inp.xp is np else "cuda", dtype=inp.dtype.name,
                      head_dim=inp.head_dim, value_dim=inp.head_dim, sizes=(("d_in", d_in),))
    kernel = select_kernel("mca value projection", PROJECTION_KERNELS, problem, backend)
    r = budgets_from_probs(np.zeros(inp.batch_shape + (inp.nq, inp.nk)), alpha, d_in, None)
    return inp.zero_output().reshape(inp.out_shape), (r, kernel.backend)


def _zero_heads_info(inp, extra, alpha, seed, sampling, shared_draws):
    """The :class:`MCAInfo` of a call with ``num_heads=0``."""
    r, backend = extra
    ops = exact_ops(inp)
    return MCAInfo(method="mca", backend=backend, ops=ops, dense_ops=ops, budgets=r,
                   projection_ops=OpCounts(), dense_projection_ops=OpCounts(),
                   seed=resolve_seed(seed), alpha=float(alpha), sampling=sampling,
                   shared_draws=shared_draws)
