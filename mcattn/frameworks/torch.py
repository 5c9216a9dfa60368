"""PyTorch adapter: mcattn methods on torch tensors, and inside Hugging Face models.

* :func:`attention` / :func:`method_attention` run a method on torch tensors (CPU or
  CUDA) through DLPack and return torch tensors. With grad mode on and an input that
  requires grad, the call is an autograd node whose backward runs the method's backward
  kernels (``mcattn/<method>/grad.py``); otherwise it is the plain forward.
* :func:`use_method` swaps a method into the self-attention of a transformers model for
  the duration of a ``with`` block, without copying or touching any weight: it registers
  an attention function of its own with transformers' ``AttentionInterface``, points this
  model's configs at it, then restores what they ran before and unregisters it. Blocks
  on several models, nested or in several threads, do not interfere.

Every method goes through the front door :func:`mcattn.attention` (``method=``, knobs by
keyword); what a method needs from the model beyond q, k, v is in its spec
(:class:`mcattn._plugin.ModelHooks`, ``mcattn/<method>/spec.py``): ``mca`` reads the
value projection's input from a forward pre-hook on the module's ``value`` Linear and
its weight as ``value.weight.T``; ``latte`` (``target_mass=``) and ``eigen``
(``num_columns=``) fit thresholds and bases on the model's own attention.
"""

import contextlib
import itertools
import threading
import time
import warnings
from dataclasses import dataclass

import torch

import mcattn

from .._plugin import ModelHooks
from . import _grad

__all__ = ["attention", "method_attention", "use_method", "attention_modules", "layer_inputs",
           "ModelCall"]


class _MethodFunction(torch.autograd.Function):
    """One method call as an autograd node: the library's forward and backward kernels."""

    @staticmethod
    def forward(ctx, module, names, common, static, *tensors):
        from .._array import import_arrays

        present = {n: t.detach() if isinstance(t, torch.Tensor) else t  # masks may be NumPy
                   for n, t in zip(names, tensors) if t is not None}
        float_names = [n for n in names if n not in _grad.MASKS and n in present]
        # One dtype for q, k, v; trainable knobs (rfa's gate, latte's threshold) may differ.
        bridge, native = import_arrays(present, float_names=float_names,
                                       same_dtype=[n for n in ("q", "k", "v") if n in present])
        q, k, v = native["q"], native["k"], native.get("v")
        masks = {n: native.get(n) for n in _grad.MASKS}
        knobs = dict(static, **{n: a for n, a in native.items() if n not in ("q", "k", "v") + _grad.MASKS})
        out, residuals = module.forward(q, k, v, **common, **masks, **knobs)
        ctx.saved = (module, bridge, q, k, v, out, residuals, masks, knobs, common)
        ctx.names = names
        # The inputs themselves, for create_graph=True: the gradients depend on them.
        ctx.save_for_backward(*(t for t in tensors if isinstance(t, torch.Tensor)))
        return bridge.export(out)

    @staticmethod
    def backward(ctx, dout):
        from .._array import import_arrays

        module, bridge, q, k, v, out, residuals, masks, knobs, common = ctx.saved
        _, native = import_arrays({"dout": dout.detach().contiguous()})
        g = native["dout"].astype(out.dtype, copy=False)
        grads = module.backward(q, k, v, out, residuals, g, **common, **masks, **knobs)
        result = [None, None, None, None]
        for name, needed in zip(ctx.names, ctx.needs_input_grad[4:]):
            result.append(bridge.export(grads[name]) if needed and name in grads else None)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must not pass for constants
            result = _first_order_only(module, result, ctx.saved_tensors + (dout,))
        return tuple(result)


class _FirstOrderOnly(torch.autograd.Function):
    """Gradients of a method call recorded under ``create_graph=True``: they depend on the
    call's inputs, so they require grad, and differentiating them raises."""

    @staticmethod
    def forward(ctx, module, count, *tensors):  # ``count`` gradients, then the inputs
        ctx.module = module
        return tuple(t.detach().clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *unused):
        raise _grad.second_order_error(ctx.module)


