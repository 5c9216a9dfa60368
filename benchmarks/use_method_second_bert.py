"""Every registered method inside a second BERT through ``use_method`` (issue 21's check).

A random-weight ``transformers.BertModel`` unlike the packaged MiniLM (hidden 64, 4 heads,
3 layers, one padded sequence); latte and eigen calibrate on another batch of the same model
(``calibration=``). Prints, per method, the relative error and the cosine of the last hidden
state against the model's own attention. Usage: ``python benchmarks/use_method_second_bert.py``.
"""

import numpy as np
import torch
import transformers

from mcattn import registry
from mcattn.frameworks.torch import use_method

OPTIONS = {"mca": {"alpha": 0.3, "seed": 0}, "rfa": {"num_features": 64, "seed": 0},
           "eatt": {"alignment": "l1"}, "latte": {"target_mass": 0.95}, "eigen": {"num_columns": 8}}


def batch(seed, n=24):
    ids = torch.randint(0, 200, (3, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, n, dtype=torch.long)
    mask[2, n - 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def main():
    config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                                     intermediate_size=128, vocab_size=200, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        ref = model(**batch(1)).last_hidden_state.numpy().astype(np.float64)
    print("method | options | calibrated on another batch | rel. error | cosine to the model's attention")
    for name in registry.method_names():
        options = dict(OPTIONS.get(name, {}))
        hooks = registry.get_method(name).model
        calibrated = bool(hooks and hooks.calibrate)
        if calibrated:
            options["calibration"] = batch(2)
        with torch.no_grad(), use_method(model, name, **options):
            out = model(**batch(1)).last_hidden_state.numpy().astype(np.float64)
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        cos = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
        shown = {k: v for k, v in options.items() if k != "calibration"}
        print(f"{name} | {shown} | {'yes' if calibrated else 'no'} | {err:.3g} | {cos:.4f}")


if __name__ == "__main__":
    main()
