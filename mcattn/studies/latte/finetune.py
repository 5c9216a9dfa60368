"""latte's own trainable parameters in ``mcattn finetune``: a threshold per layer and head.

The thresholds start from those calibrated on the embedded sample for ``target_mass``
(default 0.99), train with soft keep weights (``soft=True`` unless given) and are scored
after training in the deployed hard form too (``DEPLOY``; hooks described in
:func:`mcattn.studies.entries.finetune_hooks`).
"""

import numpy as np

__all__ = ["FLAGS", "DEPLOY", "supplies", "parameters", "layer_knobs"]

FLAGS = ()
#: The deployed form: the hard keep mask.
DEPLOY = {"soft": False}


def supplies(config):
    return ("threshold",)


def parameters(config, bert, knobs):
    """``[layers, heads]`` thresholds as one parameter, and the knobs without ``target_mass``."""
    import torch

    from .compare import sample_thresholds

    knobs = dict(knobs)
    target = knobs.pop("target_mass", 0.99)
    cfg = bert.config
    start = np.asarray(sample_thresholds(target), dtype=np.float32).reshape(
        cfg.num_hidden_layers, cfg.num_attention_heads)
    knobs.setdefault("soft", True)
    return torch.nn.ParameterDict({"threshold": torch.nn.Parameter(torch.from_numpy(start))}), knobs


def layer_knobs(module, attention_module):
    # relative thresholds are distances below the row maximum: kept >= 0 (a step that would
    # take one below zero leaves it at zero, with no gradient there)
    return {"threshold": module["threshold"][attention_module.layer_idx].clamp(min=0.0)}
