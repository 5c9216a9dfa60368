"""mca.attention on device arrays computes the probabilities by blocks on the device too
(mcattn/mca/stream.py, ``config.MCA_GPU_BLOCK_ELEMENTS``): the host call's budgets, and its
output to rounding (fake CuPy: host memory; or a GPU)."""

import numpy as np
import pytest
from helpers import rel_error

from mcattn import config, mca
from mcattn._validate import prepare_attention
from mcattn.mca import stream


@pytest.mark.hostshim
@pytest.mark.parametrize("shared_draws", [False, True])
def test_device_blocks_give_the_host_budgets(cupy_or_fake, monkeypatch, shared_draws):
    cp = cupy_or_fake
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((2, 2, 70, 8), dtype=np.float32) * 1.5 for _ in range(2))
    x = rng.standard_normal((2, 70, 24), dtype=np.float32)
    w = rng.standard_normal((24, 16), dtype=np.float32)
    kpm = np.ones((2, 70), bool)
    kpm[1, 60:] = False
    kw = dict(num_heads=2, alpha=1.5, seed=3, is_causal=True, shared_draws=shared_draws,
              return_info=True)
    ref, info = mca.attention(q, k, x, w, None, key_padding_mask=kpm, **kw)
    monkeypatch.setattr(config, "MCA_GPU_BLOCK_ELEMENTS", 16 * 70)  # blocks of 16 rows
    monkeypatch.setattr(config, "MCA_BLOCK_ELEMENTS", 1 << 30)  # the host cap: one block
    monkeypatch.setattr(config, "MCA_KEEP_ELEMENTS", 0)  # recomputed in pass 2
    dq, dk = cp.asarray(q), cp.asarray(k)
    assert len(stream.blocks(prepare_attention(dq, dk, dk))) == 4 * 4
    out, dinfo = mca.attention(dq, dk, cp.asarray(x), cp.asarray(w), None,
                               key_padding_mask=cp.asarray(kpm), backend="cupy", **kw)
    assert np.array_equal(dinfo.budgets, info.budgets)
    assert ((info.budgets > 0) & (info.budgets < 24)).mean() > 0.2
    assert rel_error(out.get(), ref) < 1e-5
