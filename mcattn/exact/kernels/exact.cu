// Exact softmax attention with a streaming (online) softmax, for CuPy.
//
// Grid (ceil(Nq / blockDim.x), BH); one thread per query row. The block walks over
// tiles of TILE keys: its threads load the K and V rows of the tile into shared memory
// together, then each thread scores its row against the tile, updates its running max
// m, running sum l and unnormalised output acc, and moves on. Memory is O(N d): no
// score matrix is stored. With is_causal the tiles after the block's last row are
// skipped. A row with no visible key (fully masked) returns zeros. With write_lse each
// row's log-sum-exp m + log l (-inf: no visible key) goes to lse [BH, Nq], for training.
//
// The backward (the FlashAttention-2 recipe; the probabilities are recomputed from lse,
// p_ij = exp(s_ij - lse_i), never stored) is two kernels launched in this order:
// mcattn_exact_backward_dq: one thread per query row i, over key tiles in shared memory:
//   delta_i = dout_i . out_i (written to delta [BH, Nq]), ds_ij = p_ij (dout_i . v_j - delta_i),
//   dq_i = scale sum_j ds_ij k_j.
// mcattn_exact_backward_dkdv: one thread per key row j, over query tiles in shared memory:
//   dv_j = sum_i p_ij dout_i, dk_j = scale sum_i ds_ij q_i.
// Each thread owns the row it writes: no atomics.
//
// Layout (C-contiguous): q [BH, Nq, d], k [BH, Nk, d], v [BH, Nk, dv], out [BH, Nq, dv],
// bias [M, bias_rows, Nk] (bias_rows = 1 or Nq) selected per batch row by
// mask_index [BH]. Requires d, dv <= MAXD.
#include "common.cuh"

template <typename T, int MAXD, int TILE>
__device__ void mcattn_exact_forward(const T* __restrict__ q, const T* __restrict__ k,
                                     const T* __restrict__ v, T* __restrict__ out,
                                     T* __restrict__ lse, const T* __restrict__ bias,
                                     const long long* __restrict__ mask_index, int nq, int nk,
                                     int d, int dv, T scale, int has_bias, int bias_rows,
                                     int is_causal, int write_lse) {
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

    const T* bias_row = mcattn_bias_row(bias, mask_index, bh, i, bias_rows, nk, has_bias && active);
    const int key_end = mcattn_block_key_end(nq, nk, is_causal);
    for (int j0 = 0; j0 < key_end; j0 += TILE) {
        const int tile = mcattn_min(TILE, key_end - j0);
        mcattn_load_tile(k_tile, MAXD, k, bh * nk + j0, tile, d, T(1));
        mcattn_load_tile(v_tile, MAXD, v, bh * nk + j0, tile, dv, T(1));
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
        if (write_lse) lse[bh * nq + i] = l > T(0) ? m + mcattn_log(l) : neg_inf;
    }
}

