// Philox-4x32-10 (Salmon et al., SC 2011) for mcattn's CUDA C kernels.
//
// The same generator as mcattn/random.py (NumPy, Numba CPU, numba.cuda): the tests
// check that all of them produce identical words. Counter layout used by mcattn:
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (index mod 2^32, index >> 32, stream mod 2^32, stream >> 32)
// Self-contained (no CUDA headers) so that NVRTC and the host-compiler test shim can
// both compile it.
#ifndef MCATTN_PHILOX_CUH
#define MCATTN_PHILOX_CUH

struct mcattn_words4 {
    unsigned int w0, w1, w2, w3;
};

__device__ __forceinline__ unsigned int mcattn_mulhi32(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * (unsigned long long)b) >> 32);
}

__device__ __forceinline__ mcattn_words4 mcattn_philox4x32_10(
    unsigned int c0, unsigned int c1, unsigned int c2, unsigned int c3,
    unsigned int k0, unsigned int k1) {
    const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const unsigned int W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned int hi0 = mcattn_mulhi32(M0, c0), lo0 = M0 * c0;
        const unsigned int hi1 = mcattn_mulhi32(M1, c2), lo1 = M1 * c2;
        const unsigned int n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
        k0 += W0; k1 += W1;
    }
    mcattn_words4 out = {c0, c1, c2, c3};
    return out;
}

// Two words -> the 64-bit word w0 * 2^32 + w1.
__device__ __forceinline__ unsigned long long mcattn_bits64(unsigned int w0, unsigned int w1) {
    return ((unsigned long long)w0 << 32) | (unsigned long long)w1;
}

// 64 bits -> double in [0, 1) from the top 53 bits (exact scaling).
__device__ __forceinline__ double mcattn_bits_to_uniform(unsigned long long bits) {
    return (double)(bits >> 11) * 1.1102230246251565404236316680908203125e-16;  // 2^-53
}

// Two words -> double in [0, 1), bit-identical to mcattn.random.uniform.
__device__ __forceinline__ double mcattn_uniform53(unsigned int w0, unsigned int w1) {
    return mcattn_bits_to_uniform(mcattn_bits64(w0, w1));
}

// The uniform mcattn draws for (seed key, stream, index).
__device__ __forceinline__ double mcattn_uniform(unsigned int k0, unsigned int k1,
                                                 unsigned long long stream,
                                                 unsigned long long index) {
    const mcattn_words4 w = mcattn_philox4x32_10(
        (unsigned int)(index & 0xFFFFFFFFull), (unsigned int)(index >> 32),
        (unsigned int)(stream & 0xFFFFFFFFull), (unsigned int)(stream >> 32), k0, k1);
    return mcattn_uniform53(w.w0, w.w1);
}

// Draw t of a stream as 64 bits, as every sampling kernel draws it: word pair t % 2 of
// Philox call t / 2 (mcattn.random.sample_bits).
__device__ __forceinline__ unsigned long long mcattn_sample_bits(unsigned int k0, unsigned int k1,
                                                                 unsigned long long stream,
                                                                 unsigned long long t) {
    const unsigned long long index = t >> 1;
    const mcattn_words4 w = mcattn_philox4x32_10(
        (unsigned int)(index & 0xFFFFFFFFull), (unsigned int)(index >> 32),
        (unsigned int)(stream & 0xFFFFFFFFull), (unsigned int)(stream >> 32), k0, k1);
    return (t & 1ull) ? mcattn_bits64(w.w2, w.w3) : mcattn_bits64(w.w0, w.w1);
}

// Draw t of a stream as a double in [0, 1) (mcattn.random.sample_uniform).
__device__ __forceinline__ double mcattn_sample_uniform(unsigned int k0, unsigned int k1,
                                                        unsigned long long stream,
                                                        unsigned long long t) {
    return mcattn_bits_to_uniform(mcattn_sample_bits(k0, k1, stream, t));
}

#endif  // MCATTN_PHILOX_CUH
