"""``mcattn energy``: each method's operations priced per kind, next to the papers' claims.

Every method contributes the operation counts of one attention block for a model
configuration through one small function (:data:`METHODS`: name -> function of an
:class:`EnergyConfig` returning the block's :class:`~mcattn.cost.OpCounts` by stage).
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
(the count of a LATTE call's ``info.ops``, see :func:`latte_block`). Prices:
:data:`mcattn.cost.HOROWITZ_45NM_PJ` or a table
given as JSON. One self-attention block of one sequence (batch 1, no mask), every
token attending to every token.
"""

import json
import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np

from ..cost import HOROWITZ_45NM_PJ, OpCounts, energy_pj
from ..eatt import alignment_ops, dense_projection_ops, projection_ops, softmax_value_ops

__all__ = ["EnergyConfig", "STAGES", "METHODS", "vanilla_block", "eatt_block",
           "eatt_hamming_block", "mca_block", "latte_block", "rfa_block", "rfa_crossover",
           "mca_sample_figures", "load_table", "run", "format_report"]

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


def mca_block(cfg):
    """MCA: the vanilla block with the value projection sampled at ``cfg.mca_kept`` of the MACs.

    Every (token, head) gets ``round(mca_kept * d_model)`` draws, counted by MCA's own
    projection count (multiply-adds, two random words, the alias lookup and a divide
    per draw).
    """
    from ..mca import _projection_ops

    blocks = vanilla_block(cfg)
    t, d, h = cfg.length, cfg.d_model, cfg.heads
    r = np.full((h, t), int(round(cfg.mca_kept * d)), np.int64)
    sampled, _ = _projection_ops(r, d, cfg.head_dim, "weight", np.ones((h, t), bool))
    blocks["v_projection"] = sampled
    return blocks


def latte_block(cfg):
    """LATTE from :func:`mcattn.latte.latte_ops`, the count ``info.ops`` of a LATTE call.

    One sequence of ``length`` tokens per head, relative thresholds, int8 kept scores
    reusing the estimate's high-nibble products, ``latte_keep`` of the keys kept in every
    row: quantisation of q and k, the 4-bit estimate and the threshold compare on every
    pair, the remaining nibble products, softmax and ``P V`` on the kept pairs. The whole
    attention core goes into ``scores`` (LATTE interleaves scoring and the softmax).
    Projections as in the vanilla block.
    """
    from .._validate import MaskSpec
    from ..latte import latte_ops

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


def _rfa_inputs(cfg, length):
    """The fields :func:`mcattn.rfa.rfa_ops` reads, for one sequence (positive features)."""
    return SimpleNamespace(q=SimpleNamespace(shape=(cfg.heads, length, cfg.head_dim)), nq=length,
                           nk=length, value_dim=cfg.head_dim, num_features=cfg.rfa_features,
                           feature_dim=cfg.rfa_features, unit=False, kind="positive",
                           is_causal=False, chunk_size=64, log_gate=None)


def rfa_block(cfg):
    """RFA (positive random features, non-causal): its whole attention core as ``scores``."""
    from ..rfa import rfa_ops

    blocks = vanilla_block(cfg)
    blocks["scores"] = rfa_ops(_rfa_inputs(cfg, cfg.length))
    blocks["softmax_pv"] = OpCounts()
    return blocks


#: Method -> function of an EnergyConfig returning the block's counts by stage.
METHODS = {
    "exact": vanilla_block,
    "eatt": eatt_block,
    "eatt-hamming": eatt_hamming_block,
    "mca": mca_block,
    "latte": latte_block,
    "rfa": rfa_block,
}
ANALYTICAL = set()  # every method is counted by the library's own count functions


def _energy(blocks, stages, table):
    return sum(energy_pj(blocks[s], table) for s in stages if s in blocks)


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

    from ..mca import _projection_ops
    from .data import load_sample
    from .mca.report import PADDED_LENGTH, _pad, _paper_budgets

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
    from .._validate import prepare_attention

    return prepare_attention(q, k, k, key_padding_mask=kpm, scale=scale, check_finite=False)


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


