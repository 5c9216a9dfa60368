"""Decoding with random feature attention: a constant-size state per batch row.

:class:`RFADecoder` is causal self-attention one token at a time: the state
``(S [m, dv], z [m])`` absorbs each key/value pair and answers the token's query in
``O(m dv)``, whatever the position. :class:`RFACrossAttention` summarises a fixed
key/value set (an encoder's output) once and answers queries in ``O(m dv)`` each.

Both compute with the array namespace of their inputs (NumPy on the host, CuPy on a
GPU), with the same definitions as :mod:`mcattn.rfa.naive`.
"""

import numpy as np

from .._array import import_arrays
from .._validate import check_finite_array
from ..errors import DTypeError, ShapeError
from . import naive
from ._inputs import prepare_rfa

__all__ = ["RFADecoder", "RFACrossAttention"]


class RFADecoder:
    """Causal RFA state, advanced one token (:meth:`step`) or one block (:meth:`extend`) at a time.

    Made by :meth:`RandomFeatures.decoder`. The first call fixes the batch shape, the
    value dim, the dtype and the device; later calls must match.

    Attributes
    ----------
    position : int
        Tokens absorbed so far.
    clamped : int
        Query rows whose denominator was floored so far.
    state : RFAState or None
        ``S [BH, m, dv]``, ``z [BH, m]``, mass and shift (None before the first token).
    """

    def __init__(self, features, *, normalize=None, scale=None, eps=None):
        self.features = features
        self._options = {"normalize": normalize, "scale": scale, "eps": eps}
        # Validate the options now rather than at the first token.
        from ._inputs import _check_eps, check_normalize, row_scales

        row_scales(features, check_normalize(normalize), scale, features.head_dim)
        _check_eps(eps)
        self.reset()

    def reset(self):
        """Forget every token."""
        self.state = None
        self.position = 0
        self._clamped = 0
        self._clamped_device = None  # steps on a GPU count their floored rows there
        self._signature = None

    @property
    def clamped(self):
        """Query rows whose denominator was floored so far (reads GPU steps' count back)."""
        if self._clamped_device is not None:
            self._clamped += int(self._clamped_device.sum())
            self._clamped_device = None
        return self._clamped

    def _prepare(self, q, k, v, gate, check_finite):
        bridge, a = import_arrays({"q": q, "k": k, "v": v, "gate": gate}, float_names=("q", "k", "v"))
        rinp, inp = prepare_rfa(
            self.features, a["q"], a["k"], a["v"], attn_mask=None, key_padding_mask=None,
            gate=a["gate"], is_causal=True, chunk_size=None, check_finite=check_finite, **self._options,
        )
        if inp.nq != inp.nk:
            raise ShapeError(f"q and k must hold the same tokens; got {inp.nq} queries and {inp.nk} keys")
        signature = (tuple(inp.batch_shape), inp.value_dim, inp.dtype, inp.xp.__name__)
        if self._signature is None:
            self._signature = signature
        elif signature != self._signature:
            raise ShapeError(
                "this decoder holds the state of batch shape {}, value dim {}, dtype {} ({}); got "
                "batch shape {}, value dim {}, dtype {} ({}); call reset() to start another "
                "sequence".format(*self._signature, *signature)
            )
        if self.state is None:
            self.state = naive.empty_state(rinp.q.shape[0], rinp.feature_dim, rinp.value_dim,
                                           rinp.dtype, rinp.xp)
        return bridge, rinp, inp

    def step(self, q_t, k_t, v_t, gate_t=None, *, check_finite=True):
        """Absorb one token and return its attention output.

        Parameters
        ----------
        q_t, k_t : array, shape ``[..., d]``
            The token's query and key (no sequence dim).
        v_t : array, shape ``[..., dv]``
        gate_t : array, shape ``[...]``, optional
            Gate in (0, 1): ``S <- g S + (1 - g) phi(k) v^T``. With no gate the state is a
            plain prefix sum.
        check_finite : bool, default True

        Returns
        -------
        array, shape ``[..., dv]``
            ``phi(q_t)^T S_t / (phi(q_t) . z_t)``, the same as row ``t`` of causal
            :func:`mcattn.rfa.attention` over the tokens so far.
        """
        for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
            if getattr(x, "ndim", 1) < 1:
                raise ShapeError(f"{name} must have shape [..., dim]; got a scalar")
        expand = _expand_dims
        gate = None if gate_t is None else expand(gate_t, -1)
        bridge, rinp, _ = self._prepare(expand(q_t, -2), expand(k_t, -2), expand(v_t, -2), gate,
                                        check_finite)
        if rinp.xp is np:  # host arrays: one fused Numba pass over the batch rows
            from . import cpu

            out, low = cpu.step(self.state, rinp)
            self._clamped += int(low.sum())
        else:  # CuPy: the features as array code, the step itself one launch (rfa_step.cu)
            fq, fk, lk = naive.row_features(rinp)
            log_gate = None if rinp.log_gate is None else rinp.log_gate[:, 0]
            out, low = gpu_step(self.state, fq[:, 0], fk[:, 0], lk[:, 0], rinp.v[:, 0], log_gate,
                                rinp.eps)
            # Counted on the device: reading a count back would wait for the GPU every token.
            self._clamped_device = low if self._clamped_device is None else self._clamped_device + low
        self.position += 1
        return bridge.export(out.reshape(tuple(rinp.batch_shape) + (rinp.value_dim,)))

    def extend(self, q, k, v, gate=None, *, check_finite=True):
        """Absorb a block of tokens (for example a prompt) with the chunked form.

        Parameters
        ----------
        q, k : array, shape ``[..., T, d]``
        v : array, shape ``[..., T, dv]``
        gate : array, shape ``[..., T]``, optional
        check_finite : bool, default True

        Returns
        -------
        array, shape ``[..., T, dv]``
            The causal outputs of the block's tokens, continuing from the state.
        """
        bridge, rinp, inp = self._prepare(q, k, v, gate, check_finite)
        out, clamped, self.state = naive.chunked(rinp, state=self.state)
        self.position += inp.nq
        self._clamped += int(clamped.sum())
        return bridge.export(out.reshape(inp.out_shape))


