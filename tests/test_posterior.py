"""mcattn.posterior: the shared a-posteriori bound type."""

import numpy as np
import pytest

from mcattn.posterior import from_rows


def test_relative_bound_holds_for_any_error_within_the_rows():
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((2, 3, 7, 4))
    err = rng.standard_normal(exact.shape) * 0.1
    approx = exact + err
    rows = np.linalg.norm(err, axis=-1) * 1.0001  # true row bounds
    b = from_rows(rows, approx, certified=True)
    realised = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert realised <= b.relative < 2 * realised
    assert b.median == pytest.approx(np.median(rows))


def test_vacuous_and_bad_arguments():
    out = np.ones((1, 2, 3))
    assert from_rows(np.full((1, 2), 10.0), out, certified=True).relative == float("inf")
    assert from_rows(np.zeros((1, 2)), out, certified=True).relative == 0.0
    with pytest.raises(ValueError, match="delta"):
        from_rows(np.zeros((1, 2)), out, certified=False)
    with pytest.raises(ValueError, match="no delta"):
        from_rows(np.zeros((1, 2)), out, certified=True, delta=0.05)
    with pytest.raises(ValueError, match="shape"):
        from_rows(np.zeros((2, 2)), out, certified=True)
