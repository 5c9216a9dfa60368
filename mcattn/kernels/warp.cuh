// Warp-level device API of mcattn's CUDA C kernels: conversions to the tensor cores'
// input types and mma.sync through inline PTX (sm_80 and later).
//
// Shuffles and ballots are CUDA's own intrinsics (__shfl_sync, __shfl_xor_sync,
// __shfl_down_sync, __ballot_sync, __syncwarp); masks must name every running lane of the
// warp (no divergent warp code), which is what the host shim emulates.
//
// Under the host shim (tests/cuda/hostshim/cuda_host_shim.h, MCATTN_HOST_SHIM) every name
// below is defined by the shim instead: the warp's 32 lanes are host threads that meet at
// a per-warp barrier, publish their fragment registers, and each computes its own output
// elements from the PTX ISA's fragment layouts. That is a second, independent statement
// of the layouts; the shim tests check it against NumPy (docs/cuda-testing.md).
//
// Fragments, g = lane / 4, t = lane % 4 (PTX ISA, "Matrix fragments for mma.m16n8k16",
// "... m16n8k8", "... m16n8k32"); a register holds its elements low bits first:
//   m16n8k16 f16/bf16  A 16x16 row-major, 4 regs x 2: (g, 2t..2t+1) (g+8, 2t..) (g, 2t+8..) (g+8, 2t+8..)
//                      B 16x8 column-major, 2 regs x 2: (2t..2t+1, g) (2t+8..2t+9, g)
//   m16n8k8 tf32       A 16x8, 4 regs: (g, t) (g+8, t) (g, t+4) (g+8, t+4); B 8x8: (t, g) (t+4, g)
//   m16n8k32 s8        A 16x32, 4 regs x 4: (g, 4t..4t+3) (g+8, 4t..) (g, 4t+16..) (g+8, 4t+16..)
//                      B 32x8, 2 regs x 4: (4t..4t+3, g) (4t+16..4t+19, g)
//   C/D (all three)    16x8, 4 values: (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1)
// The mma functions accumulate in place: acc += A B.
#ifndef MCATTN_WARP_CUH
#define MCATTN_WARP_CUH

#ifndef MCATTN_HOST_SHIM

// The block size a kernel is compiled for (ptxas may then use up to 65536 / n registers).
#define MCATTN_LAUNCH_BOUNDS(n) __launch_bounds__(n)

// float -> half / bfloat16, round to nearest even; half -> float (exact).
__device__ __forceinline__ unsigned short mcattn_f32_to_f16(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
__device__ __forceinline__ float mcattn_f16_to_f32(unsigned short h) {
    float x;
    asm("cvt.f32.f16 %0, %1;" : "=f"(x) : "h"(h));
    return x;
}
__device__ __forceinline__ unsigned short mcattn_f32_to_bf16(float x) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
// float -> tf32 (nearest, ties away from zero), as a 32-bit word with the low 13 bits 0.
__device__ __forceinline__ unsigned mcattn_f32_to_tf32(float x) {
    unsigned u;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
    return u;
}

__device__ __forceinline__ void mcattn_mma_m16n8k16_f16(float* acc, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mcattn_mma_m16n8k16_bf16(float* acc, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mcattn_mma_m16n8k8_tf32(float* acc, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mcattn_mma_m16n8k32_s8(int* acc, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#else
#define MCATTN_LAUNCH_BOUNDS(n)
#endif  // MCATTN_HOST_SHIM

__device__ __forceinline__ float mcattn_bf16_to_f32(unsigned short h) {
    return __int_as_float((int)((unsigned)h << 16));
}

// Two 16-bit values in one register, `lo` in the low half (the element order of a fragment).
__device__ __forceinline__ unsigned mcattn_pack16(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

// The tensor-core input types of the f16/bf16 kernels, one template parameter:
// round(x) to the 16-bit code, and the matching mma.
struct mcattn_f16_ops {
    static __device__ __forceinline__ unsigned short round(float x) { return mcattn_f32_to_f16(x); }
    static __device__ __forceinline__ void mma(float* acc, const unsigned* a, const unsigned* b) {
        mcattn_mma_m16n8k16_f16(acc, a, b);
    }
};
struct mcattn_bf16_ops {
    static __device__ __forceinline__ unsigned short round(float x) { return mcattn_f32_to_bf16(x); }
    static __device__ __forceinline__ void mma(float* acc, const unsigned* a, const unsigned* b) {
        mcattn_mma_m16n8k16_bf16(acc, a, b);
    }
};

#endif  // MCATTN_WARP_CUH
