"""Checked, canonical inputs of a LATTE call: quantised q/k and one threshold per batch row."""

import math
from dataclasses import dataclass

import numpy as np

from .._validate import prepare_attention
from .naive import MODES, quantize_rows

__all__ = ["LatteInputs", "prepare_latte", "head_count", "check_thresholds"]

EXACT_SCORES = ("int8", "float")


@dataclass(frozen=True)
class LatteInputs:
    """What every LATTE kernel takes.

    Attributes
    ----------
    inp : mcattn._validate.AttentionInputs
        ``q [BH, Nq, d]``, ``k [BH, Nk, d]``, ``v [BH, Nk, dv]`` and the mask.
    q8, k8 : array of int8, ``[BH, Nq, d]`` and ``[BH, Nk, d]``
    s_q, s_k : array of float32, ``[BH, Nq]`` and ``[BH, Nk]``
        Per-row quantisation scales.
    theta : numpy.ndarray of float64, ``[BH]``
        Threshold of each batch row's head (an integer count for ``topk``).
    thresholds : numpy.ndarray, ``[H]``
        The thresholds per head as given (broadcast).
    mode : str
    exact_scores : str
    want_mass : bool
        Also compute the realised dropped attention mass per row.
    """

    inp: object
    q8: object
    k8: object
    s_q: object
    s_k: object
    theta: np.ndarray
    thresholds: np.ndarray
    mode: str
    exact_scores: str
    want_mass: bool

    @property
    def num_heads(self):
        return self.thresholds.shape[0]


def head_count(batch_shape):
    """Heads = the last batch dim (1 without batch dims)."""
    return int(batch_shape[-1]) if batch_shape else 1


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")


def check_thresholds(threshold, mode, heads):
    """``threshold`` (a number or ``[H]``) checked for ``mode``, as a float64 ``[H]`` array."""
    check_mode(mode)
    raw = np.asarray(threshold if not hasattr(threshold, "get") else threshold.get())
    if raw.dtype.kind not in "iuf":  # None, a string, a bool: no silent NaN or 1.0
        raise TypeError(f"threshold must be a number or an array of one number per head [H]; "
                        f"got {threshold!r}")
    t = raw.astype(np.float64)  # checked as given: a bad number is refused even with no heads
    if t.ndim != 0 and (t.ndim != 1 or t.shape[0] != heads):
        from ..errors import ShapeError

        raise ShapeError(f"threshold must be a number or have shape [H] = ({heads},) (one per head); "
                         f"got shape {t.shape}")
    if np.isnan(t).any():
        raise ValueError(f"threshold must not be NaN; got {t}")
    if mode in ("relative", "safe") and (t < 0).any():
        raise ValueError(f"threshold of mode {mode!r} is a distance below the row maximum in logit "
                         f"units and must be >= 0 (inf keeps every key); got {t}")
    if mode == "topk":
        if not np.isfinite(t).all() or (t != np.round(t)).any() or (t < 1).any():
            raise ValueError(f"threshold of mode 'topk' is the number of keys to keep: whole numbers "
                             f">= 1; got {t}")
    return np.full(heads, float(t)) if t.ndim == 0 else t


def _cpu_quantize_rows():
    from .cpu import quantize_rows as fast  # (imports Numba: only for host arrays)

    return fast


def prepare_latte(q, k, v, *, threshold, mode, attn_mask, key_padding_mask, is_causal, scale,
                  exact_scores, check_finite, want_mass):
    """Validate a LATTE call and quantise ``q`` and ``k``; returns :class:`LatteInputs`."""
    check_mode(mode)
    if exact_scores not in EXACT_SCORES:
        raise ValueError(f"exact_scores must be 'int8' or 'float'; got {exact_scores!r}")
    inp = prepare_attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                            is_causal=is_causal, scale=scale, check_finite=check_finite)
    if not inp.scale > 0 or not math.isfinite(inp.scale):
        raise ValueError(f"scale must be > 0 for LATTE (thresholds are in logit units); got {inp.scale}")
    heads = head_count(inp.batch_shape)
    thresholds = check_thresholds(threshold, mode, heads)
    bh = inp.q.shape[0]
    theta = np.ascontiguousarray(np.tile(thresholds, bh // heads if heads else 0))
    xp = inp.xp
    # Host arrays: the same quantisation on the CPU threads (identical int8 values and scales).
    quantize = _cpu_quantize_rows() if xp is np else quantize_rows
    q8, s_q = quantize(inp.q)
    k8, s_k = quantize(inp.k)
    return LatteInputs(inp=inp, q8=q8, k8=k8, s_q=xp.ascontiguousarray(s_q[..., 0]),
                       s_k=xp.ascontiguousarray(s_k[..., 0]), theta=theta,
                       thresholds=thresholds, mode=mode, exact_scores=exact_scores,
                       want_mass=bool(want_mass))
