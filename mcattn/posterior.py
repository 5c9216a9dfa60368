"""A-posteriori error bounds: what one call can say about its own error, per query row.

A method that approximates softmax attention returns, with ``return_info=True``, a
:class:`PosteriorBound` in ``info.posterior``: a bound on ``||o~_i - o_i||_2`` for every query
row ``i``, computed from quantities the call already has. Certified bounds (deterministic
methods) hold on every row; the others hold on each row with probability at least
``1 - delta`` over the method's random draws. docs/bounds.md derives each method's bound.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["PosteriorBound", "from_rows"]


@dataclass(frozen=True)
class PosteriorBound:
    """A per-row bound on the output error of one call.

    Attributes
    ----------
    row : numpy.ndarray, shape ``[..., Nq]`` (the output's batch dims), float64
        Bound on ``||o~_i - o_i||_2`` per query row (0 for a row with no visible key,
        ``inf`` where the bound says nothing).
    relative : float
        Bound on ``||O~ - O||_F / ||O||_F`` over the call, from the rows:
        ``r / max(||O~||_F - r, 0)`` with ``r = sqrt(sum_i row_i^2)`` (``||O||_F >= ||O~||_F - r``).
    certified : bool
        True: holds on every row, no exceptions. False: each row holds with probability at
        least ``1 - delta``.
    delta : float or None
        The failure probability of a random bound; None when certified.
    """

    row: np.ndarray
    relative: float
    certified: bool
    delta: float | None = None

    @property
    def median(self):
        """Median of the per-row bounds."""
        return float(np.median(self.row)) if self.row.size else 0.0


def from_rows(row, out, *, certified, delta=None):
    """A :class:`PosteriorBound` from per-row bounds and the call's output.

    Parameters
    ----------
    row : array_like, shape ``[..., Nq]``
        Bound on ``||o~_i - o_i||_2`` per row (host).
    out : array_like, shape ``[..., Nq, dv]``
        The call's output ``O~`` (host).
    certified : bool
    delta : float, optional
        Required when ``certified`` is False, in ``(0, 1)``.

    Returns
    -------
    PosteriorBound
    """
    row = np.asarray(row, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if row.shape != out.shape[:-1]:
        raise ValueError(f"row must have the output's shape without dv {out.shape[:-1]}; got {row.shape}")
    if certified:
        if delta is not None:
            raise ValueError("a certified bound has no delta")
    elif delta is None or not 0 < float(delta) < 1:
        raise ValueError(f"a random bound needs delta in (0, 1); got {delta}")
    total = float(np.sqrt((row * row).sum()))
    norm = float(np.linalg.norm(out))
    floor = norm - total
    relative = 0.0 if total == 0 else (total / floor if floor > 0 else float("inf"))
    return PosteriorBound(row=row, relative=relative, certified=bool(certified),
                          delta=None if certified else float(delta))
