"""Error bounds of Monte-Carlo attention, and their inverse.

Setting (one head ``h``; ``W`` below is the head's block ``w[:, cols_h]`` of the value
weight): key token ``j`` has input ``x_j`` (length ``d_in``) and budget ``r_j``; its value
``V_j = x_j W`` is estimated by ``V~_j = (1/r_j) sum_t Z_jt`` with i.i.d. draws
``Z_jt = x_{j,k} W_k / p(k)``, ``k ~ p``, so ``E Z = V_j``. Tokens with ``r_j >= d_in``
are exact. The output row ``i`` is ``O~_i = sum_j A_ij V~_j`` with exact probabilities
``A``, so ``O~_i - O_i = sum_j A_ij (V~_j - V_j)`` is a sum of independent zero-mean
vectors.

Lemma (per token; Kim & Ko 2022, appendix; Drineas, Kannan & Mahoney 2006):

    E||V~_j - V_j||^2 = (1/r_j) (sum_k x_jk^2 ||W_k||^2 / p(k) - ||x_j W||^2)

With weight-norm probabilities ``p(k) = ||W_k||^2 / ||W||_F^2`` this is at most
``||x_j||^2 ||W||_F^2 / r_j``; with the per-token optimal ``p_j(k)`` proportional to
``|x_jk| ||W_k||`` it is ``((sum_k |x_jk| ||W_k||)^2 - ||x_j W||^2) / r_j``, the smallest
possible.

Theorem (per output row; the paper's, with the budget rounded up):

    E||O~_i - O_i|| <= sqrt(sum_j A_ij^2 E||V~_j - V_j||^2)     (independent draws; ours)
                    <= sum_j A_ij sqrt(E||V~_j - V_j||^2)
                    <= sum_j A_ij ||x_j|| ||W||_F / sqrt(r_j)          (weight sampling)
                    <= (alpha / n) sum_j ||x_j|| ||W||_F

(the first line is Jensen on the exact second moment of a sum of independent zero-mean
terms; the paper goes through the triangle inequality instead). The last step needs
``sqrt(r_j) >= n v_j / alpha`` with ``v_j = max_i A_ij >= A_ij``, which
``r_j = ceil((n v_j / alpha)^2)`` guarantees; with the authors' floor it can fail.
``n`` is the number of valid keys.

High probability. Markov: ``P(||O~_i - O_i|| > E_i / delta) <= delta`` (the paper's form,
stated correctly). Sharper, Bernstein for sums of independent bounded zero-mean vectors
in a Hilbert space (Pinelis 1994, Ann. Probab. 22(4), Thm 3.4 with D = 1, in its
Bernstein form): if every term satisfies ``||Y|| <= a`` and the variances sum to ``b^2``,

    P(||sum Y|| >= s) <= 2 exp(-s^2 / (2 (b^2 + a s / 3))),

so with probability ``1 - delta``, ``||O~_i - O_i|| <= a L / 3 + sqrt((a L / 3)^2 + 2 b^2 L)``,
``L = log(2 / delta)``, where here ``b^2 = sum_j A_ij^2 E||V~_j - V_j||^2`` and
``a = max_j (A_ij / r_j) max_k ||Z_jk - V_j||``.

All functions take NumPy arrays, compute in float64 and return NumPy arrays.
"""

import numpy as np

from .naive import weight_probs

__all__ = [
    "token_variance",
    "token_variance_bound",
    "expected_error_bound",
    "alpha_error_bound",
    "alpha_for_expected_error",
    "high_probability_bound",
]