template <typename T, int MAXD, int TILE>
__device__ void mcattn_exact_backward_dq(const T* __restrict__ q, const T* __restrict__ k,
                                         const T* __restrict__ v, const T* __restrict__ out,
                                         const T* __restrict__ dout, const T* __restrict__ lse,
                                         T* __restrict__ dq, T* __restrict__ delta,
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

    T q_row[MAXD], do_row[MAXD], acc[MAXD];
    const T top = active ? lse[bh * nq + i] : neg_inf;
    T total = T(0);
    for (int c = 0; c < d; ++c) {
        q_row[c] = active ? q[(bh * nq + i) * d + c] * scale : T(0);
        acc[c] = T(0);
    }
    for (int c = 0; c < dv; ++c) {
        const T g = active ? dout[(bh * nq + i) * dv + c] : T(0);
        do_row[c] = g;
        if (active) total += g * out[(bh * nq + i) * dv + c];
    }
    if (active) delta[bh * nq + i] = total;
    const bool live = active && top != neg_inf;  // no visible key: zero gradients

    const T* bias_row = mcattn_bias_row(bias, mask_index, bh, i, bias_rows, nk, has_bias && active);
    const int key_end = mcattn_block_key_end(nq, nk, is_causal);
    for (int j0 = 0; j0 < key_end; j0 += TILE) {
        const int tile = mcattn_min(TILE, key_end - j0);
        mcattn_load_tile(k_tile, MAXD, k, bh * nk + j0, tile, d, T(1));
        mcattn_load_tile(v_tile, MAXD, v, bh * nk + j0, tile, dv, T(1));
        __syncthreads();
        if (live) {
            for (int r = 0; r < tile; ++r) {
                const int j = j0 + r;
                if (is_causal && j > i) break;
                T s = T(0);
                for (int c = 0; c < d; ++c) s += q_row[c] * k_tile[r * MAXD + c];
                if (has_bias) s += bias_row[j];
                const T p = mcattn_exp(s - top);  // a masked key (-inf) gives 0
                T dp = T(0);
                for (int c = 0; c < dv; ++c) dp += do_row[c] * v_tile[r * MAXD + c];
                const T ds = p * (dp - total);
                for (int c = 0; c < d; ++c) acc[c] += ds * k_tile[r * MAXD + c];
            }
        }
        __syncthreads();
    }
    if (active)
        for (int c = 0; c < d; ++c) dq[(bh * nq + i) * d + c] = acc[c] * scale;
}

// The thread's own k and v rows are read from global memory (cached) rather than copied:
// two more local rows would take the double kernel past 4 KiB of stack per thread.
template <typename T, int MAXD, int TILE>
__device__ void mcattn_exact_backward_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, const T* __restrict__ dout,
                                           const T* __restrict__ lse, const T* __restrict__ delta,
                                           T* __restrict__ dk, T* __restrict__ dv_out,
                                           const T* __restrict__ bias,
                                           const long long* __restrict__ mask_index, int nq,
                                           int nk, int d, int dv, T scale, int has_bias,
                                           int bias_rows, int is_causal) {
    __shared__ T q_tile[TILE * MAXD];
    __shared__ T do_tile[TILE * MAXD];
    __shared__ T lse_tile[TILE];
    __shared__ T delta_tile[TILE];
    const long long bh = blockIdx.y;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = j < nk;
    const T neg_inf = mcattn_neg_inf<T>();

    T dk_acc[MAXD], dv_acc[MAXD];
    for (int c = 0; c < d; ++c) dk_acc[c] = T(0);
    for (int c = 0; c < dv; ++c) dv_acc[c] = T(0);
    const T* k_row = k + (bh * nk + (active ? j : 0)) * d;
    const T* v_row = v + (bh * nk + (active ? j : 0)) * dv;
    const T* bias_base = 0;
    if (has_bias) bias_base = bias + mask_index[bh] * bias_rows * (long long)nk;
    // queries before the block's first key see none of its keys
    const int first = is_causal ? mcattn_min(nq, (int)(blockIdx.x * blockDim.x)) : 0;
    for (int i0 = first; i0 < nq; i0 += TILE) {
        const int tile = mcattn_min(TILE, nq - i0);
        mcattn_load_tile(q_tile, MAXD, q, bh * nq + i0, tile, d, scale);
        mcattn_load_tile(do_tile, MAXD, dout, bh * nq + i0, tile, dv, T(1));
        for (int e = threadIdx.x; e < tile; e += blockDim.x) {
            lse_tile[e] = lse[bh * nq + i0 + e];
            delta_tile[e] = delta[bh * nq + i0 + e];
        }
        __syncthreads();
        if (active) {
            for (int r = 0; r < tile; ++r) {
                const int i = i0 + r;
                const T top = lse_tile[r];
                if (top == neg_inf || (is_causal && j > i)) continue;
                T s = T(0);
                for (int c = 0; c < d; ++c) s += q_tile[r * MAXD + c] * k_row[c];
                if (has_bias) s += bias_base[(bias_rows > 1 ? (long long)i * nk : 0) + j];
                const T p = mcattn_exp(s - top);
                T dp = T(0);
                for (int c = 0; c < dv; ++c) {
                    const T g = do_tile[r * MAXD + c];
                    dv_acc[c] += p * g;
                    dp += g * v_row[c];
                }
                const T ds = p * (dp - delta_tile[r]);
                for (int c = 0; c < d; ++c) dk_acc[c] += ds * q_tile[r * MAXD + c];
            }
        }
        __syncthreads();
    }
    if (active) {
        for (int c = 0; c < d; ++c) dk[(bh * nk + j) * d + c] = dk_acc[c];
        for (int c = 0; c < dv; ++c) dv_out[(bh * nk + j) * dv + c] = dv_acc[c];
    }
}

