// The operand staging of the FlashAttention-2 backward on 16-bit mma.sync, shared by
// exact_mma_backward.cu and latte_mma_backward.cu: tiles packed two 16-bit codes a word
// along the mma's k dimension, A fragments of a warp's 16 rows, and an accumulator tile
// turned into an A fragment in place (the same lane holds the same cells).
#ifndef MCATTN_MMA_BACKWARD_CUH
#define MCATTN_MMA_BACKWARD_CUH
#include "common.cuh"
#include "warp.cuh"

#define MCATTN_MMA_BWD_ROWS 64  // rows (dq pass) or keys (dk/dv pass) per block
#define MCATTN_MMA_BWD_TILE 32  // keys (dq pass) or queries (dk/dv pass) per shared tile
#define MCATTN_MMA_BWD_THREADS 128

// dst[r][pair] = the 16-bit codes of src row (first + r), dims 2 pair and 2 pair + 1;
// dst_t[c][pair] = rows (first + 2 pair, + 1) of dim c. Rows >= rows_end are 0.
template <class Ops, int D>
__device__ __forceinline__ void mcattn_mma_load_pairs(unsigned (*dst)[D / 2 + 4],
                                                      unsigned (*dst_t)[MCATTN_MMA_BWD_TILE / 2 + 4],
                                                      const float* src, int first, int rows_end) {
    for (int e = threadIdx.x; e < MCATTN_MMA_BWD_TILE * D / 2; e += MCATTN_MMA_BWD_THREADS) {
        const int r = e / (D / 2), pair = e % (D / 2), row = first + r;
        const float* p = src + (long long)row * D + 2 * pair;
        dst[r][pair] = row < rows_end ? mcattn_pack16(Ops::round(p[0]), Ops::round(p[1])) : 0u;
        if (dst_t) {
            const int c = e % D, rp = e / D, row2 = first + 2 * rp;
            const float x0 = row2 < rows_end ? src[(long long)row2 * D + c] : 0.0f;
            const float x1 = row2 + 1 < rows_end ? src[(long long)(row2 + 1) * D + c] : 0.0f;
            dst_t[c][rp] = mcattn_pack16(Ops::round(x0), Ops::round(x1));
        }
    }
}

// A fragments of 16 rows (row0 + g, row0 + g + 8) of a row-major [rows, D] matrix.
template <class Ops, int D>
__device__ __forceinline__ void mcattn_mma_load_a(unsigned (*frag)[4], const float* src, int row0,
                                                  int rows_end, int g, int t) {
    for (int kk = 0; kk < D / 16; ++kk)
        for (int r = 0; r < 4; ++r) {
            const int row = row0 + g + 8 * (r & 1), c = 16 * kk + 2 * t + 8 * (r >> 1);
            const float x0 = row < rows_end ? src[(long long)row * D + c] : 0.0f;
            const float x1 = row < rows_end ? src[(long long)row * D + c + 1] : 0.0f;
            frag[kk][r] = mcattn_pack16(Ops::round(x0), Ops::round(x1));
        }
}

// The A fragment of columns 16 kk .. 16 kk + 15 from accumulator tiles x[2kk], x[2kk+1].
template <class Ops>
__device__ __forceinline__ void mcattn_mma_acc_to_a(unsigned* a, const float (*x)[4], int kk) {
    a[0] = mcattn_pack16(Ops::round(x[2 * kk][0]), Ops::round(x[2 * kk][1]));
    a[1] = mcattn_pack16(Ops::round(x[2 * kk][2]), Ops::round(x[2 * kk][3]));
    a[2] = mcattn_pack16(Ops::round(x[2 * kk + 1][0]), Ops::round(x[2 * kk + 1][1]));
    a[3] = mcattn_pack16(Ops::round(x[2 * kk + 1][2]), Ops::round(x[2 * kk + 1][3]));
}

#endif  // MCATTN_MMA_BACKWARD_CUH
