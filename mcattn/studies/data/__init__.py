"""Real attention inputs: the embedded MiniLM sample and user sample files.

The package ships ``minilm_sample.npz``, captured by :mod:`mcattn.studies.data.capture` from
all-MiniLM-L6-v2 on real text (its provenance is inside the file). :func:`load_sample`
reads it, or a user's own ``.npz`` holding at least ``q``, ``k``, ``v``.
"""

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import SampleFileError

__all__ = ["SAMPLE_PATH", "AttentionSample", "load_sample"]

#: The packaged sample.
SAMPLE_PATH = Path(__file__).with_name("minilm_sample.npz")
_FORMATS = ("mcattn-sample-v1",)


@dataclass(frozen=True)
class AttentionSample:
    """Attention inputs of a model on real text, per layer (float32 arrays).

    Attributes
    ----------
    q, k, v : numpy.ndarray, shape ``[L, B, H, N, d]``
    key_padding_mask : numpy.ndarray of bool, shape ``[B, N]``
        True = a real token.
    scale : float
    x : numpy.ndarray, shape ``[L, B, N, d_model]``, or None
        Input of the value projection.
    w_v : numpy.ndarray, shape ``[L, d_model, H * d]``, or None
        Value weight, ``v = x @ w_v + b_v``.
    b_v : numpy.ndarray, shape ``[L, H * d]``, or None
    provenance : dict
        What was captured, from what, how (empty for files without it).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    key_padding_mask: np.ndarray
    scale: float
    x: np.ndarray | None = None
    w_v: np.ndarray | None = None
    b_v: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def num_layers(self):
        return self.q.shape[0]

    @property
    def num_heads(self):
        return self.q.shape[2]

    @property
    def lengths(self):
        """Real tokens per sequence, ``[B]``."""
        return self.key_padding_mask.sum(axis=1)

    @property
    def has_projection(self):
        """True when ``x``, ``w_v`` (and ``b_v``) are present (needed by mca)."""
        return self.x is not None and self.w_v is not None

    def layer(self, i):
        """The arrays of layer ``i`` as a dict (``q, k, v, x, w_v, b_v, key_padding_mask``)."""
        def pick(a):
            return None if a is None else a[i]

        return {"q": self.q[i], "k": self.k[i], "v": self.v[i], "x": pick(self.x),
                "w_v": pick(self.w_v), "b_v": pick(self.b_v),
                "key_padding_mask": self.key_padding_mask, "scale": self.scale}


def _fail(path, problem):
    raise SampleFileError(f"{path}: {problem}")


def _float_array(path, data, name):
    a = data[name]
    if a.dtype.kind != "f":
        _fail(path, f"'{name}' must be a floating-point array; got dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        _fail(path, f"'{name}' contains NaN or Inf")
    return a


def _projected_values(path, data):
    """``v = x @ w_v + b_v`` split into heads, ``[L, B, H, N, d]`` (float32)."""
    x, w, b, q = (_float_array(path, data, key) for key in ("x", "w_v", "b_v", "q"))
    if x.ndim == 3:
        x, w, b = x[None], w[None], b[None]
    if q.ndim == 4:
        q = q[None]
    if x.ndim != 4 or w.ndim != 3 or b.ndim != 2 or x.shape[-1] != w.shape[1]:
        _fail(path, f"x {x.shape}, w_v {w.shape}, b_v {b.shape} do not form a projection")
    heads = q.shape[2]
    if w.shape[2] % heads:
        _fail(path, f"w_v's width {w.shape[2]} is not a multiple of the {heads} heads of q")
    v = np.einsum("lbnk,lkc->lbnc", x, w) + b[:, None, None, :]
    num_layers, n_batch, n, _ = x.shape
    v = v.reshape(num_layers, n_batch, n, heads, -1).transpose(0, 1, 3, 2, 4)
    if "key_padding_mask" in data and data["key_padding_mask"].shape == (n_batch, n):
        v = v * data["key_padding_mask"][None, :, None, :, None]  # padding stays zero
    return np.ascontiguousarray(v, dtype=np.float32)


def load_sample(path=None):
    """Load a real-attention sample.

    Parameters
    ----------
    path : str or Path, optional
        An ``.npz`` file; default: the packaged MiniLM sample (:data:`SAMPLE_PATH`).
        Required keys: ``q``, ``k``, ``v`` as ``[B, H, N, d]`` (one layer) or
        ``[L, B, H, N, d]`` (``v`` may be left out when ``x``, ``w_v``, ``b_v`` are
        given: it is recomputed as ``x @ w_v + b_v``, as in the packaged sample).
        Optional: ``key_padding_mask`` ``[B, N]`` bool (default all
        True), ``scale`` (default ``1/sqrt(d)``), and ``x`` ``[L, B, N, d_model]``,
        ``w_v`` ``[L, d_model, H*d]``, ``b_v`` ``[L, H*d]`` (all three or none; the
        leading ``L`` may be dropped for one layer).

    Returns
    -------
    AttentionSample

    Raises
    ------
    SampleFileError
        The file is missing, not an ``.npz``, or its arrays do not fit the layout.
    """
    path = SAMPLE_PATH if path is None else Path(path)
    if not path.is_file():
        _fail(path, "no such file" + (" (the packaged sample is missing: reinstall mcattn)"
                                      if path == SAMPLE_PATH else ""))
    if not zipfile.is_zipfile(path):
        _fail(path, "not an .npz archive (expected numpy.savez output with q, k, v)")
    try:
        data = dict(np.load(path, allow_pickle=False))
    except ValueError as exc:  # object arrays need pickle: refused
        _fail(path, f"cannot be read without pickle ({exc}); store plain numeric arrays")
    except (OSError, zipfile.BadZipFile) as exc:
        _fail(path, f"cannot be read as .npz ({exc})")
    fmt = data.get("format")
    if fmt is not None and str(fmt) not in _FORMATS:
        _fail(path, f"unknown format {str(fmt)!r}; this mcattn reads {_FORMATS}")
    if "v" not in data and all(key in data for key in ("q", "x", "w_v", "b_v")):
        data["v"] = _projected_values(path, data)
    missing = [key for key in ("q", "k", "v") if key not in data]
    if missing:
        _fail(path, f"missing array(s) {missing}; a sample needs q, k and v")
    q, k, v = (_float_array(path, data, key) for key in ("q", "k", "v"))
    if q.ndim == 4:
        q, k, v = q[None], k[None], v[None]
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 5:
            _fail(path, f"'{name}' must be [B, H, N, d] or [L, B, H, N, d]; got shape {a.shape}")
    if not (q.shape[:4] == k.shape[:4] == v.shape[:4]) or q.shape[-1] != k.shape[-1]:
        _fail(path, f"q {q.shape}, k {k.shape} and v {v.shape} do not agree (same L, B, H, N; "
                    "q and k the same d)")
    num_layers, n_batch, heads, n, d = q.shape
    if "key_padding_mask" in data:
        kpm = data["key_padding_mask"]
        if kpm.dtype != bool:
            _fail(path, f"'key_padding_mask' must be boolean (True = real token); got {kpm.dtype}")
        if kpm.shape != (n_batch, n):
            _fail(path, f"'key_padding_mask' must have shape {(n_batch, n)}; got {kpm.shape}")
    else:
        kpm = np.ones((n_batch, n), dtype=bool)
    scale = float(data["scale"]) if "scale" in data else 1.0 / np.sqrt(d)
    if not np.isfinite(scale):
        _fail(path, f"'scale' must be finite; got {scale}")
    present = [key for key in ("x", "w_v", "b_v") if key in data]
    x = w_v = b_v = None
    if present:
        if len(present) != 3:
            _fail(path, f"x, w_v and b_v go together; found only {present}")
        x, w_v, b_v = (_float_array(path, data, key) for key in ("x", "w_v", "b_v"))
        if x.ndim == 3:
            x, w_v, b_v = x[None], w_v[None], b_v[None]
        if x.shape[:3] != (num_layers, n_batch, n):
            _fail(path, f"'x' must have shape {(num_layers, n_batch, n)} + (d_model,); got {x.shape}")
        if w_v.shape != (num_layers, x.shape[-1], heads * v.shape[-1]):
            _fail(path, f"'w_v' must have shape {(num_layers, x.shape[-1], heads * v.shape[-1])} "
                        f"([L, d_model, H * d]); got {w_v.shape}")
        if b_v.shape != (num_layers, heads * v.shape[-1]):
            _fail(path, f"'b_v' must have shape {(num_layers, heads * v.shape[-1])}; got {b_v.shape}")
    provenance = {}
    if "provenance" in data:
        try:
            provenance = json.loads(str(data["provenance"]))
        except json.JSONDecodeError:
            _fail(path, "'provenance' is not valid JSON")
    return AttentionSample(q=q, k=k, v=v, key_padding_mask=kpm, scale=scale, x=x, w_v=w_v,
                           b_v=b_v, provenance=provenance)