def _first_order_only(module, grads, inputs):
    """``grads`` (None where absent) as outputs of a :class:`_FirstOrderOnly` node over the
    ``inputs`` that require grad (none: no dependency to record)."""
    linked = [t for t in inputs if t.requires_grad]
    present = [i for i, g in enumerate(grads) if g is not None]
    if not linked or not present:
        return grads
    refused = _FirstOrderOnly.apply(module, len(present), *(grads[i] for i in present), *linked)
    grads = list(grads)
    for i, g in zip(present, refused):
        grads[i] = g
    return grads


def attention(q, k, v=None, *, method="exact", **kwargs):
    """Any method on torch tensors, differentiable where the method has a backward.

    Parameters
    ----------
    q, k, v : torch.Tensor
        As :func:`mcattn.attention` (``v=None`` for mca).
    method : str
    **kwargs
        The common arguments (masks, ``is_causal``, ``scale``, ``backend``) and the
        method's knobs. A trainable knob given as a tensor that requires grad (rfa's
        ``gate``, ...) receives a gradient.

    Returns
    -------
    torch.Tensor, shape ``[..., Nq, dv]``
        Part of the autograd graph when grad mode is on and an input requires grad; the
        backward runs the method's backward kernels. Otherwise the plain forward (same
        speed as :func:`mcattn.attention`).
    """
    common = {n: kwargs.pop(n) for n in list(kwargs) if n in _COMMON}
    inputs = [q, k, v] + [a for a in kwargs.values() if isinstance(a, torch.Tensor)]
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if not wants_grad:  # inference: the library's plain forward on detached tensors
        detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
        with torch.no_grad():
            return mcattn.attention(detach(q), detach(k), detach(v), method=method,
                                    **{n: detach(a) for n, a in common.items()},
                                    **{n: detach(a) for n, a in kwargs.items()})
    if common.pop("return_info", False):
        raise ValueError("return_info=True is not available while recording gradients")
    _, _, module = _grad.training_module(method, kwargs)
    trainable, static = _grad.split_knobs(module, kwargs)
    for name in [n for n, a in trainable.items() if not isinstance(a, torch.Tensor)]:
        static[name] = trainable.pop(name)  # a number or NumPy array: a constant
    check = getattr(module, "check_trainable", None)  # settings under which a knob cannot learn
    if check is not None:
        check(tuple(n for n, a in trainable.items() if a.requires_grad), kwargs)
    for name, value in static.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise mcattn.errors.GradientNotSupportedError(
                f"{method}'s knob {name!r} requires grad but has no gradient here (trainable: "
                f"{', '.join(module.TRAINABLE) or 'none'})")
    masks = {n: common.pop(n, None) for n in _grad.MASKS}
    names = ("q", "k", "v") + tuple(masks) + tuple(trainable)
    tensors = (q, k, v) + tuple(masks.values()) + tuple(trainable.values())
    return _MethodFunction.apply(module, names, common, static, *tensors)


_COMMON = ("attn_mask", "key_padding_mask", "is_causal", "scale", "backend", "check_finite", "return_info")
_NO_HOOKS = ModelHooks()


def _layer_inputs(q, k, v, mask, scale):
    """One call's exact-attention inputs as a calibration hook takes them (float64 NumPy)."""
    host = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    kpm = None
    if mask is not None:  # [B, 1 or H, Nq, Nk] -> the keys any query may see, per batch row
        kpm = mask.detach().to("cpu").any(dim=-2).all(dim=1).numpy()
    return {"q": host(q), "k": host(k), "v": host(v) if v is not None else None,
            "key_padding_mask": kpm, "scale": None if scale is None else float(scale)}


