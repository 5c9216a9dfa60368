"""Random projections and feature maps of random feature attention.

:class:`RandomFeatures` holds the random matrix ``W`` (one per head when ``num_heads`` is
given) and names the feature map. The matrices are drawn once, on the host, from
mcattn's Philox generator (:mod:`mcattn.random`) and copied to the device as they are,
so every backend uses identical projections.

Stream layout of the draws (``seed`` is the Philox key):

* stream ``2 h`` (head ``h``, 0 when the projections are shared): the Gaussian entries.
  Entry ``(r, c)`` of the ``[D, d]`` matrix is draw ``r * d + c``; with
  ``orthogonal=True`` the same draws are read as ``ceil(D / d)`` square blocks of
  ``d x d`` which are orthogonalised (QR, signs fixed so that ``R`` has a positive
  diagonal, which makes ``Q`` Haar distributed).
* stream ``2 h + 1``: the row norms of orthogonal features. Row ``r`` is rescaled to the
  norm of the Gaussian vector made of draws ``r * d ... r * d + d - 1``, so that each
  row has the chi distribution of a Gaussian row (Yu et al., 2016).
"""

import threading

import numpy as np

from .. import random as mcrandom
from .._validate import check_bool, positive_real
from ..errors import ShapeError
from .naive import KINDS, feature_map

__all__ = ["RandomFeatures", "KINDS", "draw_projections"]

