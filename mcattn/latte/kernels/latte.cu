// LATTE attention for CuPy: MS4B estimate, per-head keep rule, softmax over kept keys.
//
// Grid (ceil(Nq / blockDim.x), BH); one thread per query row, two passes over the keys
// (the algorithm of mcattn/latte/cuda.py, which documents it):
//   1. hh = hi(q8) . hi(k8) in integers, u = hh * sk256[j] (+ bias / c) in double -- an
//      exact product -- and the row maximum (safe mode: of u - err, err from the nibbles);
//   2. keep u (safe: u + err) >= cut, score the kept keys (q8 . k8 in integers, or q . k),
//      online softmax and sum p v; with want_mass, the exact scores of every visible key
//      for the dropped attention mass.
// The keep rule uses the same IEEE double operations as the CPU kernel (products that are
// exact, one division and one subtraction per row), so the kept sets are identical. The
// topk cut is found without storing the row: a bisection in value space snapped to the
// row's values (mcattn_latte_kth_largest; extra passes over the keys).
//
// Layout (C-contiguous): q8, k8 int8 [BH, N, d]; qf, kf [BH, N, d] and v [BH, Nk, dv] in
// T; s_q [BH, Nq], s_k [BH, Nk] float; sk256 [BH, Nk] double (= 256 s_k); theta [BH]
// double; bias [M, bias_rows, Nk] T selected by mask_index [BH]; out [BH, Nq, dv] T;
// kept [BH, Nq] long long; dropped [BH, Nq] double; mask_out [BH, Nq, Nk] bool (if
// write_mask). Requires d, dv <= MAXD.
#include "common.cuh"

__device__ __forceinline__ int mcattn_iabs(int x) { return x < 0 ? -x : x; }

// u of key j (the CPU kernel's operations), -inf when masked.
template <typename T>
__device__ double mcattn_latte_unit(const int* qh, const signed char* krows, const double* sk,
                                    const T* bias_row, int has_bias, double cq, int d, int j) {
    double b = 0.0;
    if (has_bias) {
        b = (double)bias_row[j];
        if (b == mcattn_neg_inf<double>()) return b;
    }
    int hh = 0;
    for (int c = 0; c < d; ++c) hh += qh[c] * (((int)krows[(long long)j * d + c]) >> 4);
    double val = (double)hh * sk[j];
    if (has_bias) val = val + b / cq;
    return val;
}

// The kk-th largest visible u of the row (ties counted): bisection between lo (at least
// kk values >= lo, a value of the row) and hb (fewer than kk values >= hb), snapped to the
// row's values; when no value lies strictly between them, lo is the answer.
template <typename T>
__device__ double mcattn_latte_kth_largest(const int* qh, const signed char* krows,
                                           const double* sk, const T* bias_row, int has_bias,
                                           double cq, int d, int rend, long long kk, double top) {
    const double ninf = mcattn_neg_inf<double>(), inf = -ninf;
    double lo = inf;
    long long count_top = 0;
    for (int j = 0; j < rend; ++j) {
        const double x = mcattn_latte_unit<T>(qh, krows, sk, bias_row, has_bias, cq, d, j);
        if (x != ninf) {
            lo = x < lo ? x : lo;
            if (x == top) ++count_top;
        }
    }
    if (count_top >= kk) return top;
    double hb = top;
    for (int step = 0; step < 4096; ++step) {
        long long between = 0;
        double first = inf;
        for (int j = 0; j < rend; ++j) {
            const double x = mcattn_latte_unit<T>(qh, krows, sk, bias_row, has_bias, cq, d, j);
            if (x > lo && x < hb) {
                ++between;
                first = x < first ? x : first;
            }
        }
        if (between == 0) return lo;
        double mid = lo + (hb - lo) * 0.5;
        if (!(mid > lo && mid < hb)) mid = first;
        long long above = 0;
        double snap = inf;
        for (int j = 0; j < rend; ++j) {
            const double x = mcattn_latte_unit<T>(qh, krows, sk, bias_row, has_bias, cq, d, j);
            if (x >= mid) {
                ++above;
                snap = x < snap ? x : snap;
            }
        }
        if (above >= kk) lo = snap;
        else hb = mid;
    }
    return lo;
}

