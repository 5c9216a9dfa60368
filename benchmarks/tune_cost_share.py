"""How much of a layer's exact cost (docs/tune.md's scope: attention + value projection) is the
dense value projection, on tune's calibration text (48 texts), in ops and in 45 nm energy.

Only mca replaces that projection; every other method leaves it, which bounds its layer's cost
below by this share. Run: ``python benchmarks/tune_cost_share.py``.
"""

import torch

from mcattn.eatt.ops import dense_projection_ops
from mcattn.frameworks.torch import use_method
from mcattn.studies.models import load_model
from mcattn.studies.tune import calibration_batches

for name in ("all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"):
    enc = load_model(name)
    att, proj = [0.0, 0.0], [0.0, 0.0]
    def rec(c, att=att, proj=proj):
        lin, t = c.module.value, c.tokens
        p = dense_projection_ops(t, lin.in_features, lin.out_features, lin.bias is not None)
        att[0] += c.info.ops.total
        att[1] += c.info.ops.energy_pj()
        proj[0] += p.total
        proj[1] += p.energy_pj()
    with use_method(enc.bert, "exact", on_call=rec), torch.no_grad():  # mcattn exact in every layer
        for b in calibration_batches(enc, 48):
            enc.bert(**b)
    print(f"{name} projection share of exact cost: ops {proj[0] / (att[0] + proj[0]):.3f} "
          f"energy {proj[1] / (att[1] + proj[1]):.3f}")
