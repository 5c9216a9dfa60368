"""Backends, what they can run, and how a call picks one.

Four backends exist: ``numpy`` (the readable reference, any host array), ``numba``
(parallel CPU kernels), ``cuda`` (numba.cuda kernels) and ``cupy`` (CuPy RawKernels).
Whether a backend can run at all on this machine is :func:`backend_status`; whether it
can run a given call is a method's :class:`Kernel` answering
:meth:`Kernel.not_supported_reasons`. With ``backend=None`` a call takes the first
capable kernel in the priority list of its device; a named backend that cannot run the
inputs raises :class:`~mcattn.errors.BackendError` listing its reasons, and so does a
call that nothing can run (listing every backend's reasons).
"""

import functools
import importlib
from dataclasses import dataclass, field

from .config import cuda_simulator_enabled
from .errors import BackendError

__all__ = [
    "BACKEND_NAMES",
    "BackendStatus",
    "backend_status",
    "backends",
    "Problem",
    "Kernel",
    "select_kernel",
    "cuda_simulator_enabled",
]

BACKEND_NAMES = ("numpy", "numba", "cuda", "cupy")
_PRIORITY = {"cpu": ("numba", "numpy"), "cuda": ("cupy", "cuda")}
_DEVICE = {"numpy": "cpu", "numba": "cpu", "cuda": "cuda", "cupy": "cuda"}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this machine.

    Attributes
    ----------
    name : str
    device : str
        ``"cpu"`` or ``"cuda"``: where the arrays it takes live.
    available : bool
    reason : str
        Why it is unavailable, or what it runs on when it is available.
    """

    name: str
    device: str
    available: bool
    reason: str

    def __str__(self):
        state = "available" if self.available else "unavailable"
        return f"{self.name:6s} [{self.device}] {state}: {self.reason}"


@functools.cache
def backend_status(name):
    """The :class:`BackendStatus` of one backend (cached; probing CUDA is slow)."""
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; the backends are {', '.join(BACKEND_NAMES)}")
    device = _DEVICE[name]
    if name == "numpy":
        import numpy

        return BackendStatus(name, device, True, f"NumPy {numpy.__version__}")
    if name == "numba":
        try:
            import numba
        except ImportError as exc:  # pragma: no cover - numba is a dependency
            return BackendStatus(name, device, False, f"Numba cannot be imported ({exc})")
        return BackendStatus(name, device, True, f"Numba {numba.__version__} CPU kernels")
    if name == "cuda":
        try:
            from numba import cuda
        except ImportError as exc:
            return BackendStatus(
                name, device, False, f"numba.cuda cannot be imported ({exc}); pip install mcattn[cuda]"
            )
        if cuda_simulator_enabled():
            return BackendStatus(
                name,
                device,
                True,
                "numba.cuda simulator (NUMBA_ENABLE_CUDASIM=1): kernels run on the CPU, one "
                "Python thread per CUDA thread; host arrays are accepted",
            )
        try:
            ok = cuda.is_available()
        except Exception as exc:  # noqa: BLE001 - any driver failure means unavailable
            return BackendStatus(name, device, False, f"numba.cuda failed to probe the GPU ({exc})")
        if not ok:
            return BackendStatus(name, device, False, "numba.cuda finds no CUDA GPU on this machine")
        return BackendStatus(name, device, True, f"numba.cuda on {cuda.get_current_device().name}")
    # cupy
    try:
        import cupy
    except ImportError as exc:
        return BackendStatus(name, device, False, f"CuPy is not installed ({exc}); pip install mcattn[cuda]")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        return BackendStatus(name, device, False, f"CuPy finds no usable CUDA GPU ({_short(exc)})")
    if count < 1:
        return BackendStatus(name, device, False, "CuPy finds no CUDA GPU on this machine")
    return BackendStatus(name, device, True, f"CuPy {cupy.__version__} on {count} GPU(s)")


def _short(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def backends():
    """Every backend, whether it can run here and, if not, why.

    Returns
    -------
    list of BackendStatus
        In the order ``numpy``, ``numba``, ``cuda``, ``cupy``.

    Examples
    --------
    >>> import mcattn
    >>> for status in mcattn.backends():  # doctest: +SKIP
    ...     print(status)
    numpy  [cpu] available: NumPy 2.4.6
    ...
    """
    return [backend_status(name) for name in BACKEND_NAMES]


@dataclass(frozen=True)
class Problem:
    """What a call asks for, in the terms kernels declare their limits in.

    Attributes
    ----------
    device : str
        ``"cpu"`` (NumPy arrays) or ``"cuda"`` (CuPy arrays).
    dtype : str
        Compute dtype, ``"float32"`` or ``"float64"``.
    head_dim, value_dim : int
    features : frozenset of str
        Options in use, e.g. ``{"mask", "causal"}``.
    sizes : tuple of (str, int)
        Other sizes a kernel may limit, e.g. ``(("d_in", 384),)``.
    """

    device: str
    dtype: str
    head_dim: int
    value_dim: int
    features: frozenset = field(default_factory=frozenset)
    sizes: tuple = ()


@dataclass(frozen=True)
class Kernel:
    """One method on one backend, imported only when it runs.

    Parameters
    ----------
    backend : str
        One of :data:`BACKEND_NAMES`.
    module, function : str
        Where the implementation lives (imported lazily, so CuPy and numba.cuda are
        never imported unless used).
    dtypes : tuple of str
        Compute dtypes it supports.
    max_head_dim : int or None
        Largest ``head_dim`` and ``value_dim`` it supports.
    features : frozenset of str
        Options it supports (a call using another option is refused with a reason).
    max_sizes : tuple of (str, int)
        Limits on the problem's other ``sizes``.
    """

    backend: str
    module: str
    function: str
    dtypes: tuple = ("float32", "float64")
    max_head_dim: int | None = None
    features: frozenset = frozenset()
    max_sizes: tuple = ()

    def devices(self):
        """Devices whose arrays this kernel accepts."""
        if self.backend == "cuda" and cuda_simulator_enabled():
            return ("cuda", "cpu")  # the simulator runs on host arrays
        return (_DEVICE[self.backend],)

    def not_supported_reasons(self, problem):
        """Why this kernel cannot run ``problem`` (an empty list when it can)."""
        reasons = []
        status = backend_status(self.backend)
        if not status.available:
            reasons.append(status.reason)
        if problem.device not in self.devices():
            reasons.append(
                f"takes {'/'.join(self.devices())} arrays but the inputs are {problem.device} arrays"
            )
        if problem.dtype not in self.dtypes:
            reasons.append(f"computes in {'/'.join(self.dtypes)}, not {problem.dtype}")
        if self.max_head_dim is not None:
            widest = max(problem.head_dim, problem.value_dim)
            if widest > self.max_head_dim:
                reasons.append(f"head dims up to {self.max_head_dim}; got {widest}")
        limits = dict(self.max_sizes)
        for name, size in problem.sizes:
            if name in limits and size > limits[name]:
                reasons.append(f"{name} up to {limits[name]}; got {size}")
        missing = sorted(problem.features - self.features)
        if missing:
            reasons.append(f"does not support {', '.join(missing)}")
        return reasons

    def __call__(self, *args, **kwargs):
        impl = getattr(importlib.import_module(self.module), self.function)
        if _DEVICE[self.backend] == "cuda":  # run on the GPU that holds the inputs
            from ._device import device_context, find_device

            with device_context(find_device(*args, *kwargs.values()), numba=self.backend == "cuda"):
                return impl(*args, **kwargs)
        return impl(*args, **kwargs)


def select_kernel(method, kernels, problem, backend=None):
    """Pick the kernel that runs ``problem``.

    Parameters
    ----------
    method : str
        Method name, for error messages.
    kernels : sequence of Kernel
        The method's kernels (at most one per backend).
    problem : Problem
    backend : str or None
        ``None`` picks the first capable kernel in the priority list of the inputs'
        device (``numba``, ``numpy`` for host arrays; ``cupy``, ``cuda`` for device
        arrays); a name forces that backend.

    Returns
    -------
    Kernel

    Raises
    ------
    BackendError
        The named backend (or every backend, when none was named) cannot run the call;
        the message lists the reasons.
    """
    by_name = {k.backend: k for k in kernels}
    if backend is not None:
        if backend not in BACKEND_NAMES:
            raise BackendError(
                f"unknown backend {backend!r}; the backends are {', '.join(BACKEND_NAMES)}"
            )
        if backend not in by_name:
            have = ", ".join(k.backend for k in kernels)
            raise BackendError(f"{method} has no {backend} kernel; it has {have}")
        reasons = by_name[backend].not_supported_reasons(problem)
        if reasons:
            raise BackendError(f"backend {backend!r} cannot run this {method} call:", {backend: reasons})
        return by_name[backend]
    tried = {}
    for name in _PRIORITY[problem.device]:
        if name not in by_name:
            continue
        reasons = by_name[name].not_supported_reasons(problem)
        if not reasons:
            return by_name[name]
        tried[name] = reasons
    raise BackendError(f"no backend can run this {method} call:", tried)
