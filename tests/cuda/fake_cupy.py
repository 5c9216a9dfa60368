"""A stand-in for ``cupy`` that runs mcattn's OWN CuPy launch code on the CPU.

Installed as ``sys.modules["cupy"]`` (fixture ``fake_cupy`` in ``conftest.py``), it lets
``mcattn.<method>.attention(..., backend="cupy")`` run unchanged on a machine without a
GPU:

* ``ndarray`` wraps a host NumPy array and the device it "lives" on. It refuses implicit
  conversion to NumPy (as CuPy does: ``np.asarray(x)`` raises, ``x.get()`` copies), so a
  launcher that forgets a transfer fails here too. Methods, operators and the module's
  functions forward to NumPy and wrap what comes back.
* ``RawModule(code=..., options=...)`` compiles the source with the host compiler under
  ``hostshim/cuda_host_shim.h`` (include folders and ``-D`` from the options), exporting
  every ``extern "C" __global__`` kernel with ``MCATTN_SHIM_EXPORT``.
* ``RawKernel.__call__(grid, block, args)`` checks what the driver and the C++ calling
  convention would not forgive: the argument count, each scalar's exact C type against
  the kernel's parameter (an ``np.int32`` for an ``int``, never a Python ``int`` for a
  ``float``), each array's dtype against the pointer's element type, C-contiguity, that
  every array lives on the current device, and CUDA's grid limits (enforced by the shim).
  It records the launch (``LAUNCHES``) and runs the kernel on CPU threads.
* ``cuda.Device`` / ``cuda.runtime`` / streams model several devices (``DEVICE_COUNT``)
  and the current stream, so device-in = device-out can be tested.

Nothing here is specific to a method: a new ``<method>/cupy.py`` launcher runs through
it as soon as its source is in ``mcattn._cupy.KERNEL_SOURCES``.
"""

import contextlib
import ctypes
import hashlib
import re
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np

__version__ = "0.0-fake"
SHIM_DIR = Path(__file__).resolve().parent / "hostshim"
BUILD_DIR = Path(__file__).resolve().parent / "_build"

#: Every launch: dicts with kernel, grid, block, device, stream and the argument types.
LAUNCHES = []
DEVICE_COUNT = 2
_state = threading.local()

_CODE_OF_DTYPE = {np.dtype(t): c for t, c in [
    (np.float32, "f32"), (np.float64, "f64"), (np.int8, "i8"), (np.uint8, "u8"), (np.bool_, "b8"),
    (np.int16, "i16"), (np.uint16, "u16"), (np.int32, "i32"), (np.uint32, "u32"),
    (np.int64, "i64"), (np.uint64, "u64")]}
_CTYPE_OF_CODE = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i8": ctypes.c_int8,
                  "u8": ctypes.c_uint8, "b8": ctypes.c_bool, "i16": ctypes.c_int16,
                  "u16": ctypes.c_uint16, "i32": ctypes.c_int32, "u32": ctypes.c_uint32,
                  "i64": ctypes.c_int64, "u64": ctypes.c_uint64}


class CUDADriverError(RuntimeError):
    """What CuPy raises when the driver refuses a launch."""


def _current():
    return getattr(_state, "device", 0)


def _stream():
    return getattr(_state, "stream", None) or _NULL_STREAM


# --- arrays -------------------------------------------------------------------------------

def _wrap(value, device=None):
    if isinstance(value, np.ndarray):
        return ndarray(value, _current() if device is None else device)
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        return ndarray(np.asarray(value), _current() if device is None else device)
    if isinstance(value, tuple):
        return tuple(_wrap(v, device) for v in value)
    if isinstance(value, list):
        return [_wrap(v, device) for v in value]
    return value


def _unwrap(value):
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


class Device:
    """``cupy.cuda.Device``: a context manager that makes ``id`` the current device."""

    def __init__(self, device=None):
        self.id = _current() if device is None else int(device)
        if not 0 <= self.id < DEVICE_COUNT:
            raise CUDADriverError(f"cudaErrorInvalidDevice: device {self.id} of {DEVICE_COUNT}")
        self._saved = []

    def use(self):
        _state.device = self.id

    def synchronize(self):  # host memory: every "kernel" has finished when it returns
        pass

    def __enter__(self):
        self._saved.append(_current())
        self.use()
        return self

    def __exit__(self, *exc):
        _state.device = self._saved.pop()

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class ndarray:  # noqa: N801 - the name CuPy uses
    """A "device" array: host memory, a device id, CuPy's refusal of implicit transfers."""

    __array_priority__ = 100

    def __init__(self, a, device=0):
        self._a = a
        self._device = device

    device = property(lambda self: Device(self._device))
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.ctypes.data, device_id=self._device))

    def get(self, stream=None):
        return np.array(self._a)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                        "to construct a NumPy array explicitly.")

    def __dlpack_device__(self):
        return (2, self._device)

    def __getattr__(self, name):
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)), self._device)
        return _wrap(attr, self._device)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)], self._device)

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __bool__(self):
        return bool(self._a)

    def __int__(self):
        return int(self._a)

    def __float__(self):
        return float(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return f"fake_cupy.ndarray(device={self._device}, {self._a!r})"

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs)))