def _heads(x, w, num_heads):
    """x as float64 ``[B, N, d_in]`` and w as ``[H, d_in, dh]``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    w = np.asarray(w, dtype=np.float64)
    d_in = w.shape[0]
    dh = w.shape[1] // num_heads
    return x, w.reshape(d_in, num_heads, dh).transpose(1, 0, 2)


def _second_moment(x, w_heads, sampling):
    """``E||Z||^2`` for one draw, per ``[B, H, N]``: ``sum_k x_k^2 ||W_k||^2 / p(k)``."""
    row_sq = (w_heads**2).sum(-1)  # [H, d_in]
    if sampling == "weight":  # ||W_k||^2 / p(k) = ||W||_F^2 on rows that can be drawn
        ratio = np.where(row_sq > 0, row_sq.sum(-1, keepdims=True), 0.0)
        return np.einsum("bnk,hk->bhn", x**2, ratio)
    if sampling == "optimal":
        return np.einsum("bnk,hk->bhn", np.abs(x), np.sqrt(row_sq)) ** 2
    raise ValueError(f"sampling must be 'weight' or 'optimal'; got {sampling!r}")


def token_variance(x, w, num_heads, budgets, *, sampling="weight"):
    """Exact ``E||V~_j - V_j||^2`` of every token and head (the Lemma).

    Parameters
    ----------
    x : array, shape ``[B, N, d_in]`` (or ``[N, d_in]``)
    w : array, shape ``[d_in, H * dh]``
    num_heads : int
    budgets : array of int, shape ``[B, H, N]``
    sampling : {"weight", "optimal"}

    Returns
    -------
    numpy.ndarray, shape ``[B, H, N]``
        0 for tokens computed exactly (``r >= d_in``), masked (``r = 0``) or zero.
    """
    x, wh = _heads(x, w, num_heads)
    r = np.asarray(budgets, dtype=np.float64).reshape(x.shape[0], num_heads, x.shape[1])
    exact_sq = (np.einsum("bnk,hkc->bhnc", x, wh) ** 2).sum(-1)  # ||x_j W||^2
    spread = np.maximum(_second_moment(x, wh, sampling) - exact_sq, 0.0)
    sampled = (r > 0) & (r < wh.shape[1])
    return np.where(sampled, spread / np.where(sampled, r, 1.0), 0.0)


def token_variance_bound(x, w, num_heads, budgets):
    """The Lemma's bound ``||x_j||^2 ||W_h||_F^2 / r_j`` (weight sampling), ``[B, H, N]``."""
    x, wh = _heads(x, w, num_heads)
    r = np.asarray(budgets, dtype=np.float64).reshape(x.shape[0], num_heads, x.shape[1])
    bound = (x**2).sum(-1)[:, None, :] * (wh**2).sum((1, 2))[None, :, None]
    sampled = (r > 0) & (r < wh.shape[1])
    return np.where(sampled, bound / np.where(sampled, r, 1.0), 0.0)


def expected_error_bound(probs_attn, x, w, num_heads, budgets, *, sampling="weight",
                         kind="rms"):
    """Bound on ``E||O~_i - O_i||`` for every output row.

    Parameters
    ----------
    probs_attn : array, shape ``[B, H, Nq, Nk]``
    x : array, shape ``[B, Nk, d_in]``
    w : array, shape ``[d_in, H * dh]``
    num_heads : int
    budgets : array of int, shape ``[B, H, Nk]``
    sampling : {"weight", "optimal"}
    kind : {"rms", "triangle", "lemma"}
        ``"rms"`` (default, sharpest): ``sqrt(sum_j A_ij^2 E||V~_j - V_j||^2)``, which is
        ``sqrt(E||O~_i - O_i||^2)`` exactly when tokens draw independently (the default;
        not with ``shared_draws=True``), and bounds the mean by Jensen.
        ``"triangle"``: ``sum_j A_ij sqrt(E||V~_j - V_j||^2)`` (the paper's first step;
        holds for correlated draws too). ``"lemma"``: ``sum_j A_ij ||x_j|| ||W_h||_F /
        sqrt(r_j)``, the paper's bound before the budget is substituted (weight sampling).

    Returns
    -------
    numpy.ndarray, shape ``[B, H, Nq]``
    """
    a = np.asarray(probs_attn, dtype=np.float64)
    if kind == "lemma":
        return np.einsum("bhij,bhj->bhi", a, np.sqrt(token_variance_bound(x, w, num_heads, budgets)))
    var = token_variance(x, w, num_heads, budgets, sampling=sampling)
    if kind == "triangle":
        return np.einsum("bhij,bhj->bhi", a, np.sqrt(var))
    if kind == "rms":
        return np.sqrt(np.einsum("bhij,bhj->bhi", a**2, var))
    raise ValueError(f"kind must be 'rms', 'triangle' or 'lemma'; got {kind!r}")


def _key_counts(x, key_padding_mask):
    batch, n = x.shape[0], x.shape[1]
    if key_padding_mask is None:
        return np.full(batch, n), np.ones((batch, n), dtype=bool)
    kpm = np.asarray(key_padding_mask, dtype=bool).reshape(batch, n)
    return kpm.sum(-1), kpm


