"""One counter-based random number generator for every backend.

mcattn draws its random numbers from **Philox-4x32-10** (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011), a counter-based generator: the output is a pure
function of a 64-bit key and a 128-bit counter, so a thread needs no state and the
numbers a kernel uses do not depend on how the work is split between threads. The same
function is implemented

* here in NumPy (vectorised over arrays of counters),
* for Numba CPU kernels (:func:`philox4x32_cpu`, ``@njit``),
* for numba.cuda kernels (:func:`cuda_device_functions`), from the same Python source,
* in CUDA C (``mcattn/kernels/philox.cuh``) for the CuPy RawKernels,

and the tests check that the four give identical words, and match the Random123
known-answer vectors.

How mcattn lays out a draw
--------------------------
``key = (seed mod 2**32, seed // 2**32)`` and
``counter = (index mod 2**32, index // 2**32, stream mod 2**32, stream // 2**32)``:
a *stream* is a 64-bit number that a method derives from what the draw belongs to (for
example ``(batch * heads + head) * tokens + token``) and *index* numbers the draws
within that stream. One call yields four 32-bit words.

* :func:`uniform` turns words 0 and 1 into a float64 in ``[0, 1)``: the top 53 bits of
  the 64-bit word ``w0 * 2**32 + w1`` times ``2**-53`` — integer work followed by an exact
  scaling, so every backend produces the same bits.
* :func:`sample_bits` / :func:`sample_uniform` are what the sampling kernels use: draw
  ``t`` of a stream is the 64-bit word of pair ``t % 2`` (words 0, 1 or words 2, 3) of
  call ``t // 2`` (one Philox call serves two samples), or its top 53 bits as a float.
* :func:`normal` uses Box-Muller on words (0, 1) and (2, 3); it is only used on the host
  (random projection matrices are drawn once, in NumPy, and copied to the device).
"""

import numbers

import numpy as np

__all__ = [
    "PHILOX_ROUNDS",
    "philox4x32",
    "philox_words",
    "uniform",
    "sample_bits",
    "sample_uniform",
    "normal",
    "seed_to_key",
    "resolve_seed",
    "philox4x32_cpu",  # noqa: F822 - built on first use (__getattr__)
    "uniform_cpu",  # noqa: F822 - built on first use (__getattr__)
    "sample_bits_cpu",  # noqa: F822 - built on first use (__getattr__)
    "sample_uniform_cpu",  # noqa: F822 - built on first use (__getattr__)
    "cuda_device_functions",
]

PHILOX_ROUNDS = 10

# Philox-4x32 constants (Salmon et al. 2011): the two round multipliers and the Weyl
# sequence increments of the key (golden ratio and sqrt(3) - 1, as 32-bit fractions).
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_SHIFT11 = np.uint64(11)
_ONE = np.uint64(1)
_TWO_M53 = 1.0 / 9007199254740992.0  # 2**-53