STEP_SOURCE = "rfa/kernels/rfa_step.cu"
_STEP_THREADS = 256  # the kernel's shared scratch (MCATTN_STEP_THREADS)


def gpu_step(state, fq, fk, lk, v, log_gate, eps):
    """:func:`mcattn.rfa.naive.step` on CuPy arrays in one RawKernel launch (``rfa_step.cu``).

    ``fq``, ``fk`` ``[BH, m]``; ``lk`` ``[BH]``; ``v`` ``[BH, dv]``; ``log_gate`` ``[BH]``
    or None. The state's arrays are updated in place (they must be C-contiguous, in the
    inputs' dtype). Returns the output ``[BH, dv]`` and the floored flags ``[BH]`` (int32).
    """
    import cupy

    from .._cupy import raw_module

    bh, m = fq.shape
    dv = v.shape[-1]
    dt = fq.dtype
    suffix = "f32" if dt == np.float32 else "f64"
    kernel = raw_module(STEP_SOURCE).get_function(f"mcattn_rfa_step_{suffix}")
    out = cupy.empty((bh, dv), dtype=dt)
    low = cupy.zeros(bh, dtype=np.int32)
    if bh == 0:
        return out, low
    threads = 32
    while threads < min(_STEP_THREADS, max(m, dv)):  # a power of two for the block sums
        threads *= 2
    for name in ("S", "z", "mass", "shift"):  # updated in place by the kernel
        a = getattr(state, name)
        if a.dtype != dt or not a.flags.c_contiguous:
            setattr(state, name, cupy.ascontiguousarray(a, dtype=dt))
    gate = log_gate if log_gate is not None else lk  # any array: the kernel does not read it
    args = [cupy.ascontiguousarray(a, dtype=dt) for a in (fq, fk, lk, v, gate)]
    kernel((bh,), (threads,), (*args, state.S, state.z, state.mass, state.shift, out, low,
                                np.int32(m), np.int32(dv), np.int32(log_gate is not None),
                                dt.type(eps)))
    return out, low


