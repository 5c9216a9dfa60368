"""Eigen reconstruction: attention from a few computed score columns and a fitted eigenbasis.

After Bhojanapalli et al., "Eigen Analysis of Self-Attention and its Reconstruction from
Partial Computation" (arXiv 2106.08823, 2021); the construction is ours (the paper has
no public code). Score rows ``a_i = scale * q_i K^T`` of windows of ``n`` tokens vary
mostly in a low-dimensional subspace: :func:`fit` finds its mean and eigenbasis from
calibration rows (:func:`score_rows`; in memory, streaming, or on dask), :func:`overlap`
and :func:`principal_angles` compare subspaces of layers and models, and
:func:`attention` computes only some columns of each row and reconstructs the rest:

1. ``a_S = scale * q_i K[S]^T`` for ``m`` fixed columns ``S`` (:func:`select_columns`);
2. ``a_hat = mean_i + (a_S - mean_i[S]) @ G``, computed columns exact, with ``G`` from the
   estimator (``"deim"``: ``pinv(U[:, S]) U``; ``"conditional"``: the probabilistic-PCA
   conditional mean, the default; see :mod:`mcattn.eigen.plan`);
3. optionally ``per_query`` more columns per query, the largest reconstructed scores,
   computed exactly (the keys that carry the softmax mass);
4. softmax and ``@ V``.

The defaults (per-head bases fitted with ``center="position"``, the conditional
estimator, an eighth of the column budget fixed and the rest chosen per query) are what
brought the output error on held-out real attention from about 0.7 (plain PCA + Q-DEIM)
down; the figures are in docs/eigen.md. Bounds: :mod:`mcattn.eigen.bounds`.
"""

from dataclasses import dataclass

import numpy as np

from .._array import import_arrays
from .._device import on_input_device
from .._dispatch import Kernel, select_kernel
from .._validate import check_flags, prepare_attention
from ..cost import CallInfo, OpCounts
from ..errors import ShapeError
from ..exact import exact_ops
from . import bounds
from .basis import (
    COLUMN_METHODS,
    EigenBasis,
    fit,
    overlap,
    principal_angles,
    score_rows,
    select_columns,
)
from .plan import ESTIMATORS, Plan, make_plan

__all__ = [
    "attention",
    "fit",
    "fit_heads",
    "EigenBasis",
    "score_rows",
    "overlap",
    "principal_angles",
    "select_columns",
    "make_plan",
    "Plan",
    "EigenInfo",
    "eigen_ops",
    "bounds",
    "COLUMN_METHODS",
    "ESTIMATORS",
    "KERNELS",
]

_ALL = frozenset({"mask", "causal"})

#: The eigen-reconstruction kernels, one per backend.
KERNELS = (
    Kernel("numba", "mcattn.eigen.cpu", "forward", features=_ALL),
    Kernel("numpy", "mcattn.eigen.naive", "forward", features=_ALL),
    Kernel("cupy", "mcattn.eigen.cupy", "forward", max_head_dim=64, features=_ALL,
           max_sizes=(("n", 256), ("m", 64))),
    Kernel("cuda", "mcattn.eigen.cuda", "forward", max_head_dim=64, features=_ALL,
           max_sizes=(("n", 256), ("m", 64))),
)


@dataclass(frozen=True)
class EigenInfo(CallInfo):
    """What one :func:`attention` call did.

    Attributes
    ----------
    method, backend, ops, dense_ops
        See :class:`~mcattn.cost.CallInfo`.
    partial_score_macs : int
        Multiply-adds of the computed scores (fixed and per-query columns).
    reconstruction_macs : int
        Multiply-adds of ``a_S @ G`` (``m * n`` per row).
    dense_score_macs : int
        Multiply-adds of all scores of the same rows (``n * d`` per row): the partial
        computation saves work only when the two above add up to less.
    num_fixed, per_query, rank : int
    expected_row_error : numpy.ndarray ``[H]``
        Root-mean-square error of a reconstructed score row expected under the fitted
        covariance (:func:`mcattn.eigen.bounds.expected_row_error`), per head.
    """

    partial_score_macs: int = 0
    reconstruction_macs: int = 0
    dense_score_macs: int = 0
    num_fixed: int = 0
    per_query: int = 0
    rank: int = 0
    expected_row_error: np.ndarray | None = None


