// Eigen reconstruction attention for CuPy: partial scores, reconstruction, softmax, P V.
//
// Grid (ceil(Nq / blockDim.x), BH); one thread per query row i of batch row bh (head
// h = bh % heads). The thread computes the fixed columns' scores a_S = scale q_i K[S]^T,
// the reconstructed row s = base[h, i or 0] + a_S G[h] with the computed columns exact,
// adds the mask, computes exactly the per_query largest visible reconstructed scores
// outside S (repeated arg-max, ties to the lower index: the same set as the CPU kernel's
// partition), then the softmax and out_i = sum_j p_j v_j / sum_j p_j. A row with no
// visible key returns zeros. Scratch per thread: the row (n <= MAXN) in local memory,
// so the limits (d, dv <= 64, n <= 256, m <= 64) keep it under 4 KiB of stack per thread
// (tests/cuda/test_cuda_compile.py): eigen serves fixed windows (96 tokens in the study).
//
// Layout (C-contiguous): q [BH, Nq, d], k [BH, n, d], v [BH, n, dv], out [BH, Nq, dv],
// cols [heads, m] (int64), weights [heads, m, n], base [heads, base_rows, n],
// bias [M, bias_rows, n] selected by mask_index [BH]. d, dv <= MAXD, m <= MAXM.
#include "common.cuh"

template <typename T, int MAXD, int MAXN, int MAXM>
__device__ void mcattn_eigen_forward(const T* __restrict__ q, const T* __restrict__ k,
                                     const T* __restrict__ v, T* __restrict__ out,
                                     const long long* __restrict__ cols,
                                     const T* __restrict__ weights, const T* __restrict__ base,
                                     const T* __restrict__ bias,
                                     const long long* __restrict__ mask_index, int nq, int nk,
                                     int d, int dv, int heads, int m, int base_rows,
                                     int per_query, T scale, int has_bias, int bias_rows,
                                     int is_causal) {
    const long long bh = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nq) return;  // no shared memory or barriers: early exit is safe
    const T neg_inf = mcattn_neg_inf<T>();
    const int h = (int)(bh % heads);
    const long long* my_cols = cols + (long long)h * m;
    T qs[MAXD], a_s[MAXM], s[MAXN], acc[MAXD];
    unsigned char taken[MAXN];
    for (int c = 0; c < d; ++c) qs[c] = q[(bh * nq + i) * d + c] * scale;
    for (int t = 0; t < m; ++t) {
        const T* krow = k + (bh * nk + my_cols[t]) * d;
        T dot = T(0);
        for (int c = 0; c < d; ++c) dot += qs[c] * krow[c];
        a_s[t] = dot;
    }
    const T* brow = base + ((long long)h * base_rows + (base_rows > 1 ? i : 0)) * nk;
    for (int j = 0; j < nk; ++j) {
        T r = brow[j];
        for (int t = 0; t < m; ++t) r += a_s[t] * weights[((long long)h * m + t) * nk + j];
        s[j] = r;
        taken[j] = 0;
    }
    for (int t = 0; t < m; ++t) {
        s[my_cols[t]] = a_s[t];
        taken[my_cols[t]] = 1;
    }
    const T* bias_row = 0;
    if (has_bias) {
        bias_row = bias + (mask_index[bh] * bias_rows + (bias_rows > 1 ? i : 0)) * (long long)nk;
        for (int j = 0; j < nk; ++j) s[j] += bias_row[j];
    }
    if (is_causal)
        for (int j = i + 1; j < nk; ++j) s[j] = neg_inf;
    for (int pick = 0; pick < per_query; ++pick) {
        int best = -1;
        for (int j = 0; j < nk; ++j)
            if (!taken[j] && s[j] > neg_inf && (best < 0 || s[j] > s[best])) best = j;
        if (best < 0) break;
        taken[best] = 1;
        const T* krow = k + (bh * nk + best) * d;
        T dot = T(0);
        for (int c = 0; c < d; ++c) dot += qs[c] * krow[c];
        s[best] = has_bias ? dot + bias_row[best] : dot;
    }
    T top = neg_inf;
    for (int j = 0; j < nk; ++j) top = mcattn_max(top, s[j]);
    for (int c = 0; c < dv; ++c) acc[c] = T(0);
    T total = T(0);
    if (top != neg_inf) {
        for (int j = 0; j < nk; ++j) {
            const T p = mcattn_exp(s[j] - top);
            total += p;
            const T* vrow = v + (bh * nk + j) * dv;
            for (int c = 0; c < dv; ++c) acc[c] += p * vrow[c];
        }
    }
    const T inv = total > T(0) ? T(1) / total : T(0);
    for (int c = 0; c < dv; ++c) out[(bh * nq + i) * dv + c] = acc[c] * inv;
}

#define MCATTN_EIGEN_ARGS(T)                                                               \
    const T *q, const T *k, const T *v, T *out, const long long *cols, const T *weights,     \
        const T *base, const T *bias, const long long *mask_index, int nq, int nk, int d,    \
        int dv, int heads, int m, int base_rows, int per_query, T scale, int has_bias,       \
        int bias_rows, int is_causal
#define MCATTN_EIGEN_PASS q, k, v, out, cols, weights, base, bias, mask_index, nq, nk, d, dv, \
    heads, m, base_rows, per_query, scale, has_bias, bias_rows, is_causal

extern "C" __global__ void mcattn_eigen_forward_f32(MCATTN_EIGEN_ARGS(float)) {
    mcattn_eigen_forward<float, 64, 256, 64>(MCATTN_EIGEN_PASS);
}
extern "C" __global__ void mcattn_eigen_forward_f64(MCATTN_EIGEN_ARGS(double)) {
    mcattn_eigen_forward<double, 64, 256, 64>(MCATTN_EIGEN_PASS);
}