def run(cfg=EnergyConfig(), table=None, *, lengths=(16, 32, 64, 128, 512), mca=True):
    """Every method's block energy and the papers' claims, as a JSON-ready dict."""
    from dataclasses import replace

    _check(cfg)
    table = dict(HOROWITZ_45NM_PJ) if table is None else dict(table)
    methods = {}
    for name, fn in METHODS.items():
        blocks = fn(cfg)
        methods[name] = {
            "analytical": name in ANALYTICAL,
            "stages_pj": {s: energy_pj(blocks[s], table) for s in STAGES if s in blocks},
            "ops": {s: dict(blocks[s]) for s in STAGES if s in blocks},
        }
        methods[name]["total_pj"] = sum(methods[name]["stages_pj"].values())
    base = methods["exact"]
    for m in methods.values():
        m["energy_vs_exact"] = m["total_pj"] / base["total_pj"]

    def eatt_savings(c):
        van, ea = vanilla_block(c), eatt_block(c)
        no_out = ("qk_projection", "scores", "softmax_pv", "v_projection")
        return {
            "length": c.length,
            "alignment": _saving(_energy(ea, ALIGNMENT_STAGES, table), _energy(van, ALIGNMENT_STAGES, table)),
            "attention_without_out_projection": _saving(_energy(ea, no_out, table),
                                                        _energy(van, no_out, table)),
            "attention_with_out_projection": _saving(_energy(ea, STAGES, table), _energy(van, STAGES, table)),
        }

    core = ("scores", "softmax_pv")
    latte = latte_block(cfg)
    van = vanilla_block(cfg)
    claims = {
        "eatt": eatt_savings(cfg),
        "eatt_by_length": [eatt_savings(replace(cfg, length=n)) for n in lengths],
        "latte": {
            "keep": cfg.latte_keep,
            "core_saving": _saving(_energy(latte, core, table), _energy(van, core, table)),
            "block_saving": _saving(_energy(latte, STAGES, table), _energy(van, STAGES, table)),
        },
        "rfa": {"features": cfg.rfa_features, "head_dim": cfg.head_dim,
                "crossover_length": rfa_crossover(cfg, table)},
    }
    if mca:
        claims["mca"] = mca_sample_figures()
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
    c = result["claims"]
    e = c["eatt"]
    lines += ["", "claims:",
              f"E-Att alignment energy saved (Q/K projections + scores): {e['alignment']:.1%} "
              "(paper: 99%)",
              f"E-Att attention energy saved, without the output projection: "
              f"{e['attention_without_out_projection']:.1%}; with it: "
              f"{e['attention_with_out_projection']:.1%} (paper: 66%)",
              "  by length:  " + "  ".join(
                  f"N={r['length']}: {r['alignment']:.1%} / {r['attention_without_out_projection']:.1%}"
                  f" / {r['attention_with_out_projection']:.1%}" for r in c["eatt_by_length"])
              + "  (alignment / attention without / with output projection)"]
    la = c["latte"]
    lines.append(f"LATTE (keep {la['keep']:.0%} of keys): attention core (scores + softmax + PV) "
                 f"energy saved {la['core_saving']:.1%}, whole block {la['block_saving']:.1%}")
    r = c["rfa"]
    lines.append(f"RFA ({r['features']} features, head dim {r['head_dim']}): its core costs less "
                 f"energy than exact attention's from length {r['crossover_length']}")
    if "mca" in c:
        lines.append("MCA on the real sample, FLOPs dense / MCA (paper: up to 11x):")
        lines.append(f"  {'alpha':>6} {'padded 128, paper-style':>24} {'ours, unpadded':>15} "
                     f"{'ours, V proj + attention':>25}")
        for row in c["mca"]:
            lines.append(f"  {row['alpha']:>6} {row['paper_padded_projection_x']:>23.2f}x "
                         f"{row['ours_projection_x']:>14.2f}x "
                         f"{row['ours_attention_and_projection_x']:>24.2f}x")
    return "\n".join(lines)