class _Calibration:
    """Knobs a method fits on a model's own attention (:attr:`ModelHooks.calibrate`), per
    layer (and per length), for one ``use_method`` block.

    The knobs of a layer come from the block's calibration batch when there is one
    (``source``: model inputs, run once at the start with exact attention), from
    ``source(length)`` when ``source`` is a callable (run when a new length appears),
    and otherwise from the first call the layer makes (its own ``q`` and ``k``).
    """

    def __init__(self, hooks, options, source):
        self.hooks, self.options, self.source = hooks, options, source
        self.knobs = {}  # (id(module), length or None) -> knobs
        self.local = threading.local()  # .active: a calibration run is going on in this thread

    def key(self, module, q):
        return id(module), int(q.shape[-2]) if self.hooks.per_length else None

    @property
    def active(self):
        return getattr(self.local, "active", False)

    def record(self, module, q, k, v, mask, scale):
        """Fit this call's knobs (a calibration run: the call itself returns exact attention)."""
        key = self.key(module, q)
        if key not in self.knobs:
            self.knobs[key] = self.hooks.calibrate(_layer_inputs(q, k, v, mask, scale), self.options)

    def run_source(self, model, inputs):
        """Run ``model`` on ``inputs`` in calibration mode (no graph, exact attention)."""
        self.local.active = True
        try:
            with torch.no_grad():
                if isinstance(inputs, dict):
                    model(**inputs)
                else:
                    model(inputs)
        finally:
            self.local.active = False

    def knobs_of(self, model, module, q, k, v, mask, scale):
        key = self.key(module, q)
        if key not in self.knobs and callable(self.source):
            self.run_source(model, self.source(int(q.shape[-2])))
        if key not in self.knobs:  # no batch for this layer (or length): its own call's
            self.record(module, q, k, v, mask, scale)
        return self.knobs[key]


@dataclass(frozen=True)
class ModelCall:
    """One attention call inside a model, as ``use_method(..., on_call=...)`` reports it.

    Attributes
    ----------
    module : torch.nn.Module
        The self-attention module that made the call.
    info : mcattn.cost.CallInfo
        The call's operation counts (and the method's own figures, e.g. ``posterior``).
    seconds : float
        Wall-clock time of the mcattn call (inputs' conversion included).
    tokens : int
        Real (unmasked) key positions over the batch: what the layer's dense value
        projection ran on.
    """

    module: object
    info: object
    seconds: float
    tokens: int


def method_attention(method, q, k, v, *, module=None, mask=None, scale=None, _calls=None,
                     _calibration=None, _model=None, _on_call=None, **knobs):
    """Run ``method`` on torch tensors ``[B, H, N, d]`` inside a model; a torch tensor back.

    ``mask`` is boolean ``[B, 1, Nq, Nk]`` (True = may attend) or None; the method's knobs
    are checked by :func:`mcattn.front.check_knobs`. A method that needs more than q, k, v
    from the model says so in its spec (:class:`mcattn._plugin.ModelHooks`): mca takes
    the values from ``module``'s value projection, latte and eigen fit their thresholds
    and bases on the model's own attention (``_calibration``; without one, on this call's
    own ``q`` and ``k``).
    """
    from ..front import check_knobs
    from ..registry import get_method

    calls = itertools.count() if _calls is None else _calls
    hooks = get_method(method).model or _NO_HOOKS
    if _calibration is not None and _calibration.active:  # a calibration run: fit, then exact
        _calibration.record(module, q, k, v, mask, scale)
        return attention(q, k, v, method="exact", attn_mask=mask, scale=scale)
    if hooks.exact_when is not None and hooks.wants_calibration(knobs) \
            and hooks.exact_when(int(q.shape[-2]), int(k.shape[-2]), knobs):
        return _reported("exact", q, k, v, mask, scale, {}, module, _on_call)
    merged = {n: a for n, a in knobs.items() if n not in hooks.consumes}
    if _calibration is None and hooks.wants_calibration(knobs):  # a call on its own: fit on it
        _calibration = _Calibration(hooks, knobs, None)
    if _calibration is not None:
        merged.update(_calibration.knobs_of(_model, module, q, k, v, mask, scale))
    if hooks.resolve is not None:
        merged = hooks.resolve(module, q, merged, calls)
    common = {n: merged.pop(n) for n in _COMMON if n in merged}  # is_causal, ... by keyword
    _, spec = check_knobs(method, merged)
    return _reported(method, q, k, v if spec.needs_values else None, mask, scale,
                     dict(common, **merged), module, _on_call)


def _reported(method, q, k, v, mask, scale, knobs, module, on_call):
    """``attention(...)``, reporting the call to ``on_call`` (a :class:`ModelCall`) if given."""
    if on_call is None:
        return attention(q, k, v, method=method, attn_mask=mask, scale=scale, **knobs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v)):
        raise ValueError("use_method(on_call=...) reports inference calls only; run the model "
                         "under torch.no_grad()")
    start = time.perf_counter()
    out, info = attention(q, k, v, method=method, attn_mask=mask, scale=scale, return_info=True,
                          **knobs)
    seconds = time.perf_counter() - start
    tokens = int(q.shape[0] * k.shape[-2]) if mask is None else int(mask.any(-2).sum())
    on_call(ModelCall(module, info, seconds, tokens))
    return out


