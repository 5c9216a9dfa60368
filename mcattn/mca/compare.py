"""Monte-Carlo attention's entry in ``mcattn compare``."""

import numpy as np

from ..registry import MethodEntry, Trial
from . import attention, bounds


def theorem_relative_bound(inputs, out_exact, alpha):
    """The paper's Theorem in Frobenius form, relative to ``||O||`` per ``[B, H]``.

    With independent draws ``E||O~_i - O_i||^2 = sum_j A_ij^2 Var_j`` and the Lemma with
    ``r_j >= (n v_j / alpha)^2`` give ``E||O~_i - O_i||^2 <= (alpha/n)^2 ||W_h||_F^2
    sum_j ||x_j||^2``, hence ``E||O~ - O||_F <= (alpha/n) ||W_h||_F sqrt(n_q sum_j
    ||x_j||^2)`` over the ``n_q`` real query rows.
    """
    kpm = inputs.key_padding_mask
    n = kpm.sum(-1).astype(np.float64)  # [B]
    x_sq = ((inputs.x.astype(np.float64) ** 2).sum(-1) * kpm).sum(-1)  # [B]
    heads = inputs.q.shape[1]
    w = inputs.w_v.astype(np.float64)
    w_norm = np.sqrt((w.reshape(w.shape[0], heads, -1) ** 2).sum((0, 2)))  # [H]
    bound = alpha / n[:, None] * w_norm[None, :] * np.sqrt(n[:, None] * x_sq[:, None])
    rows = kpm[:, None, :, None]
    o_norm = np.sqrt(((out_exact.astype(np.float64) ** 2) * rows).sum((-1, -2)))
    return bound / np.where(o_norm > 0, o_norm, 1.0)


def _run(inputs, alpha, seed):
    out, info = attention(inputs.q, inputs.k, inputs.x, inputs.w_v, inputs.b_v,
                          num_heads=inputs.q.shape[1], alpha=alpha,
                          key_padding_mask=inputs.key_padding_mask, scale=inputs.scale,
                          seed=seed, return_info=True)
    return Trial(out=out, info=info)


def _bound(inputs, alpha, trial, exact_out):
    return theorem_relative_bound(inputs, exact_out, alpha)


ENTRY = MethodEntry(
    name="mca", knob="alpha", values=(0.1, 0.2, 0.4, 0.6, 1.0), run=_run, bound=_bound,
    needs_projection=True, eval_values=(0.05, 0.1, 0.2, 0.4),
    bound_note="mca: the paper's Theorem (Frobenius form, expected error, independent draws) "
               "relative to ||O||",
)

__all__ = ["ENTRY", "theorem_relative_bound", "bounds"]
