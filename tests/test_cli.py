"""The ``mcattn`` command, the method registry and the comparison engine."""

import json
import subprocess
import sys

import numpy as np
import pytest

import mcattn
from mcattn import cli
from mcattn.studies import entries
from mcattn.studies.compare import relative_errors
from mcattn.studies.data import load_sample


def _run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # an argument refused: argparse's exit, status 2
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "c.json", tmp_path / "p.png"
    code, out, _ = _run(["compare", "--methods", "mca", "--layers", "0", "--repeats", "1",
                         "--json", str(js), "--plot", str(png), "--no-progress"], capsys)
    assert code == 0
    assert "exact" in out and "mca" in out and "alpha" in out
    rows = json.loads(js.read_text())["rows"]
    assert rows[0]["method"] == "exact" and rows[0]["error_median"] == 0.0
    mca_rows = [r for r in rows if r["method"] == "mca"]
    assert [r["value"] for r in mca_rows] == list(mcattn.studies.mca.compare.ENTRY.values)
    errors = [r["error_median"] for r in mca_rows]
    assert errors == sorted(errors)  # larger alpha, larger error
    assert all(r["bound_median"] >= r["error_median"] for r in mca_rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_on_a_user_sample_without_projection(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, **{n: rng.standard_normal((1, 2, 9, 8)).astype(np.float32) for n in "qkv"})
    code, out, _ = _run(["compare", "--sample", str(path), "--methods", "exact", "mca",
                         "--repeats", "1", "--no-progress"], capsys)
    assert code == 0
    assert "skipped" in out and "mca" in out.split("skipped")[1]


def test_compare_rejects_unknown_methods_and_bad_files(tmp_path, capsys):
    code, _, err = _run(["compare", "--methods", "magic", "--no-progress"], capsys)
    assert code == 2 and "unknown method" in err and "magic" in err
    bad = tmp_path / "bad.npz"
    bad.write_text("not numpy")
    code, _, err = _run(["compare", "--sample", str(bad), "--no-progress"], capsys)
    assert code == 2 and "not an .npz" in err


def test_compare_runs_a_variant_with_fixed_knobs(tmp_path, capsys):
    """``mca:shared_draws=True``: the same runs as mca.attention with shared draws."""
    js = tmp_path / "v.json"
    code, out, _ = _run(["compare", "--methods", "mca:shared_draws=True", "mca", "--layers", "4",
                         "--repeats", "1", "--json", str(js), "--no-progress"], capsys)
    assert code == 0 and "mca:shared_draws=True" in out
    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["exact"] + ["mca"] * 5 + ["mca:shared_draws=True"] * 5
    shared = {r["value"]: r for r in rows if r["method"] == "mca:shared_draws=True"}
    plain = {r["value"]: r for r in rows if r["method"] == "mca"}
    sample = load_sample()
    inputs = mcattn.studies.compare.layer_inputs(sample, 4)
    exact = mcattn.attention(inputs.q, inputs.k, np.ascontiguousarray(
        (inputs.x @ inputs.w_v + inputs.b_v).reshape(inputs.x.shape[:2] + (inputs.q.shape[1], -1))
        .transpose(0, 2, 1, 3)), key_padding_mask=inputs.key_padding_mask, scale=inputs.scale)
    for alpha in (0.2, 1.0):
        out_s = mcattn.mca.attention(inputs.q, inputs.k, inputs.x, inputs.w_v, inputs.b_v,
                                     num_heads=inputs.q.shape[1], alpha=alpha, seed=4,
                                     key_padding_mask=inputs.key_padding_mask, scale=inputs.scale,
                                     shared_draws=True)
        errors = relative_errors(out_s, exact, inputs.key_padding_mask)
        assert shared[alpha]["error_median"] == pytest.approx(float(np.median(errors)), rel=1e-4)
        assert shared[alpha]["error_median"] != plain[alpha]["error_median"]
        # The bound of correlated (shared) draws is the triangle form: looser, and it holds.
        assert shared[alpha]["bound_median"] > plain[alpha]["bound_median"]
        assert shared[alpha]["bound_median"] > shared[alpha]["error_median"]


def test_variants_refuse_unknown_or_supplied_knobs(capsys):
    for spec, named in (("mca:bogus=1", "bogus"), ("mca:alpha=0.3", "alpha"), ("mca:x=1", "x"),
                        ("rfa:features=3", "features"), ("mca:shared_draws", "knob=value")):
        code, _, err = _run(["compare", "--methods", spec, "--no-progress"], capsys)
        assert code == 2 and named in err, spec
    assert entries.parse_variant("mca:shared_draws=True,sampling=weight") == (
        "mca", {"shared_draws": True, "sampling": "weight"})
    assert entries.parse_variant("rfa") == ("rfa", {})
    (entry,) = entries.get_entries(["mca:shared_draws=True"])
    assert entry.method == "mca" and entry.fixed == (("shared_draws", True),)


def test_backends_command(capsys):
    code, out, _ = _run(["backends"], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == ["numpy", "numba", "cuda",
                                                                       "cupy"]


def test_no_command_prints_help(capsys):
    code, out, _ = _run([], capsys)
    assert code == 2 and "compare" in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "mcattn.cli", "backends"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "numba" in result.stdout


def test_registry_lists_entries_and_rejects_unknown():
    names = [e.name for e in entries.get_entries()]
    assert names[0] == "exact" and "mca" in names
    with pytest.raises(ValueError, match="unknown method"):
        entries.get_entries(["nope"])


def test_relative_errors_ignore_padding():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 3, 5, 4))
    out = ref.copy()
    kpm = np.array([[True] * 5, [True, True, True, False, False]])
    out[1, :, 3:] += 100.0  # garbage on padded rows must not count
    out[0] *= 1.5
    errors = relative_errors(out, ref, kpm)
    assert np.allclose(errors[0], 0.5) and np.allclose(errors[1], 0.0)


def test_python_m_mcattn_is_the_command():
    # mcattn/__main__.py: the command without the console script (an uninstalled checkout)
    root = mcattn.__file__.rpartition("/mcattn/")[0]
    done = subprocess.run([sys.executable, "-m", "mcattn", "methods"], capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eigen" in done.stdout and "mca" in done.stdout
