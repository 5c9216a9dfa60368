"""From fitted bases and chosen columns to the linear map every backend applies.

A row is reconstructed from its computed columns ``a_S`` as ``a_hat = base_i + a_S @ G``
(``G [m, n]``; ``base_i`` the mean row of query position ``i`` minus its part predicted
from ``mean[S]``). Two estimators give ``G``:

* ``"deim"`` (the construction of the method's spec): ``G = pinv(U[:, S]) U``, i.e.
  ``a_hat = mean + ((a_S - mean_S) pinv(U[:, S])) U``: the rank-``r`` row that fits the
  computed columns in least squares (interpolates them when ``m = r``);
* ``"conditional"`` (the default): the conditional mean of the row given ``a_S`` under
  the probabilistic-PCA model of the fit, covariance ``C = U^T diag(lambda) U + sigma^2 I``
  with ``sigma^2`` the mean discarded eigenvalue (Tipping & Bishop, 1999):
  ``G = C[S, S]^{-1} C[S, :]``. It shrinks the directions the computed columns pin down
  poorly instead of amplifying them (DEIM's ``pinv`` can overshoot, and softmax turns
  overshoot into mass), and it works with fewer fixed columns than the rank.

Computed columns keep their exact values in both. :class:`Plan` stacks one map per head.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import ShapeError
from .basis import EigenBasis, select_columns

__all__ = ["Plan", "make_plan", "ESTIMATORS", "reconstruction_map", "DEFAULT_FIXED_FRACTION"]

ESTIMATORS = ("conditional", "deim")
#: With ``columns=m`` (an int) and ``per_query=None``: an eighth of the budget is fixed
#: (Q-DEIM) columns, the rest is chosen per query (docs/eigen.md, "what made the error fall").
DEFAULT_FIXED_FRACTION = 0.125


@dataclass(frozen=True)
class Plan:
    """Per-head reconstruction maps, in float64 (kernels cast to the compute dtype).

    Attributes
    ----------
    columns : numpy.ndarray of int64, ``[H, m]``
        Fixed computed columns of each head (sorted, distinct).
    weights : numpy.ndarray, ``[H, m, n]``
        ``G``: ``a_hat = base + a_S @ G`` (rows ``S`` of ``G`` are not used: those
        entries take their computed values).
    base : numpy.ndarray, ``[H, P, n]``
        ``P = n`` (per query position) or 1 (one mean row).
    per_query : int
        Extra columns computed per query: the largest reconstructed visible scores.
    rank : int
    estimator : str
    """

    columns: np.ndarray
    weights: np.ndarray
    base: np.ndarray
    per_query: int
    rank: int
    estimator: str

    @property
    def num_heads(self):
        return self.columns.shape[0]

    @property
    def num_fixed(self):
        return self.columns.shape[1]

    @property
    def length(self):
        return self.weights.shape[2]

    @property
    def positional(self):
        return self.base.shape[1] > 1


def reconstruction_map(basis, columns, rank=None, estimator="conditional"):
    """``(G [m, n], offset [P, n])`` with ``a_hat = offset + a_S @ G`` for one basis.

    ``P`` is ``n`` for a position-centred basis, else 1. See the module docstring.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
    b = basis if rank is None else basis.truncated(rank)
    u = b.components
    cols = np.asarray(columns, dtype=np.int64)
    if estimator == "deim":
        g = np.linalg.pinv(u[:, cols]) @ u
    else:
        cov = (u.T * b.explained_variance) @ u
        # A floor keeps C[S, S] invertible when the fit left no variance outside the basis.
        floor = 1e-12 * (b.total_variance / b.length if b.total_variance > 0 else 1.0)
        cov[np.diag_indices_from(cov)] += max(b.noise_variance(), floor)
        g = np.linalg.solve(cov[np.ix_(cols, cols)], cov[cols, :])
    means = b.position_mean if b.position_mean is not None else b.mean[None, :]
    offset = means - means[:, cols] @ g
    return g, offset


def check_columns(columns, n, rank, name="columns"):
    """Validate ``m`` distinct in-range column indices; returns them sorted, int64."""
    cols = np.asarray(columns)
    if cols.ndim != 1:
        raise ShapeError(f"{name} must be a 1-D array of column indices; got shape {cols.shape}")
    if cols.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer column indices; got dtype {cols.dtype}")
    if cols.size and (cols.min() < 0 or cols.max() >= n):
        raise ValueError(f"{name} must lie in [0, {n}); got values from {cols.min()} to {cols.max()}")
    if len(np.unique(cols)) != len(cols):
        raise ValueError(f"{name} must be distinct; got duplicates in {cols.tolist()}")
    if len(cols) < rank:
        raise ValueError(f"{name}: need at least rank = {rank} columns; got m = {len(cols)}")
    return np.sort(cols.astype(np.int64))


