"""Monte-Carlo attention on real MiniLM attention: the table of docs/mca.md.

``python -m mcattn.studies.mca.report [--out FILE] [--seeds S]`` runs MCA on every layer of the
embedded sample (:mod:`mcattn.studies.data`) for alpha in 0.1 ... 1.0, two ways:

* **ours** — the budget rule of :func:`mcattn.mca.budgets`: ``n`` = valid keys of each
  sequence, ``ceil``; MACs kept over the real tokens;
* **paper-style** — every sequence padded to 128 tokens, ``n = 128`` and ``floor`` as in
  the authors' code; MACs kept counted as they count it (all 128 positions, padding free)
  and over the real tokens only, to show how much of the saving is padding.

Errors are ``||O~ - O|| / ||O||`` over real query rows, per (sequence, head), median over
those and over ``--seeds`` seeds; the bound is the paper's Theorem in Frobenius form
(:func:`mcattn.studies.mca.compare.theorem_relative_bound`), also median.
"""

import argparse
import sys

import numpy as np

import mcattn

from ...mca import value_projection
from .._tables import markdown_table
from .compare import theorem_relative_bound

ALPHAS = (0.1, 0.2, 0.4, 0.6, 1.0)
PADDED_LENGTH = 128


def _heads_values(x, w, b, heads):
    v = (x @ w + b).reshape(x.shape[0], x.shape[1], heads, -1)
    return np.ascontiguousarray(v.transpose(0, 2, 1, 3))


def _rel_errors(out, ref, kpm):
    rows = kpm[:, None, :, None]
    num = np.sqrt((((out - ref) ** 2) * rows).sum((-1, -2)))
    den = np.sqrt(((ref**2) * rows).sum((-1, -2)))
    return num / den


def _paper_budgets(probs, alpha, d_in, n):
    """The authors' rule: ``min(d_in, floor((n max_i A_ij / alpha)^2))`` with padded ``n``."""
    return np.minimum(np.floor((n * probs.max(-2) / alpha) ** 2), d_in).astype(np.int64)


def _pad(a, axis, length):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, length - a.shape[axis])
    return np.pad(a, widths)


def layer_rows(sample, layer, alpha, seeds):
    """Errors, bounds and MACs kept for one layer and alpha, both budget rules."""
    heads = sample.num_heads
    q, k, x = sample.q[layer], sample.k[layer], sample.x[layer]
    w, b, kpm = sample.w_v[layer], sample.b_v[layer], sample.key_padding_mask
    d_in = x.shape[-1]
    v = _heads_values(x, w, b, heads)
    exact = mcattn.attention(q, k, v, key_padding_mask=kpm, scale=sample.scale)
    probs = mcattn.attention_probs(q, k, key_padding_mask=kpm, scale=sample.scale)
    valid = np.broadcast_to(kpm[:, None, :], probs.shape[:2] + kpm.shape[-1:])
    ours_r = mcattn.mca.budgets(probs, alpha, d_in, key_padding_mask=kpm)
    # Paper-style: pad every sequence to 128 positions (padding masked, probability 0).
    qp, kp = (_pad(a, 2, PADDED_LENGTH) for a in (q, k))
    xp = _pad(x, 1, PADDED_LENGTH)
    kpm_p = _pad(kpm, 1, PADDED_LENGTH)
    probs_p = mcattn.attention_probs(qp, kp, key_padding_mask=kpm_p, scale=sample.scale)
    paper_r = _paper_budgets(probs_p, alpha, d_in, PADDED_LENGTH)
    errors = {"ours": [], "paper": [], "optimal": []}
    for seed in range(seeds):
        v_ours = value_projection(x, w, b, num_heads=heads, budgets=ours_r, seed=seed)
        errors["ours"].append(_rel_errors(probs @ v_ours, exact, kpm))
        v_opt = value_projection(x, w, b, num_heads=heads, budgets=ours_r, seed=seed,
                                 sampling="optimal")
        errors["optimal"].append(_rel_errors(probs @ v_opt, exact, kpm))
        v_paper = value_projection(xp, w, b, num_heads=heads, budgets=paper_r, seed=seed)
        out_paper = (probs_p @ v_paper)[:, :, : q.shape[2]]
        errors["paper"].append(_rel_errors(out_paper, exact, kpm))
    valid_p = np.broadcast_to(kpm_p[:, None, :], paper_r.shape)
    return {
        "ours_error": float(np.median(errors["ours"])),
        "paper_error": float(np.median(errors["paper"])),
        "optimal_error": float(np.median(errors["optimal"])),
        "bound": float(np.median(theorem_relative_bound(_Inputs(x, w, kpm, q), exact, alpha))),
        "ours_kept": float(np.minimum(ours_r, d_in)[valid].mean() / d_in),
        "paper_kept_padded": float(np.minimum(paper_r, d_in).mean() / d_in),
        "paper_kept_real": float(np.minimum(paper_r, d_in)[valid_p].mean() / d_in),
    }


class _Inputs:
    """The fields :func:`theorem_relative_bound` reads."""

    def __init__(self, x, w, kpm, q):
        self.x, self.w_v, self.key_padding_mask, self.q = x, w, kpm, q


def build_report(seeds=3, alphas=ALPHAS, progress=None):
    """The markdown report (a string)."""
    from ..data import load_sample

    sample = load_sample()
    layers = range(sample.num_layers)
    results = {}
    for alpha in alphas:
        for layer in layers:
            results[alpha, layer] = layer_rows(sample, layer, alpha, seeds)
            if progress:
                progress()

    def table(extra, error, extra_cells):
        # One row per alpha: the error on each layer, then ``extra_cells`` of the layers' rows.
        body = []
        for alpha in alphas:
            row = [results[alpha, i] for i in layers]
            body.append([alpha, *(f"{r[error]:.3f}" for r in row), *(f"{x:.3f}" for x in extra_cells(row))])
        return markdown_table(["alpha", *(f"L{i}" for i in layers), *extra], body)

    lines = [
        f"Sample: {sample.provenance.get('model', 'embedded sample')}; sequences of "
        f"{', '.join(map(str, sample.lengths.tolist()))} real tokens; {seeds} seeds; "
        "weight-norm sampling, independent draws.",
        "",
        "**Relative output error per layer** (median over sequences, heads and seeds), ours "
        "(valid-key n, ceil):",
        "",
        table(["MACs kept", "Theorem bound (median)"], "ours_error",
              lambda row: [np.mean([r["ours_kept"] for r in row]), np.median([r["bound"] for r in row])]),
        "",
        "**Same budgets, optimal sampling** (per-token probabilities proportional to "
        "|x_jk| ||W_k||, beyond the paper):",
        "",
        table([], "optimal_error", lambda row: []),
        "",
        "**Paper-style** (padded to 128, n = 128, floor): error and MACs kept counted the "
        "paper's way (all 128 positions, padding free) and over the real tokens:",
        "",
        table(["MACs kept (padded, paper)", "MACs kept (real tokens)"], "paper_error",
              lambda row: [np.mean([r["paper_kept_padded"] for r in row]),
                           np.mean([r["paper_kept_real"] for r in row])]),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    report = build_report(args.seeds, progress=lambda: print(".", end="", file=sys.stderr,
                                                             flush=True))
    print(file=sys.stderr)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)
    print(report)


if __name__ == "__main__":
    main()