def alpha_error_bound(x, w, num_heads, alpha, *, key_padding_mask=None):
    """The Theorem's bound ``(alpha / n) sum_j ||x_j|| ||W_h||_F`` on every row's expected error.

    Parameters
    ----------
    x : array, shape ``[B, N, d_in]``
    w : array, shape ``[d_in, H * dh]``
    num_heads : int
    alpha : float or array broadcastable to ``[B, H]``
    key_padding_mask : array of bool, shape ``[B, N]``, optional
        True = real key; ``n`` and the sum run over real keys.

    Returns
    -------
    numpy.ndarray, shape ``[B, H]``
        Holds for weight-norm sampling and budgets from :func:`mcattn.mca.budgets`.
    """
    x, wh = _heads(x, w, num_heads)
    n, valid = _key_counts(x, key_padding_mask)
    x_norm_sum = (np.sqrt((x**2).sum(-1)) * valid).sum(-1)  # [B]
    w_norm = np.sqrt((wh**2).sum((1, 2)))  # [H]
    alpha = np.asarray(alpha, dtype=np.float64)
    return alpha / np.maximum(n, 1)[:, None] * x_norm_sum[:, None] * w_norm[None, :]


def alpha_for_expected_error(target, x, w, num_heads, *, key_padding_mask=None):
    """The ``alpha`` whose Theorem bound equals ``target`` (inverse of :func:`alpha_error_bound`).

    Parameters
    ----------
    target : float
        Wanted bound on ``E||O~_i - O_i||`` (absolute, in the units of the values), > 0.
    x, w, num_heads, key_padding_mask
        As in :func:`alpha_error_bound`.

    Returns
    -------
    numpy.ndarray, shape ``[B]``
        For each sequence the largest ``alpha`` meeting ``target`` in every head; use
        ``.min()`` for one value for the whole batch.
    """
    if not target > 0:
        raise ValueError(f"target must be > 0; got {target}")
    per_unit = alpha_error_bound(x, w, num_heads, 1.0, key_padding_mask=key_padding_mask)
    worst = per_unit.max(axis=-1)
    return np.where(worst > 0, float(target) / np.where(worst > 0, worst, 1.0), np.inf)


def high_probability_bound(probs_attn, x, w, num_heads, budgets, delta, *, sampling="weight",
                           method="bernstein"):
    """A bound on ``||O~_i - O_i||`` that holds with probability at least ``1 - delta``.

    Parameters
    ----------
    probs_attn : array, shape ``[B, H, Nq, Nk]``
    x : array, shape ``[B, Nk, d_in]``
    w : array, shape ``[d_in, H * dh]``
    num_heads : int
    budgets : array of int, shape ``[B, H, Nk]``
    delta : float in (0, 1)
    sampling : {"weight", "optimal"}
    method : {"bernstein", "markov"}
        ``"markov"``: the exact-variance expected bound over ``delta`` (the paper's form);
        ``"bernstein"``: the vector Bernstein bound of the module docstring (logarithmic
        in ``1/delta``).

    Returns
    -------
    numpy.ndarray, shape ``[B, H, Nq]``
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    if method == "markov":
        return expected_error_bound(probs_attn, x, w, num_heads, budgets, sampling=sampling,
                                    kind="triangle") / delta
    if method != "bernstein":
        raise ValueError(f"method must be 'bernstein' or 'markov'; got {method!r}")
    xs, wh = _heads(x, w, num_heads)
    a_mat = np.asarray(probs_attn, dtype=np.float64)
    r = np.asarray(budgets, dtype=np.float64).reshape(xs.shape[0], num_heads, xs.shape[1])
    var = token_variance(xs, w, num_heads, budgets, sampling=sampling)
    b_sq = np.einsum("bhij,bhj->bhi", a_mat**2, var)
    # Largest single-draw deviation ||Z - V_j|| <= max_k ||x_jk W_k / p(k)|| + ||x_j W||.
    row_norm = np.sqrt((wh**2).sum(-1))  # [H, d_in]
    exact_norm = np.sqrt((np.einsum("bnk,hkc->bhnc", xs, wh) ** 2).sum(-1))  # [B, H, N]
    if sampling == "weight":
        p = weight_probs(np.asarray(w, dtype=np.float64), num_heads)
        scale = np.where(p > 0, row_norm / np.where(p > 0, p, 1.0), 0.0)  # ||W_k|| / p(k)
        biggest = np.einsum("bnk,hk->bhnk", np.abs(xs), scale).max(-1)
    else:  # optimal: every draw has ||Z|| = sum_k |x_jk| ||W_k||
        biggest = np.einsum("bnk,hk->bhn", np.abs(xs), row_norm)
    sampled = (r > 0) & (r < wh.shape[1])
    per_draw = np.where(sampled, (biggest + exact_norm) / np.where(sampled, r, 1.0), 0.0)
    a_max = (a_mat * per_draw[:, :, None, :]).max(-1)
    log_term = np.log(2.0 / delta)
    return a_max * log_term / 3 + np.sqrt((a_max * log_term / 3) ** 2 + 2 * b_sq * log_term)
