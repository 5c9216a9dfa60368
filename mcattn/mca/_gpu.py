"""What the numba.cuda and CuPy value projections share: launch planning, device tables."""

import collections
import threading

from .. import config

__all__ = ["scratch_plan", "device_tables", "clear_table_cache"]


def scratch_plan(total, d_in, optimal):
    """Tasks per launch (the CDF scratch's width) and the first task of each launch.

    Optimal sampling keeps each token's CDF (``d_in`` doubles) in a global scratch
    ``[d_in, chunk]`` of at most ``config.CUDA_SCRATCH_BYTES`` bytes, so a large call runs
    as several launches. Weight sampling needs no scratch and runs as one launch.

    Returns
    -------
    chunk : int
    starts : range
    """
    if total == 0:
        return 1, range(0)
    if not optimal:
        return total, range(0, total, total)
    chunk = max(1, min(total, int(config.CUDA_SCRATCH_BYTES) // (8 * max(int(d_in), 1))))
    return chunk, range(0, total, chunk)


_TABLE_NAMES = ("wh", "threshold", "alias", "p_weight", "row_norms")
_CACHE_SIZE = 4
_cache = collections.OrderedDict()
_lock = threading.Lock()


def device_tables(w, num_heads, tables=None):
    """The weight tables of a CuPy weight, on the current device, without rebuilding them.

    * ``tables`` given (:func:`mcattn.mca.weight_tables`): its device copies are made once
      per device and kept on the object: no host work, no transfer, no sync per call.
    * otherwise the tables of the last few weights are cached per (device, data pointer,
      shape, strides, dtype, heads), with a device copy of the weight: a call compares the
      weight with that copy on the device (one 1-byte read back instead of copying the
      weight to the host and rebuilding and uploading five tables), so a weight changed
      in place is noticed and rebuilt.

    Returns
    -------
    host : WeightTables
    dev : dict of cupy.ndarray
        ``wh``, ``threshold``, ``alias``, ``p_weight``, ``row_norms`` on the current device.
    """
    import cupy

    from .naive import WeightTables

    device = cupy.cuda.runtime.getDevice()
    if tables is not None:
        per_device = tables.__dict__.setdefault("_device_copies", {})
        if device not in per_device:
            per_device[device] = {n: cupy.asarray(getattr(tables, n)) for n in _TABLE_NAMES}
        return tables, per_device[device]
    key = (device, int(w.data.ptr), tuple(w.shape), tuple(w.strides), w.dtype.str, int(num_heads))
    with _lock:
        entry = _cache.get(key)
    if entry is not None and bool(cupy.array_equal(entry[0], w)):
        with _lock:
            _cache.move_to_end(key)
        return entry[1], entry[2]
    host = WeightTables(w.get(), num_heads)
    entry = (w.copy(), host, {n: cupy.asarray(getattr(host, n)) for n in _TABLE_NAMES})
    with _lock:
        _cache[key] = entry
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return entry[1], entry[2]


def clear_table_cache():
    """Forget the cached device tables (they are also dropped, oldest first, past 4 weights)."""
    with _lock:
        _cache.clear()
