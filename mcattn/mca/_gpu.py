"""What the numba.cuda and CuPy value projections share: launch planning, device tables."""

import collections
import threading

import numpy as np

from .. import config

__all__ = ["scratch_plan", "device_tables", "device_wh", "clear_table_cache", "shared_plan",
           "split_shared_plan", "SHARED_PLAN_FIELDS", "shared_grid", "shared_device_args"]


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

    from .cpu import WeightTables

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


def device_wh(dev, dtype):
    """``wh`` ``[H, d_in, dh]`` of :func:`device_tables`' ``dev`` in ``dtype`` (cast once, kept
    beside the float64 tables: the shared-draw kernels accumulate in the input precision)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return dev["wh"]
    key = f"wh_{dtype.name}"
    if key not in dev:
        dev[key] = dev["wh"].astype(dtype)
    return dev[key]


#: The integer arrays of a :class:`~mcattn.mca.shared_cpu.SharedPlan`, in the order of the
#: packed plan (:func:`shared_plan`) and of the kernels' arguments.
SHARED_PLAN_FIELDS = ("group_of", "group_ptr", "row_base", "rows", "width", "weight_ptr")


def shared_plan(budgets, seed, tables, dtype):
    """The shared-draw plan of host budgets, packed for two uploads.

    The plan is built on the host by the compiled planner
    (:func:`mcattn.mca.shared_cpu.make_plan`); its six integer arrays go to the device as
    one int64 buffer (one transfer instead of six), the weights as a second one.

    Parameters
    ----------
    budgets : numpy.ndarray of int, shape ``[B, H, N]``
    seed : int
    tables : WeightTables
    dtype : numpy dtype
        The input precision: the weights ``count / (p e)`` are cast to it (as on the CPU).

    Returns
    -------
    ints : numpy.ndarray of int64, 1-D
        ``group_of`` (flattened, ``B * H * N``), ``group_ptr``, ``row_base``, ``rows``,
        ``width``, ``weight_ptr``, one after the other.
    weights : numpy.ndarray of ``dtype``, 1-D (at least one element: never an empty upload)
    bounds : tuple of (start, stop)
        Where each array of :data:`SHARED_PLAN_FIELDS` lies in ``ints``.
    """
    from .shared_cpu import make_plan

    plan = make_plan(budgets, seed, tables)
    parts = [np.ravel(getattr(plan, name)) for name in SHARED_PLAN_FIELDS]
    stops = np.cumsum([p.size for p in parts])
    bounds = tuple((int(stop - p.size), int(stop)) for p, stop in zip(parts, stops))
    weights = plan.weights.astype(dtype) if plan.weights.size else np.zeros(1, dtype)
    return np.concatenate(parts).astype(np.int64, copy=False), weights, bounds


def split_shared_plan(ints, bounds):
    """The views of an uploaded packed plan (:func:`shared_plan`), in the order of
    :data:`SHARED_PLAN_FIELDS`; works on any 1-D array that slices into views (CuPy, numba
    device arrays)."""
    return tuple(ints[start:stop] for start, stop in bounds)


def shared_device_args(x, w, bias, num_heads, budgets, seed, tables):
    """The device arrays of a shared-draw launch on CuPy inputs, in the kernels' order:
    ``(x, wh, bias, group_of, group_ptr, row_base, rows, width, weight_ptr, weights)``.

    ``x`` C-contiguous, ``wh`` ``[H, d_in, dh]`` and ``bias`` ``[H * dh]`` (zeros without
    one) in ``x``'s dtype, then the plan of the host ``budgets`` (:func:`shared_plan`)
    uploaded in two transfers; the weight tables come from :func:`device_tables`.
    """
    import cupy

    host, dev = device_tables(w, num_heads, tables)
    r_host = budgets.get() if hasattr(budgets, "get") else np.asarray(budgets)
    ints, weights, bounds = shared_plan(r_host, seed, host, x.dtype)
    cols = w.shape[1]
    bias_row = (cupy.zeros(cols, x.dtype) if bias is None
                else cupy.ascontiguousarray(bias, dtype=x.dtype))
    return (cupy.ascontiguousarray(x), device_wh(dev, x.dtype), bias_row,
            *split_shared_plan(cupy.asarray(ints), bounds), cupy.asarray(weights))


#: The most blocks of a shared-draw launch (CUDA's gridDim.x limit); the kernels loop over
#: the elements beyond (grid-stride). The tests lower it to exercise that loop.
SHARED_MAX_BLOCKS = 2**31 - 1


def shared_grid(total, threads):
    """Blocks of a grid-stride launch over ``total`` elements: one per ``threads`` elements,
    at least one, at most :data:`SHARED_MAX_BLOCKS`."""
    return max(1, min(-(-int(total) // int(threads)), int(SHARED_MAX_BLOCKS)))
