"""Eigenbases of pre-softmax score rows: fit, compare, pick columns.

A score row ``a_i = scale * q_i K^T`` (length ``n``) of a fixed-length window is a point
in ``R^n``. :func:`fit` finds the mean and the top principal directions of many such
rows: in memory (SVD of the centred rows), by randomized SVD, streaming over chunks
(mergeable mean/scatter statistics, ``O(n^2)`` memory) or on a dask array (the same
statistics as a distributed tree reduction). :func:`overlap` and
:func:`principal_angles` compare two bases; :func:`select_columns` picks the key columns
that a partial computation evaluates.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .._validate import canonical_mask, check_finite_array, default_scale
from ..errors import ShapeError

__all__ = [
    "EigenBasis",
    "fit",
    "score_rows",
    "overlap",
    "principal_angles",
    "select_columns",
    "COLUMN_METHODS",
    "CENTER_MODES",
]

COLUMN_METHODS = ("qdeim", "uniform", "first", "random")
CENTER_MODES = (True, False, "position")


@dataclass(frozen=True)
class EigenBasis:
    """Mean and principal directions of score rows of length ``n``.

    Attributes
    ----------
    mean : numpy.ndarray, shape ``[n]``
        Mean row (zeros when fitted with ``center=False``).
    components : numpy.ndarray, shape ``[rank, n]``
        Orthonormal rows, by decreasing variance.
    explained_variance : numpy.ndarray, shape ``[rank]``
        Variance of the rows along each component (eigenvalues of the covariance,
        denominator ``n_rows - 1``).
    total_variance : float
        Trace of the covariance: the variance of all ``n`` directions, kept or not.
    n_rows : int
        Rows the fit saw.
    position_mean : numpy.ndarray, shape ``[n, n]``, or None
        With ``center="position"``: the mean row of each query position (the mean score
        matrix of a window); rows are then centred by the mean of their own position.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    total_variance: float
    n_rows: int
    position_mean: np.ndarray | None = None

    @property
    def length(self):
        """``n``: the row length (keys per window) the basis describes."""
        return self.components.shape[1]

    @property
    def rank(self):
        return self.components.shape[0]

    def truncated(self, rank):
        """The same basis keeping its first ``rank`` components."""
        rank = _check_rank_value(rank, self.rank)
        return EigenBasis(self.mean, self.components[:rank], self.explained_variance[:rank],
                          self.total_variance, self.n_rows, self.position_mean)

    def tail_variance(self, rank=None):
        """Variance outside the first ``rank`` components (``total - sum(kept)``)."""
        rank = self.rank if rank is None else _check_rank_value(rank, self.rank)
        return max(0.0, float(self.total_variance - self.explained_variance[:rank].sum()))

    def noise_variance(self, rank=None):
        """Mean variance per discarded direction: ``tail_variance / (n - rank)``."""
        rank = self.rank if rank is None else _check_rank_value(rank, self.rank)
        free = self.length - rank
        return self.tail_variance(rank) / free if free > 0 else 0.0

    def explained_fraction(self):
        """Cumulative fraction of the total variance explained by the first 1..rank components."""
        if self.total_variance <= 0:
            return np.ones(self.rank)
        return np.cumsum(self.explained_variance) / self.total_variance

    def effective_rank(self, fraction):
        """Smallest number of components explaining ``fraction`` of the variance.

        Returns ``None`` when the kept components do not reach it (fit with a larger
        ``rank``, or ``rank=None``, to see the whole spectrum).
        """
        fraction = float(fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
        reached = np.nonzero(self.explained_fraction() >= fraction - 1e-12)[0]
        return int(reached[0]) + 1 if reached.size else None

    def centre_of_rows(self, num_rows):
        """Mean subtracted from each of ``num_rows`` rows given in window order ``[num_rows, n]``."""
        if self.position_mean is None:
            return np.broadcast_to(self.mean, (num_rows, self.length))
        n = self.length
        if num_rows % n:
            raise ShapeError(f"a position-centred basis needs rows in whole windows of {n}; "
                             f"got {num_rows} rows")
        return np.tile(self.position_mean, (num_rows // n, 1))


def _check_rank_value(rank, limit):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int; got {rank!r}")
    if not 1 <= rank <= limit:
        raise ValueError(f"rank must be in [1, {limit}]; got {rank}")
    return int(rank)


# --- mergeable statistics: (count, mean, scatter) with per-position means optional -----


@dataclass
class _Stats:
    """Rows seen, their (per-position) means and the scatter of the centred rows."""

    count: int
    mean: np.ndarray  # [P, n]: P = 1, or n for per-position means
    scatter: np.ndarray  # [n, n]

    @staticmethod
    def of(rows, positions):
        rows = np.asarray(rows, dtype=np.float64)
        n = rows.shape[1]
        if positions:
            if rows.shape[0] % n:
                raise ShapeError(f"center='position' needs rows in whole windows of {n}; a chunk "
                                 f"has {rows.shape[0]} rows")
            windows = rows.reshape(-1, n, n)
            mean = windows.mean(0) if len(windows) else np.zeros((n, n))
            centred = (windows - mean).reshape(-1, n)
            count = len(windows)
        else:
            mean = rows.mean(0, keepdims=True) if len(rows) else np.zeros((1, n))
            centred = rows - mean
            count = len(rows)
        return _Stats(count, mean, centred.T @ centred)

    def merge(self, other):
        """Chan et al.'s pairwise update: exact, order-independent up to rounding."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean  # [P, n]
        mean = self.mean + delta * (other.count / total)
        scatter = self.scatter + other.scatter + (self.count * other.count / total) * (delta.T @ delta)
        return _Stats(total, mean, scatter)


def _basis_from_stats(stats, rank, positions):
    n = stats.scatter.shape[0]
    rows = stats.count * (n if positions else 1)
    if rows < 2:
        raise ValueError(f"fit needs at least 2 rows; got {rows}")
    cov = stats.scatter / (rows - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:rank]
    comps = _fix_signs(evecs[:, order].T)
    mean = stats.mean.mean(0)
    return EigenBasis(mean=mean, components=comps, explained_variance=np.maximum(evals[order], 0.0),
                      total_variance=float(np.trace(cov)), n_rows=rows,
                      position_mean=stats.mean.copy() if positions else None)


def _fix_signs(components):
    """Make the largest-magnitude entry of every component positive (a unique sign)."""
    comps = np.array(components, dtype=np.float64)
    pivot = np.argmax(np.abs(comps), axis=1)
    signs = np.sign(comps[np.arange(len(comps)), pivot])
    signs[signs == 0] = 1.0
    return comps * signs[:, None]


def _centre_in_memory(rows, center):
    n = rows.shape[1]
    if center == "position":
        if rows.shape[0] % n:
            raise ShapeError(f"center='position' needs rows in whole windows of {n} (as "
                             f"score_rows gives them); got {rows.shape[0]} rows")
        pos = rows.reshape(-1, n, n).mean(0)
        return (rows.reshape(-1, n, n) - pos).reshape(-1, n), pos.mean(0), pos
    if center:
        mean = rows.mean(0)
        return rows - mean, mean, None
    return rows, np.zeros(n), None


def _randomized_svd(x, rank, seed, oversample=10, power_iters=4):
    """Halko, Martinsson & Tropp (2011), Algorithm 4.4 with QR-stabilised power iterations."""
    rng = np.random.default_rng(seed)
    width = min(x.shape[1], rank + oversample)
    y = x @ rng.standard_normal((x.shape[1], width))
    basis, _ = np.linalg.qr(y)
    for _ in range(power_iters):
        z, _ = np.linalg.qr(x.T @ basis)
        basis, _ = np.linalg.qr(x @ z)
    _, s, vt = np.linalg.svd(basis.T @ x, full_matrices=False)
    return s[:rank], vt[:rank]


def _check_rows_array(rows):
    if rows.ndim != 2:
        raise ShapeError(f"rows must have shape [M, n]; got shape {rows.shape}")
    if rows.dtype.kind not in "fiu":
        raise TypeError(f"rows must be real numbers; got dtype {rows.dtype}")


def fit(rows, *, rank=None, method="full", center=True, seed=None):
    """Fit the mean and top principal directions of score rows.

    Parameters
    ----------
    rows : array ``[M, n]``, iterable of arrays ``[m_i, n]``, or dask array ``[M, n]``
        Pre-softmax score rows (see :func:`score_rows`). An iterable (not an array) is
        streamed: each chunk updates mergeable statistics (count, mean, scatter), so memory
        is ``O(n^2)`` whatever ``M`` and the basis equals the one-shot fit up to rounding. A
        dask array computes the same statistics per row block and merges them in a tree
        on the dask scheduler (a ``dask.distributed`` cluster when one is active).
    rank : int, optional
        Components to keep (default: all ``n``).
    method : {"full", "randomized"}
        In memory: SVD of the centred rows (``"full"``) or randomized SVD (Halko et al.,
        for large ``M``; ``seed`` fixes it). Streaming and dask fits always
        eigendecompose the accumulated covariance.
    center : {True, False, "position"}
        Subtract the mean row; ``"position"`` subtracts the mean row of each query
        position instead (rows must come in whole windows of ``n``, as
        :func:`score_rows` returns them): positional patterns such as attending to the
        previous token then live in the mean, not in the components.
    seed : int, optional
        For ``method="randomized"``.

    Returns
    -------
    EigenBasis

    Raises
    ------
    ShapeError
        Rows that are not ``[M, n]``, chunks of different ``n``.
    ValueError
        Fewer than 2 rows, an unknown ``method``/``center``, a bad ``rank``.
    """
    if method not in ("full", "randomized"):
        raise ValueError(f"method must be 'full' or 'randomized'; got {method!r}")
    if center not in CENTER_MODES:
        raise ValueError(f"center must be True, False or 'position'; got {center!r}")
    if _is_dask(rows):
        return _fit_dask(rows, rank, center)
    if isinstance(rows, Iterable) and not hasattr(rows, "shape"):
        return _fit_stream(rows, rank, center)
    rows = np.asarray(rows)
    _check_rows_array(rows)
    n = rows.shape[1]
    rank = n if rank is None else _check_rank_value(rank, n)
    x = rows.astype(np.float64)
    check_finite_array("rows", x)
    if x.shape[0] < 2:
        raise ValueError(f"fit needs at least 2 rows; got {x.shape[0]}")
    centred, mean, pos = _centre_in_memory(x, center)
    dof = x.shape[0] - 1
    total = float((centred**2).sum() / dof)
    if method == "full" or rank >= min(centred.shape):
        # Tall input: the SVD of the QR factor R has the same singular values and right
        # singular vectors, at a fraction of the cost.
        small = np.linalg.qr(centred, mode="r") if centred.shape[0] > 2 * n else centred
        _, s, vt = np.linalg.svd(small, full_matrices=False)
        s, vt = s[:rank], vt[:rank]
    else:
        s, vt = _randomized_svd(centred, rank, seed)
    explained = s**2 / dof
    if len(explained) < rank:  # fewer rows than the rank: pad with zero-variance directions
        extra = scipy.linalg.null_space(vt)[:, : rank - len(explained)].T
        vt = np.vstack([vt, extra])
        explained = np.concatenate([explained, np.zeros(len(extra))])
    return EigenBasis(mean=mean, components=_fix_signs(vt), explained_variance=explained,
                      total_variance=total, n_rows=x.shape[0], position_mean=pos)


def _fit_stream(chunks, rank, center):
    positions = center == "position"
    stats, n = None, None
    for chunk in chunks:
        chunk = np.asarray(chunk)
        _check_rows_array(chunk)
        if n is None:
            n = chunk.shape[1]
        elif chunk.shape[1] != n:
            raise ShapeError(f"every chunk must have {n} columns; got a chunk of shape {chunk.shape}")
        check_finite_array("rows", chunk)
        part = _Stats.of(chunk, positions)
        stats = part if stats is None else stats.merge(part)
    if stats is None:
        raise ValueError("fit got an empty iterable of chunks")
    rank = n if rank is None else _check_rank_value(rank, n)
    if not center:
        stats = _uncentred(stats)
    return _basis_from_stats(stats, rank, positions)


def _uncentred(stats):
    """Second moments about zero instead of the mean (``center=False``)."""
    m = stats.mean[0]
    return _Stats(stats.count, np.zeros_like(stats.mean),
                  stats.scatter + stats.count * np.outer(m, m))


def _is_dask(x):
    return type(x).__module__.startswith("dask.")


def _block_stats(block, positions):
    return _Stats.of(np.asarray(block), positions)


def _merge_all(*parts):
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


def _fit_dask(rows, rank, center):
    import dask
    import dask.array as da

    if not isinstance(rows, da.Array):
        raise TypeError(f"a dask input must be a dask.array.Array; got {type(rows).__name__}")
    if rows.ndim != 2:
        raise ShapeError(f"rows must have shape [M, n]; got shape {rows.shape}")
    positions = center == "position"
    n = rows.shape[1]
    rows = rows.rechunk({1: n})  # whole rows per block
    if positions and any(c % n for c in rows.chunks[0]):
        raise ShapeError(f"center='position' needs row blocks that are whole windows of {n}; "
                         f"got row chunks {rows.chunks[0]}")
    parts = [dask.delayed(_block_stats)(b, positions) for b in rows.to_delayed().ravel()]
    while len(parts) > 1:  # a tree of merges, 8 at a time
        parts = [dask.delayed(_merge_all)(*parts[i:i + 8]) for i in range(0, len(parts), 8)]
    stats = parts[0].compute()
    if not np.isfinite(stats.scatter).all():
        raise ValueError("rows contain NaN or Inf")
    rank = n if rank is None else _check_rank_value(rank, n)
    if not center:
        stats = _uncentred(stats)
    return _basis_from_stats(stats, rank, positions)


def score_rows(q, k, *, scale=None, attn_mask=None, key_padding_mask=None, length=None):
    """Pre-softmax score rows of fixed length, the input of :func:`fit`.

    Each sequence is cut into consecutive windows of ``length`` real tokens; within a
    window every query gives the row ``scale * q_i K_w^T`` (``length`` numbers), rows in
    window order (``length`` consecutive rows per window, as ``center="position"``
    needs). Variable lengths: a sequence's real tokens (``key_padding_mask``) are taken
    from its start; the last piece shorter than ``length`` is dropped, and a sequence
    shorter than ``length`` gives no rows (pad or bucket sequences to a common length
    beforehand to keep them).

    Parameters
    ----------
    q : array, shape ``[..., N, d]``
    k : array, shape ``[..., N, d]``
    scale : float, optional
        Default ``1/sqrt(d)``.
    attn_mask : array, optional
        Broadcastable to ``[..., N, N]``; boolean (True = may attend) or additive float.
        A window containing a masked (query, key) pair within it is dropped (a basis
        describes complete rows); float values are added to the scores.
    key_padding_mask : array of bool, optional
        ``[B, N]``, True = a real token (only the leading real tokens are used).
    length : int, optional
        Window length ``n`` (default ``N``).

    Returns
    -------
    numpy.ndarray, shape ``[M, length]``, float64
    """
    q = np.asarray(q)
    k = np.asarray(k)
    if q.ndim < 2 or k.ndim < 2 or q.shape[-1] != k.shape[-1] or q.shape[-2] != k.shape[-2]:
        raise ShapeError(f"q and k must be [..., N, d] with the same N and d; got {q.shape} and {k.shape}")
    nseq, d = q.shape[-2:]
    length = nseq if length is None else int(length)
    if not 1 <= length:
        raise ValueError(f"length must be >= 1; got {length}")
    scale = default_scale(d, scale)
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    q = np.broadcast_to(q, batch + q.shape[-2:]).astype(np.float64)
    k = np.broadcast_to(k, batch + k.shape[-2:]).astype(np.float64)
    check_finite_array("q", q)
    check_finite_array("k", k)
    bias = None
    if attn_mask is not None:
        spec = canonical_mask(np.asarray(attn_mask), None, False, batch, nseq, nseq, np.dtype(np.float64), np)
        bias = spec.bias[spec.mask_index].reshape(batch + (spec.bias.shape[1], nseq))
        bias = np.broadcast_to(bias, batch + (nseq, nseq))
    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask, dtype=bool)
        if kpm.shape[-1] != nseq:
            raise ShapeError(f"key_padding_mask must be [B, N] with N = {nseq}; got {kpm.shape}")
        real = np.broadcast_to(kpm.reshape(kpm.shape[:1] + (1,) * (len(batch) - 1) + (nseq,))
                               if batch else kpm.reshape(nseq), batch + (nseq,)).sum(-1)
    else:
        real = np.full(batch, nseq)
    q2 = q.reshape(-1, nseq, d)
    k2 = k.reshape(-1, nseq, d)
    real = np.asarray(real).reshape(-1)
    b2 = None if bias is None else bias.reshape(-1, nseq, nseq)
    out = []
    for s in range(q2.shape[0]):
        for w0 in range(0, int(real[s]) - length + 1, length):
            sl = slice(w0, w0 + length)
            rows = scale * (q2[s, sl] @ k2[s, sl].T)
            if b2 is not None:
                extra = b2[s, sl, sl]
                if np.isneginf(extra).any():
                    continue
                rows = rows + extra
            out.append(rows)
    if not out:
        return np.zeros((0, length))
    return np.concatenate(out)


def _components(b, rank):
    if not isinstance(b, EigenBasis):
        raise TypeError(f"expected an EigenBasis; got {type(b).__name__}")
    return b.components if rank is None else b.truncated(rank).components


def overlap(b1, b2, rank=None):
    """Subspace overlap ``||U1 U2^T||_F^2 / rank`` in ``[0, 1]``.

    1 when the two rank-``r`` subspaces coincide, 0 when orthogonal; two independent
    random ``r``-dimensional subspaces of ``R^n`` give ``r / n`` on average (chance).

    Parameters
    ----------
    b1, b2 : EigenBasis
        Of the same length ``n``.
    rank : int, optional
        Compare the first ``rank`` components of each (default: the smaller rank).
    """
    if b1.length != b2.length:
        raise ShapeError(f"bases of different lengths ({b1.length} and {b2.length}) cannot be compared")
    rank = min(b1.rank, b2.rank) if rank is None else rank
    u1, u2 = _components(b1, rank), _components(b2, rank)
    return float(np.sum((u1 @ u2.T) ** 2) / rank)


def principal_angles(b1, b2, rank=None):
    """Principal angles (radians, ascending) between the spans of two bases' components."""
    if b1.length != b2.length:
        raise ShapeError(f"bases of different lengths ({b1.length} and {b2.length}) cannot be compared")
    rank = min(b1.rank, b2.rank) if rank is None else rank
    angles = scipy.linalg.subspace_angles(_components(b1, rank).T, _components(b2, rank).T)
    return np.sort(angles)


def select_columns(basis, m, *, method="qdeim", rank=None, seed=None):
    """``m`` distinct key columns for a partial computation.

    Parameters
    ----------
    basis : EigenBasis
    m : int
        Columns to compute, ``rank <= m <= n``.
    method : {"qdeim", "uniform", "first", "random"}
        ``qdeim``: the first ``m`` pivots of a column-pivoted QR of the components
        (Drmac & Gugercin, 2016), which keeps ``||pinv(U[:, S])||`` small; beyond
        ``rank`` columns it adds those of lowest leverage ``||U[:, j]||^2`` (the keys
        the basis explains least, whose exact values help most). ``uniform``: evenly
        spaced; ``first``: ``0..m-1``; ``random``: uniformly without replacement.
    rank : int, optional
        Components used (default: all of the basis').
    seed : int, optional
        For ``random``.

    Returns
    -------
    numpy.ndarray of int64, shape ``[m]``, sorted
    """
    n = basis.length
    r = basis.rank if rank is None else _check_rank_value(rank, basis.rank)
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m must be an int; got {m!r}")
    if not r <= m <= n:
        raise ValueError(f"m (columns) must be between the rank ({r}) and n ({n}); got {m}")
    if method == "qdeim":
        _, _, piv = scipy.linalg.qr(basis.components[:r], pivoting=True, mode="economic")
        chosen = list(piv[:r])
        if m > r:  # more columns: those the basis explains least (lowest leverage) come next
            rest = np.setdiff1d(np.arange(n), chosen)
            leverage = (basis.components[:r][:, rest] ** 2).sum(0)
            chosen += list(rest[np.argsort(leverage, kind="stable")[: m - r]])
        cols = np.array(chosen)
    elif method == "uniform":
        cols = np.unique(np.round(np.linspace(0, n - 1, m)).astype(np.int64))
    elif method == "first":
        cols = np.arange(m)
    elif method == "random":
        cols = np.random.default_rng(seed).choice(n, size=m, replace=False)
    else:
        raise ValueError(f"method must be one of {COLUMN_METHODS}; got {method!r}")
    return np.sort(np.asarray(cols, dtype=np.int64))
