"""``mcattn energy``: each method's operations priced per kind, next to the papers' claims.

Every method contributes the operation counts of one attention block for a model
configuration through one small function (``BLOCKS`` in ``studies/<method>/energy.py``,
named by the method's study entry: label -> function of an :class:`EnergyConfig`
returning the block's :class:`~mcattn.cost.OpCounts` by stage; :func:`blocks` collects
them), and checks its paper's claims there (``claims``, ``report``).
The stages are

``qk_projection``   the query and key projections (E-Att: binarise + selective projection)
``scores``          the alignment: ``q k^T`` (E-Att: L1 / Hamming distances)
``softmax_pv``      softmax and ``P V``
``v_projection``    the value projection (MCA: sampled)
``out_projection``  the output projection

The counts are the library's own: :func:`mcattn.eatt.alignment_ops`,
:func:`mcattn.eatt.softmax_value_ops`, :func:`mcattn.eatt.projection_ops` (the same
functions that fill ``info.ops`` of :mod:`mcattn.eatt`; exact attention's
:func:`~mcattn.exact.exact_ops` is their ``dot`` + softmax sum, which the tests check),
:func:`mcattn.rfa.rfa_ops`, MCA's projection counts and :func:`mcattn.latte.latte_ops`
(the count of a LATTE call's ``info.ops``). Prices:
:data:`mcattn.cost.HOROWITZ_45NM_PJ` or a table
given as JSON. One self-attention block of one sequence (batch 1, no mask), every
token attending to every token.
"""

import json
import math
from dataclasses import asdict, dataclass

from ..cost import HOROWITZ_45NM_PJ, energy_pj
from ..eatt import alignment_ops, dense_projection_ops, softmax_value_ops

__all__ = ["EnergyConfig", "STAGES", "blocks", "vanilla_block", "load_table", "run", "format_report",
           "ASSUMPTIONS"]

STAGES = ("qk_projection", "scores", "softmax_pv", "v_projection", "out_projection")
ALIGNMENT_STAGES = ("qk_projection", "scores")


@dataclass(frozen=True)
class EnergyConfig:
    """The configuration a block is counted for.

    Attributes
    ----------
    d_model : int
        Hidden width (E-Att's Transformer-base: 512).
    heads : int
        Attention heads (8).
    length : int
        Tokens of the sequence (self-attention, every token sees every token).
    ones_fraction : float
        Fraction of the binarised hidden states that are 1 (E-Att's selective
        projection adds that many rows; 0.5 for a layer-normalised input).
    latte_keep : float
        Fraction of keys LATTE keeps after its 4-bit filter (0.15: the paper's ~85 %
        filtered).
    rfa_features : int
        RFA's random features per head.
    mca_kept : float
        MCA's value-projection MACs kept (for the per-method table; the claims use the
        real sample's budgets directly).
    """

    d_model: int = 512
    heads: int = 8
    length: int = 32
    ones_fraction: float = 0.5
    latte_keep: float = 0.15
    rfa_features: int = 128
    mca_kept: float = 0.573

    @property
    def head_dim(self):
        return self.d_model // self.heads


