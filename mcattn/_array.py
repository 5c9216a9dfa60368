"""Array boundary: what came in, how to compute on it, and how to give it back.

Every public function calls :func:`import_arrays` once on entry and
:meth:`ArrayBridge.export` once on exit. In between, the code sees only ``numpy.ndarray``
(host) or ``cupy.ndarray`` (CUDA device) in float32 or float64.

* NumPy and CuPy arrays pass through untouched.
* PyTorch, JAX and TensorFlow tensors cross by DLPack, zero-copy where the framework
  allows: ``np.from_dlpack`` / ``cupy.from_dlpack`` on the way in and the framework's
  ``from_dlpack`` on the way out, so a torch CPU tensor comes back as a torch CPU tensor
  and a CUDA tensor stays on its device.
* Nested Python lists (and other array-likes) are imported with ``numpy.asarray``: they
  are NumPy arrays from here on.
* The floating-point arguments of a call (``q``, ``k``, ``v`` and the data arrays a
  method takes beside them, such as mca's ``x``, ``w_v``) must share one dtype, checked
  here on the dtypes as given, before any widening: float16 with float32 is as much an
  error as float32 with float64 (:class:`~mcattn.errors.DTypeError`).
* float16 and bfloat16 are widened to float32 for the computation and the result is cast
  back to the input dtype (bfloat16 in the framework itself; a NumPy bfloat16 array, from
  ``ml_dtypes``, comes back as one).
* A torch tensor that requires grad is refused while grad mode is on: the array API is
  forward only (the autograd adapters in ``mcattn.frameworks`` wire the backward kernels),
  and detaching silently would break training code without a word. Under
  ``torch.no_grad()`` / ``torch.inference_mode()`` it is detached: nothing is recorded.
"""

import re
from dataclasses import dataclass

import array_api_compat as aac
import numpy as np

from .errors import DTypeError, GradientNotSupportedError

_TF_GPU = re.compile(r"(?:device:)?GPU:(\d+)", re.IGNORECASE)


def tf_device_id(device):
    """The GPU id in a TensorFlow device string (``None`` for a CPU device)."""
    m = _TF_GPU.search(device or "")
    return int(m.group(1)) if m else None

__all__ = ["ArrayBridge", "import_arrays", "check_same_dtype", "array_kind", "is_cupy", "host_copy"]

_WIDENED = ("float16", "bfloat16")
_TF_ALIGNMENT = 64