def make_plan(basis, columns, *, rank=None, per_query=None, estimator="conditional",
              column_method="qdeim"):
    """Build the :class:`Plan` of one attention call.

    Parameters
    ----------
    basis : EigenBasis or sequence of EigenBasis
        One basis for every head, or one per head (``H`` of them).
    columns : int, array ``[m]``, sequence of ``H`` arrays, or Plan
        A :class:`Plan` is returned as it is (build it once, reuse it). An int is a
        budget of ``m`` columns per query: ``per_query`` of them (default
        seven eighths) are chosen per query, the rest are fixed columns picked by
        ``column_method`` from each head's basis. Arrays are the fixed columns.
    rank : int, optional
        Components used (default: each basis' rank).
    per_query : int, optional
        Extra columns per query (default 0 with explicit columns).
    estimator : {"conditional", "deim"}
    column_method : str
        For an int ``columns``; see :func:`~mcattn.eigen.basis.select_columns`.
    """
    if isinstance(columns, Plan):  # built once, reused across calls
        return columns
    bases = (basis,) if isinstance(basis, EigenBasis) else basis
    if not isinstance(bases, (list, tuple)) or not bases or not all(isinstance(b, EigenBasis)
                                                                     for b in bases):
        raise TypeError("basis must be an EigenBasis or a non-empty sequence of them (one per "
                        f"head); got {_describe(basis)}")
    bases = tuple(bases)
    n = bases[0].length
    for b in bases:
        if b.length != n:
            raise ShapeError(f"every head's basis must have the same length; got {n} and {b.length}")
        if (b.position_mean is None) != (bases[0].position_mean is None):
            raise ValueError("mixing position-centred and plain bases is not supported")
    ranks = [b.rank if rank is None else rank for b in bases]
    r = ranks[0]
    for b, rr in zip(bases, ranks):
        if isinstance(rr, bool) or not isinstance(rr, (int, np.integer)) or not 1 <= rr <= b.rank:
            raise ValueError(f"rank must be an int in [1, {b.rank}] (the basis' rank); got {rr!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
    if isinstance(columns, (int, np.integer)) and not isinstance(columns, bool):
        budget = int(columns)
        if not r <= budget <= n:
            raise ValueError(f"columns (m) must be between the rank ({r}) and n ({n}); got {budget}")
        if per_query is None:
            per_query = 0 if estimator == "deim" else budget - max(1, round(budget * DEFAULT_FIXED_FRACTION))
        fixed = budget - int(per_query)
        if estimator == "deim" and fixed < r:
            raise ValueError(f"estimator='deim' needs at least rank = {r} fixed columns; got "
                             f"{fixed} (columns={budget}, per_query={per_query})")
        if fixed < 1:
            raise ValueError(f"per_query ({per_query}) must leave at least one fixed column of {budget}")
        col_sets = [_pick_columns(b, rr, fixed, column_method) for b, rr in zip(bases, ranks)]
    else:
        if not _is_index_arrays(columns):
            raise TypeError("columns must be an int (a budget of columns per query), an array of "
                            "column indices [m], one such array per head, or a Plan; got "
                            f"{_describe(columns)}")
        per_query = 0 if per_query is None else per_query
        arr = [columns] if np.ndim(columns) == 1 else list(columns)
        if len(arr) not in (1, len(bases)):
            raise ShapeError(f"columns: one array for all heads or one per head ({len(bases)}); "
                             f"got {len(arr)}")
        col_sets = [check_columns(c, n, r if estimator == "deim" else 1) for c in arr]
        if len({len(c) for c in col_sets}) != 1:
            raise ShapeError("every head needs the same number of columns")
        if len(col_sets) == 1:
            col_sets = col_sets * len(bases)
    if isinstance(per_query, bool) or not isinstance(per_query, (int, np.integer)) or per_query < 0:
        raise ValueError(f"per_query must be an int >= 0; got {per_query!r}")
    m = len(col_sets[0])
    if m + per_query > n:
        raise ValueError(f"fixed columns ({m}) + per_query ({per_query}) exceed n = {n}")
    gs, offs = zip(*(reconstruction_map(b, c, rr, estimator) for b, c, rr in zip(bases, col_sets, ranks)))
    return Plan(columns=np.stack(col_sets), weights=np.stack(gs), base=np.stack(offs),
                per_query=int(per_query), rank=int(r), estimator=estimator)


def _describe(value):
    """``repr`` of a small value, the type of a large one (for error messages)."""
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def _is_index_arrays(columns):
    """Whether ``columns`` is an array [m] or a sequence of them (not a number, string, None)."""
    if isinstance(columns, (str, bytes)) or getattr(columns, "ndim", 1) == 0:
        return False
    try:
        items = list(columns)
    except TypeError:  # a number, None
        return False
    return all(np.ndim(c) <= 1 for c in items)


def _pick_columns(basis, rank, count, method):
    """``count`` fixed columns of one head; Q-DEIM may stop short of the rank (conditional)."""
    import scipy.linalg

    if method != "qdeim":
        return select_columns(basis, count, method=method, rank=min(rank, count), seed=0)
    if count >= rank:
        return select_columns(basis, count, method="qdeim", rank=rank)
    _, _, piv = scipy.linalg.qr(basis.components[:rank], pivoting=True, mode="economic")
    return np.sort(piv[:count]).astype(np.int64)
