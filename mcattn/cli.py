"""The ``mcattn`` command.

``mcattn compare``   every method on real attention: error, bound, cost, time (the main job)
``mcattn evaluate``  methods inside the real model, on real tasks (needs ``mcattn[eval]``)
``mcattn methods``   the methods of ``mcattn.attention(..., method=...)`` and their knobs
``mcattn backends``  which backends can run here, and why not
``mcattn energy``    each method's operations priced by kind, next to the papers' claims
``mcattn selftest``  every method on every backend against the NumPy reference (+ GPU timings)
``mcattn finetune``  distil the real model with a method swapped in; task scores before/after
``mcattn tune``      the cheapest per-layer plan meeting an accuracy target, checked on held-out text
"""

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main"]


# Every argument is checked right after parsing, before any computation (a run of compare,
# evaluate or finetune takes minutes to hours): a bad one stops the command with
# ``mcattn CMD: error: argument --X: ...`` and exit status 2, as argparse's own errors do.
# Numeric ranges are argparse types; what needs a file, the registry or the sample is
# checked by the subcommand's ``check`` function (run by ``main``).


class _Refused(Exception):
    """An argument the command cannot use: ``option`` and what is wrong with it."""

    def __init__(self, option, problem):
        super().__init__(f"argument {option}: {problem}")


def _number(kind, accepts, expected):
    """An argparse ``type``: ``kind(text)`` when ``accepts`` it; otherwise a one-line error."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda n: n >= 1, "an integer >= 1")
_seed = _number(int, lambda n: 0 <= n < 2**64, "an integer in [0, 2**64)")
_fraction = _number(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")  # NaN fails too


def _writable_folder(option, folder, path):
    if not folder.exists():
        raise _Refused(option, f"{path!r}: directory {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise _Refused(option, f"{path!r}: {str(folder)!r} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _Refused(option, f"{path!r}: directory {str(folder)!r} is not writable")


def _output_file(option, path, formats=None, made_folder=None):
    """Refuse an output file the command could not write when its work is done.

    ``formats``: the suffixes accepted (the format is taken from the suffix);
    ``made_folder``: a directory the command creates before writing ``path`` there.
    """
    target = Path(path)
    if target.is_dir():
        raise _Refused(option, f"{path!r} is a directory; expected a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise _Refused(option, f"{path!r} is not writable")
    if formats is not None and target.suffix.lower()[1:] not in formats:
        raise _Refused(option, f"{path!r}: expected a file name ending in one of "
                               f"{', '.join('.' + f for f in formats)} (the format is taken "
                               "from it)")
    if made_folder is None or target.parent.resolve() != Path(made_folder).resolve():
        _writable_folder(option, target.parent, path)


def _output_folder(option, path):
    """Refuse a directory that the command could not create (or write into)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise _Refused(option, f"{path!r} exists and is not a directory")
    folder = target
    while not folder.exists():  # the missing levels are created (os.makedirs)
        folder = folder.parent
    _writable_folder(option, folder, path)


def _image_formats():
    """The suffixes matplotlib can write here (pgf only where its TeX system is installed)."""
    import shutil

    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    formats = set(FigureCanvasBase.get_supported_filetypes())
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:
        formats.discard("pgf")
    return sorted(formats)


def _check_json_and_methods(args):
    """``--json`` and ``--methods`` (registry names, variants ``NAME:KNOB=VALUE``): compare
    and evaluate."""
    from .studies.entries import get_entries

    if args.json:
        _output_file("--json", args.json)
    if args.methods:
        try:
            get_entries(args.methods)  # unknown methods, variants fixing unknown knobs
        except ValueError as err:
            raise _Refused("--methods", str(err)) from None


