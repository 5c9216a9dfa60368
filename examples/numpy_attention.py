"""Exact attention on NumPy arrays: causal, padded, with operation counts.

Run: python examples/numpy_attention.py
"""

import numpy as np

import mcattn

rng = np.random.default_rng(0)
batch, heads, n, head_dim = 2, 4, 256, 64
q, k, v = (rng.standard_normal((batch, heads, n, head_dim), dtype=np.float32) for _ in range(3))

# The second sequence is 200 tokens long, padded to 256 (True = real token).
key_padding_mask = np.ones((batch, n), dtype=bool)
key_padding_mask[1, 200:] = False

out, info = mcattn.attention(q, k, v, is_causal=True, key_padding_mask=key_padding_mask,
                             return_info=True)
print("output", out.shape, out.dtype, "computed by", info.backend)
print("operations:", info.ops)
print(f"energy at 45 nm: {info.ops.energy_pj() / 1e6:.2f} uJ")

# The same call on the readable NumPy reference agrees to float32 rounding.
ref = mcattn.attention(q, k, v, is_causal=True, key_padding_mask=key_padding_mask,
                       backend="numpy")
err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
print(f"numba vs numpy reference: relative difference {err:.1e}")
assert err < 1e-5

for status in mcattn.backends():
    print(status)
