"""E-Att in ``mcattn energy``: its block (selective projections, L1 or Hamming alignment)
and the paper's claims (alignment energy saved, attention energy saved)."""

from dataclasses import replace

from ...cost import OpCounts
from ...eatt import projection_ops
from ..energy import ALIGNMENT_STAGES, STAGES, _attention_core, _check, _energy, _saving, vanilla_block

__all__ = ["BLOCKS", "claims", "report", "eatt_block", "eatt_hamming_block"]


def eatt_block(cfg, alignment="l1"):
    """E-Att: binarised input, selective Q/K projections of total width ``d_model / h``
    (``d_model / h^2`` per head, rounded down, at least 1), L1 alignment; V and O as in
    the vanilla block."""
    _check(cfg)
    t, d = cfg.length, cfg.d_model
    d_qk = _eatt_qk_head_dim(cfg) * cfg.heads
    ones = int(round(cfg.ones_fraction * t * d))
    select = projection_ops(t, ones, d, d_qk, True)
    blocks = vanilla_block(cfg)
    return {"qk_projection": OpCounts({"fp32_cmp": t * d}) + select + select,
            **_attention_core(cfg, alignment, d_qk // cfg.heads),
            "softmax_pv": blocks["softmax_pv"], "v_projection": blocks["v_projection"],
            "out_projection": blocks["out_projection"]}


def _eatt_qk_head_dim(cfg):
    """E-Att's per-head query/key width: ``d_model / h^2``, rounded down, at least 1."""
    return max(1, cfg.d_model // (cfg.heads * cfg.heads))


def eatt_hamming_block(cfg):
    """E-Att with Hamming alignment of the signs of q and k (beyond the paper)."""
    return eatt_block(cfg, "hamming")


def _savings(cfg, table):
    van, ea = vanilla_block(cfg), eatt_block(cfg)
    no_out = ("qk_projection", "scores", "softmax_pv", "v_projection")
    return {
        "length": cfg.length,
        "alignment": _saving(_energy(ea, ALIGNMENT_STAGES, table), _energy(van, ALIGNMENT_STAGES, table)),
        "attention_without_out_projection": _saving(_energy(ea, no_out, table), _energy(van, no_out, table)),
        "attention_with_out_projection": _saving(_energy(ea, STAGES, table), _energy(van, STAGES, table)),
    }


def claims(cfg, table, lengths, mca=True):
    return {"eatt": _savings(cfg, table),
            "eatt_by_length": [_savings(replace(cfg, length=n), table) for n in lengths]}


def report(c):
    e = c["eatt"]
    return [f"E-Att alignment energy saved (Q/K projections + scores): {e['alignment']:.1%} "
            "(paper: 99%)",
            f"E-Att attention energy saved, without the output projection: "
            f"{e['attention_without_out_projection']:.1%}; with it: "
            f"{e['attention_with_out_projection']:.1%} (paper: 66%)",
            "  by length:  " + "  ".join(
                f"N={r['length']}: {r['alignment']:.1%} / {r['attention_without_out_projection']:.1%}"
                f" / {r['attention_with_out_projection']:.1%}" for r in c["eatt_by_length"])
            + "  (alignment / attention without / with output projection)"]


#: ``mcattn energy`` rows: label -> block counts of an EnergyConfig.
BLOCKS = {"eatt": eatt_block, "eatt-hamming": eatt_hamming_block}
