"""Eigen reconstruction's public functions: :func:`attention` and :func:`fit_heads`."""

from dataclasses import dataclass, field

import numpy as np

from .._device import on_input_device
from .._dispatch import Kernel
from .._door import door, qkv_inputs
from .._validate import check_flags
from ..cost import CallInfo
from ..errors import ShapeError
from ..exact.ops import exact_ops
from . import bounds
from ._inputs import check_plan_fits
from .basis import fit, score_rows
from .ops import eigen_ops
from .plan import make_plan
from .posterior import attention_bound

__all__ = ["attention", "fit_heads", "EigenInfo", "KERNELS"]

_ALL = frozenset({"mask", "causal"})

#: The eigen-reconstruction kernels, one per backend.
KERNELS = (
    Kernel("numba", "mcattn.eigen.cpu", "forward", features=_ALL),
    Kernel("numpy", "mcattn.eigen.naive", "forward", features=_ALL),
    Kernel("cupy", "mcattn.eigen.cupy", "forward", features=_ALL),  # any size: RawKernel or GEMMs
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
    posterior : mcattn.posterior.PosteriorBound
        Certified per-row bound on the output error (:mod:`mcattn.eigen.posterior`),
        computed when first read.
    """

    partial_score_macs: int = 0
    reconstruction_macs: int = 0
    dense_score_macs: int = 0
    num_fixed: int = 0
    per_query: int = 0
    rank: int = 0
    expected_row_error: np.ndarray | None = None
    posterior_source: object = field(default=None, repr=False, compare=False)


@on_input_device
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
    arrays = {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask}

    def prepare(a):
        inp = qkv_inputs(a, is_causal=is_causal, scale=scale, check_finite=check_finite)
        check_plan_fits(inp, plan)
        sizes = (("n", plan.length), ("m", plan.num_fixed + plan.per_query))
        problem = inp.problem()
        problem = type(problem)(problem.device, problem.dtype, problem.head_dim,
                                problem.value_dim, problem.features, sizes)
        return inp, problem

    def run(inp, kernel):
        out = (inp.zero_output() if inp.empty else kernel(inp, plan)).reshape(inp.out_shape)
        return out, out

    def info(inp, kernel, out):
        ops, figures = eigen_ops(inp, plan)
        expected = np.array([bounds.expected_row_error_of_plan(plan, h, basis)
                             for h in range(plan.num_heads)])
        return EigenInfo(method="eigen", backend=kernel.backend, ops=ops,
                         dense_ops=exact_ops(inp), num_fixed=plan.num_fixed,
                         per_query=plan.per_query, rank=plan.rank, expected_row_error=expected,
                         posterior_source=lambda: attention_bound(inp, plan, out), **figures)

    return door("eigen attention", arrays, ("q", "k", "v"), prepare, run, info,
                kernels=KERNELS, backend=backend, return_info=return_info)
