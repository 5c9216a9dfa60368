"""Error bounds of eigen reconstruction, and their inverses.

Row form: a score row ``a`` (length ``n``), its centre ``mu`` (mean row, or the mean of
its query position), ``x = a - mu = c U + t`` with ``c = x U^T`` (coefficients in the
rank-``r`` basis ``U [r, n]``) and ``t = x (I - U^T U)`` (the tail). The reconstruction
is linear: ``a_hat - mu = x T`` with ``T = E_S G`` whose columns ``S`` are replaced by the
identity (computed columns are exact), so the error is ``e = x (I - T)``.

* **DEIM** (``G = pinv(U[:, S]) U``): ``T`` reproduces every row of the subspace, so
  ``e = t (I - T)``. With ``C = ||pinv(U[:, S])||_2`` (:func:`deim_constant`):
  ``||e|| <= C ||t||`` when ``m = r`` (Chaturantabut & Sorensen, 2010: ``I - T`` is the
  complement of an oblique projector of norm ``C``), and ``||e|| <= sqrt(1 + C^2) ||t||``
  when ``m > r``: ``T`` is still a projector, now keeping ``t_S`` exactly and adding
  ``t_S pinv(U_S) U`` outside ``S``, so ``||T||^2 <= 1 + C^2`` (and ``||I - T|| = ||T||``
  for a projector). The spec's ``C ||t||`` can fail for ``m > r``; the tests show the
  stated constant holds on every real row.
* **Conditional** (the default): ``T`` does not reproduce the subspace exactly, and
  ``||e|| <= alpha ||c|| + beta ||t||`` with ``alpha = ||U (I - T)||_2`` and
  ``beta = ||(I - U^T U)(I - T)||_2`` (computed, ``n x n``).

Both are deterministic: they hold for every row. Extra per-query columns only make more
entries exact, so they hold with them too. In expectation over rows distributed as in the
fit, ``E||t||^2`` is the tail variance ``sum_{i>r} lambda_i`` and ``E||c||^2 = sum_{i<=r}
lambda_i``, which gives :func:`expected_row_error` (a bound on the root-mean-square row
error) and its inverses :func:`rank_for_target`, :func:`columns_for_target`.

Softmax: with ``delta = a_hat - a``, ``p_hat_j / p_j = exp(delta_j) / E_p[exp(delta)]``,
so ``log(p_hat / p)`` has the oscillation of ``delta``, at most ``2 ||delta||_inf``; the
total variation of two distributions whose log-ratio oscillates by ``w`` is at most
``tanh(w / 4)`` (Birkhoff's contraction of the Hilbert metric), hence
``||p_hat - p||_1 <= 2 tanh(||delta||_2 / 2)`` (:func:`probability_error_bound`). The
output moves by ``sum_j (p_hat_j - p_j)(v_j - v_bar)``: at most
``||p_hat - p||_1 max_j ||v_j - v_bar||`` (:func:`output_error_bound`).
"""

import numpy as np

from .basis import EigenBasis, _check_rank_value, select_columns
from .plan import check_columns, reconstruction_map

__all__ = [
    "deim_constant",
    "error_constants",
    "row_error_bound",
    "expected_row_error",
    "probability_error_bound",
    "output_error_bound",
    "rank_for_target",
    "columns_for_target",
]


def _prepare(basis, columns, rank, estimator):
    if not isinstance(basis, EigenBasis):
        raise TypeError(f"basis must be an EigenBasis; got {type(basis).__name__}")
    r = basis.rank if rank is None else _check_rank_value(rank, basis.rank)
    cols = check_columns(columns, basis.length, r if estimator == "deim" else 1)
    return r, cols


def deim_constant(basis, columns, rank=None):
    """``||pinv(U[:, S])||_2``: how much the tail is amplified by the column choice.

    Parameters
    ----------
    basis : EigenBasis
    columns : array of int ``[m]``, ``m >= rank``
    rank : int, optional

    Returns
    -------
    float
        ``>= 1``; infinite when ``U[:, S]`` loses rank.
    """
    r, cols = _prepare(basis, columns, rank, "deim")
    sv = np.linalg.svd(basis.components[:r][:, cols], compute_uv=False)
    return float(1.0 / sv[-1]) if sv[-1] > 0 else float("inf")


def _transfer(basis, cols, r, estimator):
    """``I - T`` (row form) of the reconstruction."""
    n = basis.length
    g, _ = reconstruction_map(basis, cols, r, estimator)
    t = np.zeros((n, n))
    t[cols, :] = g
    t[:, cols] = 0.0
    t[cols, cols] = 1.0
    return np.eye(n) - t


