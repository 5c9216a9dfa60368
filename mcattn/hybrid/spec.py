"""Hybrid attention as the library runs it (:class:`mcattn._plugin.Method`).

Inside a transformers model, ``use_method(model, "hybrid", target_keep=...)`` (or
``target_mass=``) fits per-head relative thresholds on each layer's own attention with
:func:`mcattn.latte.calibrate` (the kept set is LATTE's), and the pooled remainder covers
the dropped keys. ``spread="mass"`` shares a ``target_keep`` budget among a layer's heads
by attention mass instead of evenly.
"""

import numpy as np

from .._plugin import Check, Method, ModelHooks, random_qkv
from ..latte import calibrate
from . import attention

__all__ = ["METHOD"]


def _calibrate(layer, options):
    """Per-head relative thresholds keeping ``target_keep`` of the keys (or ``target_mass``)."""
    targets = {name: float(options[name]) for name in ("target_keep", "target_mass")
               if options.get(name) is not None}
    theta = calibrate(layer["q"], layer["k"], key_padding_mask=layer["key_padding_mask"],
                      scale=layer["scale"], spread=options.get("spread") or "even", **targets)
    return {"threshold": np.asarray(theta, dtype=np.float32), "mode": "relative"}


def _check(put, backend, dtype):
    q, k, v = random_qkv(np.random.default_rng(6), (2, 3, 29, 16), dtype, put)
    return attention(q, k, v, threshold=7, block=4, is_causal=True, backend=backend)


def _bench(put, backend, n):
    q, k, v = random_qkv(np.random.default_rng(6), (1, 8, n, 64), np.float32, put)
    return lambda: attention(q, k, v, threshold=max(1, n // 8), backend=backend)


METHOD = Method(
    name="hybrid",
    description="hybrid sparse + pooled: exact scores on the keys LATTE's 4-bit estimate keeps, "
                "each key block's dropped keys pooled (estimated mass, mean value)",
    attention=attention,
    knobs_for=lambda rng, heads, nk, dv: dict(threshold=max(1, nk // 4)),
    grad="mcattn.hybrid.grad",
    model=ModelHooks(supplies=("threshold", "mode"), consumes=("target_keep", "target_mass", "spread"),
                     calibrate=_calibrate,
                     needs_calibration=lambda options: options.get("target_keep") is not None
                     or options.get("target_mass") is not None),
    checks={"hybrid": Check(_check, {"float32": 1e-5, "float64": 1e-12}, _bench)},
)
