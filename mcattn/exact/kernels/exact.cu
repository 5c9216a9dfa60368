// Exact softmax attention with a streaming (online) softmax, for CuPy.
//
// Grid (ceil(Nq / blockDim.x), BH); one thread per query row. The block walks over
// tiles of TILE keys: its threads load the K and V rows of the tile into shared memory
// together, then each thread scores its row against the tile, updates its running max
// m, running sum l and unnormalised output acc, and moves on. Memory is O(N d): no
// score matrix is stored. With is_causal the tiles after the block's last row are
// skipped. A row with no visible key (fully masked) returns zeros.
//
// Layout (C-contiguous): q [BH, Nq, d], k [BH, Nk, d], v [BH, Nk, dv], out [BH, Nq, dv],
// bias [M, bias_rows, Nk] (bias_rows = 1 or Nq) selected per batch row by
// mask_index [BH]. Requires d, dv <= MAXD.
#include "common.cuh"

template <typename T, int MAXD, int TILE>
__device__ void mcattn_exact_forward(const T* __restrict__ q, const T* __restrict__ k,
                                     const T* __restrict__ v, T* __restrict__ out,
                                     const T* __restrict__ bias,
                                     const long long* __restrict__ mask_index, int nq, int nk,
                                     int d, int dv, T scale, int has_bias, int bias_rows,
                                     int is_causal) {
    __shared__ T k_tile[TILE * MAXD];
    __shared__ T v_tile[TILE * MAXD];
    const long long bh = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = i < nq;
    const T neg_inf = mcattn_neg_inf<T>();

    T q_row[MAXD], acc[MAXD], scores[TILE];
    for (int c = 0; c < d; ++c) q_row[c] = active ? q[(bh * nq + i) * d + c] * scale : T(0);
    for (int c = 0; c < dv; ++c) acc[c] = T(0);
    T m = neg_inf, l = T(0);

    const T* bias_row = 0;
    if (has_bias && active) {
        const long long slot = mask_index[bh];
        bias_row = bias + (slot * bias_rows + (bias_rows > 1 ? i : 0)) * (long long)nk;
    }
    int key_end = nk;
    if (is_causal) {  // keys after the block's last row are invisible to the whole block
        const int last_row = mcattn_min(nq, (int)((blockIdx.x + 1) * blockDim.x)) - 1;
        key_end = mcattn_min(nk, last_row + 1);
    }
    for (int j0 = 0; j0 < key_end; j0 += TILE) {
        const int tile = mcattn_min(TILE, key_end - j0);
        for (int e = threadIdx.x; e < tile * d; e += blockDim.x)
            k_tile[(e / d) * MAXD + e % d] = k[(bh * nk + j0 + e / d) * d + e % d];
        for (int e = threadIdx.x; e < tile * dv; e += blockDim.x)
            v_tile[(e / dv) * MAXD + e % dv] = v[(bh * nk + j0 + e / dv) * dv + e % dv];
        __syncthreads();
        if (active) {
            T top = m;
            for (int r = 0; r < tile; ++r) {
                const int j = j0 + r;
                T s = T(0);
                for (int c = 0; c < d; ++c) s += q_row[c] * k_tile[r * MAXD + c];
                if (has_bias) s += bias_row[j];
                if (is_causal && j > i) s = neg_inf;
                scores[r] = s;
                top = mcattn_max(top, s);
            }
            mcattn_softmax_tile(scores, tile, top, v_tile, MAXD, dv, m, l, acc);
        }
        __syncthreads();
    }
    if (active) {
        const T inv = l > T(0) ? T(1) / l : T(0);
        for (int c = 0; c < dv; ++c) out[(bh * nq + i) * dv + c] = acc[c] * inv;
    }
}

#define MCATTN_EXACT_ARGS(T)                                                              \
    const T *q, const T *k, const T *v, T *out, const T *bias, const long long *mask_index, \
        int nq, int nk, int d, int dv, T scale, int has_bias, int bias_rows, int is_causal
#define MCATTN_EXACT_PASS q, k, v, out, bias, mask_index, nq, nk, d, dv, scale, has_bias, \
    bias_rows, is_causal

extern "C" __global__ void mcattn_exact_forward_f32(MCATTN_EXACT_ARGS(float)) {
    mcattn_exact_forward<float, 128, 32>(MCATTN_EXACT_PASS);
}
extern "C" __global__ void mcattn_exact_forward_f64(MCATTN_EXACT_ARGS(double)) {
    mcattn_exact_forward<double, 128, 16>(MCATTN_EXACT_PASS);
}