#: One registered attention name per ``use_method`` context ("mcattn_0", "mcattn_1", ...).
_NAMES = itertools.count()
_LOCK = threading.Lock()
#: id(config) -> the live contexts on that config (several: nested blocks, or models that
#: share one config object).
_SWAPS = {}


@dataclass
class _ConfigSwaps:
    """The contexts that swapped into one config: what it ran before the first, and theirs."""

    config: object
    base: object  # the config's ``_attn_implementation`` before any live context
    names: list  # the contexts' registered names, innermost last


def _as_bool_mask(mask, q):
    """transformers' mask (bool True = attend, or additive float) -> bool or None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _model_configs(model):
    """Every config of ``model``'s modules and their sub-configs, each before its sub-configs.

    transformers' ``_attn_implementation`` setter writes a config's sub-configs too, so
    writing parents first leaves each config with the value written to it last.
    """
    found = {}

    def children(config):
        subs = (getattr(config, key, None) for key in getattr(config, "sub_configs", None) or {})
        return [sub for sub in subs if sub is not None and hasattr(sub, "_attn_implementation")]

    def visit(config):
        if id(config) not in found:
            found[id(config)] = config
            for sub in children(config):
                visit(sub)

    def descendants(config, seen):
        for sub in children(config):
            if id(sub) not in seen:
                seen.add(id(sub))
                descendants(sub, seen)
        return seen

    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            visit(config)
    configs = list(found.values()) or [c for c in [getattr(model, "config", None)] if c is not None]
    return sorted(configs, key=lambda c: -len(descendants(c, set())))  # a parent has more


def _push(configs, name):
    """Point ``configs`` at context ``name`` (innermost from now on)."""
    with _LOCK:
        for config in configs:  # every base before any write: a write reaches sub-configs
            swaps = _SWAPS.setdefault(id(config), _ConfigSwaps(config, config._attn_implementation, []))
            swaps.names.append(name)
        for config in configs:
            config._attn_implementation = name


def _pop(configs, name):
    """Take context ``name`` off ``configs``: each runs its innermost remaining context, or
    what it ran before the first."""
    with _LOCK:
        for config in configs:
            swaps = _SWAPS[id(config)]
            swaps.names.remove(name)
            config._attn_implementation = swaps.names[-1] if swaps.names else swaps.base
            if not swaps.names:
                del _SWAPS[id(config)]


def _attention_below(name, module, query, key, value, attention_mask, **kwargs):
    """Run, for a module that context ``name`` does not own (another model sharing the
    config), what its config ran beneath ``name``: an outer context or its own attention."""
    import sys

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _LOCK:
        swaps = _SWAPS[id(module.config)]
        place = swaps.names.index(name)
        below = swaps.names[place - 1] if place else swaps.base
    if not place and attention_mask is not None and attention_mask.dtype == torch.bool \
            and ALL_MASK_ATTENTION_FUNCTIONS.get(below) is not sdpa_mask:  # eager adds its mask
        attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    function = ALL_ATTENTION_FUNCTIONS.get_interface(below, eager)
    return function(module, query, key, value, attention_mask, **kwargs)


def _keep_input(module, args):
    """Forward pre-hook on a value Linear: its input for mca's knobs and ``layer_knobs``."""
    module._mcattn_input = args[0]


