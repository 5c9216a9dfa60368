"""Launch planning shared by the numba.cuda and CuPy value projections."""

from .. import config

__all__ = ["scratch_plan"]


def scratch_plan(total, d_in, optimal):
    """Tasks per launch (the CDF scratch's width) and the first task of each launch.

    Optimal sampling keeps each token's CDF (``d_in`` doubles) in a global scratch
    ``[d_in, chunk]`` of at most ``config.CUDA_SCRATCH_BYTES`` bytes, so a large call runs
    as several launches. Weight sampling needs no scratch and runs as one launch.

    Returns
    -------
    chunk : int
    starts : range
    """
    if total == 0:
        return 1, range(0)
    if not optimal:
        return total, range(0, total, total)
    chunk = max(1, min(total, int(config.CUDA_SCRATCH_BYTES) // (8 * max(int(d_in), 1))))
    return chunk, range(0, total, chunk)
