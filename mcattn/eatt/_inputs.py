"""Input checks of E-Att beyond those of every method: binary codes, packed words, the
alignment, a positive scale, the projection weights of :func:`mcattn.eatt.layer`."""

import numpy as np

from .._array import ArrayBridge, _framework_to_native, array_kind, is_cupy
from .._validate import namespace_of
from ..errors import DTypeError, ShapeError

__all__ = ["ALIGNMENTS", "import_any", "check_binary", "check_packed", "positive_scale",
           "check_alignment", "check_matrix", "check_bias"]

ALIGNMENTS = ("l1", "hamming")


def import_any(name, x):
    """One array argument of any dtype -> (bridge, native NumPy/CuPy array)."""
    kind = array_kind(x)
    if kind in ("numpy", "cupy"):
        native = x
    elif kind == "other":
        native = np.asarray(x)
    else:
        native = _framework_to_native(x, kind, name)
    device = "cuda" if is_cupy(native) else "cpu"
    return ArrayBridge(kind=kind, device=device, input_dtype=str(native.dtype)), native


def check_binary(name, b):
    """``b`` holds only 0/1 (or booleans); returns it as bool."""
    if b.dtype == bool:
        return b
    if b.dtype.kind not in "iuf":
        raise DTypeError(f"{name} must hold 0/1 values (bool, integer or float); got dtype {b.dtype}")
    xp = namespace_of(b)
    if b.size and not bool(xp.all((b == 0) | (b == 1))):
        bad = b[(b != 0) & (b != 1)].ravel()[:3]
        raise ValueError(f"{name} must hold only 0 and 1 (binarize first); found values such as "
                         f"{[float(v) for v in bad]}")
    return b != 0


def check_packed(name, words, d):
    if words.dtype != np.uint64:
        raise DTypeError(f"{name} must be packed uint64 words (see pack_bits); got dtype {words.dtype}")
    expected = (int(d) + 63) // 64
    if words.ndim < 1 or words.shape[-1] != expected:
        raise ShapeError(f"{name} must have {expected} uint64 words in its last dim for {d} codes "
                         f"(ceil({d}/64)); got shape {words.shape}")
    pad = expected * 64 - int(d)
    if pad and words.size:
        xp = namespace_of(words)
        spill = words[..., -1] >> np.uint64(64 - pad)
        if bool(xp.any(spill != 0)):
            raise ValueError(f"{name} has bits set beyond code {d} (the padding of its last word "
                             "must be 0)")


def positive_scale(s):
    if not s > 0:
        raise ValueError(f"scale must be positive for a distance alignment; got {s}")
    return s


def check_alignment(alignment):
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}; got {alignment!r}")


def check_matrix(name, w, d_in, dtype):
    if w is None:
        return
    if w.ndim != 2 or w.shape[0] != d_in:
        raise ShapeError(f"{name} must have shape [{d_in}, width] (d_model rows); got {w.shape}")
    if w.dtype != dtype:
        raise DTypeError(f"{name} must have the dtype of x ({dtype}); got {w.dtype}")


def check_bias(name, b, width, dtype):
    if b is None:
        return
    if b.shape != (width,):
        raise ShapeError(f"{name} must have shape ({width},); got {b.shape}")
    if b.dtype != dtype:
        raise DTypeError(f"{name} must have the dtype of x ({dtype}); got {b.dtype}")
