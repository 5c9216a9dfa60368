"""Run on the GPU that holds the inputs, not on the current one.

CuPy allocates, compiles and launches on its *current* device; numba.cuda on its own
current context. A call whose inputs live on ``cuda:1`` while device 0 is current would
allocate its outputs (and random projections, scratch, tables) on device 0 and launch
kernels there on device-1 pointers. Two layers make every call run where its data is:

* :meth:`mcattn._dispatch.Kernel.__call__` runs every GPU kernel under
  :func:`device_context` of the CuPy arrays among its arguments (automatic for every
  method's kernels);
* :func:`on_input_device` wraps a public function so that the array code around the
  kernel (validation, random features, the output's export) runs there too.

Device ids come from the native arrays: CuPy ``x.device.id``, torch ``x.device.index``,
JAX ``x.devices()``, TensorFlow's ``.../device:GPU:<id>`` string.
"""

import contextlib
import dataclasses
import functools

from ._array import array_kind, tf_device_id
from .config import cuda_simulator_enabled

__all__ = ["device_id", "find_device", "device_context", "on_input_device", "tf_device_id"]


def device_id(x):
    """The CUDA device id of one array (``None`` for host arrays and non-arrays)."""
    try:
        return _device_id(x)
    except Exception:  # noqa: BLE001 - e.g. a JAX tracer has no device: leave the current one
        return None


def _device_id(x):
    kind = array_kind(x)
    if kind == "cupy":
        return int(x.device.id)
    if kind == "torch":
        return x.device.index if x.device.type == "cuda" else None
    if kind == "jax":
        dev = next(iter(x.devices()))
        return int(dev.id) if dev.platform == "gpu" else None
    if kind == "tensorflow":
        return tf_device_id(getattr(x, "device", ""))
    return None


def find_device(*objects):
    """The device id of the first device array among ``objects`` (one level into
    sequences, dicts, dataclasses and plain objects' attributes), or ``None``."""
    for obj in objects:
        for candidate in _candidates(obj):
            found = device_id(candidate)
            if found is not None:
                return found
    return None


def _candidates(obj):
    yield obj
    if isinstance(obj, (list, tuple)):
        yield from obj
    elif isinstance(obj, dict):
        yield from obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield getattr(obj, f.name, None)
    elif hasattr(obj, "__dict__") and array_kind(obj) == "other":
        yield from vars(obj).values()


@contextlib.contextmanager
def device_context(device, numba=False):
    """Make ``device`` current for CuPy (and, with ``numba=True``, for numba.cuda).

    ``None`` changes nothing. Under the numba.cuda simulator only CuPy is switched.
    """
    if device is None:
        yield
        return
    import cupy


    with contextlib.ExitStack() as stack:
        stack.enter_context(cupy.cuda.Device(device))
        if numba and not cuda_simulator_enabled():
            from numba import cuda

            stack.enter_context(cuda.gpus[device])
        yield


def on_input_device(func):
    """Decorator: run ``func`` on the GPU that holds its first device-array argument."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        device = find_device(*args, *kwargs.values())
        if device is None:
            return func(*args, **kwargs)
        with device_context(device):
            return func(*args, **kwargs)

    return wrapper