@contextlib.contextmanager
def use_method(model, method=None, *, plan=None, **options):
    """Swap an mcattn method into every self-attention of a transformers model.

    Each block registers its own attention function (a name of its own with transformers'
    ``AttentionInterface``) and points only this model's configs at it, so blocks on two
    models, in two threads, or nested, each run their own method: in a nested block on the
    same model the inner method runs, and the outer one again after the inner block exits.
    On exit (also through an exception) each config gets back what it ran before, the
    name is unregistered and the block's hooks are removed. Modules of another model that
    shares a config object with this one keep running what they ran before.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model whose attention goes through transformers' ``AttentionInterface`` (BERT
        and most encoder models of transformers >= 4.48).
    method : str
        One of :func:`mcattn.methods` (``"exact"``, ``"mca"``, ``"rfa"``, ...).
    **options
        The method's knobs (as for :func:`mcattn.attention`): ``alpha``, ``sampling``,
        ``seed`` for mca (its ``x``, ``w_v``, ``b_v`` come from the model); ``num_features``,
        ``kind``, ``seed`` for rfa. Checked before the model runs. Also:

        ``layer_knobs`` : callable ``(attention_module) -> dict``, optional
            Knobs (or common arguments such as ``is_causal``) for one layer's call, for
            per-layer parameters (rfa's gate from the layer's input, which is kept as
            ``attention_module.value._mcattn_input``; latte's thresholds). Its attribute
            ``supplies`` (tuple of str) names the knobs it gives. ``mcattn finetune`` uses it.
        ``on_call`` : callable ``(ModelCall) -> None``, optional
            Called after each of the method's calls with its :class:`ModelCall` (the
            module, the call's ``info``, its time and its real tokens), for cost
            accounting (``mcattn.tune``). Inference only (under ``torch.no_grad()``).
    plan : mcattn.plan.Plan, dict or path, optional
        Instead of ``method`` and options: a method per layer (:mod:`mcattn.plan`). Layer
        ``i`` is the ``i``-th self-attention module (one with ``query``, ``key`` and
        ``value`` Linears) in module order; layers the plan marks ``exact`` or does not
        list run the model's own attention. ``on_call`` may be given with a plan.

    Examples
    --------
    >>> with use_method(bert, "mca", alpha=0.2, seed=0):   # doctest: +SKIP
    ...     embeddings = bert(**batch).last_hidden_state
    """
    if plan is not None:
        if method is not None or set(options) - {"on_call"}:
            raise TypeError("use_method: give either plan= or a method and its options, not both")
        with _use_plan(model, plan, options.get("on_call")):
            yield model
        return
    if method is None:
        raise TypeError("use_method needs a method name (or plan=)")
    from ..front import check_knobs
    from ..registry import get_method

    hooks = get_method(method).model or _NO_HOOKS
    layer_knobs = options.pop("layer_knobs", None)
    on_call = options.pop("on_call", None)
    if on_call is not None and not callable(on_call):
        raise TypeError(f"use_method: on_call must be callable, got {type(on_call).__name__}")
    source = options.pop("calibration", None)
    calibrated = hooks.wants_calibration(options)
    supplied = (hooks.supplies if hooks.resolve is not None or calibrated else ()) \
        + tuple(getattr(layer_knobs, "supplies", ()))
    given = {n: v for n, v in options.items() if n not in hooks.consumes and n not in _COMMON}
    try:
        check_knobs(method, dict(given, **{name: None for name in supplied if name not in _COMMON}))
    except TypeError as exc:
        if hooks.consumes and "needs the knob" in str(exc):  # say how the model can supply them
            raise TypeError(f"{exc}, or {' / '.join(hooks.consumes)} to fit them on the model's "
                            "own attention") from None
        raise
    if source is not None and not calibrated:
        raise TypeError(f"calibration= is for methods that fit knobs on the model ({method!r} with "
                        f"these options fits none)")
    if not any(hasattr(c, "_attn_implementation") for c in _model_configs(model)):
        raise TypeError("use_method needs a transformers model whose attention goes through "
                        "AttentionInterface (model.config._attn_implementation); got "
                        f"{type(model).__name__}")
    calibration = _Calibration(hooks, options, source) if calibrated else None
    options = dict(options, _calls=itertools.count(), _calibration=calibration, _model=model,
                   _on_call=on_call)
    name = f"mcattn_{next(_NAMES)}"
    owned = set(model.modules())
    warned = []

    def attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           **kwargs):
        if module not in owned:
            return _attention_below(name, module, query, key, value, attention_mask,
                                    scaling=scaling, dropout=dropout, **kwargs)
        if dropout and not warned:
            warned.append(True)
            warnings.warn(f"use_method: attention dropout (p={dropout}) is not applied by mcattn's "
                          "methods; call model.eval() for inference, or set the model's attention "
                          "dropout to 0 for training", RuntimeWarning, stacklevel=2)
        mask, causal = _call_mask(module, query, attention_mask, kwargs)
        extra = layer_knobs(module) if layer_knobs is not None else {}
        if causal and "is_causal" not in extra:
            extra = dict(extra, is_causal=True)
        out = method_attention(method, query, key, value, module=module, mask=mask,
                               scale=scaling, **options, **extra)
        return out.transpose(1, 2).contiguous(), None  # [B, N, H, dv], as transformers expects

    hooks_, hooked = [], []
    if hooks.needs_value_input or layer_knobs is not None:
        for sub in owned:
            value = getattr(sub, "value", None)
            if isinstance(value, torch.nn.Linear) and hasattr(sub, "query"):
                hooks_.append(value.register_forward_pre_hook(_keep_input))
                hooked.append(value)
    try:
        with _registered(model, name, attention_function):
            if calibration is not None and source is not None and not callable(source):
                calibration.run_source(model, source)  # the calibration batch, before the block runs
            yield model
    finally:
        for handle in hooks_:
            handle.remove()
        for value in hooked:  # an outer block's hook still needs the input
            if _keep_input not in value._forward_pre_hooks.values() and hasattr(value, "_mcattn_input"):
                del value._mcattn_input