#define MCATTN_EXACT_ARGS(T)                                                                  \
    const T *q, const T *k, const T *v, T *out, T *lse, const T *bias,                          \
        const long long *mask_index, int nq, int nk, int d, int dv, T scale, int has_bias,      \
        int bias_rows, int is_causal, int write_lse
#define MCATTN_EXACT_PASS q, k, v, out, lse, bias, mask_index, nq, nk, d, dv, scale, has_bias, \
    bias_rows, is_causal, write_lse
#define MCATTN_EXACT_DQ_ARGS(T)                                                               \
    const T *q, const T *k, const T *v, const T *out, const T *dout, const T *lse, T *dq,       \
        T *delta, const T *bias, const long long *mask_index, int nq, int nk, int d, int dv,    \
        T scale, int has_bias, int bias_rows, int is_causal
#define MCATTN_EXACT_DQ_PASS q, k, v, out, dout, lse, dq, delta, bias, mask_index, nq, nk, d, dv, \
    scale, has_bias, bias_rows, is_causal
#define MCATTN_EXACT_DKDV_ARGS(T)                                                             \
    const T *q, const T *k, const T *v, const T *dout, const T *lse, const T *delta, T *dk,     \
        T *dv_out, const T *bias, const long long *mask_index, int nq, int nk, int d, int dv,   \
        T scale, int has_bias, int bias_rows, int is_causal
#define MCATTN_EXACT_DKDV_PASS q, k, v, dout, lse, delta, dk, dv_out, bias, mask_index, nq, nk, \
    d, dv, scale, has_bias, bias_rows, is_causal

extern "C" __global__ void mcattn_exact_forward_f32(MCATTN_EXACT_ARGS(float)) {
    mcattn_exact_forward<float, 128, 32>(MCATTN_EXACT_PASS);
}
extern "C" __global__ void mcattn_exact_forward_f64(MCATTN_EXACT_ARGS(double)) {
    mcattn_exact_forward<double, 128, 16>(MCATTN_EXACT_PASS);
}
extern "C" __global__ void mcattn_exact_backward_dq_f32(MCATTN_EXACT_DQ_ARGS(float)) {
    mcattn_exact_backward_dq<float, 128, 32>(MCATTN_EXACT_DQ_PASS);
}
extern "C" __global__ void mcattn_exact_backward_dq_f64(MCATTN_EXACT_DQ_ARGS(double)) {
    mcattn_exact_backward_dq<double, 128, 16>(MCATTN_EXACT_DQ_PASS);
}
extern "C" __global__ void mcattn_exact_backward_dkdv_f32(MCATTN_EXACT_DKDV_ARGS(float)) {
    mcattn_exact_backward_dkdv<float, 128, 32>(MCATTN_EXACT_DKDV_PASS);
}
extern "C" __global__ void mcattn_exact_backward_dkdv_f64(MCATTN_EXACT_DKDV_ARGS(double)) {
    mcattn_exact_backward_dkdv<double, 128, 16>(MCATTN_EXACT_DKDV_PASS);
}