def fit_heads(q, k, *, rank=None, length=None, center="position", method="full",
              key_padding_mask=None, scale=None):
    """One basis per head from ``q, k`` of shape ``[B, H, N, d]`` (windows of ``length``).

    Returns
    -------
    tuple of EigenBasis
        ``H`` bases (pass them as ``basis=`` to :func:`attention`).
    """
    q = np.asarray(q)
    k = np.asarray(k)
    if q.ndim != 4 or k.shape != q.shape:
        raise ShapeError(f"fit_heads needs q and k of one shape [B, H, N, d]; got {q.shape} and {k.shape}")
    out = []
    for h in range(q.shape[1]):
        rows = score_rows(q[:, h], k[:, h], length=length, key_padding_mask=key_padding_mask,
                          scale=scale)
        out.append(fit(rows, rank=rank, center=center, method=method))
    return tuple(out)


def _fixed_visible(inp, plan):
    """Host ``[BH, Nq]``: visible keys per row, and visible fixed columns per row."""
    bh, nq, nk = inp.q.shape[0], inp.nq, inp.nk
    vis = np.ones((1, nq, nk), dtype=bool)
    if inp.mask.bias is not None:
        from .._array import host_copy

        vis = np.broadcast_to(host_copy(inp.mask.bias) > -np.inf, (inp.mask.bias.shape[0], nq, nk))
    if inp.mask.is_causal:
        vis = vis & (np.arange(nk)[None, :] <= np.arange(nq)[:, None])[None]
    index = inp.mask.mask_index if inp.mask.bias is not None else np.zeros(bh, np.int64)
    heads = np.arange(bh) % plan.num_heads
    visible = np.empty((bh, nq), np.int64)
    fixed = np.empty((bh, nq), np.int64)
    for b in range(bh):
        v = vis[index[b]]
        visible[b] = v.sum(-1)
        fixed[b] = v[:, plan.columns[heads[b]]].sum(-1)
    return visible, fixed


def eigen_ops(inp, plan):
    """Operations of one call, from what the kernels do; also the MAC figures of :class:`EigenInfo`.

    Per query row: ``d`` multiplies to scale ``q``; ``m d`` multiply-adds for the fixed
    columns; ``m n`` for the reconstruction plus ``n`` adds of the mean; with
    ``per_query``, about ``3 n`` compares to pick the largest (an ``O(n)`` partition,
    about ``2 n`` expected, and a pass) and ``d`` multiply-adds per chosen column; then,
    per visible key, the softmax (compare, subtract, exp, add) and ``dv`` multiply-adds;
    a divide and ``dv`` multiplies per row with a visible key.

    Returns
    -------
    (OpCounts, dict)
        The counts and ``partial_score_macs``, ``reconstruction_macs``, ``dense_score_macs``.
    """
    bh, nq, nk, d, dv = inp.q.shape[0], inp.nq, inp.nk, inp.head_dim, inp.value_dim
    m = plan.num_fixed
    visible, fixed = _fixed_visible(inp, plan)
    chosen = int(np.minimum(plan.per_query, visible - fixed).sum())
    rows = bh * nq
    pairs = int(visible.sum())
    live = int(np.count_nonzero(visible))
    partial = rows * m * d + chosen * d
    recon = rows * m * nk
    counts = {
        "fp32_mul": rows * d + partial + recon + pairs * dv + live * dv,
        "fp32_add": partial + recon + rows * nk + pairs * (dv + 2)
                    + (rows * nk if inp.mask.bias is not None else 0),
        "fp32_cmp": pairs + (3 * rows * nk if plan.per_query else 0),
        "fp32_exp": pairs,
        "fp32_div": live,
    }
    figures = {"partial_score_macs": partial, "reconstruction_macs": recon,
               "dense_score_macs": rows * nk * d}
    return OpCounts(counts), figures


def check_plan_fits(inp, plan):
    """Raise :class:`ShapeError` unless the canonical inputs ``inp`` fit ``plan``'s basis
    (its key count, ``Nq = n`` for a position-centred basis, one head per per-head basis)."""
    if inp.nk != plan.length:
        raise ShapeError(f"the basis describes rows of {plan.length} keys; k has {inp.nk} keys "
                         f"(shape {tuple(inp.batch_shape) + tuple(inp.k.shape[-2:])})")
    if plan.positional and inp.nq != plan.length:
        raise ShapeError(f"a position-centred basis needs Nq = n = {plan.length} queries; got {inp.nq}")
    if plan.num_heads > 1 and (not inp.batch_shape or inp.batch_shape[-1] != plan.num_heads):
        raise ShapeError(f"{plan.num_heads} per-head bases need inputs [..., H={plan.num_heads}, N, d]; "
                         f"got batch dims {inp.batch_shape}")


