"""Operation counts of random feature attention."""

from ..cost import OpCounts

__all__ = ["rfa_ops"]


def rfa_ops(rinp):
    """Operations of the RFA algorithm for canonical inputs (as the CPU and NumPy backends run it).

    Per row of ``q`` and ``k``: scaling and squared norm (``3d``; unit rows ``+d`` and a
    divide), the projection (``D d`` multiply-adds), the feature map (``positive``: a
    max, a subtract, an exp and a multiply per projection; ``sincos``: a sin and a cos —
    each counted as one ``fp32_exp``, a polynomial of the same size after range
    reduction — and 2 multiplies; ``arccos``: a compare and a multiply) and the feature
    norm (``m`` multiply-adds and a square root, counted as a divide). Per key: its weight
    (an add, a compare, an exp) applied to ``m`` features. Non-causal: ``S`` and ``z``
    (``m (dv + 1)`` multiply-adds per key) and the read-out (``m (dv + 1)`` per query, a
    divide, ``dv`` multiplies, the floor's compare). Causal, per chunk of ``L`` tokens:
    ``L^2 (m + dv + 2)`` multiply-adds for the intra-chunk products, the decay mask
    (``L^2`` multiplies; gated: ``L^2`` exps and adds), ``2 L m (dv + 1)`` for the state's
    read-out and update.

    Returns
    -------
    OpCounts
    """
    bh, nq, nk = rinp.q.shape[0], rinp.nq, rinp.nk
    d, dv, D, m = rinp.q.shape[2], rinp.value_dim, rinp.num_features, rinp.feature_dim
    rows = bh * (nq + nk)
    keys = bh * nk
    mul = rows * (2 * d + D * d + m) + keys * m
    add = rows * (d + D * d + m) + keys
    exp = keys
    cmp = keys
    div = rows
    if rinp.unit:
        mul += rows * d
        add += rows * d
        div += rows
    if rinp.kind == "positive":
        cmp += rows * D
        add += rows * D
        exp += rows * D
        mul += rows * D
    elif rinp.kind == "sincos":
        exp += rows * 2 * D
        mul += rows * 2 * D
    else:
        cmp += rows * D
        mul += rows * D
    if rinp.is_causal:
        chunk = rinp.chunk_size
        full, rest = divmod(nq, chunk)
        sq = full * chunk * chunk + rest * rest
        n_chunks = full + (1 if rest else 0)
        intra = bh * sq * (m + dv + 2)
        mul += intra + bh * sq + 2 * bh * nq * m * (dv + 1)
        add += intra + 2 * bh * nq * m * (dv + 1)
        if rinp.log_gate is not None:
            exp += bh * (sq + 2 * nq)
            add += bh * (sq + nq)
        mul += bh * n_chunks * m * (dv + 1)
    else:
        mul += bh * (nk + nq) * m * (dv + 1)
        add += bh * (nk + nq) * m * (dv + 1)
    mul += bh * nq * (dv + 1)
    div += bh * nq
    cmp += bh * nq
    return OpCounts({"fp32_mul": mul, "fp32_add": add, "fp32_exp": exp, "fp32_cmp": cmp, "fp32_div": div})