def _expand_dims(x, axis):
    """``x`` with a new axis, for any array library (through its own method or NumPy)."""
    if hasattr(x, "unsqueeze"):  # torch
        return x.unsqueeze(axis)
    if type(x).__module__.startswith("tensorflow"):
        import tensorflow as tf

        return tf.expand_dims(x, axis)
    if hasattr(x, "__array_namespace__") or hasattr(x, "reshape"):
        shape = tuple(x.shape)
        axis = axis % (len(shape) + 1)
        return x.reshape(shape[:axis] + (1,) + shape[axis:])
    return np.expand_dims(np.asarray(x), axis)


class RFACrossAttention:
    """Attention from a fixed key/value set, summarised once into ``(S, z)``.

    Made by :meth:`RandomFeatures.cross`; call it with queries ``[..., Nq, d]`` whose
    leading dims broadcast to the keys' batch shape.

    Attributes
    ----------
    state : RFAState
        ``S [BH, m, dv]``, ``z [BH, m]``, mass, shift.
    batch_shape : tuple
    """

    def __init__(self, features, k, v, *, key_padding_mask=None, normalize=None, scale=None,
                 eps=None, check_finite=True):
        _, a = import_arrays({"k": k, "v": v, "key_padding_mask": key_padding_mask},
                             float_names=("k", "v"))
        rinp, inp = prepare_rfa(
            features, a["k"], a["k"], a["v"], attn_mask=None, key_padding_mask=a["key_padding_mask"],
            gate=None, is_causal=False, normalize=normalize, scale=scale, chunk_size=None, eps=eps,
            check_finite=check_finite,
        )
        self.features = features
        self._rinp = rinp
        self.batch_shape = tuple(inp.batch_shape)
        fk, lk = naive.side_features(rinp.k, rinp.k_scale, rinp)
        if rinp.key_bias is not None:
            lk = lk + rinp.key_bias
        xp = rinp.xp
        self.state = naive.accumulate(
            naive.empty_state(rinp.k.shape[0], rinp.feature_dim, rinp.value_dim, rinp.dtype, xp),
            fk, lk, rinp.v, xp,
        )

    def __call__(self, q, *, check_finite=True, return_clamped=False):
        """Attention outputs of queries ``q`` ``[..., Nq, d]`` -> ``[..., Nq, dv]``.

        With ``return_clamped=True`` also the number of floored rows.
        """
        bridge, a = import_arrays({"q": q}, float_names=("q",))
        q = a["q"]
        rinp = self._rinp
        xp = rinp.xp
        if q.ndim < 2 or q.shape[-1] != self.features.head_dim:
            raise ShapeError(f"q must have shape [..., Nq, {self.features.head_dim}]; got {q.shape}")
        if q.dtype != rinp.dtype:
            raise DTypeError(f"q must have the keys' dtype {rinp.dtype}; got {q.dtype}")
        if type(q) is not type(rinp.k):
            raise ValueError("q must live where the keys live (host or the same GPU)")
        nq = q.shape[-2]
        try:
            q = xp.broadcast_to(q, self.batch_shape + (nq, q.shape[-1]))
        except ValueError:
            raise ShapeError(
                f"the batch dims of q {q.shape[:-2]} do not broadcast to the keys' {self.batch_shape}"
            ) from None
        if check_finite:
            check_finite_array("q", q)
        q = xp.ascontiguousarray(q.reshape(-1, nq, q.shape[-1]))
        fq, _ = naive.side_features(q, rinp.q_scale, rinp)
        out, low = naive.readout(fq, self.state, rinp.eps, xp)
        result = bridge.export(out.reshape(self.batch_shape + (nq, rinp.value_dim)))
        return (result, int(low.sum())) if return_clamped else result
