"""The embedded real-attention sample and the sample-file loader."""

import json

import numpy as np
import pytest
from helpers import rel_error

from mcattn.errors import SampleFileError
from mcattn.studies.data import SAMPLE_PATH, load_sample


def test_packaged_sample_is_real_minilm_attention():
    s = load_sample()
    assert s.q.shape[0] == 6 and s.num_heads == 12 and s.q.shape[-1] == 32
    assert s.has_projection and s.x.shape[-1] == 384 and s.w_v.shape[1:] == (384, 384)
    lengths = s.lengths
    assert lengths.min() < lengths.max() == s.q.shape[3]  # unpadded lengths vary
    assert "all-MiniLM-L6-v2" in s.provenance["model"]
    assert s.provenance["tokens_per_sequence"] == lengths.tolist()
    pad = ~s.key_padding_mask
    assert np.all(s.q[:, :, :, :, :][..., 0].transpose(0, 1, 3, 2)[:, pad] == 0)  # zeroed padding
    assert abs(s.scale - 1 / np.sqrt(32)) < 1e-12


def test_real_attention_is_peaked():
    s = load_sample()
    kpm = s.key_padding_mask
    scores = s.scale * s.q[2] @ np.swapaxes(s.k[2], -1, -2)
    scores = np.where(kpm[:, None, None, :], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = p.max(-1)[np.broadcast_to(kpm[:, None, :], p.shape[:-1])]
    uniform = 1.0 / np.broadcast_to(kpm.sum(1)[:, None, None], p.shape[:-1])[
        np.broadcast_to(kpm[:, None, :], p.shape[:-1])]
    assert np.median(top / uniform) > 5  # far from uniform attention: real, peaked rows


def test_values_are_the_projection():
    s = load_sample()
    for layer in (0, 5):
        v = (s.x[layer] @ s.w_v[layer] + s.b_v[layer]) * s.key_padding_mask[:, :, None]
        v = v.reshape(v.shape[0], v.shape[1], 12, 32).transpose(0, 2, 1, 3)
        assert rel_error(s.v[layer], v) < 1e-6


def test_user_file_with_only_qkv(tmp_path):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 7, 4)).astype(np.float32) for _ in range(3))
    path = tmp_path / "mine.npz"
    np.savez(path, q=q, k=k, v=v)
    s = load_sample(path)
    assert s.q.shape == (1, 2, 3, 7, 4) and s.key_padding_mask.all()
    assert s.scale == pytest.approx(0.5) and not s.has_projection and s.provenance == {}


def _write(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"q": np.ones((2, 3, 7, 4)), "k": np.ones((2, 3, 7, 4))}, "missing"),
        ({"q": np.ones((3, 7, 4)), "k": np.ones((3, 7, 4)), "v": np.ones((3, 7, 4))}, "must be"),
        ({"q": np.ones((2, 3, 7, 4)), "k": np.ones((2, 3, 6, 4)), "v": np.ones((2, 3, 7, 4))},
         "do not agree"),
        ({"q": np.ones((2, 3, 7, 4), int), "k": np.ones((2, 3, 7, 4)), "v": np.ones((2, 3, 7, 4))},
         "floating-point"),
        ({"q": np.full((2, 3, 7, 4), np.nan), "k": np.ones((2, 3, 7, 4)),
          "v": np.ones((2, 3, 7, 4))}, "NaN"),
        ({"q": np.ones((2, 3, 7, 4)), "k": np.ones((2, 3, 7, 4)), "v": np.ones((2, 3, 7, 4)),
          "key_padding_mask": np.ones((2, 6), bool)}, "key_padding_mask"),
        ({"q": np.ones((2, 3, 7, 4)), "k": np.ones((2, 3, 7, 4)), "v": np.ones((2, 3, 7, 4)),
          "key_padding_mask": np.ones((2, 7))}, "boolean"),
        ({"q": np.ones((2, 3, 7, 4)), "k": np.ones((2, 3, 7, 4)), "v": np.ones((2, 3, 7, 4)),
          "x": np.ones((2, 7, 5))}, "go together"),
        ({"q": np.ones((2, 3, 7, 4)), "k": np.ones((2, 3, 7, 4)), "v": np.ones((2, 3, 7, 4)),
          "x": np.ones((2, 7, 5)), "w_v": np.ones((5, 11)), "b_v": np.ones(12)}, "w_v"),
        ({"q": np.ones((2, 3, 7, 4)), "k": np.ones((2, 3, 7, 4)), "v": np.ones((2, 3, 7, 4)),
          "format": np.array("someone-else-v9")}, "unknown format"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, arrays, words):
    with pytest.raises(SampleFileError, match=words):
        load_sample(_write(tmp_path, **arrays))


def test_foreign_files(tmp_path):
    with pytest.raises(SampleFileError, match="no such file"):
        load_sample(tmp_path / "absent.npz")
    text = tmp_path / "notes.npz"
    text.write_text("q, k, v")
    with pytest.raises(SampleFileError, match="not an .npz"):
        load_sample(text)
    npy = tmp_path / "array.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(SampleFileError, match="not an .npz"):
        load_sample(npy)
    objects = tmp_path / "objects.npz"
    np.savez(objects, q=np.array([{"a": 1}], dtype=object), k=np.ones(1), v=np.ones(1))
    with pytest.raises(SampleFileError, match="pickle"):
        load_sample(objects)


def test_provenance_is_json():
    with np.load(SAMPLE_PATH, allow_pickle=False) as data:
        meta = json.loads(str(data["provenance"]))
    assert meta["command"] == "python -m mcattn.data.capture"  # how the shipped file was made
    assert any("lee.cor" in t["source"] for t in meta["texts"])
