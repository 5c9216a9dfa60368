"""Monte-Carlo attention's entry in ``mcattn compare``."""

import numpy as np

from ..._validate import namespace_of
from ...errors import ShapeError
from ...mca import attention, bounds
from ...registry import MethodEntry, Trial


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


def door(q, k, v=None, *, x, w_v, b_v=None, alpha, seed=None, sampling="weight", shared_draws=False,
         tables=None, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None, backend=None,
         check_finite=True, return_info=False):
    """:func:`mcattn.mca.attention` as ``mcattn.attention(q, k, method="mca", x=, w_v=, alpha=)``.

    ``v`` must be None: MCA estimates the values from the value projection's input ``x``
    and weight ``w_v`` (``[d_in, H * d_v]``); the number of heads is ``q.shape[-3]``.
    """
    if v is not None:
        raise TypeError("mca computes the values from x, w_v and b_v; pass v=None")
    shape = np.shape(q)  # any array, or nested lists (imported by mca.attention)
    if len(shape) < 3:
        raise ShapeError(f"mca needs q of shape [..., H, Nq, d]; got {tuple(shape)}")
    return attention(q, k, x, w_v, b_v, num_heads=int(shape[-3]), alpha=alpha, seed=seed,
                     sampling=sampling, shared_draws=shared_draws, tables=tables, attn_mask=attn_mask,
                     key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
                     backend=backend, check_finite=check_finite, return_info=return_info)


def row_seed(seed, row):
    """The seed of global batch row ``row`` when mca runs on dask chunks."""
    return int(np.random.SeedSequence([int(seed), int(row)]).generate_state(1, np.uint64)[0])


def dask_plan(knobs, batch_shape):
    """mca on dask chunks: heads stay whole (``w_v`` holds them all), the batch is split.

    Each batch row draws with :func:`row_seed` of its *global* index, so the result does
    not depend on the chunking (it differs from an in-memory call with the same seed,
    which keys its draws by position in the call).
    """
    from ... import random as mrandom
    from ..._dask import ChunkedArray, DaskPlan, is_dask

    if len(batch_shape) < 1:
        raise ValueError("mca needs batch dims [..., H]")
    knobs = dict(knobs)
    x = knobs.pop("x")
    seed = mrandom.resolve_seed(knobs.pop("seed", None))
    for name in ("w_v", "b_v"):
        if is_dask(knobs.get(name)):
            knobs[name] = knobs[name].compute()  # a weight: small, needed whole by every chunk
    lead = tuple(batch_shape[:-1])
    if is_dask(x):
        import dask.array as da

        x = da.broadcast_to(x, lead + x.shape[-2:])
    else:
        x = np.broadcast_to(x, lead + tuple(x.shape[-2:]))
    heads = int(batch_shape[-1])
    value_dim = int(knobs["w_v"].shape[1]) // heads

    def run(q, k, v, arrays, coords, **common):
        xs = arrays["x"]
        rows = np.ravel_multi_index(np.ix_(*coords[:-1]), lead).reshape(-1) if lead else np.zeros(1, int)
        shape = q.shape[:-3]
        q3 = q.reshape((-1,) + q.shape[-3:])
        k3 = k.reshape((-1,) + k.shape[-3:])
        x3 = xs.reshape((-1,) + xs.shape[-2:])
        outs = []
        for i, row in enumerate(rows):
            one = {}
            for name in ("attn_mask", "key_padding_mask"):
                m = common.get(name)
                if m is None:
                    continue
                if name == "key_padding_mask":
                    idx = np.unravel_index(i, shape)[0] if m.shape[0] > 1 else 0
                    one[name] = m[idx: idx + 1]
                else:
                    mm = m.reshape((1,) * (q.ndim - m.ndim) + m.shape)
                    sel = tuple(j if s > 1 else 0 for j, s in zip(np.unravel_index(i, shape), mm.shape))
                    one[name] = mm[sel][None]
            rest = {key: val for key, val in common.items() if key not in one}
            rest.pop("attn_mask", None), rest.pop("key_padding_mask", None)
            outs.append(door(q3[i:i + 1], k3[i:i + 1], x=x3[i:i + 1], seed=row_seed(seed, row),
                             **one, **rest, **knobs))
        xp = namespace_of(outs[0])
        return xp.concatenate(outs).reshape(shape + outs[0].shape[1:])

    return DaskPlan(run=run, arrays={"x": ChunkedArray(x, tuple(range(len(lead))))},
                    value_dim=value_dim, split_dims=tuple(range(len(lead))))


ENTRY = MethodEntry(
    name="mca", knob="alpha", values=(0.1, 0.2, 0.4, 0.6, 1.0), run=_run, bound=_bound,
    supplied=("x", "w_v", "b_v", "seed", "tables"),
    needs_projection=True, eval_values=(0.05, 0.1, 0.2, 0.4),
    bound_note="mca: the paper's Theorem (Frobenius form, expected error; with shared draws its "
               "triangle-inequality form) relative to ||O||",
    attention=door, dask_plan=dask_plan, grad="mcattn.mca.grad",
    description="Monte-Carlo attention: exact probabilities, value projection x @ w_v by importance "
                "sampling (knobs x, w_v, b_v instead of v)",
)

__all__ = ["ENTRY", "theorem_relative_bound", "bounds", "door", "dask_plan", "row_seed"]
