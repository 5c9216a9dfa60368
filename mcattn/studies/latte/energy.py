"""LATTE in ``mcattn energy``: its block from :func:`mcattn.latte.latte_ops` and the saving
of its attention core."""

from types import SimpleNamespace

import numpy as np

from ...cost import OpCounts
from ..energy import STAGES, _energy, _saving, vanilla_block

__all__ = ["BLOCKS", "claims", "report", "latte_block"]


def latte_block(cfg):
    """LATTE from :func:`mcattn.latte.latte_ops`, the count ``info.ops`` of a LATTE call.

    One sequence of ``length`` tokens per head, relative thresholds, int8 kept scores
    reusing the estimate's high-nibble products, ``latte_keep`` of the keys kept in every
    row: quantisation of q and k, the 4-bit estimate and the threshold compare on every
    pair, the remaining nibble products, softmax and ``P V`` on the kept pairs. The whole
    attention core goes into ``scores`` (LATTE interleaves scoring and the softmax).
    Projections as in the vanilla block.
    """
    from ..._validate import MaskSpec
    from ...latte import latte_ops

    blocks = vanilla_block(cfg)
    t, h, dh = cfg.length, cfg.heads, cfg.head_dim
    inp = SimpleNamespace(q=SimpleNamespace(shape=(h, t, dh)), nq=t, nk=t, head_dim=dh, value_dim=dh,
                          mask=MaskSpec(None, None, False))
    lat = SimpleNamespace(inp=inp, mode="relative", exact_scores="int8")
    kept = np.full((h, t), max(1, int(round(cfg.latte_keep * t))), np.int64)
    ops, _ = latte_ops(lat, kept)
    blocks["scores"] = ops
    blocks["softmax_pv"] = OpCounts()
    return blocks


def claims(cfg, table, lengths, mca=True):
    core = ("scores", "softmax_pv")
    latte, van = latte_block(cfg), vanilla_block(cfg)
    return {"latte": {"keep": cfg.latte_keep,
                      "core_saving": _saving(_energy(latte, core, table), _energy(van, core, table)),
                      "block_saving": _saving(_energy(latte, STAGES, table), _energy(van, STAGES, table))}}


def report(c):
    la = c["latte"]
    return [f"LATTE (keep {la['keep']:.0%} of keys): attention core (scores + softmax + PV) "
            f"energy saved {la['core_saving']:.1%}, whole block {la['block_saving']:.1%}"]


BLOCKS = {"latte": latte_block}
