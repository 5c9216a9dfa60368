"""RFA on real attention: relative output error per layer, per feature map and feature count.

Usage::

    python -m mcattn.studies.rfa.evaluate                     # print the markdown tables
    python -m mcattn.studies.rfa.evaluate --write docs/rfa.md # replace the tables between the markers

Inputs: the packaged MiniLM sample (:func:`mcattn.studies.data.load_sample`; q, k, v of the 6
layers of all-MiniLM-L6-v2 on 8 real sentences, 12 heads, head dim 32). For every
feature map and ``num_features`` in {16, 32, 64, 128, 256}, drop-in RFA
(``normalize=None``) runs on every layer with several seeds; the error is
``||O~ - O|| / ||O||`` over the real tokens of each (sequence, head) against exact
softmax attention, and the table gives its median over sequences, heads and seeds. The
bound beside it is :func:`mcattn.studies.rfa.compare.relative_bound` (probability 0.9), and the
second table the feature count that bound needs for a 10% error.
"""

import argparse
import math
import sys

import numpy as np

from ...exact import attention as exact_attention
from ...rfa import attention, bounds, naive
from ...rfa._inputs import prepare_rfa
from ...rfa.features import KINDS, RandomFeatures
from .. import data
from .._tables import markdown_table
from ..compare import layer_inputs, relative_errors
from .compare import relative_bound

__all__ = ["main", "evaluate"]

START = "<!-- rfa-real-attention:start -->"
END = "<!-- rfa-real-attention:end -->"
SIZES = (16, 32, 64, 128, 256)


def _features(inputs, kind, D, seed):
    return RandomFeatures(inputs.q.shape[-1], D, kind=kind, num_heads=inputs.q.shape[1], seed=seed)


def _own_target(inputs, feats):
    """The attention the features estimate (arc-cosine attention for arccos), ``[B, H, N, dv]``."""
    rinp, _ = prepare_rfa(feats, inputs.q, inputs.k, inputs.v, attn_mask=None,
                          key_padding_mask=inputs.key_padding_mask, gate=None, is_causal=False,
                          normalize=None, scale=inputs.scale, chunk_size=None, eps=None, check_finite=True)
    return naive.target_attention(rinp).reshape(inputs.v.shape)


def evaluate(sample=None, seeds=3, sizes=SIZES):
    """Errors, bounds and clamped fractions of drop-in RFA on every layer of a sample.

    Returns
    -------
    dict
        ``errors[kind][D]`` (list over layers of median errors against softmax),
        ``own[D]`` (arccos against arc-cosine attention), ``bounds[kind][D]`` (list over
        layers of median bounds), ``clamped[kind][D]`` (fraction of rows floored),
        ``needed[kind]`` (list over layers: features the bound needs for 10% error).
    """
    sample = data.load_sample() if sample is None else sample
    layers = sample.q.shape[0]
    result = {"errors": {}, "own": {}, "bounds": {}, "clamped": {}, "needed": {}, "layers": layers}
    inputs = [layer_inputs(sample, layer) for layer in range(layers)]
    refs = [exact_attention(i.q, i.k, i.v, key_padding_mask=i.key_padding_mask, scale=i.scale)
            for i in inputs]
    for kind in KINDS:
        result["errors"][kind], result["bounds"][kind], result["clamped"][kind] = {}, {}, {}
        for D in sizes:
            errs, bnds, own, low, rows = [], [], [], 0, 0
            for inp, ref in zip(inputs, refs):
                cells, own_cells = [], []
                for seed in range(seeds):
                    feats = _features(inp, kind, D, seed)
                    out, info = attention(inp.q, inp.k, inp.v, features=feats, scale=inp.scale,
                                          key_padding_mask=inp.key_padding_mask, return_info=True)
                    cells.append(relative_errors(out, ref, inp.key_padding_mask))
                    real = inp.key_padding_mask[:, None, :]
                    low += int(info.clamped)
                    rows += int(np.broadcast_to(real, inp.q.shape[:3]).size)
                    if kind == "arccos":
                        own_cells.append(relative_errors(out, _own_target(inp, feats), inp.key_padding_mask))
                errs.append(float(np.median(cells)))
                if kind == "arccos":
                    own.append(float(np.median(own_cells)))
                else:
                    bnds.append(float(np.median(relative_bound(inp, _features(inp, kind, D, 0), ref))))
            result["errors"][kind][D] = errs
            result["clamped"][kind][D] = low / rows
            if kind == "arccos":
                result["own"][D] = own
            else:
                result["bounds"][kind][D] = bnds
        if kind != "arccos":
            result["needed"][kind] = [
                bounds.features_for_output_error(
                    0.1, inp.q, inp.k, inp.v, kind=kind, num_heads=inp.q.shape[1],
                    key_padding_mask=inp.key_padding_mask, scale=inp.scale)
                for inp in inputs
            ]
    return result


def _fmt_err(x):
    return f"{x:.3g}" if x < 1e3 else f"{x:.1e}"


def _fmt_bound(x):
    return "∞" if not math.isfinite(x) else f"{x:.2g}"


def _fmt_count(x):
    if not math.isfinite(x):
        return "∞"
    return f"{x:,}" if x < 1e7 else f"1e{math.log10(x):.0f}"


def format_tables(result):
    """The markdown tables of :func:`evaluate`."""
    layers = result["layers"]
    rows = []
    for kind in KINDS:
        for D, errs in result["errors"][kind].items():
            if kind == "arccos":
                cells = [f"{_fmt_err(e)} (own {_fmt_err(o)})" for e, o in zip(errs, result["own"][D])]
            else:
                cells = [f"{_fmt_err(e)} ({_fmt_bound(b)})" for e, b in zip(errs, result["bounds"][kind][D])]
            rows.append([kind, D, *cells, f"{result['clamped'][kind][D]:.1%}"])
    errors = markdown_table(["features", "D", *(f"L{i} err (bound)" for i in range(layers)), "rows floored"],
                            rows, align="l" + "r" * (layers + 2))
    needed = markdown_table(["features", *(f"L{i}" for i in range(layers))],
                            [[kind, *map(_fmt_count, counts)] for kind, counts in result["needed"].items()],
                            align="l" + "r" * layers)
    return "\n".join([errors, "", "Features the bound needs for a 10% relative error (worst sequence and "
                       "head of the layer):", "", needed])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcattn.studies.rfa.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--write", metavar="MARKDOWN", help=f"replace the text between {START} and {END}")
    args = parser.parse_args(argv)
    table = format_tables(evaluate(seeds=args.seeds))
    command = "python -m mcattn.studies.rfa.evaluate" + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
    block = f"{START}\n<!-- produced by `{command}`; do not edit by hand -->\n\n{table}\n\n{END}"
    if args.write:
        with open(args.write) as fh:
            text = fh.read()
        if START not in text or END not in text:
            parser.error(f"{args.write} has no {START} ... {END} markers")
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        with open(args.write, "w") as fh:
            fh.write(before + block + after)
    else:
        sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
