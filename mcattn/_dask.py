"""dask arrays at the front door: map a method over chunks of the batch and head dims.

A dask input makes :func:`mcattn.attention` return a lazy dask array whose chunks are
independent calls of the method on chunks of the batch dims (``[B, H]`` typically); the
kernels never see dask. The sequence and feature dims (the last two) of ``q``, ``k``,
``v`` and of the masks are rechunked to one chunk each, since a query row needs every
key. Chunks are computed wherever dask runs them (threads, processes, a
``dask.distributed`` cluster), on NumPy or on CuPy blocks.

Random methods must give the same result whatever the chunking: a method's spec
(:class:`mcattn._plugin.Method`) may give a ``dask_plan`` (see :class:`DaskPlan`) that
fixes its random state once (for example ``seed=None`` resolved to one seed) and keys
its draws by the *global* batch/head indices of each chunk, which the chunk function
receives.
"""

import sys
from dataclasses import dataclass, field

import numpy as np

__all__ = ["any_dask", "is_dask", "attention", "DaskPlan", "ChunkedArray"]

_BATCH_LETTERS = tuple(f"b{i}" for i in range(32))


def is_dask(x):
    """True for a ``dask.array.Array`` (without importing dask when it is not loaded)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


def any_dask(*xs):
    return any(is_dask(x) for x in xs)


@dataclass(frozen=True)
class ChunkedArray:
    """A knob array split along some batch dims with the inputs.

    Attributes
    ----------
    array : array
        NumPy, CuPy or dask.
    dims : tuple of int
        For each leading dim of ``array``, the batch dim it runs along (``x [B, Nk, d_in]``
        of mca: ``(0,)`` with batch ``[B, H]``). Its other dims are passed whole.
    """

    array: object
    dims: tuple


@dataclass(frozen=True)
class DaskPlan:
    """How a method runs on one chunk.

    Attributes
    ----------
    run : callable ``(q, k, v, arrays, coords, **common) -> out``
        ``arrays``: the chunk's part of each :attr:`arrays` entry, by name; ``coords``: one
        int64 array per batch dim, the global indices of the chunk along it.
    arrays : dict of str to ChunkedArray
        Knob arrays that are split with the batch.
    value_dim : int or None
        Width of the output when there is no ``v`` (mca).
    split_dims : tuple of int or None
        Batch dims the method may split (None: all); the others are kept whole.
    """

    run: object
    arrays: dict = field(default_factory=dict)
    value_dim: int | None = None
    split_dims: tuple | None = None


def default_plan(method, knobs, batch_shape):
    """Deterministic methods: the same knobs for every chunk; knob arrays passed whole."""
    for name, value in knobs.items():
        if is_dask(value):
            raise TypeError(f"knob {name!r} of method {method.name!r} cannot be a dask array; "
                            "pass a NumPy/CuPy array")

    def run(q, k, v, arrays, coords, **common):
        return method.attention(q, k, v, **common, **knobs)

    return DaskPlan(run=run)


def _as_dask(x, name):
    import dask.array as da

    if is_dask(x):
        return x
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: with dask inputs, every array must be a dask, NumPy or CuPy array; "
                        f"got {type(x).__name__}")
    return da.from_array(x, chunks=x.shape or ())


def _index(x, target, letters, tag):
    """blockwise indices of ``x`` right-aligned against ``target`` dims named ``letters``.

    A dim of size 1 broadcast against a larger one gets a private index (a single block
    that is passed to every chunk).
    """
    offset = len(target) - x.ndim
    if offset < 0:
        raise ValueError(f"{tag} has more dims ({x.ndim}) than the attention scores ({len(target)})")
    index = []
    for i, size in enumerate(x.shape):
        if size == target[offset + i]:
            index.append(letters[offset + i])
        elif size == 1:
            index.append(f"{tag}_{i}")
        else:
            raise ValueError(f"{tag} of shape {x.shape} does not broadcast to {tuple(target)}")
    return tuple(index)


def attention(method, q, k, v, common, knobs):
    """Lazy ``method.attention`` over dask chunks of the batch dims (see the module docstring)."""
    import dask.array as da

    if common.get("return_info"):
        raise ValueError("return_info=True is not available with dask inputs (each chunk has its own "
                         "info); compute a chunk with NumPy/CuPy arrays to inspect it")
    q, k = _as_dask(q, "q"), _as_dask(k, "k")
    v = None if v is None else _as_dask(v, "v")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is not None and x.ndim < 2:
            raise ValueError(f"{name} must have shape [..., N, d]; got {x.shape}")
    try:
        batch_shape = tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2],
                                                () if v is None else v.shape[:-2]))
    except ValueError:
        raise ValueError(f"the batch dims of q {q.shape[:-2]}, k {k.shape[:-2]} and v "
                         f"{None if v is None else v.shape[:-2]} do not broadcast") from None
    nb = len(batch_shape)
    if nb > len(_BATCH_LETTERS):
        raise ValueError(f"at most {len(_BATCH_LETTERS)} batch dims; got {nb}")
    plan = method.dask_plan(knobs, batch_shape) if method.dask_plan else default_plan(method, knobs,
                                                                                   batch_shape)
    # Batch chunks: those of the first input that is not broadcast along a dim; a dim the
    # method cannot split stays whole.
    chunks = []
    for i, size in enumerate(batch_shape):
        pick = (size,)
        if plan.split_dims is None or i in plan.split_dims:
            for x in (q, k, v):
                if x is None:
                    continue
                j = i - (nb - (x.ndim - 2))
                if j >= 0 and x.shape[j] == size:
                    pick = x.chunks[j]
                    break
        chunks.append(pick)
    letters = _BATCH_LETTERS[:nb]

    def whole_tail(x, ndim_tail):
        """Broadcast ``x`` to the batch, batch chunks as chosen, trailing dims in one chunk."""
        x = da.broadcast_to(x, batch_shape + x.shape[-ndim_tail:])
        return x.rechunk(tuple(chunks) + tuple(-1 for _ in range(ndim_tail)))

    args, names = [], []
    for name, x, tail in (("q", q, ("q", "d")), ("k", k, ("k", "d")), ("v", v, ("k", "e"))):
        if x is None:
            continue
        args += [whole_tail(x, 2), letters + tail]
        names.append(name)
    nq, nk = q.shape[-2], k.shape[-2]
    score_dims = batch_shape + (nq, nk)
    score_letters = letters + ("q", "k")
    for name in ("attn_mask", "key_padding_mask"):
        m = common.get(name)
        if m is None:
            continue
        m = _as_dask(m, name)
        if name == "key_padding_mask":
            if m.ndim != 2 or nb < 1 or m.shape[0] not in (1, batch_shape[0]) or m.shape[1] != nk:
                raise ValueError(f"key_padding_mask must have shape {(batch_shape[:1] + (nk,))} "
                                 f"([B, Nk]); got {m.shape}")
            index = (letters[0] if m.shape[0] == batch_shape[0] else "kpm_0", "k")
        else:
            index = _index(m, score_dims, score_letters, name)
        want = tuple(chunks[letters.index(c)] if c in letters else -1 for c in index)
        args += [m.rechunk(want), index]
        names.append(name)
    for name, ca in plan.arrays.items():
        x = _as_dask(ca.array, name)
        lead = len(ca.dims)
        index = tuple(letters[d] for d in ca.dims) + tuple(f"{name}_{i}" for i in range(x.ndim - lead))
        want = []
        for d, size in zip(ca.dims, x.shape[:lead]):
            if size != batch_shape[d]:
                raise ValueError(f"{name} has {size} entries along batch dim {d}; the inputs have "
                                 f"{batch_shape[d]}")
            want.append(chunks[d])
        args += [x.rechunk(tuple(want) + (-1,) * (x.ndim - lead)), index]
        names.append(("array", name))
    for i in range(nb):
        args += [da.arange(batch_shape[i], chunks=(chunks[i],)), (letters[i],)]
        names.append(("coord", i))

    passed = {key: val for key, val in common.items() if key not in ("attn_mask", "key_padding_mask")}
    run = plan.run

    def chunk(*blocks):
        got = dict(zip(names, blocks))
        arrays = {n[1]: b for n, b in zip(names, blocks) if isinstance(n, tuple) and n[0] == "array"}
        coords = [b for n, b in zip(names, blocks) if isinstance(n, tuple) and n[0] == "coord"]
        return run(got["q"], got["k"], got.get("v"), arrays, coords,
                   attn_mask=got.get("attn_mask"), key_padding_mask=got.get("key_padding_mask"),
                   **passed)

    dv = v.shape[-1] if v is not None else plan.value_dim
    new_axes = {} if v is not None else {"e": int(dv)}
    meta = da.utils.meta_from_array(q._meta, ndim=nb + 2, dtype=q.dtype)
    return da.blockwise(chunk, letters + ("q", "e"), *args, new_axes=new_axes, dtype=q.dtype,
                        meta=meta, concatenate=True, name=f"mcattn-{method.name}")
