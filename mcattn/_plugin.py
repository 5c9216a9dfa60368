"""What a method is to the library: one runtime spec, :class:`Method`.

Each method folder defines ``METHOD`` in ``mcattn/<method>/spec.py`` and
:data:`mcattn.registry.METHODS` names it in one line. Everything that runs methods
reads the spec and names no method: the front door (:func:`mcattn.attention`, the knobs
from the signature of ``Method.attention``), dask (``dask_plan``), the autograd adapters
(``grad``), :func:`mcattn.frameworks.torch.use_method` (``model``: how a transformers
model supplies knobs, calibration on that model's own batch), ``mcattn selftest``
(``checks``), the CUDA source list (``kernel_sources``) and the tests that cover every
method (``knobs_for``). How a method is *evaluated* (sweeps, bounds in a table, energy,
fine-tuning) is the evaluation wing's business (:mod:`mcattn.studies`), not the spec's.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Method", "ModelHooks", "Check", "random_qkv", "tensor_core_check"]


@dataclass(frozen=True)
class Check:
    """One row of ``mcattn selftest``: the method on small fixed inputs, on a backend.

    Attributes
    ----------
    run : callable ``(put, backend, dtype) -> array``
        Builds its inputs with ``put`` (a NumPy array -> where the backend wants it) and
        runs the method; the float64 NumPy backend's result is the reference.
    tolerance : dict
        ``{"float32": ..., "float64": ...}``: largest ``max|out - ref| / max|ref|``
        accepted, ``ref`` being ``run`` with the ``numpy`` backend in float64.
    bench : callable ``(put, backend, n) -> thunk``, optional
        For ``mcattn selftest --bench``: a call of the method on ``[1, 8, n, 64]``
        float32 inputs.
    bench_max_n : int, optional
        Largest ``n`` benched.
    """

    run: Callable
    tolerance: dict
    bench: Callable | None = None
    bench_max_n: int | None = None


@dataclass(frozen=True, eq=False)
class ModelHooks:
    """How a method takes its knobs from a transformers model it is swapped into.

    Attributes
    ----------
    supplies : tuple of str
        Knobs the hooks fill in (the user does not give them to ``use_method``).
    consumes : tuple of str
        Options of ``use_method`` that the hooks turn into knobs (``target_mass``).
    needs_value_input : bool
        ``use_method`` keeps the input of each attention module's ``value`` Linear
        (``module.value._mcattn_input``), e.g. for mca's sampled projection.
    resolve : callable ``(module, q, knobs, calls) -> knobs``, optional
        The knobs of one call from the attention ``module`` (``calls``: a counter, one
        value per call, for per-call seeds).
    calibrate : callable ``(layer, options) -> knobs``, optional
        Knobs fitted on one layer's exact attention inputs ``layer`` (a dict of float64
        NumPy arrays ``q``, ``k``, ``v`` ``[B, H, N, d]``, ``key_padding_mask`` ``[B, N]``
        or None, and ``scale``) for the model-level ``options`` (e.g. latte's per-head
        thresholds for ``target_mass``). ``use_method`` runs it on the model's own
        calibration batch (or on the first batch each layer sees) and caches the result
        per layer (and per length with ``per_length``).
    needs_calibration : callable ``(options) -> bool``, optional
        Whether ``options`` call for calibration (default: whenever ``calibrate`` is set).
    per_length : bool
        Calibrated knobs hold for one sequence length only (eigen's bases).
    exact_when : callable ``(nq, nk, options) -> bool``, optional
        Calls for which the method is exact attention anyway (eigen with at least as many
        columns as keys): ``use_method`` runs exact attention there.
    """

    supplies: tuple = ()
    consumes: tuple = ()
    needs_value_input: bool = False
    resolve: Callable | None = None
    calibrate: Callable | None = None
    needs_calibration: Callable | None = None
    per_length: bool = False
    exact_when: Callable | None = None

    def wants_calibration(self, options):
        if self.calibrate is None:
            return False
        return True if self.needs_calibration is None else bool(self.needs_calibration(options))


@dataclass(frozen=True, eq=False)
class Method:
    """A method as the library runs it.

    Attributes
    ----------
    name : str
        The value of ``method=``.
    description : str
        One line for :func:`mcattn.methods` and ``mcattn methods``.
    attention : callable
        ``(q, k, v, *, attn_mask, key_padding_mask, is_causal, scale, backend,
        check_finite, return_info, **knobs)``: what :func:`mcattn.attention` calls. Its
        other keyword-only parameters are the method's knobs.
    knobs_for : callable ``(rng, heads, nk, dv) -> dict``
        Sample knobs for inputs with ``heads`` heads, ``nk`` keys and values of width
        ``dv`` (NumPy arrays where the knob is an array): what the tests that cover every
        registered method, and the default self-test, run the method with.
    grad : str, optional
        Module with the training functions (``forward``, ``backward``, ``TRAINABLE``;
        :mod:`mcattn.frameworks._grad`). None: no backward.
    dask_plan : callable ``(knobs, batch_shape) -> mcattn._dask.DaskPlan``, optional
        How the method runs on dask chunks (default: the same knobs for every chunk).
    model : ModelHooks, optional
        What the method needs from a transformers model beyond q, k, v.
    checks : dict, optional
        ``mcattn selftest`` rows, name -> :class:`Check` (default: one row, the method
        on :meth:`example` inputs).
    kernel_sources : dict
        CUDA C sources of the method, path relative to the package -> the ``extern "C"``
        kernels each defines (compiled by the tests for every architecture).
    """

    name: str
    description: str
    attention: Callable
    knobs_for: Callable = lambda rng, heads, nk, dv: {}
    grad: str | None = None
    dask_plan: Callable | None = None
    model: ModelHooks | None = None
    checks: dict = field(default_factory=dict)
    kernel_sources: dict = field(default_factory=dict)

    def example(self, rng, dtype=np.float32, shape=(2, 2, 17, 8)):
        """Keyword arguments of ``mcattn.attention(method=self.name, **kwargs)`` on small
        random NumPy inputs of ``dtype`` (q, k, v of ``shape`` and the sample knobs)."""
        q, k, v = random_qkv(rng, shape, dtype)
        knobs = self.knobs_for(rng, shape[-3], shape[-2], shape[-1])
        return dict(q=q, k=k, v=v, **knobs)

    def selftest_checks(self):
        """``checks``, or one default row that runs the method on :meth:`example` inputs."""
        if self.checks:
            return dict(self.checks)
        return {self.name: Check(self._default_check, {"float32": 1e-5, "float64": 1e-12})}

    def _default_check(self, put, backend, dtype):
        import mcattn

        kwargs = self.example(np.random.default_rng(0), np.float64)
        kwargs = {n: put(a.astype(dtype)) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                  else put(a) if isinstance(a, np.ndarray) else a for n, a in kwargs.items()}
        if kwargs.get("v") is not None and not _needs_values(self):
            kwargs["v"] = None
        return mcattn.attention(method=self.name, backend=backend, **kwargs)


def _needs_values(method):
    import inspect

    v = inspect.signature(method.attention).parameters.get("v")
    return v is not None and v.default is inspect.Parameter.empty


def random_qkv(rng, shape, dtype, put=lambda a: a):
    """Standard normal q, k, v of ``shape`` in ``dtype``, each passed through ``put``."""
    return tuple(put(rng.standard_normal(shape).astype(dtype)) for _ in range(3))


def tensor_core_check(knob, run, bench, tolerance=1.5e-3, precision="float16"):
    """A self-test row for a tensor-core path switched on by ``mcattn.config.<knob>``.

    ``run(put, backend, dtype)`` and ``bench(put, backend, n) -> thunk`` are the method's
    own calls; the row runs them with the knob set to ``precision`` (restored after each
    call). Backends other than cupy ignore the knob, so their rows check the method's
    usual kernels; the bench times the cupy backend only. Tolerances: ``tolerance``
    (float32: the 16-bit rounding of the probabilities and v, about 3 float16 unit
    roundoffs; the shim measures 2.6e-4 to 3.0e-4 on latte-mma and eatt-mma) and 1e-12
    (float64, where the path does not apply).
    """
    from . import config

    def switched(fn):
        saved = getattr(config, knob)
        setattr(config, knob, precision)
        try:
            return fn()
        finally:
            setattr(config, knob, saved)

    def check(put, backend, dtype):
        return switched(lambda: run(put, backend, dtype))

    def timed(put, backend, n):
        if backend != "cupy":
            raise ValueError(f"the {knob} path is a cupy kernel; {backend} is benched by its own row")
        thunk = bench(put, backend, n)
        return lambda: switched(thunk)

    return Check(check, {"float32": tolerance, "float64": 1e-12}, timed)
