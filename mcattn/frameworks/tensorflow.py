"""TensorFlow adapter: mcattn methods as differentiable TensorFlow ops (``tf.custom_gradient``).

:func:`attention` runs a method's forward and backward kernels (``mcattn/<method>/grad.py``)
on the host through ``tf.numpy_function``, so it works eagerly, inside ``tf.function`` and
under ``tf.GradientTape``. Inputs are copied to the host; for GPU tensors without
gradients call :func:`mcattn.attention` directly (DLPack). The backward recomputes the
forward on the host. Gradients are first order: an outer ``tf.GradientTape`` that
differentiates them raises :class:`mcattn.errors.GradientNotSupportedError`.
"""

import tensorflow as tf

from . import _grad

__all__ = ["attention"]


@tf.autograph.experimental.do_not_convert
def attention(q, k, v=None, *, method="exact", attn_mask=None, key_padding_mask=None, is_causal=False,
              scale=None, backend=None, check_finite=True, **knobs):
    """A method on TensorFlow tensors, differentiable in ``q``, ``k``, ``v`` and trainable knobs.

    Parameters
    ----------
    q, k, v : tf.Tensor
        As :func:`mcattn.attention`.
    method : str
    attn_mask, key_padding_mask, is_causal, scale, backend, check_finite
        As :func:`mcattn.attention` (masks get no gradient).
    **knobs
        The method's knobs; trainable ones given as tensors receive gradients.

    Returns
    -------
    tf.Tensor, shape ``[..., Nq, dv]``
    """
    _, _, module = _grad.training_module(method, knobs)
    trainable, static = _grad.split_knobs(module, knobs)
    static = {n: (a.numpy() if isinstance(a, tf.Tensor) else a) for n, a in static.items()}
    common = {"is_causal": is_causal, "scale": scale, "backend": backend, "check_finite": check_finite}
    masks = {n: tf.convert_to_tensor(m) for n, m in (("attn_mask", attn_mask),
                                                      ("key_padding_mask", key_padding_mask))
             if m is not None}
    out_shape = _grad.output_shape(module, method, tuple(q.shape), tuple(k.shape),
                                   None if v is None else tuple(v.shape), knobs)
    qkv = ("q", "k") + (("v",) if v is not None else ())
    q, k, v = (None if x is None else tf.convert_to_tensor(x) for x in (q, k, v))
    trainable = {n: tf.convert_to_tensor(a) for n, a in trainable.items()}
    names = qkv + tuple(masks) + tuple(trainable)
    differentiable = qkv + tuple(trainable)

    def host_forward(*xs):
        return _grad.host_forward(module, names, common, static, *xs)

    def host_backward(*xs):
        return _grad.host_backward(module, names, differentiable, common, static, *xs)

    diff_tensors = [q, k] + ([v] if v is not None else []) + list(trainable.values())

    @tf.custom_gradient
    def call(*xs):
        named = dict(zip(differentiable, xs))
        ordered = [named.get(n, masks.get(n)) for n in names]
        out = tf.numpy_function(host_forward, ordered, Tout=q.dtype, stateful=False)
        out.set_shape(out_shape)

        def grad(dout):
            grads = tf.numpy_function(host_backward, ordered + [dout],
                                      Tout=[x.dtype for x in xs], stateful=False)
            for g, x in zip(grads, xs):
                g.set_shape(x.shape)
            return first_order_only(*grads, *xs, dout)

        return out, grad

    @tf.custom_gradient
    def first_order_only(*tensors):
        """The gradients (the first ``len(diff_tensors)`` tensors) as an op over the inputs
        and ``dout`` whose own gradient raises: an outer tape must not see constants."""

        def refuse(*unused):
            raise _grad.second_order_error(module)

        return [tf.identity(g) for g in tensors[:len(diff_tensors)]], refuse

    return call(*diff_tensors)
