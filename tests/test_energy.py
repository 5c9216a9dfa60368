"""``mcattn energy``: counts per method, the pricing, the claims and the command."""

import json
from dataclasses import replace

import numpy as np
import pytest

import mcattn
from mcattn import eatt
from mcattn.cli import main
from mcattn.cost import HOROWITZ_45NM_PJ, energy_pj
from mcattn.studies import energy
from mcattn.studies.eatt import energy as eatt_energy
from mcattn.studies.latte import energy as latte_energy
from mcattn.studies.mca import energy as mca_energy
from mcattn.studies.rfa import energy as rfa_energy

SMALL = energy.EnergyConfig(d_model=32, heads=2, length=9)


def test_vanilla_block_is_exact_attention_plus_projections():
    rng = np.random.default_rng(0)
    t, d, h = SMALL.length, SMALL.d_model, SMALL.heads
    q, k, v = (rng.standard_normal((1, h, t, d // h)) for _ in range(3))
    from mcattn._validate import prepare_attention

    blocks = energy.vanilla_block(SMALL)
    attention = blocks["scores"] + blocks["softmax_pv"]
    assert attention == mcattn.exact.exact_ops(prepare_attention(q, k, v))
    assert blocks["v_projection"] == eatt.dense_projection_ops(t, d, d, True)


@pytest.mark.parametrize("alignment", eatt.ALIGNMENTS)
def test_eatt_block_equals_what_layer_counts(alignment):
    """The energy function and eatt.layer's info.ops agree (half of the codes are 1)."""
    rng = np.random.default_rng(1)
    t, d, h = SMALL.length, SMALL.d_model, SMALL.heads
    signs = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
    x = np.stack([rng.permutation(signs) * rng.uniform(0.5, 1.5, d) for _ in range(t)])[None]
    w_q, w_k = (rng.standard_normal((d, d // h)) for _ in range(2))
    w_v, w_o = (rng.standard_normal((d, d)) for _ in range(2))
    b_q, b_k = (rng.standard_normal(d // h) for _ in range(2))
    b_v, b_o = (rng.standard_normal(d) for _ in range(2))
    _, info = eatt.layer(x, w_q, w_k, w_v, num_heads=h, b_q=b_q, b_k=b_k, b_v=b_v, w_o=w_o,
                         b_o=b_o, alignment=alignment, return_info=True)
    blocks = eatt_energy.eatt_block(SMALL, alignment)
    assert info.ops == sum(blocks.values(), mcattn.OpCounts())
    assert info.alignment_ops == blocks["qk_projection"] + blocks["scores"]
    vanilla = energy.vanilla_block(SMALL)
    assert info.dense_ops == sum(vanilla.values(), mcattn.OpCounts())
    assert info.dense_alignment_ops == vanilla["qk_projection"] + vanilla["scores"]


def test_rfa_block_equals_rfa_call_counts():
    rng = np.random.default_rng(2)
    cfg = replace(SMALL, rfa_features=16)
    q, k, v = (rng.standard_normal((1, cfg.heads, cfg.length, cfg.head_dim)) for _ in range(3))
    feats = mcattn.rfa.RandomFeatures(cfg.head_dim, 16, kind="positive", num_heads=cfg.heads, seed=0)
    _, info = mcattn.rfa.attention(q, k, v, features=feats, return_info=True)
    assert rfa_energy.rfa_block(cfg)["scores"] == info.ops


def test_alignment_has_no_multiplications_per_pair():
    for cfg in (SMALL, replace(SMALL, length=40)):
        for alignment in eatt.ALIGNMENTS:
            blocks = eatt_energy.eatt_block(cfg, alignment)
            assert blocks["qk_projection"].multiplies == 0
            # only the once-per-call / once-per-row scaling, never per pair
            assert blocks["scores"].multiplies <= 2 * cfg.heads * cfg.length * cfg.head_dim


def test_crossover_is_the_first_cheaper_length():
    table = dict(HOROWITZ_45NM_PJ)
    n = rfa_energy.rfa_crossover(SMALL, table)
    core = ("scores", "softmax_pv")

    def cost(fn, length):
        blocks = fn(replace(SMALL, length=length))
        return sum(energy_pj(blocks[s], table) for s in core)

    assert cost(rfa_energy.rfa_block, n) < cost(energy.vanilla_block, n)
    assert cost(rfa_energy.rfa_block, n - 1) >= cost(energy.vanilla_block, n - 1)


def test_bad_configuration():
    with pytest.raises(ValueError, match="divide"):
        energy.run(energy.EnergyConfig(d_model=30, heads=4), mca=False)
    with pytest.raises(ValueError, match="latte_keep"):
        energy.run(energy.EnergyConfig(latte_keep=1.5), mca=False)


def test_command_json_follows_from_the_table(tmp_path, capsys):
    path = tmp_path / "energy.json"
    assert main(["energy", "--no-mca", "--length", "48", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "paper: 99%" in text and "paper: 66%" in text and "assumptions" in text
    result = json.loads(path.read_text())
    table = result["table_pj"]
    for method in result["methods"].values():
        for stage, ops in method["ops"].items():
            priced = sum(n * table[kind] for kind, n in ops.items())
            assert method["stages_pj"][stage] == pytest.approx(priced, rel=1e-12)
        assert method["total_pj"] == pytest.approx(sum(method["stages_pj"].values()), rel=1e-12)
    ex, ea = result["methods"]["exact"]["stages_pj"], result["methods"]["eatt"]["stages_pj"]
    align = 1 - (ea["qk_projection"] + ea["scores"]) / (ex["qk_projection"] + ex["scores"])
    assert result["claims"]["eatt"]["alignment"] == pytest.approx(align, rel=1e-12)
    whole = 1 - sum(ea.values()) / sum(ex.values())
    assert result["claims"]["eatt"]["attention_with_out_projection"] == pytest.approx(whole, rel=1e-12)
    assert not any(m["analytical"] for m in result["methods"].values())
    assert result["config"]["length"] == 48


def test_latte_block_is_latte_own_count():
    """The LATTE row is what mcattn.latte reports for the same call (relative, int8 scores)."""
    import numpy as np

    from mcattn import latte

    cfg = energy.EnergyConfig(d_model=64, heads=2, length=20, latte_keep=0.25)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 20, 32)) for _ in range(3))
    theta = latte.calibrate(q[None], k[None], target_keep=0.25)
    _, info = latte.attention(q, k, v, threshold=theta, return_info=True)
    block = latte_energy.latte_block(cfg)["scores"]
    kept = int(round(info.keep_fraction * 2 * 20 * 20))
    # Same counts per visible pair; the kept-pair terms scale with the kept count.
    assert block["int4_mul"] - 3 * 5 * 20 * 2 * 32 == info.ops["int4_mul"] - 3 * kept * 32
    assert block["fp32_exp"] == 5 * 20 * 2 and info.ops["fp32_exp"] == kept


def test_command_with_a_table_file(tmp_path, capsys):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"fp32_mul": 0.9}))  # multiplies as cheap as adds
    out = tmp_path / "e.json"
    assert main(["energy", "--no-mca", "--table", str(table), "--json", str(out)]) == 0
    assert "replaced from the file: fp32_mul" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["table_pj"]["fp32_mul"] == 0.9
    default = energy.run(energy.EnergyConfig(), mca=False)
    assert result["claims"]["eatt"]["alignment"] < default["claims"]["eatt"]["alignment"]
    table.write_text(json.dumps({"fp32_mul": -1}))
    with pytest.raises(ValueError, match="non-negative"):
        energy.load_table(str(table))


@pytest.mark.slow
def test_mca_figures_on_the_real_sample():
    rows = mca_energy.mca_sample_figures(alphas=(0.2, 1.0))
    for row in rows:  # padding flatters the paper-style figure
        assert row["paper_padded_projection_x"] > row["ours_projection_x"] > 1
        assert row["ours_projection_x"] > row["ours_attention_and_projection_x"] > 1
    assert rows[1]["ours_projection_x"] > rows[0]["ours_projection_x"]