def _check(cfg):
    if cfg.d_model < 1 or cfg.heads < 1 or cfg.d_model % cfg.heads:
        raise ValueError(f"heads ({cfg.heads}) must divide d_model ({cfg.d_model})")
    if cfg.length < 1:
        raise ValueError(f"length must be >= 1; got {cfg.length}")
    for name in ("ones_fraction", "latte_keep", "mca_kept"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{name} must be in [0, 1]; got {getattr(cfg, name)}")


def _attention_core(cfg, alignment, head_dim):
    t, h = cfg.length, cfg.heads
    pairs, rows = h * t * t, h * t
    return {"scores": alignment_ops(alignment, pairs, rows, rows, head_dim),
            "softmax_pv": softmax_value_ops(pairs, rows, cfg.head_dim)}


def vanilla_block(cfg):
    """Dot-product attention: dense Q, K, V, O projections (with biases), ``q k^T``, softmax, ``P V``."""
    _check(cfg)
    t, d = cfg.length, cfg.d_model
    dense = dense_projection_ops(t, d, d, True)
    return {"qk_projection": dense + dense, **_attention_core(cfg, "dot", cfg.head_dim),
            "v_projection": dense, "out_projection": dense}


ANALYTICAL = set()  # every method is counted by the library's own count functions


def _energy(blocks, stages, table):
    return sum(energy_pj(blocks[s], table) for s in stages if s in blocks)


def load_table(path=None):
    """The energy table: :data:`HOROWITZ_45NM_PJ`, with the entries of a JSON file replacing its own.

    Returns
    -------
    table : dict of str to float
    replaced : list of str
        Kinds whose price the file set.

    Raises
    ------
    OSError
        The file cannot be read.
    ValueError
        It is not a JSON object of known kinds to non-negative finite numbers.
    """
    table = dict(HOROWITZ_45NM_PJ)
    if path is None:
        return table, []
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        given = json.loads(raw)
    except ValueError as exc:  # not UTF-8 or not JSON
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(given, dict):
        raise ValueError(f"{path}: the table must be a JSON object of kind -> picojoules")
    for kind, price in given.items():
        if kind not in table:  # a misspelt kind would price nothing
            raise ValueError(f"{path}: unknown kind {kind!r}; the kinds are {', '.join(table)}")
        if (isinstance(price, bool) or not isinstance(price, (int, float))
                or not math.isfinite(price) or price < 0):
            raise ValueError(f"{path}: price of {kind!r} must be a non-negative number; got {price!r}")
        table[kind] = float(price)
    return table, sorted(given)


def _saving(ours, base):
    return 1.0 - ours / base if base else float("nan")


def _energy_modules():
    """The energy modules of the registered methods' study entries, in registry order."""
    import importlib

    from .entries import get_entries

    return [importlib.import_module(e.energy) for e in get_entries() if e.energy is not None]


def blocks():
    """``mcattn energy`` rows: label -> function of an :class:`EnergyConfig` returning the
    block's counts by stage; exact attention (:func:`vanilla_block`) first, then each
    method's rows (``BLOCKS`` of ``studies/<method>/energy.py``)."""
    rows = {"exact": vanilla_block}
    for module in _energy_modules():
        rows.update(module.BLOCKS)
    return rows


def run(cfg=EnergyConfig(), table=None, *, lengths=(16, 32, 64, 128, 512), mca=True):
    """Every method's block energy and the papers' claims, as a JSON-ready dict."""
    _check(cfg)
    table = dict(HOROWITZ_45NM_PJ) if table is None else dict(table)
    methods = {}
    for name, fn in blocks().items():
        counts = fn(cfg)
        methods[name] = {
            "analytical": name in ANALYTICAL,
            "stages_pj": {s: energy_pj(counts[s], table) for s in STAGES if s in counts},
            "ops": {s: dict(counts[s]) for s in STAGES if s in counts},
        }
        methods[name]["total_pj"] = sum(methods[name]["stages_pj"].values())
    base = methods["exact"]
    for m in methods.values():
        m["energy_vs_exact"] = m["total_pj"] / base["total_pj"]
    claims = {}
    for module in _energy_modules():  # each paper's claims, checked by its method's module
        if hasattr(module, "claims"):
            claims.update(module.claims(cfg, table, lengths, mca=mca))
    return {"config": asdict(cfg), "table_pj": table, "methods": methods, "claims": claims}


ASSUMPTIONS = [
    "one self-attention block of one sequence, batch 1, no mask, every token sees every token",
    "float work priced as fp32 (Horowitz 2014, 45 nm); memory traffic is not modelled",
    "projections have biases; a multiply-add is one fp32_mul and one fp32_add",
    "E-Att: query/key width d_model/h in total (d_model/h^2 per head, rounded down); half of the "
    "binarised inputs are 1 (--ones-fraction); a select is priced as an int32 add (upper "
    "bound); the L1 |.| is a sign-bit clear (free); q, k rows scaled once by 1/sqrt(d)",
    "LATTE: mcattn.latte's own count (latte_ops: quantisation, int4 estimate and threshold on "
    "all pairs, the remaining nibble products, softmax and P V on the kept keys; relative "
    "thresholds, int8 kept scores), with --latte-keep of every row's keys kept",
    "RFA: positive random features, non-causal, its whole core (feature maps, states, "
    "read-out) against q k^T + softmax + P V; projections identical and left out",
    "MCA: budgets from the embedded MiniLM sample's real attention (6 layers, 8 sequences)",
]


def format_report(result, replaced=()):
    """The plain-text report of :func:`run`."""
    cfg = result["config"]
    lines = [f"mcattn energy: d_model={cfg['d_model']}, heads={cfg['heads']}, length={cfg['length']} "
             f"(head dim {cfg['d_model'] // cfg['heads']})", "assumptions:"]
    lines += [f"  - {a}" for a in ASSUMPTIONS]
    if replaced:
        lines.append(f"  - energy table entries replaced from the file: {', '.join(replaced)}")
    lines += ["", "energy per block, nJ (stage and total) and against exact attention:"]
    header = f"{'method':<14}" + "".join(f"{s:>15}" for s in STAGES) + f"{'total':>11}{'/exact':>8}"
    lines += [header, "-" * len(header)]
    for name, m in result["methods"].items():
        stages = "".join(f"{m['stages_pj'].get(s, 0.0) / 1e3:>15.1f}" for s in STAGES)
        label = name + (" *" if m["analytical"] else "")
        lines.append(f"{label:<14}{stages}{m['total_pj'] / 1e3:>11.1f}{m['energy_vs_exact']:>8.3f}")
    if any(m["analytical"] for m in result["methods"].values()):
        lines.append("(* analytical count)")
    lines += ["", "claims:"]
    for module in _energy_modules():
        if hasattr(module, "report"):
            lines += module.report(result["claims"])
    return "\n".join(lines)