def _aligned_copy(a, alignment):
    """A C-contiguous copy of ``a`` whose data starts on an ``alignment``-byte boundary."""
    raw = np.empty(a.nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def array_kind(x):
    """``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"``, ``"tensorflow"`` or ``"other"``."""
    if isinstance(x, np.ndarray) or isinstance(x, np.generic):
        return "numpy"
    if aac.is_cupy_array(x):
        return "cupy"
    if aac.is_torch_array(x):
        return "torch"
    if aac.is_jax_array(x):
        return "jax"
    if type(x).__module__.startswith("tensorflow"):
        return "tensorflow"
    return "other"


def is_cupy(x):
    """True for a ``cupy.ndarray`` (without importing CuPy when it is absent)."""
    return aac.is_cupy_array(x)


def host_copy(x):
    """A NumPy copy of a native array (``cupy`` arrays are copied to the host)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def _dtype_name(x):
    dt = getattr(x, "dtype", None)
    name = getattr(dt, "name", None) or str(dt)
    return name.replace("torch.", "")


@dataclass(frozen=True)
class ArrayBridge:
    """How the caller's arrays were imported, so that the result goes back the same way.

    Attributes
    ----------
    kind : str
        Array library of the inputs (see :func:`array_kind`).
    device : str
        ``"cpu"`` or ``"cuda"`` (where the native arrays live).
    input_dtype : str
        dtype name of the first float input (``"float16"``, ``"bfloat16"``, ...).
    """

    kind: str
    device: str
    input_dtype: str

    def export(self, out):
        """Return a native result array in the caller's array type and dtype."""
        if out is None:
            return None
        if self.kind in ("numpy", "other", "cupy"):
            if self.input_dtype in _WIDENED:  # a bfloat16 NumPy input means ml_dtypes is loaded
                out = out.astype(self.input_dtype)
            return out
        if self.kind == "torch":
            import torch

            t = torch.from_dlpack(out)
            if self.input_dtype in _WIDENED:
                t = t.to(getattr(torch, self.input_dtype))
            return t
        if self.kind == "jax":
            import jax.numpy as jnp

            a = jnp.from_dlpack(out)
            if self.input_dtype in _WIDENED:
                a = a.astype(getattr(jnp, self.input_dtype))
            return a
        if self.kind == "tensorflow":
            import tensorflow as tf

            if isinstance(out, np.ndarray) and out.ctypes.data % _TF_ALIGNMENT:
                out = _aligned_copy(out, _TF_ALIGNMENT)  # TensorFlow aborts on unaligned buffers
            if is_cupy(out):  # TensorFlow's DLPack import takes no stream: finish ours first
                import cupy

                cupy.cuda.get_current_stream().synchronize()
            t = tf.experimental.dlpack.from_dlpack(out.__dlpack__())
            if self.input_dtype in _WIDENED:
                t = tf.cast(t, getattr(tf, self.input_dtype))
            return t
        raise AssertionError(f"unknown array kind {self.kind}")  # pragma: no cover


class _CapsuleHolder:
    """Gives an old-style DLPack capsule the ``__dlpack__`` protocol NumPy/CuPy expect."""

    def __init__(self, capsule, device):
        self._capsule = capsule
        self._device = device

    def __dlpack__(self, **kwargs):
        return self._capsule

    def __dlpack_device__(self):
        return self._device


def _framework_to_native(x, kind, name):
    """Widen bfloat16/float16 inside the framework, then cross by DLPack."""
    if kind == "torch":
        if x.requires_grad:
            import torch

            if torch.is_grad_enabled():
                raise GradientNotSupportedError(
                    f"{name} is a torch tensor that requires grad while grad mode is on; "
                    "mcattn.attention is forward only. To train, call "
                    "mcattn.frameworks.torch.attention (the method's backward kernels); for "
                    "inference, call under torch.no_grad() or torch.inference_mode()."
                )
            x = x.detach()  # no_grad / inference_mode: forward only, nothing to record
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on torch device {x.device}; only cpu and cuda are supported")
        if x.dtype.is_floating_point and x.dtype.itemsize < 4:
            import torch

            x = x.to(torch.float32)
        if x.device.type == "cuda":
            import cupy

            # CuPy hands its current stream to torch's __dlpack__, which orders torch's
            # pending work on x before it; the kernels then read x on CuPy's stream.
            native = cupy.from_dlpack(x)
            _torch_keep_for_cupy_stream(x, cupy)
            return native
        return np.from_dlpack(x)
    if kind == "jax":
        if _dtype_name(x) in _WIDENED:
            x = x.astype("float32")
        platform = next(iter(x.devices())).platform
        if platform == "gpu":
            import cupy

            return cupy.from_dlpack(x)
        return np.from_dlpack(x)
    if kind == "tensorflow":
        import tensorflow as tf

        if _dtype_name(x) in _WIDENED:
            x = tf.cast(x, tf.float32)
        on_gpu = "GPU" in (x.device or "")
        if hasattr(x, "__dlpack__"):
            holder = x
        else:  # older TensorFlow: a capsule only, on the GPU its device string names

            device = (2, tf_device_id(x.device) or 0) if on_gpu else (1, 0)
            holder = _CapsuleHolder(tf.experimental.dlpack.to_dlpack(x), device)
        if on_gpu:
            import cupy

            return cupy.from_dlpack(holder)
        return np.from_dlpack(holder)
    raise AssertionError(kind)  # pragma: no cover


def _torch_keep_for_cupy_stream(tensor, cupy):
    """Tell torch's caching allocator that ``tensor`` is used on CuPy's current stream.

    Otherwise, when the caller drops the tensor right after the call, torch may hand its
    memory to new work on torch's stream while mcattn's kernels still read it on CuPy's
    (torch's ``record_stream`` contract). Nothing to do when both streams are the same.
    """
    import torch

    ptr = cupy.cuda.get_current_stream().ptr
    stream = (torch.cuda.ExternalStream(ptr, device=tensor.device) if ptr
              else torch.cuda.default_stream(tensor.device))
    if stream.cuda_stream != torch.cuda.current_stream(tensor.device).cuda_stream:
        tensor.record_stream(stream)


def import_arrays(arrays, *, float_names=None, same_dtype=None):
    """Bring the caller's arrays to native NumPy/CuPy arrays.

    Parameters
    ----------
    arrays : dict[str, array or None]
        Inputs by argument name (names are used in error messages). ``None`` entries are
        passed through; nested lists become NumPy arrays.
    float_names : sequence of str, optional
        Arguments that must be floating point; their dtype decides the compute dtype
        (float16/bfloat16 are widened to float32). Default: every argument.
    same_dtype : sequence of str, optional
        Arguments that must share one dtype, as given (float16 with float32 is refused
        like float32 with float64). Default: ``float_names``.

    Returns
    -------
    bridge : ArrayBridge
    native : dict[str, numpy.ndarray or cupy.ndarray or None]

    Raises
    ------
    TypeError
        Arrays of different libraries are mixed (for example a torch ``q`` with a JAX ``k``).
    DTypeError
        A float argument holds integers, booleans or complex numbers, or the arguments of
        ``same_dtype`` differ in dtype.
    GradientNotSupportedError
        A torch tensor requires grad while torch's grad mode is on.
    """
    float_names = list(arrays) if float_names is None else list(float_names)
    same_dtype = float_names if same_dtype is None else list(same_dtype)
    arrays = {n: (np.asarray(x) if x is not None and array_kind(x) == "other" else x)
              for n, x in arrays.items()}
    kinds = {}
    for name, x in arrays.items():
        if x is None:
            continue
        kinds[name] = array_kind(x)
    # The float arguments decide the array library; masks may be plain NumPy.
    main = [kinds[n] for n in float_names if n in kinds]
    if not main:
        raise ValueError("no array arguments were given")
    lead = main[0]
    for name in float_names:
        if name in kinds and kinds[name] != lead:
            raise TypeError(
                f"all array arguments must come from one library; {float_names[0]} is a "
                f"{lead} array but {name} is a {kinds[name]} array"
            )
    dtypes = {name: _dtype_name(arrays[name]) for name in float_names if name in kinds}
    for name, dname in dtypes.items():
        if not _is_float_name(dname):
            raise DTypeError(
                f"{name} must be a floating-point array (float16, bfloat16, float32 or "
                f"float64); got dtype {dname}"
            )
    check_same_dtype({n: dtypes[n] for n in same_dtype if n in dtypes})
    native = {}
    for name, x in arrays.items():
        if x is None:
            native[name] = None
            continue
        kind = kinds[name]
        a = x if kind in ("numpy", "cupy") else _framework_to_native(x, kind, name)
        if a.dtype.name in _WIDENED:
            a = a.astype(np.float32)
        native[name] = a
    devices = {"cuda" if is_cupy(a) else "cpu" for a in native.values() if a is not None}
    if len(devices) > 1:
        on = {n: ("cuda" if is_cupy(a) else "cpu") for n, a in native.items() if a is not None}
        raise ValueError(
            f"arguments live on different devices ({on}); mcattn never moves data between "
            "host and device on its own — move them first"
        )
    gpus = {n: int(a.device.id) for n, a in native.items() if a is not None and is_cupy(a)}
    if len(set(gpus.values())) > 1:
        raise ValueError(f"arguments live on different GPUs ({gpus}); mcattn never moves data "
                         "between devices on its own — move them first")
    bridge = ArrayBridge(kind=lead, device=devices.pop(), input_dtype=next(iter(dtypes.values())))
    return bridge, native


def check_same_dtype(dtypes):
    """Raise :class:`DTypeError` unless every argument of ``dtypes`` (name -> dtype name)
    has the same dtype; the message names each argument and its dtype."""
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise DTypeError(f"{', '.join(dtypes)} must share one dtype; got {listing}")


def _is_float_name(name):
    return name in ("float16", "bfloat16", "float32", "float64")
