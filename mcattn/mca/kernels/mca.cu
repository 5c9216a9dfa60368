// Monte-Carlo value projection (mcattn.mca), for CuPy. Same draws as the NumPy, Numba
// CPU and numba.cuda versions: one thread per (batch row b, head h, token j), whose
// random stream is its thread number (b * H + h) * N + j; draw t uses the 64 bits
// mcattn_sample_bits(seed, stream, t).
//   weight sampling : alias tables built on the host; integer arithmetic only, so the
//                     indices are bit-identical to the CPU's
//   optimal sampling: the token's CDF in global scratch, binary search. The scratch holds
//                     `chunk` tasks, interleaved (entry k of task t at k * chunk + t, so
//                     that neighbouring threads write neighbouring words); the launcher
//                     covers the B * H * N tasks in launches of at most `chunk` tasks
//                     starting at task0. (A per-thread array would reserve d_in * 8 bytes
//                     of stack for every resident thread: 33 KiB, ~9 GB on an H100.)
// Accumulation in double. Layout (C-contiguous): x [B, N, d_in] (T), wh [H, d_in, dh]
// (double), bias [H * dh] (double), budgets [B, H, N] (int64), threshold [H, d_in]
// (uint64), alias [H, d_in] (int64), p_weight / row_norms [H, d_in] (double),
// out [B, H, N, dh] (T), cdf [d_in, chunk] (double; unused for weight sampling). dh <= 128.
#include "common.cuh"
#include "philox.cuh"

#define MCATTN_MCA_MAX_HEAD_DIM 128

template <typename T, bool OPTIMAL>
__device__ void mcattn_mca_projection(const T* __restrict__ x, const double* __restrict__ wh,
                                      const double* __restrict__ bias, int has_bias,
                                      const long long* __restrict__ budgets,
                                      const unsigned long long* __restrict__ threshold,
                                      const long long* __restrict__ alias, int shift,
                                      const double* __restrict__ p_weight,
                                      const double* __restrict__ row_norms, unsigned int k0,
                                      unsigned int k1, T* __restrict__ out, int n_batch, int heads,
                                      int n, int d_in, int dh, double* __restrict__ cdf,
                                      long long task0, long long chunk) {
    const long long slot = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long task = task0 + slot;
    if (slot >= chunk || task >= (long long)n_batch * heads * n) return;
    const long long b = task / ((long long)heads * n);
    const int h = (int)((task / n) % heads);
    const long long j = task % n;
    const long long r = budgets[task];
    const T* xj = x + (b * n + j) * d_in;
    const double* w = wh + (long long)h * d_in * dh;
    double acc[MCATTN_MCA_MAX_HEAD_DIM];
    for (int c = 0; c < dh; ++c) acc[c] = 0.0;
    bool zero_row = true;
    for (int k = 0; k < d_in; ++k)
        if (xj[k] != T(0)) zero_row = false;
    if (r >= d_in || (r > 0 && zero_row)) {  // exact (a zero row gives the bias only)
        for (int k = 0; k < d_in; ++k) {
            const double xv = (double)xj[k];
            for (int c = 0; c < dh; ++c) acc[c] += xv * w[k * dh + c];
        }
    } else if (r > 0) {
        const unsigned long long stream = (unsigned long long)task;
        double total = 0.0;
        if (OPTIMAL) {
            for (int k = 0; k < d_in; ++k) total += fabs((double)xj[k]) * row_norms[h * d_in + k];
            double running = 0.0;
            for (int k = 0; k < d_in; ++k) {
                running += fabs((double)xj[k]) * row_norms[h * d_in + k] / total;
                cdf[k * chunk + slot] = running;
            }
            cdf[(d_in - 1) * chunk + slot] = 1.0;
        }
        for (long long t = 0; t < r; ++t) {
            const unsigned long long bits = mcattn_sample_bits(k0, k1, stream, (unsigned long long)t);
            int k;
            double p;
            if (OPTIMAL) {
                const double u = mcattn_bits_to_uniform(bits);
                int lo = 0, hi = d_in - 1;
                while (lo < hi) {
                    const int mid = (lo + hi) >> 1;
                    if (u < cdf[mid * chunk + slot]) hi = mid; else lo = mid + 1;
                }
                k = lo;
                p = fabs((double)xj[k]) * row_norms[h * d_in + k] / total;
            } else {
                const int low = 64 - shift;
                const unsigned long long scaled = (bits >> shift) * (unsigned long long)d_in;
                k = (int)(scaled >> low);
                if ((scaled & ((1ull << low) - 1ull)) >= threshold[h * d_in + k])
                    k = (int)alias[h * d_in + k];
                p = p_weight[h * d_in + k];
            }
            const double coef = (double)xj[k] / p;
            for (int c = 0; c < dh; ++c) acc[c] += coef * w[k * dh + c];
        }
        for (int c = 0; c < dh; ++c) acc[c] /= (double)r;
    }
    T* o = out + task * dh;
    for (int c = 0; c < dh; ++c) o[c] = (T)(acc[c] + (has_bias ? bias[h * dh + c] : 0.0));
}

#define MCATTN_MCA_ARGS(T)                                                                  \
    const T *x, const double *wh, const double *bias, int has_bias, const long long *budgets, \
        const unsigned long long *threshold, const long long *alias, int shift,              \
        const double *p_weight, const double *row_norms, unsigned int k0, unsigned int k1,   \
        T *out, int n_batch, int heads, int n, int d_in, int dh, double *cdf, long long task0, \
        long long chunk
#define MCATTN_MCA_PASS x, wh, bias, has_bias, budgets, threshold, alias, shift, p_weight, \
    row_norms, k0, k1, out, n_batch, heads, n, d_in, dh, cdf, task0, chunk

extern "C" __global__ void mcattn_mca_projection_weight_f32(MCATTN_MCA_ARGS(float)) {
    mcattn_mca_projection<float, false>(MCATTN_MCA_PASS);
}
extern "C" __global__ void mcattn_mca_projection_weight_f64(MCATTN_MCA_ARGS(double)) {
    mcattn_mca_projection<double, false>(MCATTN_MCA_PASS);
}
extern "C" __global__ void mcattn_mca_projection_optimal_f32(MCATTN_MCA_ARGS(float)) {
    mcattn_mca_projection<float, true>(MCATTN_MCA_PASS);
}
extern "C" __global__ void mcattn_mca_projection_optimal_f64(MCATTN_MCA_ARGS(double)) {
    mcattn_mca_projection<double, true>(MCATTN_MCA_PASS);
}