@contextlib.contextmanager
def _registered(model, name, attention_function):
    """``attention_function`` registered as ``name`` and run by ``model``'s attention for the block."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    configs = _model_configs(model)
    AttentionInterface.register(name, attention_function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    _push(configs, name)
    try:
        yield
    finally:
        _pop(configs, name)
        for interface in (AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS):
            interface._global_mapping.pop(name, None)  # register() writes the class-wide dict


def _call_mask(module, query, attention_mask, kwargs):
    """The boolean mask of one call and whether it is causal (transformers' SDPA rule: the
    call's ``is_causal`` flag, else the module's; only without a mask and for Nq > 1)."""
    mask = _as_bool_mask(attention_mask, query)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    return mask, bool(mask is None and causal and query.shape[-2] > 1)


def layer_inputs(model, inputs):
    """Each self-attention layer's exact-attention inputs on one batch.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    inputs : dict
        Model inputs (``input_ids``, ``attention_mask``, ...), one batch.

    Returns
    -------
    list of dict
        One per :func:`attention_modules` entry, in order, as calibration hooks take them:
        float64 NumPy ``q``, ``k``, ``v`` ``[B, H, N, d]``, ``key_padding_mask`` ``[B, N]``
        or None, ``scale`` (None for a layer the batch did not reach). The model runs
        mcattn's exact attention meanwhile.
    """
    modules = attention_modules(model)
    found = {}

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        mask, causal = _call_mask(module, query, attention_mask, kwargs)
        found.setdefault(module, _layer_inputs(query, key, value, mask, scaling))
        out = attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    with _registered(model, f"mcattn_{next(_NAMES)}", record), torch.no_grad():
        model(**inputs)
    return [found.get(m) for m in modules]


def attention_modules(model):
    """The self-attention modules of ``model`` in module order (what a plan's layers index)."""
    return [m for m in model.modules() if all(isinstance(getattr(m, n, None), torch.nn.Linear)
                                              for n in ("query", "key", "value"))]


@contextlib.contextmanager
def _use_plan(model, plan, on_call=None):
    """``use_method(model, plan=plan)``: one nested block per layer the plan swaps."""
    from ..plan import Plan, load_plan

    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    elif not isinstance(plan, Plan):
        plan = load_plan(plan)
    modules = attention_modules(model)
    beyond = [c.layer for c in plan.layers if c.layer >= len(modules)]
    if beyond:
        raise ValueError(f"plan for {plan.model!r} names layers {beyond}, but the model has "
                         f"{len(modules)} self-attention layers")
    with contextlib.ExitStack() as stack:
        for choice in plan.layers:  # each block owns only its layer's modules
            if choice.method != "exact":
                extra = {} if on_call is None else {"on_call": on_call}
                stack.enter_context(use_method(modules[choice.layer], choice.method,
                                               **choice.knobs, **extra))
        yield model


def __getattr__(name):  # the names of the method table this module had before the specs
    if name in ("MODULE_KNOBS", "ModuleKnobs"):
        from ..registry import get_method, method_names

        warnings.warn(f"mcattn.frameworks.torch.{name} is deprecated: a method's model hooks are "
                      "its spec's Method.model (mcattn.registry.get_method(name).model, a "
                      "mcattn._plugin.ModelHooks)", DeprecationWarning, stacklevel=2)
        if name == "ModuleKnobs":
            return ModelHooks
        return {n: get_method(n).model for n in method_names() if get_method(n).model is not None}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