def _operator(name):
    def op(self, *args):
        return _wrap(getattr(self._a, name)(*_unwrap(args)), self._device)
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lshift", "rshift"):
    for _form in (f"__{_name}__", f"__r{_name}__", f"__i{_name}__"):
        setattr(ndarray, _form, _operator(_form))
for _form in ("__neg__", "__pos__", "__abs__", "__invert__", "__lt__", "__le__", "__gt__", "__ge__",
              "__eq__", "__ne__"):
    setattr(ndarray, _form, _operator(_form))
ndarray.__hash__ = None


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or a._a.dtype == np.dtype(dtype)):
        return a
    return ndarray(np.array(_unwrap(a), dtype=dtype, order=order or "K"), _current())


def ascontiguousarray(a, dtype=None):
    return ndarray(np.ascontiguousarray(_unwrap(a), dtype=dtype), _current())


def from_dlpack(obj):
    """A producer's ``__dlpack__`` is called with the current stream (as CuPy does)."""
    if isinstance(obj, ndarray):
        return obj
    kind, device = obj.__dlpack_device__()
    if kind != 2:
        raise TypeError(f"fake cupy.from_dlpack: device type {kind} is not CUDA")
    host = obj.__dlpack__(stream=_stream().ptr or 1)  # 1: the legacy default stream
    return ndarray(np.from_dlpack(host), device)


def __getattr__(name):  # every other function: NumPy's, on unwrapped arguments
    if name.startswith("_"):  # never NumPy's __path__ & co: `import cupy._core` must fail
        raise AttributeError(f"fake cupy has no attribute {name!r}")
    attr = getattr(np, name)
    if callable(attr) and not isinstance(attr, type):
        return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
    return attr


# --- streams and the runtime --------------------------------------------------------------

class ExternalStream:
    def __init__(self, ptr, device_id=None):
        self.ptr = int(ptr)
        self._saved = []

    def __enter__(self):
        self._saved.append(getattr(_state, "stream", None))
        _state.stream = self
        return self

    def __exit__(self, *exc):
        _state.stream = self._saved.pop()

    def use(self):
        _state.stream = self
        return self

    def synchronize(self):
        pass


Stream = ExternalStream
_NULL_STREAM = ExternalStream(0)


def _get_current_stream(device_id=None):
    return _stream()


def _device_count():
    return DEVICE_COUNT


cuda = types.SimpleNamespace(
    Device=Device, ExternalStream=ExternalStream, Stream=lambda non_blocking=False: ExternalStream(0x5EED),
    get_current_stream=_get_current_stream,
    runtime=types.SimpleNamespace(getDevice=_current, getDeviceCount=_device_count,
                                  setDevice=lambda i: Device(i).use()),
    CUDADriverError=CUDADriverError,
)


# --- kernels ------------------------------------------------------------------------------

