"""MCA's a-posteriori bound: per query row, at confidence ``1 - delta``, from the call's own draws.

Only the values are sampled: ``o~_i - o_i = sum_j A_ij e_j`` with ``e_j = v~_j - v_j`` the
error of token ``j``'s sampled projection (the probabilities ``A`` are exact). For ``r``
draws with probabilities ``p``, one draw ``z = x_c W_c / p_c`` has
``E||z||^2 = T_j`` in closed form:

* weight sampling (``p_c = ||W_c||^2 / ||W||_F^2``): ``T_j = ||W||_F^2 ||x_j||^2``;
* optimal sampling (``p_c`` proportional to ``|x_jc| ||W_c||``): ``T_j = (sum_c |x_jc| ||W_c||)^2``,

so ``E||e_j||^2 = (T_j - ||v_j - b||^2) / r_j``, estimated without bias from the sampled value
itself: ``s_j^2 = max(T_j - ||v~_j - b||^2, 0) / (r_j - 1)`` (``T_j / r_j``, an upper bound, for
``r_j = 1``; 0 for tokens computed exactly).

* Independent draws: the ``e_j`` are independent and centred, so
  ``E||o~_i - o_i||^2 = sum_j A_ij^2 E||e_j||^2``; the bound is
  ``z_delta sqrt(sum_j A_ij^2 s_j^2)`` with ``z_delta`` of
  :func:`mcattn.posterior.gaussian_factor` (the row error taken as Gaussian: a sum over
  many draws; the worst covariance shape for its norm).
* Shared draws (every token uses prefixes of one sequence): the errors are correlated, and
  ``sqrt(E||sum_j A_ij e_j||^2) <= sum_j A_ij sqrt(E||e_j||^2)`` (Minkowski) whatever the
  correlation: the bound is ``z_delta sum_j A_ij s_j``.

Cost: ``O(N d_in)`` for the variances and one more matrix-vector product per block of the
probabilities already computed for ``A @ V~`` (:func:`mcattn.mca.stream.apply`).
"""

import numpy as np

from .._array import host_copy

__all__ = ["token_variances", "rounding_allowance"]


def token_variances(x3, w, b, num_heads, budgets, values, sampling):
    """Estimated ``E||v~_j - v_j||^2`` per (batch row, head, token): ``[B, H, Nk]`` float64.

    Parameters
    ----------
    x3 : array, shape ``[B, Nk, d_in]``
    w : array, shape ``[d_in, H * dv]``
    b : array ``[H * dv]`` or None
    num_heads : int
    budgets : array of int, shape ``[B, H, Nk]``
    values : array, shape ``[B * H, Nk, dv]``
        The sampled values (bias included).
    sampling : {"weight", "optimal"}
    """
    x = np.asarray(host_copy(x3), dtype=np.float64)
    batch, nk, d_in = x.shape
    w64 = np.asarray(host_copy(w), dtype=np.float64).reshape(d_in, num_heads, -1)
    dv = w64.shape[-1]
    vals = np.asarray(host_copy(values), dtype=np.float64).reshape(batch, num_heads, nk, dv)
    if b is not None:
        vals = vals - np.asarray(host_copy(b), dtype=np.float64).reshape(num_heads, 1, dv)
    r = np.asarray(host_copy(budgets), dtype=np.int64).reshape(batch, num_heads, nk)
    col = np.sqrt((w64 * w64).sum(-1))  # ||W_h[c]||, [d_in, H]
    if sampling == "weight":
        t = (col * col).sum(0)[None, :, None] * (x * x).sum(-1)[:, None, :]
    else:
        t = (np.abs(x) @ col).transpose(0, 2, 1) ** 2
    sampled = (r > 0) & (r < d_in) & (x != 0).any(-1)[:, None, :]
    spare = np.maximum(t - (vals * vals).sum(-1), 0.0) / np.maximum(r - 1, 1)
    est = np.where(r > 1, spare, t / np.maximum(r, 1))
    return np.where(sampled, est, 0.0)


def rounding_allowance(values, d_in):
    """The floating-point part of a row's error, ``[BH, 1]``: ``8 u sqrt(d_in) max_j ||v~_j||``.

    Tokens computed exactly (``r_j >= d_in``) have no sampling error but still the rounding
    of their products and of ``A @ V~`` in the compute dtype (unit roundoff ``u``).
    """
    host = np.asarray(host_copy(values))
    unit = float(np.finfo(host.dtype).eps) if host.dtype.kind == "f" else 2.0 ** -52
    top = np.linalg.norm(host.astype(np.float64), axis=-1).max(-1, initial=0.0)
    return (8.0 * unit * np.sqrt(d_in) * top)[:, None]
