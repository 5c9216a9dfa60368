"""mcattn on PyTorch tensors through DLPack: tensors in, tensors out, no copies.

Run: python examples/torch_dlpack.py   (needs torch)
"""

import torch

import mcattn

torch.manual_seed(0)
q, k, v = (torch.randn(2, 8, 512, 64) for _ in range(3))

with torch.no_grad():
    out = mcattn.attention(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

print(type(out).__name__, tuple(out.shape), out.dtype)
err = ((out - ref).norm() / ref.norm()).item()
print(f"mcattn vs torch SDPA: relative difference {err:.1e}")
assert err < 1e-5

# bfloat16 is computed in float32 and returned as bfloat16.
out_bf16 = mcattn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
print("bfloat16 in ->", out_bf16.dtype, "out")

# A tensor that requires grad is refused with a clear message (no silent detach).
try:
    mcattn.attention(q.requires_grad_(), k, v)
except TypeError as exc:
    print("refused:", str(exc).split(";")[0])
