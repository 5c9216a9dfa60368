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

from . import bounds
from .api import KERNELS, EigenInfo, attention, fit_heads
from .basis import (
    COLUMN_METHODS,
    EigenBasis,
    fit,
    overlap,
    principal_angles,
    score_rows,
    select_columns,
)
from .ops import eigen_ops
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
