"""rfa's own trainable parameters in ``mcattn finetune``: a recency gate per layer.

With ``gate=True`` every layer gets ``g = sigmoid(x W_g + b_g)`` per head from the layer's
input ``x`` (the causal gated form of rfa), trained with the model
(:mod:`mcattn.studies.finetune`, hooks described in
:func:`mcattn.studies.entries.finetune_hooks`).
"""

__all__ = ["FLAGS", "DEPLOY", "supplies", "parameters", "layer_knobs"]

#: Config flags these hooks understand.
FLAGS = ("gate",)
#: No separate deployed form.
DEPLOY = {}


def supplies(config):
    return ("gate", "is_causal") if config.gate else ()


def parameters(config, bert, knobs):
    """One ``Linear(hidden, heads)`` gate per layer (with ``gate=True``), near ``g = 0.88``."""
    if not config.gate:
        return None, knobs
    import torch

    cfg = bert.config
    gates = torch.nn.ModuleList(torch.nn.Linear(cfg.hidden_size, cfg.num_attention_heads)
                                for _ in range(cfg.num_hidden_layers))
    generator = torch.Generator().manual_seed(config.seed)
    for lin in gates:  # start near g = sigmoid(2) = 0.88: a long memory
        torch.nn.init.normal_(lin.weight, std=0.01, generator=generator)
        torch.nn.init.constant_(lin.bias, 2.0)
    return torch.nn.ModuleDict({"gate": gates}), knobs


def layer_knobs(module, attention_module):
    if module is None:
        return {}
    import torch

    x = attention_module.value._mcattn_input  # [B, N, hidden], the layer's input
    gate = torch.sigmoid(module["gate"][attention_module.layer_idx](x)).transpose(1, 2)  # [B, H, N]
    return {"gate": gate, "is_causal": True}