def _build(code, options):
    """A shared library of ``code`` under the shim (cached by content)."""
    includes = [o[2:] for o in options if o.startswith("-I")]
    defines = [o for o in options if o.startswith("-D")]
    # kernels declared in the code itself: outside preprocessor lines (a macro's body
    # names its parameters), after an optional launch-bounds annotation
    plain = re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", "", code, flags=re.M)
    names = set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:\w+\s*\([^)]*\)\s+)?(\w+)\s*\(',
                           plain))
    from mcattn import _cupy  # kernels declared through macros: the package's registry names them

    for relative, kernels in _cupy.KERNEL_SOURCES.items():
        if _cupy.kernel_source(relative) == code:
            names.update(kernels)
    names = sorted(names)
    shim = (SHIM_DIR / "cuda_host_shim.h").read_bytes()
    digest = hashlib.sha256(code.encode() + repr((options, names)).encode() + shim).hexdigest()[:16]
    BUILD_DIR.mkdir(exist_ok=True)
    target = BUILD_DIR / f"rawmodule_{digest}.so"
    if not target.exists():
        source = BUILD_DIR / f"rawmodule_{digest}.cpp"
        body = "".join(f"MCATTN_SHIM_EXPORT({n})\n" for n in names)
        source.write_text(f'#include "cuda_host_shim.h"\n{code}\n{body}')
        compiler = shutil.which("g++") or shutil.which("c++")
        if compiler is None:
            raise RuntimeError("no host C++ compiler (g++) for the fake CuPy")
        cmd = [compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas",
               f"-I{SHIM_DIR}", *(f"-I{i}" for i in includes), *defines, str(source),
               "-o", str(target) + ".tmp"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fake CuPy: host build failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        Path(str(target) + ".tmp").rename(target)
    return ctypes.CDLL(str(target)), names


class RawModule:
    def __init__(self, code=None, options=(), **kwargs):
        self.code, self.options = code, tuple(options)
        self._lib, self._names = _build(code, self.options)

    def get_function(self, name):
        if name not in self._names:
            raise CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        return RawKernel(self, name)


class RawKernel:
    """One kernel of a :class:`RawModule`; calling it checks the arguments and runs it."""

    max_threads_per_block = 1024

    def __init__(self, module, name):
        self.name = name
        self._launch = getattr(module._lib, f"mcattn_shim_launch_{name}")
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                 ctypes.POINTER(ctypes.c_void_p)]
        self._launch.restype = ctypes.c_int
        signature = getattr(module._lib, f"mcattn_shim_signature_{name}")
        signature.restype = ctypes.c_char_p
        self.params = signature().decode().split()
        self._error = module._lib.mcattn_shim_last_error
        self._error.restype = ctypes.c_char_p

    def __call__(self, grid, block, args, *, shared_mem=0):
        grid, block = _dims(grid), _dims(block)
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments ({' '.join(self.params)}); "
                            f"got {len(args)}")
        keep, pointers, kinds = [], [], []
        for i, (param, arg) in enumerate(zip(self.params, args, strict=True)):
            value, kind = self._marshal(i, param, arg)
            keep.append(value)
            pointers.append(ctypes.cast(ctypes.pointer(value), ctypes.c_void_p))
            kinds.append(kind)
        LAUNCHES.append({"kernel": self.name, "grid": grid, "block": block, "device": _current(),
                         "stream": _stream().ptr, "args": kinds})
        argv = (ctypes.c_void_p * max(1, len(pointers)))(*pointers)
        rc = self._launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), argv)
        if rc != 0:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: invalid argument ({self._error().decode()}) "
                                  f"launching {self.name} with grid {grid} block {block}")

    def _marshal(self, i, param, arg):
        where = f"{self.name} argument {i} ({param})"
        if isinstance(arg, ndarray):
            if not param.startswith("*"):
                raise TypeError(f"{where}: got an array for a scalar parameter")
            code = _CODE_OF_DTYPE.get(arg._a.dtype)
            if code != param[1:]:
                raise TypeError(f"{where}: got a {arg._a.dtype} array")
            if not arg._a.flags.c_contiguous:
                raise ValueError(f"{where}: the array is not C-contiguous (the kernel indexes it as such)")
            if arg._device != _current():
                raise CUDADriverError(f"{where}: array on device {arg._device} used in a launch on "
                                      f"device {_current()} (an illegal address on a real GPU)")
            return ctypes.c_void_p(arg._a.ctypes.data), f"*{arg._a.dtype}"
        if isinstance(arg, np.ndarray):
            raise TypeError(f"{where}: a NumPy (host) array cannot be passed to a CUDA kernel")
        if param.startswith("*"):
            raise TypeError(f"{where}: got {type(arg).__name__} for a pointer parameter")
        if isinstance(arg, np.generic):
            code = _CODE_OF_DTYPE.get(arg.dtype)
            label = str(arg.dtype)
        elif isinstance(arg, bool):
            code, label = "b8", "bool"
        elif isinstance(arg, int):
            code, label = "i64", "int"  # CuPy passes a Python int as a 64-bit integer
        elif isinstance(arg, float):
            code, label = "f64", "float"  # ... and a Python float as a double
        else:
            raise TypeError(f"{where}: unsupported argument type {type(arg).__name__}")
        if code != param:
            raise TypeError(f"{where}: got {label} ({code}); the bytes would be misread")
        return _CTYPE_OF_CODE[code](arg.item() if isinstance(arg, np.generic) else arg), label


def _dims(value):
    dims = tuple(int(v) for v in (value if isinstance(value, tuple) else (value,)))
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"grid/block must have 1 to 3 dimensions; got {value}")
    return dims + (1,) * (3 - len(dims))


# --- installing it ------------------------------------------------------------------------

def install():
    """Make this module ``cupy`` for the running process; returns what it replaced."""
    saved = {k: sys.modules[k] for k in list(sys.modules) if k == "cupy" or k.startswith("cupy.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["cupy"] = sys.modules[__name__]
    LAUNCHES.clear()
    _state.device = 0
    _state.stream = None
    return saved


def uninstall(saved):
    sys.modules.pop("cupy", None)
    sys.modules.update(saved)


@contextlib.contextmanager
def cupy_context():
    """Real CuPy on a GPU machine; otherwise this fake, installed as ``cupy`` meanwhile."""
    from mcattn import _cupy, _dispatch

    if _gpu_present():
        import cupy

        yield cupy
        return
    saved = install()
    _dispatch.backend_status.cache_clear()
    _cupy._modules.clear()
    try:
        yield sys.modules["cupy"]
    finally:
        uninstall(saved)
        _dispatch.backend_status.cache_clear()
        _cupy._modules.clear()


def _fixture():
    import pytest

    @pytest.fixture
    def cupy_or_fake():
        """Real CuPy on a GPU machine; otherwise this fake installed as ``cupy``."""
        with cupy_context() as cp:
            yield cp

    return cupy_or_fake


def _gpu_present():  # as tests/helpers.GPU_PRESENT: conftest turns the simulator on without a GPU
    import os

    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0")


#: pytest fixture, made visible to the CUDA tests by tests/cuda/conftest.py.
cupy_or_fake = _fixture()
