"""JAX adapter: mcattn methods as differentiable JAX functions (``jax.custom_vjp``).

:func:`attention` runs a method's forward and backward kernels (``mcattn/<method>/grad.py``)
on the host through ``jax.pure_callback``, so it works under ``jax.jit`` and ``jax.grad``;
under ``jax.vmap`` the callback runs once per mapped element (``vmap_method="sequential"``).
Inputs live on the CPU (a callback copies device arrays to the host); for GPU arrays
call :func:`mcattn.attention` directly (DLPack to CuPy), without gradients.

The backward recomputes the forward on the host (a callback's residuals would need their
shapes in advance): a backward pass costs one forward more than the kernels alone.

Gradients are first order: ``jax.grad`` of ``jax.grad`` raises
:class:`mcattn.errors.GradientNotSupportedError`, and forward mode (``jax.jvp``,
``jax.jacfwd``, ``jax.hessian``) raises JAX's own ``TypeError`` for a ``custom_vjp``
function ("can't apply forward-mode autodiff").
"""

import jax
import jax.numpy as jnp
import numpy as np

from . import _grad

__all__ = ["attention"]

_COMMON = ("is_causal", "scale", "backend", "check_finite")


def attention(q, k, v=None, *, method="exact", attn_mask=None, key_padding_mask=None, is_causal=False,
              scale=None, backend=None, check_finite=True, **knobs):
    """A method on JAX arrays, differentiable in ``q``, ``k``, ``v`` and trainable knobs.

    Parameters
    ----------
    q, k, v : jax.Array
        As :func:`mcattn.attention`.
    method : str
    attn_mask, key_padding_mask, is_causal, scale, backend, check_finite
        As :func:`mcattn.attention` (masks get no gradient).
    **knobs
        The method's knobs; trainable ones given as arrays receive gradients.

    Returns
    -------
    jax.Array, shape ``[..., Nq, dv]``

    Examples
    --------
    >>> import jax, jax.numpy as jnp                           # doctest: +SKIP
    >>> from mcattn.frameworks.jax import attention
    >>> loss = lambda q, k, v: attention(q, k, v, is_causal=True).sum()
    >>> dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    """
    _, _, module = _grad.training_module(method, knobs)
    trainable, static = _grad.split_knobs(module, knobs)
    static = {n: (np.asarray(a) if isinstance(a, jax.Array) else a) for n, a in static.items()}
    common = {"is_causal": is_causal, "scale": scale, "backend": backend, "check_finite": check_finite}
    masks = {n: m for n, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask))
             if m is not None}
    names = ("q", "k") + (("v",) if v is not None else ()) + tuple(masks) + tuple(trainable)
    differentiable = ("q", "k") + (("v",) if v is not None else ()) + tuple(trainable)
    arrays = [q, k] + ([v] if v is not None else []) + [jnp.asarray(m) for m in masks.values()] \
        + [jnp.asarray(a) for a in trainable.values()]
    arrays = [jnp.asarray(a) for a in arrays]

    out_shape = _grad.output_shape(module, method, q.shape, k.shape,
                                  None if v is None else v.shape, knobs)
    out_struct = jax.ShapeDtypeStruct(out_shape, q.dtype)

    def host_forward(*xs):
        return _grad.host_forward(module, names, common, static, *xs)

    def host_backward(*xs):
        return _grad.host_backward(module, names, differentiable, common, static, *xs)

    @jax.custom_vjp
    def call(*xs):
        return jax.pure_callback(host_forward, out_struct, *xs, vmap_method="sequential")

    def call_fwd(*xs):
        return call(*xs), xs

    def call_bwd(xs, g):
        structs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in zip(names, xs)
                        if n in differentiable)

        @jax.custom_jvp  # the backward kernels are first order: refuse grad of grad by name
        def backward(*xs_and_g):
            return jax.pure_callback(host_backward, structs, *xs_and_g, vmap_method="sequential")

        @backward.defjvp
        def backward_jvp(primals, tangents):
            raise _grad.second_order_error(module)

        grads = iter(backward(*xs, g))
        result = []
        for name, x in zip(names, xs):
            if name in differentiable:
                result.append(next(grads))
            elif jnp.issubdtype(x.dtype, jnp.floating):
                result.append(jnp.zeros_like(x))
            else:  # boolean masks: the zero cotangent of a non-float input
                result.append(np.zeros(x.shape, dtype=jax.dtypes.float0))
        return tuple(result)

    call.defvjp(call_fwd, call_bwd)
    return call(*arrays)
