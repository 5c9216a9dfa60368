// Device-side draws of mcattn's counter-based generator (see philox.cuh).
#include "common.cuh"
#include "philox.cuh"

// Kernel for the cross-backend identity tests: words[4 * t + r] for t in [0, n) of
// (stream, first_index + t).
extern "C" __global__ void mcattn_philox_words(unsigned int k0, unsigned int k1,
                                               unsigned long long stream,
                                               unsigned long long first_index, long long n,
                                               unsigned int* __restrict__ words,
                                               double* __restrict__ uniforms) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) {
        const unsigned long long index = first_index + (unsigned long long)t;
        const mcattn_words4 w = mcattn_philox4x32_10(
            (unsigned int)(index & 0xFFFFFFFFull), (unsigned int)(index >> 32),
            (unsigned int)(stream & 0xFFFFFFFFull), (unsigned int)(stream >> 32), k0, k1);
        words[4 * t + 0] = w.w0;
        words[4 * t + 1] = w.w1;
        words[4 * t + 2] = w.w2;
        words[4 * t + 3] = w.w3;
        uniforms[t] = mcattn_uniform53(w.w0, w.w1);
    }
}