def _check_compare(args):
    from .errors import SampleFileError
    from .studies.data import load_sample

    _check_json_and_methods(args)
    if args.plot:
        _output_file("--plot", args.plot, formats=_image_formats())
        if args.json and Path(args.plot).resolve() == Path(args.json).resolve():
            raise _Refused("--plot", f"{args.plot!r} is the --json file too")
    try:
        args.loaded_sample = load_sample(args.sample)
    except SampleFileError as err:
        raise _Refused("--sample", str(err)) from None
    if args.layers:
        count = args.loaded_sample.num_layers
        outside = [layer for layer in args.layers if not 0 <= layer < count]
        if outside:
            raise _Refused("--layers", f"the sample has {count} layers, 0 to {count - 1}; "
                                       f"got {outside}")
        if len(set(args.layers)) < len(args.layers):
            raise _Refused("--layers", f"a layer given twice: {args.layers}")
        if args.seed + max(args.layers) >= 2**64:  # layer l draws with seed + l
            raise _Refused("--seed", f"seed + layer must be below 2**64; got {args.seed}")


def _check_energy(args):
    from .studies.energy import load_table

    if args.d_model % args.heads:
        raise _Refused("--heads", f"must divide --d-model ({args.d_model}); got {args.heads}")
    if args.json:
        _output_file("--json", args.json)
    try:
        args.loaded_table = load_table(args.table)
    except OSError as err:
        raise _Refused("--table", f"cannot read {args.table!r}: {err.strerror}") from None
    except ValueError as err:
        raise _Refused("--table", str(err)) from None


def _check_selftest(args):
    if args.json:
        _output_file("--json", args.json)


def _check_evaluate(args):
    _check_json_and_methods(args)
    if args.plan is None:
        return
    if args.methods:
        raise _Refused("--plan", "give --plan or --methods, not both")
    from .errors import PlanFileError
    from .plan import load_plan
    from .studies.models import MODELS

    try:
        args.loaded_plan = load_plan(args.plan)
    except PlanFileError as exc:
        raise _Refused("--plan", str(exc)) from None
    if args.loaded_plan.model not in MODELS:
        raise _Refused("--plan", f"{args.plan!r} is for model {args.loaded_plan.model!r}; "
                                 f"mcattn evaluate runs {', '.join(MODELS)}")


def _check_tune(args):
    from .registry import method_names
    from .tuning import DEFAULT_GRID

    for option, path, formats in (("--out", args.out, ("json",)), ("--json", args.json, None),
                                  ("--plot", args.plot, _image_formats() if args.plot else None)):
        if path:
            _output_file(option, path, formats=formats)
    paths = [Path(p).resolve() for p in (args.out, args.json, args.plot) if p]
    if len(set(paths)) != len(paths):
        raise _Refused("--out", "--out, --json and --plot must be different files")
    if args.metric == "cosine" and not 0 < args.target <= 1:
        raise _Refused("--target", f"a cosine target must be in (0, 1], got {args.target}")
    if args.metric == "token_error" and not args.target >= 0:
        raise _Refused("--target", f"a token_error target must be >= 0, got {args.target}")
    grid_methods = set(DEFAULT_GRID)
    for entry in args.grid or ():
        method, _, rest = entry.partition(":")
        knob, _, values = rest.partition("=")
        try:
            [json.loads(v) for v in values.split(",")]
        except ValueError:
            values = ""
        if method not in method_names() or not knob or not values:
            raise _Refused("--grid", f"expected METHOD:KNOB=V1,V2,... with a registered method and "
                                     f"JSON values, got {entry!r}")
        grid_methods.add(method)
    for name in args.methods or ():
        if name not in method_names():
            raise _Refused("--methods", f"unknown method {name!r}; registered: {', '.join(method_names())}")
        if name not in grid_methods and name != "exact":
            raise _Refused("--methods", f"no knob grid for {name!r}; give one with --grid "
                                        f"{name}:KNOB=V1,V2,...")


def _check_finetune(args):
    # The method, its knobs and the hyper-parameters are checked by FinetuneConfig.checked
    # (mcattn.studies.finetune.main), also before any work.
    if args.save:
        _output_folder("--save", args.save)
    if args.json:
        _output_file("--json", args.json, made_folder=args.save)