template <typename T, int MAXD>
__device__ void mcattn_latte_forward(
    const signed char* __restrict__ q8, const signed char* __restrict__ k8,
    const T* __restrict__ qf, const T* __restrict__ kf, const T* __restrict__ v,
    const float* __restrict__ s_q, const float* __restrict__ s_k,
    const double* __restrict__ sk256, const double* __restrict__ theta,
    const T* __restrict__ bias, const long long* __restrict__ mask_index, T* __restrict__ out,
    long long* __restrict__ kept, double* __restrict__ dropped, bool* __restrict__ mask_out,
    int nq, int nk, int d, int dv, double scale, int mode, int int8_scores, int has_bias,
    int bias_rows, int is_causal, int want_mass, int write_mask, int do_output) {
    const long long bh = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nq) return;
    const double ninf = mcattn_neg_inf<double>();
    int qh[MAXD], ql[MAXD];
    T qrow[MAXD], acc[MAXD];
    int l1q = 0;
    for (int c = 0; c < d; ++c) {
        const int x = q8[(bh * nq + i) * d + c];
        qh[c] = x >> 4;
        ql[c] = x & 15;
        l1q += mcattn_iabs(x);
        qrow[c] = qf[(bh * nq + i) * d + c];
    }
    const T* bias_row = 0;
    if (has_bias)
        bias_row = bias + (mask_index[bh] * bias_rows + (bias_rows > 1 ? i : 0)) * (long long)nk;
    const double cq = scale * (double)s_q[bh * nq + i];
    const int rend = is_causal ? mcattn_min(nk, i + 1) : nk;
    const double th = theta[bh];
    const signed char* krows = k8 + bh * (long long)nk * d;
    // Pass 1: the row maximum of the (lower) estimate.
    double top = ninf;
    long long visible = 0;
    for (int j = 0; j < rend; ++j) {
        double b = 0.0;
        if (has_bias) {
            b = (double)bias_row[j];
            if (b == ninf) continue;
        }
        int hh = 0, nib = 0, l1k = 0;
        for (int c = 0; c < d; ++c) {
            const int y = krows[(long long)j * d + c];
            const int yh = y >> 4;
            hh += qh[c] * yh;
            if (mode == 3) {
                const int yl = y & 15;
                nib += 16 * (mcattn_iabs(qh[c]) * yl + ql[c] * mcattn_iabs(yh)) + ql[c] * yl;
                l1k += mcattn_iabs(y);
            }
        }
        double val = (double)hh * sk256[bh * nk + j];
        if (has_bias) val = val + b / cq;
        if (mode == 3)
            val = val - ((double)nib + (2.0 * ((double)l1q + (double)l1k) + d) / 4.0) *
                            (double)s_k[bh * nk + j];
        top = mcattn_max(top, val);
        ++visible;
    }
    long long n = 0;
    if (top != ninf) {
        double cut;
        if (mode == 1) {
            cut = th / cq < top ? th / cq : top;
        } else if (mode == 2) {
            const long long kk = (long long)th;
            cut = visible <= kk ? ninf
                                : mcattn_latte_kth_largest<T>(qh, krows, sk256 + bh * nk, bias_row,
                                                              has_bias, cq, d, rend, kk, top);
        } else {
            cut = top - th / cq;
        }
        T m = mcattn_neg_inf<T>(), tot = T(0);
        for (int c = 0; c < dv; ++c) acc[c] = T(0);
        double tm = ninf, t_all = 0.0, t_drop = 0.0;
        for (int j = 0; j < rend; ++j) {
            double b = 0.0;
            if (has_bias) {
                b = (double)bias_row[j];
                if (b == ninf) continue;
            }
            int hh = 0, nib = 0, l1k = 0, dot8 = 0;
            for (int c = 0; c < d; ++c) {
                const int y = krows[(long long)j * d + c];
                const int yh = y >> 4;
                hh += qh[c] * yh;
                dot8 += (16 * qh[c] + ql[c]) * y;
                if (mode == 3) {
                    const int yl = y & 15;
                    nib += 16 * (mcattn_iabs(qh[c]) * yl + ql[c] * mcattn_iabs(yh)) + ql[c] * yl;
                    l1k += mcattn_iabs(y);
                }
            }
            double val = (double)hh * sk256[bh * nk + j];
            if (has_bias) val = val + b / cq;
            if (mode == 3)
                val = val + ((double)nib + (2.0 * ((double)l1q + (double)l1k) + d) / 4.0) *
                                (double)s_k[bh * nk + j];
            const bool keep = val >= cut;
            T fdot = T(0);
            if (want_mass || (keep && !int8_scores))
                for (int c = 0; c < d; ++c) fdot += qrow[c] * kf[(bh * nk + j) * d + c];
            if (want_mass) {
                const double ts = (double)fdot * scale + b;
                if (ts > tm) {
                    const double r = exp(tm - ts);
                    t_all *= r;
                    t_drop *= r;
                    tm = ts;
                }
                const double w = exp(ts - tm);
                t_all += w;
                if (!keep) t_drop += w;
            }
            if (!keep) continue;
            if (write_mask) mask_out[(bh * nq + i) * (long long)nk + j] = true;
            ++n;
            if (!do_output) continue;
            const T s = int8_scores ? (T)(cq * (double)s_k[bh * nk + j] * (double)dot8 + b)
                                    : (T)((double)fdot * scale + b);
            if (s > m) {
                const T r = mcattn_exp(m - s);
                tot *= r;
                for (int c = 0; c < dv; ++c) acc[c] *= r;
                m = s;
            }
            const T p = mcattn_exp(s - m);
            tot += p;
            for (int c = 0; c < dv; ++c) acc[c] += p * v[(bh * nk + j) * dv + c];
        }
        if (want_mass) dropped[bh * nq + i] = t_all > 0.0 ? t_drop / t_all : 0.0;
        if (do_output) {
            const T inv = T(1) / tot;
            for (int c = 0; c < dv; ++c) out[(bh * nq + i) * dv + c] = acc[c] * inv;
        }
    }
    kept[bh * nq + i] = n;
}

#define MCATTN_LATTE_ARGS(T)                                                                   \
    const signed char *q8, const signed char *k8, const T *qf, const T *kf, const T *v,        \
        const float *s_q, const float *s_k, const double *sk256, const double *theta,          \
        const T *bias, const long long *mask_index, T *out, long long *kept, double *dropped,   \
        bool *mask_out, int nq, int nk, int d, int dv, double scale, int mode, int int8_scores, \
        int has_bias, int bias_rows, int is_causal, int want_mass, int write_mask, int do_output
#define MCATTN_LATTE_PASS                                                                    \
    q8, k8, qf, kf, v, s_q, s_k, sk256, theta, bias, mask_index, out, kept, dropped, mask_out, \
        nq, nk, d, dv, scale, mode, int8_scores, has_bias, bias_rows, is_causal, want_mass,    \
        write_mask, do_output

extern "C" __global__ void mcattn_latte_forward_f32(MCATTN_LATTE_ARGS(float)) {
    mcattn_latte_forward<float, 128>(MCATTN_LATTE_PASS);
}
extern "C" __global__ void mcattn_latte_forward_f64(MCATTN_LATTE_ARGS(double)) {
    mcattn_latte_forward<double, 128>(MCATTN_LATTE_PASS);
}
