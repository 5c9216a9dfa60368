"""PyTorch adapter: mcattn methods on torch tensors, and inside Hugging Face models.

* :func:`attention` / :func:`method_attention` run a method on torch tensors (CPU or
  CUDA) through DLPack and return torch tensors, without gradients (mcattn's kernels
  have no backward; inputs that require grad are refused by the library, here they are
  run under ``torch.no_grad()`` explicitly, for inference).
* :func:`use_method` swaps a method into the self-attention of a transformers model for
  the duration of a ``with`` block, without copying or touching any weight: it registers
  an attention function with transformers' ``AttentionInterface`` and points the model's
  config at it, then restores the previous implementation.

Methods plug in through :data:`ADAPTERS`: a function ``(module, q, k, v, mask, scale,
options) -> out [B, H, Nq, dv]`` with ``mask`` boolean ``[B, 1, Nq, Nk]`` (True = may
attend) or None. ``mca`` reads the value projection's input from a forward pre-hook on
the module's ``value`` Linear and its weight as ``value.weight.T``.
"""

import contextlib
import itertools

import numpy as np
import torch

import mcattn

__all__ = ["attention", "method_attention", "use_method", "ADAPTERS"]


def attention(q, k, v, **kwargs):
    """Exact attention on torch tensors (see :func:`mcattn.attention`), under no_grad."""
    with torch.no_grad():
        return mcattn.attention(q, k, v, **kwargs)


def _key_padding(mask):
    """[B, Nk] True = real key, from a [B, 1, Nq, Nk] boolean mask (None -> None)."""
    if mask is None:
        return None
    return mask[:, 0].any(dim=-2)


def _exact(module, q, k, v, mask, scale, options):
    return mcattn.attention(q, k, v, attn_mask=mask, scale=scale)


def _mca(module, q, k, v, mask, scale, options):
    from mcattn import mca

    x = getattr(module.value, "_mcattn_input", None)
    if x is None:
        raise RuntimeError("mca needs the value projection's input; use_method installs a hook "
                           "on module.value that was not run")
    w = module.value.weight.detach().T
    b = module.value.bias.detach() if module.value.bias is not None else None
    seed = options.get("seed")
    if seed is not None:  # a different, reproducible seed for every call
        seed = int(seed) * 1_000_003 + next(options["_calls"])
    return mca.attention(q, k, x.detach(), w.contiguous(), b, num_heads=q.shape[1],
                         alpha=options["alpha"], attn_mask=mask, scale=scale, seed=seed,
                         sampling=options.get("sampling", "weight"))


def _rfa(module, q, k, v, mask, scale, options):
    from mcattn import rfa

    features = options.get("_features")
    if features is None or features.head_dim != q.shape[-1]:
        features = rfa.RandomFeatures(q.shape[-1], options["num_features"],
                                      kind=options.get("kind", "positive"),
                                      seed=options.get("seed", 0))
        options["_features"] = features
    return rfa.attention(q, k, v, features=features, key_padding_mask=_key_padding(mask),
                         scale=scale)


def _eigen(module, q, k, v, mask, scale, options):
    from mcattn.eigen.torch_adapter import adapter

    return adapter(module, q, k, v, mask, scale, options)


#: Method name -> adapter ``(module, q, k, v, mask, scale, options) -> [B, H, Nq, dv]``.
ADAPTERS = {"exact": _exact, "mca": _mca, "rfa": _rfa, "eigen": _eigen}


def method_attention(method, q, k, v, *, module=None, mask=None, scale=None, **options):
    """Run ``method`` on torch tensors ``[B, H, N, d]`` and return a torch tensor."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown method {method!r}; the adapters are {sorted(ADAPTERS)}")
    options.setdefault("_calls", itertools.count())
    with torch.no_grad():
        return ADAPTERS[method](module, q, k, v, mask, scale, options)


_NAME = "mcattn"


def _as_bool_mask(mask, q):
    """transformers' mask (bool True = attend, or additive float) -> bool or None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


@contextlib.contextmanager
def use_method(model, method, **options):
    """Swap an mcattn method into every self-attention of a transformers model.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model whose attention goes through transformers' ``AttentionInterface`` (BERT
        and most encoder models of transformers >= 4.48).
    method : str
        A key of :data:`ADAPTERS` (``"exact"``, ``"mca"``, ``"rfa"``).
    **options
        The method's knobs: ``alpha``, ``sampling``, ``seed`` for mca; ``num_features``,
        ``kind``, ``seed`` for rfa.

    Examples
    --------
    >>> with use_method(bert, "mca", alpha=0.2, seed=0):   # doctest: +SKIP
    ...     embeddings = bert(**batch).last_hidden_state
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if method not in ADAPTERS:
        raise ValueError(f"unknown method {method!r}; the adapters are {sorted(ADAPTERS)}")
    options = dict(options, _calls=itertools.count())

    def attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           **kwargs):
        mask = _as_bool_mask(attention_mask, query)
        out = method_attention(method, query, key, value, module=module, mask=mask,
                               scale=scaling, **options)
        return out.transpose(1, 2).contiguous(), None  # [B, N, H, dv], as transformers expects

    AttentionInterface.register(_NAME, attention_function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_NAME, sdpa_mask)
    hooks = []
    if method == "mca":
        def keep_input(module, args):
            module._mcattn_input = args[0]

        for sub in model.modules():
            value = getattr(sub, "value", None)
            if isinstance(value, torch.nn.Linear) and hasattr(sub, "query"):
                hooks.append(value.register_forward_pre_hook(keep_input))
    configs = [m.config for m in model.modules() if hasattr(m, "config")] or [model.config]
    previous = [(c, c._attn_implementation) for c in {id(c): c for c in configs}.values()]
    try:
        for config, _ in previous:
            config._attn_implementation = _NAME
        yield model
    finally:
        for config, name in previous:
            config._attn_implementation = name
        for hook in hooks:
            hook.remove()
        for sub in model.modules():
            value = getattr(sub, "value", None)
            if value is not None and hasattr(value, "_mcattn_input"):
                del value._mcattn_input


def _numpy(t):  # pragma: no cover - small helper for callers
    return np.asarray(t.detach().cpu())