def _philox_rounds(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on uint64 values that hold 32-bit words.

    Written once and used three ways: on NumPy uint64 arrays, compiled by Numba for the
    CPU, and compiled by numba.cuda as a device function. Every operand is uint64 so
    that Numba never promotes to float; results stay below 2**32.
    """
    for _ in range(10):
        prod0 = _M0 * c0
        prod1 = _M1 * c2
        hi0 = prod0 >> _SHIFT32
        lo0 = prod0 & _MASK32
        hi1 = prod1 >> _SHIFT32
        lo1 = prod1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _bits64(w0, w1):
    """Two 32-bit words -> one 64-bit word ``w0 * 2**32 + w1``."""
    return (w0 << _SHIFT32) | w1


def _uniform53(w0, w1):
    """Two 32-bit words -> float64 in [0, 1): the top 53 bits of ``w0 * 2**32 + w1``."""
    return (((w0 << _SHIFT32) | w1) >> _SHIFT11) * _TWO_M53


def _make_draw_functions(rounds, u53, bits64):
    """``(uniform, sample_bits, sample_uniform)`` built on Philox and word converters.

    Called with the plain Python functions (NumPy arrays), with their ``@njit`` versions
    and with their numba.cuda device versions, so the counter layout is written once.
    """

    def uniform_from_index(k0, k1, stream, index):
        """One float64 uniform in [0, 1) for (key, stream, index)."""
        w0, w1, _, _ = rounds(
            index & _MASK32, index >> _SHIFT32, stream & _MASK32, stream >> _SHIFT32, k0, k1
        )
        return u53(w0, w1)

    def sample_bits(k0, k1, stream, t):
        """Draw ``t`` of a stream as 64 bits: word pair ``t % 2`` of Philox call ``t // 2``."""
        index = t >> _ONE
        w0, w1, w2, w3 = rounds(
            index & _MASK32, index >> _SHIFT32, stream & _MASK32, stream >> _SHIFT32, k0, k1
        )
        odd = t & _ONE
        return bits64(w0 * (_ONE - odd) + w2 * odd, w1 * (_ONE - odd) + w3 * odd)

    def sample_uniform(k0, k1, stream, t):
        """Draw ``t`` of a stream as a float64 in [0, 1): its top 53 bits."""
        return (sample_bits(k0, k1, stream, t) >> _SHIFT11) * _TWO_M53

    return uniform_from_index, sample_bits, sample_uniform


_uniform_from_index, _sample_bits, _sample_uniform = _make_draw_functions(
    _philox_rounds, _uniform53, _bits64
)


def seed_to_key(seed):
    """Split a seed in ``[0, 2**64)`` into the two 32-bit key words ``(k0, k1)``."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64); got {seed}")
    return np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)


def resolve_seed(seed):
    """Turn the ``seed`` argument of a sampling method into a 64-bit integer.

    Parameters
    ----------
    seed : None, int or numpy.random.Generator
        ``None`` draws a fresh seed from the operating system's entropy (the result is
        then not reproducible unless the caller records the seed, which ``info``
        reports); an int is used as is; a Generator gives one 64-bit draw.

    Returns
    -------
    int
        The seed in ``[0, 2**64)``.
    """
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**64, dtype=np.uint64))
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64); got {seed}")
        return int(seed)
    raise TypeError(
        f"seed must be None, an int or a numpy.random.Generator; got {type(seed).__name__}"
    )


def _as_u64(x, name):
    a = np.asarray(x)
    if a.dtype.kind not in "ui":
        raise TypeError(f"{name} must hold integers; got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise ValueError(f"{name} must be non-negative")
    return a.astype(np.uint64)


def philox4x32(counter, key):
    """The Philox-4x32-10 bijection, vectorised over counters.

    Parameters
    ----------
    counter : array_like of uint32, shape ``[..., 4]``
        Counter words ``(c0, c1, c2, c3)``.
    key : array_like of uint32, shape ``[2]`` (or broadcastable ``[..., 2]``)
        Key words ``(k0, k1)``.

    Returns
    -------
    numpy.ndarray of uint32, shape ``[..., 4]``
    """
    c = _as_u64(counter, "counter")
    k = _as_u64(key, "key")
    if c.shape[-1:] != (4,) or k.shape[-1:] != (2,):
        raise ValueError(
            f"counter must have shape [..., 4] and key [..., 2]; got {c.shape} and {k.shape}"
        )
    words = _philox_rounds(c[..., 0], c[..., 1], c[..., 2], c[..., 3], k[..., 0], k[..., 1])
    return np.stack(words, axis=-1).astype(np.uint32)


def _host_draws(draw, seed, stream, index, dtype):
    """``draw(k0, k1, stream, index)`` on NumPy arrays broadcast together."""
    k0, k1 = seed_to_key(seed)
    s, i = np.broadcast_arrays(_as_u64(stream, "stream"), _as_u64(index, "index"))
    return np.asarray(draw(k0, k1, s, i), dtype=dtype)


def philox_words(seed, stream, index):
    """The four 32-bit words mcattn draws for ``(seed, stream, index)``.

    Parameters
    ----------
    seed : int
        Key, in ``[0, 2**64)``.
    stream, index : array_like of non-negative int (broadcast together)
        64-bit stream and index (see the module docstring for the counter layout).

    Returns
    -------
    numpy.ndarray of uint32, shape ``broadcast(stream, index).shape + (4,)``
    """
    k0, k1 = seed_to_key(seed)
    s, i = np.broadcast_arrays(_as_u64(stream, "stream"), _as_u64(index, "index"))
    words = _philox_rounds(i & _MASK32, i >> _SHIFT32, s & _MASK32, s >> _SHIFT32, k0, k1)
    return np.stack(words, axis=-1).astype(np.uint32)


def uniform(seed, stream, index):
    """Float64 uniforms in ``[0, 1)``, bit-identical to the kernels' draws.

    Parameters
    ----------
    seed : int
    stream, index : array_like of non-negative int, broadcast together

    Returns
    -------
    numpy.ndarray of float64, shape ``broadcast(stream, index).shape``
    """
    return _host_draws(_uniform_from_index, seed, stream, index, np.float64)


def sample_bits(seed, stream, t):
    """The 64 random bits of draws ``t`` of ``stream`` (uint64), as the kernels draw them.

    Parameters
    ----------
    seed : int
    stream, t : array_like of non-negative int, broadcast together

    Returns
    -------
    numpy.ndarray of uint64
    """
    return _host_draws(_sample_bits, seed, stream, t, np.uint64)


def sample_uniform(seed, stream, t):
    """Float64 uniforms of draws ``t`` of ``stream``, as the sampling kernels draw them.

    Parameters
    ----------
    seed : int
    stream, t : array_like of non-negative int, broadcast together

    Returns
    -------
    numpy.ndarray of float64
    """
    return _host_draws(_sample_uniform, seed, stream, t, np.float64)


def normal(seed, stream, index):
    """Standard normal float64 draws (Box-Muller on one Philox call per draw).

    ``u1`` comes from words (0, 1) mapped to ``(0, 1]`` and ``u2`` from words (2, 3);
    the draw is ``sqrt(-2 log u1) cos(2 pi u2)``. Host only: device code receives
    matrices drawn here, so every backend sees the same numbers.

    Parameters
    ----------
    seed : int
    stream, index : array_like of non-negative int, broadcast together

    Returns
    -------
    numpy.ndarray of float64
    """
    w = philox_words(seed, stream, index).astype(np.uint64)
    u1 = 1.0 - _uniform53(w[..., 0], w[..., 1])  # (0, 1]: log is finite
    u2 = _uniform53(w[..., 2], w[..., 3])
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


# --- compiled versions -------------------------------------------------------------------
def _make_cpu_functions():
    from ._jit import njit

    rounds = njit(inline="always", cache=True)(_philox_rounds)
    u53 = njit(inline="always", cache=True)(_uniform53)
    b64 = njit(inline="always", cache=True)(_bits64)
    uniform, bits, sample = _make_draw_functions(rounds, u53, b64)
    return (rounds, njit(inline="always")(uniform), njit(inline="always")(bits),
            njit(inline="always")(sample))


_CPU_NAMES = ("philox4x32_cpu", "uniform_cpu", "sample_bits_cpu", "sample_uniform_cpu")


def __getattr__(name):
    """The Numba CPU versions, built on first use: the NumPy functions above need no Numba,
    so the pure-NumPy references (``mcattn/<method>/naive.py``) draw without it."""
    if name in _CPU_NAMES:
        globals().update(zip(_CPU_NAMES, _make_cpu_functions()))
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_CUDA_FUNCTIONS = None


def cuda_device_functions():
    """numba.cuda device functions ``(philox4x32, uniform, sample_uniform, sample_bits)``.

    Compiled from the same Python source as the NumPy and Numba CPU versions.

    Arguments are uint64 scalars holding 32-bit words (``k0, k1``) or 64-bit numbers
    (``stream, index``); see the module docstring. Built on first use so that importing
    mcattn never touches numba.cuda.
    """
    global _CUDA_FUNCTIONS
    if _CUDA_FUNCTIONS is None:
        from numba import cuda

        rounds = cuda.jit(device=True, inline=True)(_philox_rounds)
        u53 = cuda.jit(device=True, inline=True)(_uniform53)
        b64 = cuda.jit(device=True, inline=True)(_bits64)
        uniform, bits, sample = _make_draw_functions(rounds, u53, b64)
        _CUDA_FUNCTIONS = (
            rounds,
            cuda.jit(device=True, inline=True)(uniform),
            cuda.jit(device=True, inline=True)(sample),
            cuda.jit(device=True, inline=True)(bits),
        )
    return _CUDA_FUNCTIONS