@on_input_device
@check_flags
def attention(q, k, v, *, basis, columns, rank=None, per_query=None, estimator="conditional",
              attn_mask=None, key_padding_mask=None, is_causal=False, scale=None, backend=None,
              check_finite=True, return_info=False):
    """Attention from partially computed scores and a fitted eigenbasis.

    Parameters
    ----------
    q : array, shape ``[..., Nq, d]``
    k : array, shape ``[..., n, d]``
        ``n`` must be the basis' length.
    v : array, shape ``[..., n, dv]``
    basis : EigenBasis or sequence of EigenBasis
        One basis for all rows, or one per head: ``H`` bases for inputs whose last batch
        dim is ``H`` (``[B, H, N, d]``). A position-centred basis needs ``Nq == n``
        (query ``i`` is position ``i`` of the window).
    columns : int, array ``[m]``, sequence of ``H`` arrays, or Plan
        A :class:`~mcattn.eigen.plan.Plan` from :func:`make_plan` skips building the
        maps again (``rank``, ``per_query``, ``estimator`` are then ignored). An int ``m``
        is a budget per query row: ``per_query`` columns (default seven
        eighths of ``m``; 0 with ``estimator="deim"``) are chosen per query, the others
        are Q-DEIM columns of each head's basis. Arrays are the fixed columns themselves
        (distinct, in ``[0, n)``, at least ``rank`` of them for ``"deim"``).
    rank : int, optional
        Components used (default: the basis' rank).
    per_query : int, optional
        Extra columns per query: the largest reconstructed visible scores, computed exactly.
    estimator : {"conditional", "deim"}
        How the missing scores are predicted (:mod:`mcattn.eigen.plan`).
    attn_mask, key_padding_mask, is_causal, scale, backend, check_finite
        As in :func:`mcattn.attention`. Masks apply after the reconstruction.
    return_info : bool
        Also return an :class:`EigenInfo`.

    Returns
    -------
    out : array, shape ``[..., Nq, dv]``
        Same array type, device and dtype as ``q``.
    info : EigenInfo
        Only with ``return_info=True``.

    Raises
    ------
    ShapeError
        ``Nk`` is not the basis' length, head count mismatch, bad columns.
    ValueError
        ``m < rank``, duplicate or out-of-range columns, a bad rank or estimator.

    Examples
    --------
    >>> import numpy as np
    >>> from mcattn import eigen
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((8, 64, 16)) for _ in range(3))
    >>> basis = eigen.fit(eigen.score_rows(q, k), rank=8)
    >>> out = eigen.attention(q, k, v, basis=basis, columns=16)
    >>> out.shape
    (8, 64, 16)
    """
    plan = make_plan(basis, columns, rank=rank, per_query=per_query, estimator=estimator)
    bridge, a = import_arrays(
        {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask},
        float_names=("q", "k", "v"),
    )
    inp = prepare_attention(
        a["q"], a["k"], a["v"], attn_mask=a["attn_mask"], key_padding_mask=a["key_padding_mask"],
        is_causal=is_causal, scale=scale, check_finite=check_finite,
    )
    check_plan_fits(inp, plan)
    sizes = (("n", plan.length), ("m", plan.num_fixed + plan.per_query))
    problem = inp.problem()
    problem = type(problem)(problem.device, problem.dtype, problem.head_dim, problem.value_dim,
                            problem.features, sizes)
    kernel = select_kernel("eigen attention", KERNELS, problem, backend)
    out = (inp.zero_output() if inp.empty else kernel(inp, plan)).reshape(inp.out_shape)
    result = bridge.export(out)
    if not return_info:
        return result
    ops, figures = eigen_ops(inp, plan)
    expected = np.array([bounds.expected_row_error_of_plan(plan, h, basis)
                         for h in range(plan.num_heads)])
    info = EigenInfo(method="eigen", backend=kernel.backend, ops=ops, dense_ops=exact_ops(inp),
                     num_fixed=plan.num_fixed, per_query=plan.per_query, rank=plan.rank,
                     expected_row_error=expected, **figures)
    return result, info
