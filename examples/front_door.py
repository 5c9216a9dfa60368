"""One call for every method, and dask arrays that stay lazy until computed.

Run: python examples/front_door.py
"""

import dask.array as da
import numpy as np

import mcattn

for spec in mcattn.methods():
    print(spec)

rng = np.random.default_rng(0)
batch, heads, n, head_dim = 2, 4, 512, 32
q, k, v = (rng.standard_normal((batch, heads, n, head_dim), dtype=np.float32) * 0.5 for _ in range(3))

# Changing method is one word; the method's own parameters are keywords.
exact = mcattn.attention(q, k, v, is_causal=True)
approx, info = mcattn.attention(q, k, v, method="rfa", num_features=128, seed=0, is_causal=True,
                                return_info=True)
err = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
print(f"rfa (128 features) vs exact: relative error {err:.3f}, ops/exact {info.ops_ratio:.3f}")

# dask: chunks of the batch and head dims are independent calls, computed in parallel.
# Random methods draw by global head index, so the chunking does not change the result.
lazy = mcattn.attention(*(da.from_array(a, chunks=(1, 2, n, head_dim)) for a in (q, k, v)),
                        method="rfa", num_features=128, seed=0, is_causal=True)
print("dask:", type(lazy).__name__, "with", lazy.npartitions, "chunks")
same = np.array_equal(lazy.compute(), approx)
print(f"dask result equals the in-memory one: {same}")
assert same