def _progress_factory(enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda total: tqdm(total=total, desc="mcattn compare", unit="run", file=sys.stderr,
                              leave=False)


def _cmd_compare(args):
    from .registry import method_names
    from .studies.compare import format_table, plot_pareto, run_comparison
    from .studies.entries import get_entries

    sample = args.loaded_sample  # loaded by _check_compare
    methods = args.methods
    rows = run_comparison(sample, methods, seed=args.seed, repeats=args.repeats,
                          layers=args.layers, progress=_progress_factory(not args.no_progress))
    source = args.sample or "the embedded MiniLM sample"
    print(f"mcattn compare on {source}: {sample.num_layers} layers, batch "
          f"{sample.q.shape[1]}, {sample.num_heads} heads, lengths {list(map(int, sample.lengths))}")
    print("errors: ||O~ - O|| / ||O|| per (layer, sequence, head) over real tokens; bound: the "
          "method's theoretical bound on that error (median)")
    scope = ("value projection + attention" if sample.has_projection else "attention")
    print(f"ops, energy (45 nm table) and time relative to exact, for {scope}, on the unpadded "
          "inputs; time measured in this run")
    print(format_table(rows))
    ran = {r.method.partition(":")[0] for r in rows}
    for entry in get_entries([m for m in method_names() if m in ran]):
        if entry.table_note:
            print(f"note: {entry.table_note}")
    skipped = [e for e in (methods or method_names()) if e not in {r.method for r in rows}]
    if skipped:
        print(f"(skipped, the sample has no value-projection inputs: {', '.join(skipped)})")
    if args.json:
        payload = {"sample": str(source), "provenance": sample.provenance,
                   "rows": [r.as_dict() for r in rows]}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2, default=str, allow_nan=False)
        print(f"wrote {args.json}")
    if args.plot:
        plot_pareto(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_methods(args):
    from .front import methods

    for spec in methods():
        print(spec)
    return 0


def _cmd_backends(args):
    from ._dispatch import backends

    for status in backends():
        print(status)
    return 0


def _cmd_evaluate(args):
    from .studies.evaluate import main as evaluate_main

    return evaluate_main(args)


def _cmd_energy(args):
    from .studies.energy import EnergyConfig, format_report, run

    table, replaced = args.loaded_table  # loaded by _check_energy
    cfg = EnergyConfig(d_model=args.d_model, heads=args.heads, length=args.length,
                       ones_fraction=args.ones_fraction, latte_keep=args.latte_keep,
                       rfa_features=args.rfa_features)
    try:
        result = run(cfg, table, mca=not args.no_mca)
    except ValueError as exc:
        print(f"mcattn energy: {exc}", file=sys.stderr)
        return 2
    print(format_report(result, replaced))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cmd_finetune(args):
    from .studies.finetune import main as finetune_main

    return finetune_main(args, args.knobs)


def _cmd_tune(args):
    from .studies.tune import main as tune_main

    return tune_main(args)


def _cmd_selftest(args):
    from .selftest import main as selftest_main

    return selftest_main(args)


def build_parser():
    from ._dispatch import BACKEND_NAMES
    from .selftest import checks

    rows = list(checks())
    parser = argparse.ArgumentParser(
        prog="mcattn", description="Approximate softmax attention: compare methods on real attention.")
    sub = parser.add_subparsers(dest="command")

    compare = sub.add_parser(
        "compare", help="every method on real attention (error, bound, ops, energy, time)",
        description="Run exact attention and every method over its knob sweep on a real "
                    "attention sample (default: the embedded all-MiniLM-L6-v2 sample).")
    compare.add_argument("--methods", nargs="+", metavar="NAME",
                         help="methods to run (default: all registered); a variant "
                              "NAME:KNOB=VALUE[,KNOB=VALUE] fixes knobs, e.g. "
                              "mca:shared_draws=True")
    compare.add_argument("--sample", metavar="PATH",
                         help="an .npz with q, k, v (and optionally key_padding_mask, x, w_v, b_v)")
    compare.add_argument("--layers", type=int, nargs="+", metavar="L",
                         help="layers to use, 0 to L-1 (default: all)")
    compare.add_argument("--seed", type=_seed, default=0, help="seed of the random methods")
    compare.add_argument("--repeats", type=_positive_int, default=3,
                         help="timing repeats (best kept)")
    compare.add_argument("--plot", metavar="FILE",
                         help="write an error-versus-cost plot (format from the suffix: .png, "
                              ".pdf, .svg, ...)")
    compare.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare.set_defaults(func=_cmd_compare, check=_check_compare)

    evaluate = sub.add_parser(
        "evaluate", help="methods inside the real model on real tasks (needs mcattn[eval])",
        description="Swap each method into all-MiniLM-L6-v2's self-attention and score Lee "
                    "document similarity and movie-review polarity against exact attention.")
    evaluate.add_argument("--methods", nargs="+", metavar="NAME",
                          help="methods (default: all); variants as for compare")
    evaluate.add_argument("--seed", type=_seed, default=0)
    evaluate.add_argument("--json", metavar="FILE")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.add_argument("--plan", metavar="FILE",
                          help="score a per-layer plan (mcattn tune --out) against exact instead")
    evaluate.set_defaults(func=_cmd_evaluate, check=_check_evaluate)

    tune = sub.add_parser(
        "tune", help="the cheapest per-layer plan meeting an accuracy target (needs mcattn[eval])",
        description="Choose a method and its knob for each self-attention layer of a real model, "
                    "minimising --objective while the model's output stays within --target of "
                    "exact on calibration text (lee_background.cor); then check the plan on the "
                    "held-out texts of mcattn evaluate. Exit status 1 when the target is missed.")
    from .studies.models import MODELS

    tune.add_argument("--model", choices=sorted(MODELS), default="all-MiniLM-L6-v2")
    tune.add_argument("--target", type=float, default=0.99,
                      help="cosine to exact at least (or token error at most), default 0.99")
    tune.add_argument("--metric", choices=("cosine", "token_error"), default="cosine")
    tune.add_argument("--objective", choices=("ops", "energy", "time"), default="ops")
    tune.add_argument("--methods", nargs="+", metavar="NAME",
                      help="methods to choose from (default: latte hybrid mca)")
    tune.add_argument("--grid", nargs="+", metavar="METHOD:KNOB=V1,V2",
                      help="knob values searched for a method (replaces its default grid)")
    tune.add_argument("--margin", type=_number(float, lambda x: 0 <= x < 1, "a number in [0, 1)"),
                      default=0.25, help="share of the allowed loss kept for held-out text")
    tune.add_argument("--layer-bound", type=_number(float, lambda x: x > 0, "a number > 0"),
                      help="admit a method in a layer only if its a-posteriori relative bound is "
                           "at most this on every calibration call")
    tune.add_argument("--calibration-docs", type=_positive_int, default=48,
                      help="calibration texts: a third documents, long and short sentences")
    tune.add_argument("--seed", type=_seed, default=0)
    tune.add_argument("--out", metavar="FILE.json", help="write the plan (mcattn-plan-v1)")
    tune.add_argument("--plot", metavar="FILE", help="Pareto plot of the plans tried")
    tune.add_argument("--json", metavar="FILE", help="every measurement as JSON")
    tune.add_argument("--no-progress", action="store_true")
    tune.set_defaults(func=_cmd_tune, check=_check_tune)

    methods = sub.add_parser("methods", help="the methods mcattn.attention runs, with their knobs")
    methods.set_defaults(func=_cmd_methods)
    energy = sub.add_parser(
        "energy", help="each method's operations priced per kind (45 nm table), papers' claims",
        description="Count one attention block's operations per method for a model "
                    "configuration, price them with an energy table and set the figures "
                    "next to the E-Att, MCA, LATTE and RFA papers' claims. Defaults: E-Att's "
                    "Transformer-base (d_model 512, 8 heads), 32 tokens.")
    energy.add_argument("--d-model", type=_positive_int, default=512)
    energy.add_argument("--heads", type=_positive_int, default=8, help="must divide --d-model")
    energy.add_argument("--length", type=_positive_int, default=32, help="tokens per sequence")
    energy.add_argument("--ones-fraction", type=_fraction, default=0.5,
                        help="E-Att: fraction of binarised inputs that are 1")
    energy.add_argument("--latte-keep", type=_fraction, default=0.15,
                        help="LATTE: fraction of keys kept (0.15: ~85%% filtered)")
    energy.add_argument("--rfa-features", type=_positive_int, default=128)
    energy.add_argument("--table", metavar="FILE",
                        help="JSON object kind -> picojoules replacing entries of the 45 nm table")
    energy.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    energy.add_argument("--no-mca", action="store_true",
                        help="skip MCA's figures on the real sample (the slow part)")
    energy.set_defaults(func=_cmd_energy, check=_check_energy)

    backends = sub.add_parser("backends", help="which backends can run here")
    backends.set_defaults(func=_cmd_backends)

    selftest = sub.add_parser(
        "selftest", help="check every method on every backend against the NumPy reference",
        description="Run each method's kernels on small inputs with every backend and compare "
                    "with the float64 NumPy backend; backends that cannot run here say why. "
                    "Exit status 1 when a result is wrong.")
    selftest.add_argument("--json", metavar="FILE", help="write the table (and timings) as JSON")
    selftest.add_argument("--bench", action="store_true",
                          help="also time the GPU backends against torch SDPA (N = 1k..16k)")
    selftest.add_argument("--backends", nargs="+", metavar="NAME", choices=BACKEND_NAMES,
                          help=f"backends to check: {', '.join(BACKEND_NAMES)} (default: all)")
    selftest.add_argument("--methods", nargs="+", metavar="NAME", choices=rows,
                          help=f"methods to check: {', '.join(rows)} (default: all)")
    selftest.set_defaults(func=_cmd_selftest, check=_check_selftest)

    finetune = sub.add_parser(
        "finetune", help="distil the real model with a method swapped in (needs mcattn[eval])",
        usage="mcattn finetune --method NAME [--KNOB VALUE ...] [--steps N | --minutes M] [options]",
        description="Fine-tune all-MiniLM-L6-v2 with METHOD in every self-attention layer "
                    "against the same model with exact attention (sentence-embedding cosine + "
                    "token states), on real text the evaluation never sees, and score Lee "
                    "similarity, polarity and cosine to exact before and after. The method's "
                    "knobs follow as --name value (e.g. --num-features 64).")
    finetune.add_argument("--method", required=True, help="a method with a backward (mcattn methods)")
    budget = finetune.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimiser steps (default 1000)")
    budget.add_argument("--minutes", type=float, help="training time budget instead of steps")
    finetune.add_argument("--gate", action="store_true", help="rfa: learn a recency gate per layer "
                          "(causal gated form)")
    finetune.add_argument("--train", choices=("attention", "all"), default="attention",
                          help="weights trained besides the method's own (default: attention "
                               "projections)")
    finetune.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    finetune.add_argument("--batch-size", type=int, default=16)
    finetune.add_argument("--token-weight", type=float, default=1.0,
                          help="weight of the token-state loss next to the embedding cosine")
    finetune.add_argument("--max-length", type=int, default=128, help="tokens per training text")
    finetune.add_argument("--corpus", default="lee_background",
                          help="lee_background (news sentences) or head500 (stemmed Wikipedia)")
    finetune.add_argument("--seed", type=_seed, default=0)
    finetune.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    finetune.add_argument("--save", metavar="DIR", help="write the fine-tuned weights and config")
    finetune.add_argument("--json", metavar="FILE", help="write losses and scores as JSON")
    finetune.add_argument("--no-eval", action="store_true", help="train only, no task scores")
    finetune.add_argument("--no-progress", action="store_true")
    finetune.set_defaults(func=_cmd_finetune, check=_check_finetune)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)
    return parser


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) != "finetune":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.knobs = extra
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        getattr(args, "check", lambda args: None)(args)
    except _Refused as refused:
        args.command_parser.error(str(refused))  # usage, then one line; exit status 2
    from .errors import McattnError

    try:
        return args.func(args)
    except McattnError as exc:
        print(f"mcattn {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
