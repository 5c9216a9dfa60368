// LATTE's int8 operands, shared by latte_mma.cu (forward) and latte_mma_backward.cu.
#ifndef MCATTN_LATTE_INT8_CUH
#define MCATTN_LATTE_INT8_CUH
#include "common.cuh"

// Four int8 values as one word (the first in the low byte), from an address 4-aligned.
__device__ __forceinline__ unsigned mcattn_load_s8x4(const signed char* p) {
#ifdef MCATTN_HOST_SHIM
    unsigned w;
    memcpy(&w, p, 4);
    return w;
#else
    return *reinterpret_cast<const unsigned*>(p);
#endif
}

// The signed high nibbles (x >> 4, in [-8, 7]) of four int8 values packed in a word: each
// byte's top nibble moved down, its sign bit (0x08) spread over the byte's top half
// (0x08 * 0x1e = 0xf0 stays inside the byte).
__device__ __forceinline__ unsigned mcattn_hi_nibbles(unsigned w) {
    const unsigned x = (w >> 4) & 0x0f0f0f0fu;
    return x | ((x & 0x08080808u) * 0x1eu);
}

#endif  // MCATTN_LATTE_INT8_CUH
