"""RFA in ``mcattn energy``: its block from :func:`mcattn.rfa.rfa_ops` and the length from
which its core costs less energy than exact attention's."""

from types import SimpleNamespace

from ...cost import OpCounts
from ..energy import _energy, vanilla_block

__all__ = ["BLOCKS", "claims", "report", "rfa_block", "rfa_crossover"]


def _rfa_inputs(cfg, length):
    """The fields :func:`mcattn.rfa.rfa_ops` reads, for one sequence (positive features)."""
    return SimpleNamespace(q=SimpleNamespace(shape=(cfg.heads, length, cfg.head_dim)), nq=length,
                           nk=length, value_dim=cfg.head_dim, num_features=cfg.rfa_features,
                           feature_dim=cfg.rfa_features, unit=False, kind="positive",
                           is_causal=False, chunk_size=64, log_gate=None)


def rfa_block(cfg):
    """RFA (positive random features, non-causal): its whole attention core as ``scores``."""
    from ...rfa import rfa_ops

    blocks = vanilla_block(cfg)
    blocks["scores"] = rfa_ops(_rfa_inputs(cfg, cfg.length))
    blocks["softmax_pv"] = OpCounts()
    return blocks


def rfa_crossover(cfg, table):
    """Smallest length at which RFA's attention core costs less energy than exact's."""
    from dataclasses import replace

    def cheaper(n):
        c = replace(cfg, length=n)
        core = ("scores", "softmax_pv")
        return _energy(rfa_block(c), core, table) < _energy(vanilla_block(c), core, table)

    hi = 1
    while not cheaper(hi):
        hi *= 2
        if hi > 1 << 26:
            return None
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cheaper(mid) else (mid, hi)
    return hi


def claims(cfg, table, lengths, mca=True):
    return {"rfa": {"features": cfg.rfa_features, "head_dim": cfg.head_dim,
                    "crossover_length": rfa_crossover(cfg, table)}}


def report(c):
    r = c["rfa"]
    return [f"RFA ({r['features']} features, head dim {r['head_dim']}): its core costs less "
            f"energy than exact attention's from length {r['crossover_length']}"]


BLOCKS = {"rfa": rfa_block}
