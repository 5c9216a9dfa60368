"""numba.cuda kernel of the shared generator (imported only when numba.cuda is wanted).

``philox_words_kernel`` is the numba.cuda twin of ``mcattn_philox_words`` in
``kernels/random.cu``: thread ``t`` writes the four words and the uniform of
``(stream, first_index + t)``. It exists to test the device functions of
:func:`mcattn.random.cuda_device_functions` against NumPy (simulator or GPU) and to
compile them to PTX. ``cuda`` is imported at module level: the simulator swaps the
module-level ``cuda`` of kernels.
"""

import numpy as np
from numba import cuda

from .random import _MASK32, _SHIFT32, cuda_device_functions

__all__ = ["philox_words_kernel", "ptx_signatures"]

_rounds, _uniform, _, _ = cuda_device_functions()


def _philox_words(k0, k1, stream, first_index, words, uniforms):
    t = cuda.grid(1)
    if t < uniforms.shape[0]:
        index = first_index + np.uint64(t)
        w0, w1, w2, w3 = _rounds(index & _MASK32, index >> _SHIFT32, stream & _MASK32,
                                 stream >> _SHIFT32, k0, k1)
        words[t, 0] = w0
        words[t, 1] = w1
        words[t, 2] = w2
        words[t, 3] = w3
        uniforms[t] = _uniform(k0, k1, stream, index)


philox_words_kernel = cuda.jit(_philox_words)


def ptx_signatures():
    """``(name, python function, argument types)`` of the kernel, for compile_ptx tests."""
    from numba import float64, uint32, uint64

    args = (uint64, uint64, uint64, uint64, uint32[:, ::1], float64[::1])
    return [("philox_words_kernel", _philox_words, args)]
