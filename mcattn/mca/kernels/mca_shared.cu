// MCA's shared-draw value projection (mcattn.mca, shared_draws=True), for CuPy: applies
// the plan of mcattn.mca.shared_cpu.make_plan (built on the host) in one launch.
//
// One thread per output element (b, h, j, c), consecutive threads = consecutive c: a warp
// reads consecutive words of a drawn row of W_h (coalesced) while the token's x value, the
// row index and its weight are the same for the threads of one token (broadcast).
// Token j of (b, h), bh = b * H + h, with g = group_of[bh * N + j]:
//   g == -2 (masked) : out = bias
//   g == -1 (exact)  : out = x[b, j] @ W_h[:, c] + bias
//   g >= 0 (sampled) : G = group_ptr[bh] + g, rows R = rows + row_base[bh], weights
//                      w = weights + weight_ptr[G];
//                      out = sum_{m < width[G]} (x[b, j, R[m]] w[m]) W_h[R[m], c] + bias
// (the weights count / (p e) carry the token's 1 / r_j). Accumulation in T, as the CPU
// version (BLAS in the input precision): the float32 entry point does float32 arithmetic
// only. A grid-stride loop covers any number of elements with int64 indices.
// Layout (C-contiguous): x [B, N, d_in] (T), wh [H, d_in, dh] (T), bias [H * dh] (T, zeros
// without a bias), group_of [B * H * N] (int64), group_ptr / row_base [B * H + 1], rows,
// width, weight_ptr (int64), weights (T), out [B, H, N, dh] (T).
#include "common.cuh"

#define MCATTN_MCA_SHARED_MASKED (-2LL)
#define MCATTN_MCA_SHARED_EXACT (-1LL)

template <typename T>
__device__ void mcattn_mca_shared_apply(const T* __restrict__ x, const T* __restrict__ wh,
                                        const T* __restrict__ bias,
                                        const long long* __restrict__ group_of,
                                        const long long* __restrict__ group_ptr,
                                        const long long* __restrict__ row_base,
                                        const long long* __restrict__ rows,
                                        const long long* __restrict__ width,
                                        const long long* __restrict__ weight_ptr,
                                        const T* __restrict__ weights, T* __restrict__ out,
                                        long long heads, long long n, long long d_in, long long dh,
                                        long long total) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long token = e / dh;  // (b * H + h) * N + j
        const long long c = e - token * dh;
        const long long bh = token / n;
        const long long j = token - bh * n;
        const long long b = bh / heads;
        const long long h = bh - b * heads;
        const long long g = group_of[token];
        const T* xj = x + (b * n + j) * d_in;
        const T* wc = wh + h * d_in * dh + c;  // column c of W_h: row k at wc[k * dh]
        T acc = T(0);
        if (g == MCATTN_MCA_SHARED_EXACT) {
            for (long long k = 0; k < d_in; ++k) acc += xj[k] * wc[k * dh];
        } else if (g != MCATTN_MCA_SHARED_MASKED) {
            const long long group = group_ptr[bh] + g;
            const long long* r = rows + row_base[bh];
            const T* wt = weights + weight_ptr[group];
            const long long count = width[group];
            for (long long m = 0; m < count; ++m) {
                const long long k = r[m];
                acc += (xj[k] * wt[m]) * wc[k * dh];
            }
        }
        out[e] = acc + bias[h * dh + c];
    }
}

#define MCATTN_MCA_SHARED_ARGS(T)                                                            \
    const T *x, const T *wh, const T *bias, const long long *group_of,                      \
        const long long *group_ptr, const long long *row_base, const long long *rows,        \
        const long long *width, const long long *weight_ptr, const T *weights, T *out,       \
        long long heads, long long n, long long d_in, long long dh, long long total
#define MCATTN_MCA_SHARED_PASS x, wh, bias, group_of, group_ptr, row_base, rows, width, \
    weight_ptr, weights, out, heads, n, d_in, dh, total

extern "C" __global__ void mcattn_mca_shared_apply_f32(MCATTN_MCA_SHARED_ARGS(float)) {
    mcattn_mca_shared_apply<float>(MCATTN_MCA_SHARED_PASS);
}
extern "C" __global__ void mcattn_mca_shared_apply_f64(MCATTN_MCA_SHARED_ARGS(double)) {
    mcattn_mca_shared_apply<double>(MCATTN_MCA_SHARED_PASS);
}
