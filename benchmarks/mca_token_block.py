"""Shared draws at uniform budgets (B=1, N=4096, 20 % by default) for each
``shared_cpu.TOKEN_BLOCK``, best of 30 back to back, twice interleaved (how 256 was chosen;
the block changes no result).

Usage: ``python benchmarks/mca_token_block.py [--fraction 0.2] [--blocks 128 256 512]``
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmarks.bench_mca import dense_projection, sampled_projection, uniform_problem  # noqa: E402
from mca_batch_phases import _best  # noqa: E402

from mcattn.mca import shared_cpu  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args(argv)
    heads, layers = uniform_problem(args.fraction)
    dense = lambda: dense_projection(layers, heads)  # noqa: E731
    dense()
    print(f"# ms, fraction {args.fraction}; dense {_best(dense, 30):.3f}")
    for block in args.blocks + args.blocks:
        shared_cpu.TOKEN_BLOCK = block
        run = lambda: sampled_projection(layers, heads, True)  # noqa: E731
        run()
        print(f"TOKEN_BLOCK={block:<5} {_best(run, 30):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
