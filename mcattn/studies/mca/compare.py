"""Monte-Carlo attention's entry in ``mcattn compare``."""

import numpy as np

from ...mca import attention, bounds
from ..entries import MethodEntry, Trial


def theorem_relative_bound(inputs, out_exact, alpha, shared_draws=False):
    """The paper's Theorem in Frobenius form, relative to ``||O||`` per ``[B, H]``.

    With independent draws ``E||O~_i - O_i||^2 = sum_j A_ij^2 Var_j`` and the Lemma with
    ``r_j >= (n v_j / alpha)^2`` give ``E||O~_i - O_i||^2 <= (alpha/n)^2 ||W_h||_F^2
    sum_j ||x_j||^2``, hence ``E||O~ - O||_F <= (alpha/n) ||W_h||_F sqrt(n_q sum_j
    ||x_j||^2)`` over the ``n_q`` real query rows.

    With shared draws the tokens' errors are correlated; the triangle inequality in
    ``L2`` still gives ``sqrt(E||O~_i - O_i||^2) <= sum_j A_ij sqrt(Var_j) <= (alpha/n)
    ||W_h||_F sum_j ||x_j||``, hence ``E||O~ - O||_F <= (alpha/n) ||W_h||_F sqrt(n_q)
    sum_j ||x_j||`` (up to ``sqrt(n)`` looser).
    """
    kpm = inputs.key_padding_mask
    n = kpm.sum(-1).astype(np.float64)  # [B]
    x_norm = np.sqrt((inputs.x.astype(np.float64) ** 2).sum(-1)) * kpm  # [B, N]
    # [B]: sqrt(n_q) sum_j ||x_j|| (shared) or sqrt(n_q sum_j ||x_j||^2), with n_q = n
    spread = np.sqrt(n) * (x_norm.sum(-1) if shared_draws else np.sqrt((x_norm ** 2).sum(-1)))
    heads = inputs.q.shape[1]
    w = inputs.w_v.astype(np.float64)
    w_norm = np.sqrt((w.reshape(w.shape[0], heads, -1) ** 2).sum((0, 2)))  # [H]
    bound = alpha / n[:, None] * w_norm[None, :] * spread[:, None]
    rows = kpm[:, None, :, None]
    o_norm = np.sqrt(((out_exact.astype(np.float64) ** 2) * rows).sum((-1, -2)))
    return bound / np.where(o_norm > 0, o_norm, 1.0)


def _run(inputs, alpha, seed, **knobs):
    out, info = attention(inputs.q, inputs.k, inputs.x, inputs.w_v, inputs.b_v,
                          num_heads=inputs.q.shape[1], alpha=alpha,
                          key_padding_mask=inputs.key_padding_mask, scale=inputs.scale,
                          seed=seed, return_info=True, **knobs)
    return Trial(out=out, info=info)


def _bound(inputs, alpha, trial, exact_out):
    return theorem_relative_bound(inputs, exact_out, alpha, trial.info.shared_draws)








ENTRY = MethodEntry(
    energy="mcattn.studies.mca.energy",
    name="mca", knob="alpha", values=(0.1, 0.2, 0.4, 0.6, 1.0), run=_run, bound=_bound,
    supplied=("x", "w_v", "b_v", "seed", "tables"),
    needs_projection=True, eval_values=(0.05, 0.1, 0.2, 0.4),
    bound_note="mca: the paper's Theorem (Frobenius form, expected error; with shared draws its "
               "triangle-inequality form) relative to ||O||",
)

__all__ = ["ENTRY", "theorem_relative_bound", "bounds"]