def error_constants(basis, columns, rank=None, estimator="deim"):
    """``(alpha, beta)`` with ``||e|| <= alpha ||c|| + beta ||t||`` for every row.

    For ``"deim"``: ``alpha = 0`` and ``beta`` the stated DEIM constant (``C`` for
    ``m = r``, ``sqrt(1 + C^2)`` for ``m > r``). For ``"conditional"``: the operator
    norms of the module docstring.
    """
    r, cols = _prepare(basis, columns, rank, estimator)
    if estimator == "deim":
        c = deim_constant(basis, cols, r)
        return 0.0, (c if len(cols) == r else float(np.sqrt(1.0 + c * c)))
    u = basis.components[:r]
    rest = _transfer(basis, cols, r, estimator)
    alpha = np.linalg.norm(u @ rest, 2)
    beta = np.linalg.norm((np.eye(basis.length) - u.T @ u) @ rest, 2)
    return float(alpha), float(beta)


def row_error_bound(basis, columns, rows, rank=None, estimator="deim"):
    """Deterministic bound on ``||a_hat - a||_2`` of every row.

    Parameters
    ----------
    basis : EigenBasis
    columns : array of int ``[m]``
    rows : array ``[M, n]``
        Exact score rows (window order for a position-centred basis).
    rank : int, optional
    estimator : {"deim", "conditional"}

    Returns
    -------
    numpy.ndarray ``[M]``
    """
    alpha, beta = error_constants(basis, columns, rank, estimator)
    r = basis.rank if rank is None else rank
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != basis.length:
        from ..errors import ShapeError

        raise ShapeError(f"rows must be [M, {basis.length}]; got shape {rows.shape}")
    x = rows - basis.centre_of_rows(rows.shape[0])
    u = basis.components[:r]
    c = x @ u.T
    tail = np.linalg.norm(x - c @ u, axis=1)
    return alpha * np.linalg.norm(c, axis=1) + beta * tail


def expected_row_error(basis, columns, rank=None, estimator="deim"):
    """Bound on the root-mean-square row error for rows distributed as in the fit.

    ``sqrt(E||e||^2) <= alpha sqrt(sum_{i<=r} lambda_i) + beta sqrt(sum_{i>r} lambda_i)``
    (Minkowski; the tail variance is ``total - kept``).
    """
    alpha, beta = error_constants(basis, columns, rank, estimator)
    r = basis.rank if rank is None else rank
    head = float(basis.explained_variance[:r].sum())
    return alpha * np.sqrt(head) + beta * np.sqrt(basis.tail_variance(r))


def expected_row_error_of_plan(plan, head, basis):
    """:func:`expected_row_error` of one head of a :class:`~mcattn.eigen.plan.Plan`."""
    b = basis if isinstance(basis, EigenBasis) else tuple(basis)[head]
    return expected_row_error(b, plan.columns[head], plan.rank, plan.estimator)


def probability_error_bound(row_error):
    """``||p_hat - p||_1 <= 2 tanh(||delta||_2 / 2)`` for a score error of norm ``row_error``."""
    return 2.0 * np.tanh(np.asarray(row_error, dtype=np.float64) / 2.0)


def output_error_bound(row_error, v):
    """Bound on ``||o_hat - o||`` per row: ``probability_error_bound * max_j ||v_j - v_bar||``.

    Parameters
    ----------
    row_error : array ``[..., Nq]`` or float
        Score-row error norms (or their bound).
    v : array ``[..., n, dv]``
        Values (leading dims broadcast with ``row_error``'s).
    """
    v = np.asarray(v, dtype=np.float64)
    spread = np.linalg.norm(v - v.mean(-2, keepdims=True), axis=-1).max(-1)
    return probability_error_bound(row_error) * spread[..., None]


def rank_for_target(basis, m, target, estimator="deim", column_method="qdeim"):
    """Smallest rank whose :func:`expected_row_error` with ``m`` columns is ``<= target``.

    Returns None when no rank up to ``min(m, basis.rank)`` reaches it.
    """
    for r in range(1, min(int(m), basis.rank) + 1):
        cols = select_columns(basis, int(m), method=column_method, rank=r, seed=0)
        if expected_row_error(basis, cols, r, estimator) <= target:
            return r
    return None


def columns_for_target(basis, target, rank=None, estimator="deim", column_method="qdeim"):
    """Smallest ``m`` whose :func:`expected_row_error` at ``rank`` is ``<= target`` (None if none)."""
    r = basis.rank if rank is None else _check_rank_value(rank, basis.rank)
    for m in range(r, basis.length + 1):
        cols = select_columns(basis, m, method=column_method, rank=r, seed=0)
        if expected_row_error(basis, cols, r, estimator) <= target:
            return m
    return None