# KINDS (from naive): ``"positive"`` (FAVOR+, Choromanski et al. 2021), ``"sincos"``
# (random Fourier features, the paper's RFA-Gaussian), ``"arccos"`` (RFA-arccos).


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def draw_projections(seed, num_heads, num_features, head_dim, orthogonal):
    """The random matrices ``W``, float64, ``[num_heads, num_features, head_dim]``.

    Rows are standard Gaussian (``orthogonal=False``) or orthogonal within blocks of
    ``head_dim`` rows with chi-distributed norms (``orthogonal=True``); see the module
    docstring for the stream layout.
    """
    d, n_rows = head_dim, num_features
    omega = np.empty((num_heads, n_rows, d))
    for h in range(num_heads):
        if not orthogonal:
            omega[h] = mcrandom.normal(seed, 2 * h, np.arange(n_rows * d)).reshape(n_rows, d)
            continue
        n_blocks = -(-n_rows // d)
        padded = mcrandom.normal(seed, 2 * h, np.arange(n_blocks * d * d)).reshape(n_blocks, d, d)
        rows = []
        for block in padded:
            q, r = np.linalg.qr(block)
            q = q * np.where(np.diag(r) < 0, -1.0, 1.0)  # unique, Haar-distributed Q
            rows.append(q.T)
        ortho = np.concatenate(rows, axis=0)[:n_rows]
        norms = np.linalg.norm(
            mcrandom.normal(seed, 2 * h + 1, np.arange(n_rows * d)).reshape(n_rows, d), axis=1
        )
        omega[h] = ortho * norms[:, None]
    return omega


class RandomFeatures:
    """Random projections and a feature map ``phi`` with ``E[phi(x) . phi(y)] = kernel(x, y)``.

    Parameters
    ----------
    head_dim : int
        ``d``, the length of the vectors mapped.
    num_features : int
        ``D``, the number of random projections (rows of ``W``). The feature vector has
        ``m = 2 D`` entries for ``"sincos"`` and ``m = D`` otherwise
        (:attr:`feature_dim`).
    kind : {"positive", "sincos", "arccos"}, default "positive"
        ``"positive"``: ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(D)``, an always-positive
        unbiased estimator of ``exp(x . y)`` (FAVOR+). ``"sincos"``:
        ``phi(x) = [sin(W x), cos(W x)] / sqrt(D)``, estimating the Gaussian kernel
        ``exp(-|x - y|^2 / 2)`` (the paper's RFA-Gaussian); its estimates can be negative.
        ``"arccos"``: ``phi(x) = max(0, W x) / sqrt(D)``, estimating the first-order
        arc-cosine kernel (RFA-arccos) — a different attention, not an estimate of softmax.
        In each formula ``x`` stands for ``x / sigma``.
    orthogonal : bool, default True
        Orthogonal random features (blocks of orthogonal rows with chi-distributed
        norms): same expectation, lower variance.
    sigma : float, default 1.0
        Kernel bandwidth: ``W`` acts on ``x / sigma``. Only ``normalize="unit"`` attention
        depends on it (its temperature is ``1 / sigma**2``); the drop-in estimator of
        softmax attention does not.
    num_heads : int, optional
        Draw an independent ``W`` per head. Attention inputs must then have batch shape
        ``[..., num_heads]`` (the dim before ``N``). Default: one ``W`` for every head.
    seed : int, numpy.random.Generator or None, default None
        Philox key of the draws (:func:`mcattn.random.resolve_seed`); ``None`` draws a
        fresh seed, recorded in :attr:`seed` (the rule of every random method in mcattn:
        pass an int to reproduce).

    Attributes
    ----------
    projections : numpy.ndarray, ``[H, D, d]`` float64 (read-only)
        ``W`` per head (``H = 1`` when shared), as drawn (before the division by sigma).
    seed : int
        The 64-bit seed used.

    Notes
    -----
    Peng et al., "Random Feature Attention", ICLR 2021 (sincos, arccos, gating);
    Choromanski et al., "Rethinking Attention with Performers", ICLR 2021 (positive and
    orthogonal features); Rahimi & Recht, "Random Features for Large-Scale Kernel
    Machines", NIPS 2007.

    Examples
    --------
    >>> import numpy as np
    >>> from mcattn.rfa import RandomFeatures
    >>> feats = RandomFeatures(64, 128, kind="positive", num_heads=12, seed=1)
    >>> feats.feature_dim, feats.projections.shape
    (128, (12, 128, 64))
    """

    def __init__(self, head_dim, num_features, *, kind="positive", orthogonal=True, sigma=1.0,
                 num_heads=None, seed=None):
        self.head_dim = _positive_int("head_dim", head_dim)
        self.num_features = _positive_int("num_features", num_features)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        self.kind = kind
        self.orthogonal = check_bool("orthogonal", orthogonal)
        self.sigma = positive_real("sigma", sigma)
        self.num_heads = None if num_heads is None else _positive_int("num_heads", num_heads)
        self.seed = mcrandom.resolve_seed(seed)
        omega = draw_projections(self.seed, self.num_heads or 1, self.num_features,
                                 self.head_dim, self.orthogonal)
        omega.setflags(write=False)
        self.projections = omega
        self._cache = {}
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable (dask ships features to workers): no lock, no cache
        state = dict(self.__dict__)
        del state["_lock"], state["_cache"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = {}
        self._lock = threading.Lock()

    def select_heads(self, heads):
        """The features of some heads only (for a batch split across heads, e.g. by dask).

        Parameters
        ----------
        heads : array_like of int
            Global head indices, in the order of the heads of the inputs.

        Returns
        -------
        RandomFeatures
            Same kind, seed and projections for those heads (``num_heads=len(heads)``);
            ``self`` when the projections are shared by every head.
        """
        if self.num_heads is None:
            return self
        heads = np.asarray(heads, dtype=np.int64).reshape(-1)
        if heads.size == 0 or heads.min() < 0 or heads.max() >= self.num_heads:
            raise ValueError(f"heads must lie in [0, {self.num_heads}); got {heads.tolist()}")
        part = object.__new__(RandomFeatures)
        part.__setstate__(dict(self.__getstate__(), num_heads=int(heads.size)))
        omega = np.ascontiguousarray(self.projections[heads])
        omega.setflags(write=False)
        part.projections = omega
        return part

    @property
    def feature_dim(self):
        """``m``, the length of a feature vector (``2 D`` for sincos, else ``D``)."""
        return 2 * self.num_features if self.kind == "sincos" else self.num_features

    def __repr__(self):
        heads = "" if self.num_heads is None else f", num_heads={self.num_heads}"
        return (f"RandomFeatures(head_dim={self.head_dim}, num_features={self.num_features}, "
                f"kind={self.kind!r}, orthogonal={self.orthogonal}, sigma={self.sigma}{heads}, "
                f"seed={self.seed})")

    def omega_for(self, dtype, xp):
        """``W`` in ``dtype`` as an array of namespace ``xp`` (cached per dtype and device)."""
        device = None
        if xp is not np:
            device = xp.cuda.runtime.getDevice()
        key = (np.dtype(dtype).name, xp.__name__, device)
        with self._lock:
            arr = self._cache.get(key)
            if arr is None:
                arr = xp.asarray(np.ascontiguousarray(self.projections, dtype=dtype))
                self._cache[key] = arr
        return arr

    def check_heads(self, batch_shape, what="q"):
        """Raise :class:`ShapeError` unless ``batch_shape`` ends with ``num_heads``."""
        if self.num_heads is None:
            return
        if not batch_shape or batch_shape[-1] != self.num_heads:
            raise ShapeError(
                f"the features were drawn for num_heads={self.num_heads}, so {what} must have "
                f"batch shape [..., {self.num_heads}] (heads just before the sequence dim); "
                f"got batch shape {tuple(batch_shape)}"
            )

    def map(self, x):
        """The feature vectors ``phi(x)`` (float64 NumPy, for analysis and tests).

        Parameters
        ----------
        x : array_like, shape ``[..., d]`` (shared projections) or ``[..., H, n, d]``
            (per-head projections, ``H = num_heads``).

        Returns
        -------
        numpy.ndarray, shape ``[..., m]``
            With ``phi(x) . phi(y)`` an unbiased estimate of
            :func:`mcattn.rfa.bounds.kernel` ``(kind, x / sigma, y / sigma)``.
        """
        x = np.asarray(x, dtype=np.float64) / self.sigma
        if x.shape[-1] != self.head_dim:
            raise ShapeError(f"x must have last dim head_dim={self.head_dim}; got shape {x.shape}")
        if self.num_heads is None:
            u = x @ self.projections[0].T
        else:
            if x.ndim < 3 or x.shape[-3] != self.num_heads:
                raise ShapeError(
                    f"with num_heads={self.num_heads}, x must have shape [..., {self.num_heads}, "
                    f"n, {self.head_dim}]; got {x.shape}"
                )
            u = x @ np.swapaxes(self.projections, -1, -2)
        phi, log_weight = feature_map(u, (x * x).sum(-1), self.kind, np)
        if self.kind != "positive":  # sincos: the weight is the drop-in key factor, not part of phi
            return phi
        return phi * np.exp(log_weight)[..., None]

    def decoder(self, *, normalize=None, scale=None, eps=None):
        """A causal decoding state: :meth:`RFADecoder.step` costs ``O(m dv)`` per token.

        Parameters
        ----------
        normalize : {None, "unit"}
            As in :func:`mcattn.rfa.attention`.
        scale : float, optional
            Score scale of the drop-in form; default ``1/sqrt(d)``.
        eps : float, optional
            Denominator floor (default ``mcattn.config.RFA_EPS``).

        Returns
        -------
        mcattn.rfa.RFADecoder
        """
        from .decoding import RFADecoder

        return RFADecoder(self, normalize=normalize, scale=scale, eps=eps)

    def cross(self, k, v, *, key_padding_mask=None, normalize=None, scale=None, eps=None,
              check_finite=True):
        """Cross-attention from a fixed key/value set, summarised once.

        The state ``S = sum_j phi(k_j) v_j^T``, ``z = sum_j phi(k_j)`` is computed here in
        ``O(Nk m dv)``; each query then costs ``O(m dv)`` whatever ``Nk`` is.

        Parameters
        ----------
        k : array, shape ``[..., Nk, d]``
        v : array, shape ``[..., Nk, dv]``
        key_padding_mask : array of bool, optional
            ``[B, Nk]``, True = a real key.
        normalize, scale, eps
            As in :func:`mcattn.rfa.attention`.
        check_finite : bool, default True

        Returns
        -------
        mcattn.rfa.RFACrossAttention
            Call it with queries ``[..., Nq, d]``.
        """
        from .decoding import RFACrossAttention

        return RFACrossAttention(self, k, v, key_padding_mask=key_padding_mask,
                                 normalize=normalize, scale=scale, eps=eps,
                                 check_finite=check_finite)
