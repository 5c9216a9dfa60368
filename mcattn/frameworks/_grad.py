"""What the autograd adapters share: a method's training module and host-side calls.

Each method that can be trained names a module in its spec (``Method.grad``) with

* ``forward(q, k, v, **common, **knobs) -> (out, residuals)``,
* ``backward(q, k, v, out, residuals, dout, **common, **knobs) -> {"q": dq, ...}``,
* ``TRAINABLE``: the knob arrays that receive gradients (rfa's ``gate``, ...),
* optionally ``output_shape(q_shape, k_shape, v_shape, knobs)`` for a method without
  ``v`` (mca), which the JAX and TensorFlow adapters need in advance,
* optionally ``check_trainable(names, knobs)``: raises for knobs in ``names`` (those
  that require grad, torch adapter) that cannot learn under ``knobs`` (latte's
  threshold with the hard mask),

on native arrays (NumPy/CuPy). The torch adapter calls them directly (DLPack both ways);
the JAX and TensorFlow adapters call :func:`host_forward` / :func:`host_backward` from a
host callback on NumPy arrays (the backward recomputes the forward, since a callback's
residuals would need shapes known in advance).
"""

import importlib

import numpy as np

from ..errors import GradientNotSupportedError
from ..front import COMMON_ARGUMENTS, check_knobs

__all__ = ["training_module", "split_knobs", "output_shape", "host_forward", "host_backward",
           "second_order_error", "MASKS"]

MASKS = ("attn_mask", "key_padding_mask")


def training_module(method, knobs):
    """``(Method, MethodSpec, module)`` of ``method`` after checking ``knobs``."""
    found, spec = check_knobs(method, knobs)
    if found.grad is None:
        raise GradientNotSupportedError(
            f"method {method!r} has no backward pass yet; call it without gradients "
            "(torch.no_grad(), jax.lax.stop_gradient, tf.stop_gradient) or use another method")
    return found, spec, importlib.import_module(found.grad)


def second_order_error(module):
    """The error every adapter raises when a method's gradients are differentiated again.

    The backward kernels give exact first-order gradients but are not themselves
    differentiable; a gradient penalty or a Hessian through them would otherwise see
    constants and drop its terms without a word.
    """
    method = module.__name__.split(".")[-2]  # mcattn.<method>.grad
    return GradientNotSupportedError(
        f"method {method!r}: mcattn's gradients are first order only, and these were "
        "differentiated again (torch create_graph=True, a nested tf.GradientTape, "
        "jax.grad of jax.grad: a gradient penalty, a Hessian). Compute higher-order "
        "terms with the framework's own attention (for exact attention: torch's "
        "scaled_dot_product_attention with the math backend, or softmax(q k^T) v in JAX/TF)")


def split_knobs(module, knobs):
    """``(trainable, static)``: knob arrays that get gradients, and everything else."""
    trainable = {n: knobs[n] for n in module.TRAINABLE if knobs.get(n) is not None}
    static = {n: v for n, v in knobs.items() if n not in trainable}
    return trainable, static


def output_shape(module, method, q_shape, k_shape, v_shape, knobs):
    """The output's shape from the input shapes (JAX and TensorFlow need it in advance).

    ``batch + (Nq, dv)``; a method without ``v`` (mca) gives it through its training
    module's ``output_shape(q_shape, k_shape, v_shape, knobs)``.
    """
    if hasattr(module, "output_shape"):
        return tuple(module.output_shape(q_shape, k_shape, v_shape, knobs))
    if v_shape is None:
        raise NotImplementedError(f"{method}: this adapter needs v")
    batch = np.broadcast_shapes(tuple(q_shape[:-2]), tuple(k_shape[:-2]), tuple(v_shape[:-2]))
    return tuple(batch) + (int(q_shape[-2]), int(v_shape[-1]))


def _compute(a):
    a = np.asarray(a)
    if a.dtype.kind == "f" and a.dtype not in (np.float32, np.float64):
        return a.astype(np.float32)  # float16 / bfloat16 compute in float32
    return a


def _call_args(names, arrays, common, static):
    named = dict(zip(names, arrays))
    kw = {n: common[n] for n in common if n not in MASKS and n in COMMON_ARGUMENTS}
    kw.update({n: _compute(named[n]) if named.get(n) is not None else None for n in MASKS})
    knobs = dict(static)
    knobs.update({n: _compute(a) for n, a in named.items() if n not in ("q", "k", "v") + MASKS})
    q, k = _compute(named["q"]), _compute(named["k"])
    v = _compute(named["v"]) if named.get("v") is not None else None
    return q, k, v, kw, knobs


def host_forward(module, names, common, static, *arrays):
    """The method's output for NumPy ``arrays`` (named by ``names``), in ``q``'s dtype."""
    q, k, v, kw, knobs = _call_args(names, arrays, common, static)
    out, _ = module.forward(q, k, v, **kw, **knobs)
    return np.asarray(out).astype(np.asarray(arrays[0]).dtype)


def host_backward(module, names, wanted, common, static, *arrays_and_dout):
    """Gradients of ``wanted`` (names) for NumPy arrays; recomputes the forward first."""
    *arrays, dout = arrays_and_dout
    q, k, v, kw, knobs = _call_args(names, arrays, common, static)
    out, residuals = module.forward(q, k, v, **kw, **knobs)
    grads = module.backward(q, k, v, out, residuals, _compute(dout).astype(out.dtype), **kw, **knobs)
    named = dict(zip(names, arrays))
    return tuple(np.asarray(grads[n]).astype(np.asarray(named[n]).dtype) for n in wanted)
