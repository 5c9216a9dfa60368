"""The counter-based generator: known answers, NumPy = Numba CPU, statistics.

The numba.cuda and CUDA C versions are compared with these in tests/cuda/.
"""

import numpy as np
import pytest
from numba import njit
from scipy import stats

from mcattn import random as mr

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter, key, result.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_numpy(counter, key, expected):
    assert tuple(int(w) for w in mr.philox4x32(counter, key)) == expected


@njit
def _cpu_words(c, k):
    return mr.philox4x32_cpu(c[0], c[1], c[2], c[3], k[0], k[1])


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_numba(counter, key, expected):
    words = _cpu_words(np.array(counter, np.uint64), np.array(key, np.uint64))
    assert tuple(int(w) for w in words) == expected


@njit
def _cpu_uniforms(k0, k1, stream, first, n):
    out = np.empty(n)
    for t in range(n):
        out[t] = mr.uniform_cpu(k0, k1, stream, first + np.uint64(t))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**64 - 1])
@pytest.mark.parametrize("stream", [0, 7, 2**40 + 3])
def test_numba_cpu_equals_numpy_bit_for_bit(seed, stream):
    first = 2**32 - 100  # the index crosses into the high counter word
    k0, k1 = mr.seed_to_key(seed)
    got = _cpu_uniforms(k0, k1, np.uint64(stream), np.uint64(first), 300)
    want = mr.uniform(seed, stream, np.arange(first, first + 300, dtype=np.uint64))
    assert np.array_equal(got, want)


def test_words_layout():
    seed, stream, index = 2**33 + 9, 2**35 + 1, 2**34 + 2
    words = mr.philox_words(seed, stream, index)
    counter = (index % 2**32, index >> 32, stream % 2**32, stream >> 32)
    assert np.array_equal(words, mr.philox4x32(counter, (seed % 2**32, seed >> 32)))


def test_uniform_distribution():
    u = mr.uniform(123, 0, np.arange(200_000))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # Different streams and seeds are different sequences, not shifted copies.
    v = mr.uniform(123, 1, np.arange(200_000))
    w = mr.uniform(124, 0, np.arange(200_000))
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.01 and abs(np.corrcoef(u, w)[0, 1]) < 0.01


def test_normal_distribution():
    z = mr.normal(5, 3, np.arange(200_000))
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_resolve_seed():
    assert mr.resolve_seed(42) == 42
    rng = np.random.default_rng(0)
    assert mr.resolve_seed(rng) == mr.resolve_seed(np.random.default_rng(0))
    assert mr.resolve_seed(None) != mr.resolve_seed(None)
    with pytest.raises(ValueError, match="seed must be in"):
        mr.resolve_seed(-1)
    with pytest.raises(TypeError, match="seed must be None"):
        mr.resolve_seed(1.5)
