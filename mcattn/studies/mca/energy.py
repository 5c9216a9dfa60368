"""MCA in ``mcattn energy``: its block (the value projection sampled) and its FLOPs on the
embedded sample's real attention budgets."""

import numpy as np

from ..energy import vanilla_block

__all__ = ["BLOCKS", "claims", "report", "mca_block", "mca_sample_figures"]


def mca_block(cfg):
    """MCA: the vanilla block with the value projection sampled at ``cfg.mca_kept`` of the MACs.

    Every (token, head) gets ``round(mca_kept * d_model)`` draws, counted by MCA's own
    projection count (multiply-adds, two random words, the alias lookup and a divide
    per draw).
    """
    from ...mca.ops import projection_ops as _projection_ops

    blocks = vanilla_block(cfg)
    t, d, h = cfg.length, cfg.d_model, cfg.heads
    r = np.full((h, t), int(round(cfg.mca_kept * d)), np.int64)
    sampled, _ = _projection_ops(r, d, cfg.head_dim, "weight", np.ones((h, t), bool))
    blocks["v_projection"] = sampled
    return blocks


def mca_sample_figures(alphas=(0.1, 0.2, 0.4, 0.6, 1.0, 2.0, 4.0)):
    """MCA's FLOPs on the embedded MiniLM sample, from its real attention budgets.

    Per alpha, over every layer: the value projection's FLOPs, dense over sampled,
    (a) paper-style: every sequence padded to 128 positions, ``n = 128`` and ``floor`` as
    in the authors' code, the dense baseline over all 128 positions (padding counted as
    dense work, free for MCA), multiply-adds only; (b) ours: unpadded, ``n`` = real
    tokens, ``ceil``, sampling work included (:func:`mcattn.mca.attention`'s counts);
    (c) ours for the whole of value projection + attention.
    """
    import mcattn

    from ...mca.ops import projection_ops as _projection_ops
    from ..data import load_sample
    from .report import PADDED_LENGTH, _pad, _paper_budgets

    sample = load_sample()
    kpm = sample.key_padding_mask
    heads = sample.num_heads
    rows = []
    for alpha in alphas:
        padded = [0.0, 0.0]
        ours = [0.0, 0.0]
        whole = [0.0, 0.0]
        for layer in range(sample.num_layers):
            q, k = sample.q[layer], sample.k[layer]
            d_in = sample.x.shape[-1]
            dv = sample.w_v.shape[-1] // heads
            probs = mcattn.attention_probs(q, k, key_padding_mask=kpm, scale=sample.scale)
            r = mcattn.mca.budgets(probs, alpha, d_in, key_padding_mask=kpm)
            valid = np.broadcast_to(kpm[:, None, :], r.shape)
            sampled, dense = _projection_ops(r, d_in, dv, "weight", valid)
            ours[0] += dense.flops
            ours[1] += sampled.flops
            qp, kp = (_pad(a, 2, PADDED_LENGTH) for a in (q, k))
            kpm_p = _pad(kpm, 1, PADDED_LENGTH)
            probs_p = mcattn.attention_probs(qp, kp, key_padding_mask=kpm_p, scale=sample.scale)
            r_p = np.minimum(_paper_budgets(probs_p, alpha, d_in, PADDED_LENGTH), d_in)
            padded[0] += r_p.size * d_in  # dense MACs over all padded positions
            padded[1] += int(r_p.sum())
            # Whole scope: exact attention (unpadded) + dense projection vs MCA's.
            attn = mcattn.exact.exact_ops(_sample_inputs(q, k, kpm, sample.scale), value_dim=dv)
            whole[0] += (attn + dense).flops
            whole[1] += (attn + sampled).flops
        rows.append({"alpha": alpha, "paper_padded_projection_x": padded[0] / max(padded[1], 1),
                     "ours_projection_x": ours[0] / ours[1],
                     "ours_attention_and_projection_x": whole[0] / whole[1]})
    return rows


def _sample_inputs(q, k, kpm, scale):
    from ..._validate import prepare_attention

    return prepare_attention(q, k, k, key_padding_mask=kpm, scale=scale, check_finite=False)


def claims(cfg, table, lengths, mca=True):
    return {"mca": mca_sample_figures()} if mca else {}


def report(c):
    if "mca" not in c:
        return []
    lines = ["MCA on the real sample, FLOPs dense / MCA (paper: up to 11x):",
             f"  {'alpha':>6} {'padded 128, paper-style':>24} {'ours, unpadded':>15} "
             f"{'ours, V proj + attention':>25}"]
    for row in c["mca"]:
        lines.append(f"  {row['alpha']:>6} {row['paper_padded_projection_x']:>23.2f}x "
                     f"{row['ours_projection_x']:>14.2f}x "
                     f"{row['ours_attention_and_projection_x']:>24.2f}x")
    return lines


BLOCKS = {"mca": mca_block}
