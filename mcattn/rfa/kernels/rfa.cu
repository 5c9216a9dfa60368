// Random feature attention for CuPy: the four kernels of mcattn/rfa/_gpu.py.
//
// 1. features: one thread per row of q or k [BH, N, d]: the rows fed to the feature map
//    are factor * x (factor * x / |x| with unit), u = W x' with W = omega[bh % heads]
//    [D, d], then f [m] (positive: exp(u - max u) / sqrt(D); sincos: [sin u, cos u] /
//    sqrt(D); arccos: max(u, 0) / sqrt(D)), the log-weight and the feature norm.
// 2. states: one thread per (batch row, chunk, entry of [S | z] or the mass): the chunk's
//    sum over its keys s of exp(b_L - b_s) * kw_s * [v_s, 1] (kw: weighted key features,
//    b: cumulative log-gates within the chunk). Non-causal attention is one chunk.
// 3. scan: one thread per (batch row, entry): chunk sums -> state at each chunk start.
// 4. output: one thread per query row: exp(b_i) f(q_i) [S | z] of its chunk plus (causal)
//    the exact products with the chunk's earlier keys; the denominator is floored at
//    eps * |f(q_i)| * mass and the floored rows are flagged. A row whose floor scale is
//    0 (no visible key) is zero. Requires dv <= MAXD.
//
// Layout (C-contiguous): x [BH, N, d], omega [H, D, d], f / kw [BH, N, m], per-row arrays
// [BH, N], v [BH, Nk, dv], states [BH, n_chunks, m, dv + 1], mass [BH, n_chunks],
// chunk_decay [BH, n_chunks], out [BH, Nq, dv], flags [BH, Nq] (int).
#include "common.cuh"

__device__ __forceinline__ float mcattn_rfa_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double mcattn_rfa_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float mcattn_rfa_sin(float x) { return sinf(x); }
__device__ __forceinline__ double mcattn_rfa_sin(double x) { return sin(x); }
__device__ __forceinline__ float mcattn_rfa_cos(float x) { return cosf(x); }
__device__ __forceinline__ double mcattn_rfa_cos(double x) { return cos(x); }

template <typename T>
__device__ void mcattn_rfa_features(const T* __restrict__ x, const T* __restrict__ omega,
                                    T* __restrict__ f, T* __restrict__ logw,
                                    T* __restrict__ fnorm, long long rows, int n, int d,
                                    int width, int heads, T factor, int unit, int kind) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const long long bh = row / n;
    const T* xr = x + row * d;
    const T* w = omega + (bh % heads) * (long long)width * d;
    const int m = kind == 1 ? 2 * width : width;
    T* fr = f + row * m;
    T sq = T(0);
    for (int c = 0; c < d; ++c) sq += xr[c] * xr[c];
    T scale = factor;
    if (unit) scale = sq > T(0) ? factor / mcattn_rfa_sqrt(sq) : T(0);
    const T inv = T(1) / mcattn_rfa_sqrt(T(width));
    T top = mcattn_neg_inf<T>();
    for (int r = 0; r < width; ++r) {
        T u = T(0);
        for (int c = 0; c < d; ++c) u += w[(long long)r * d + c] * xr[c];
        u *= scale;
        if (kind == 1) {
            fr[r] = mcattn_rfa_sin(u) * inv;
            fr[width + r] = mcattn_rfa_cos(u) * inv;
        } else if (kind == 2) {
            fr[r] = mcattn_max(u, T(0)) * inv;
        } else {
            fr[r] = u;
            top = mcattn_max(top, u);
        }
    }
    const T half_sq = T(0.5) * scale * scale * sq;
    if (kind == 0) {
        for (int r = 0; r < width; ++r) fr[r] = mcattn_exp(fr[r] - top) * inv;
        logw[row] = top - half_sq;
    } else {
        logw[row] = kind == 1 ? half_sq : T(0);
    }
    T acc = T(0);
    for (int r = 0; r < m; ++r) acc += fr[r] * fr[r];
    fnorm[row] = mcattn_rfa_sqrt(acc);
}

template <typename T>
__device__ void mcattn_rfa_states(const T* __restrict__ kw, const T* __restrict__ v,
                                  const T* __restrict__ knorm, const T* __restrict__ cum,
                                  int has_gate, T* __restrict__ states, T* __restrict__ mass,
                                  long long bh_count, int n, int m, int dv, int chunk,
                                  int n_chunks) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long width = (long long)m * (dv + 1) + 1;
    if (tid >= bh_count * n_chunks * width) return;
    const long long e = tid % width;
    const long long chunk_row = tid / width;  // bh * n_chunks + ch
    const long long ch = chunk_row % n_chunks;
    const long long bh = chunk_row / n_chunks;
    const int s0 = (int)(ch * chunk);
    const int s1 = mcattn_min(n, s0 + chunk);
    const long long base = bh * n;
    const T b_last = has_gate ? cum[base + s1 - 1] : T(0);
    T acc = T(0);
    if (e == width - 1) {
        for (int s = s0; s < s1; ++s) {
            const T tail = has_gate ? mcattn_exp(b_last - cum[base + s]) : T(1);
            acc += tail * knorm[base + s];
        }
        mass[chunk_row] = acc;
        return;
    }
    const int r = (int)(e / (dv + 1));
    const int c = (int)(e % (dv + 1));
    for (int s = s0; s < s1; ++s) {
        const T tail = has_gate ? mcattn_exp(b_last - cum[base + s]) : T(1);
        const T val = c < dv ? v[(base + s) * dv + c] : T(1);
        acc += tail * kw[(base + s) * m + r] * val;
    }
    states[chunk_row * (width - 1) + e] = acc;
}

template <typename T>
__device__ void mcattn_rfa_scan(T* __restrict__ states, T* __restrict__ mass,
                                const T* __restrict__ chunk_decay, long long bh_count,
                                int n_chunks, int m, int dv) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long entries = (long long)m * (dv + 1);
    const long long width = entries + 1;
    if (tid >= bh_count * width) return;
    const long long bh = tid / width;
    const long long e = tid % width;
    T run = T(0);
    for (int ch = 0; ch < n_chunks; ++ch) {
        const long long chunk_row = bh * n_chunks + ch;
        T* slot = e == entries ? mass + chunk_row : states + chunk_row * entries + e;
        const T local = *slot;
        *slot = run;
        run = chunk_decay[chunk_row] * run + local;
    }
}

template <typename T, int MAXD>
__device__ void mcattn_rfa_output(const T* __restrict__ fq, const T* __restrict__ qnorm,
                                  const T* __restrict__ kw, const T* __restrict__ v,
                                  const T* __restrict__ knorm, const T* __restrict__ cum,
                                  int has_gate, const T* __restrict__ states,
                                  const T* __restrict__ mass, T* __restrict__ out,
                                  int* __restrict__ flags, long long bh_count, int nq, int nk,
                                  int m, int dv, int chunk, int n_chunks, int causal, T eps) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= bh_count * nq) return;
    const long long bh = row / nq;
    const int i = (int)(row % nq);
    const int ch = causal ? i / chunk : 0;
    const long long kbase = bh * nk;
    const T into = (causal && has_gate) ? mcattn_exp(cum[kbase + i]) : T(1);
    const T* st = states + (bh * n_chunks + ch) * (long long)m * (dv + 1);
    const T* fr = fq + row * m;
    T num[MAXD];
    T den = T(0);
    for (int c = 0; c < dv; ++c) num[c] = T(0);
    for (int r = 0; r < m; ++r) {
        const T a = fr[r];
        for (int c = 0; c < dv; ++c) num[c] += a * st[r * (dv + 1) + c];
        den += a * st[r * (dv + 1) + dv];
    }
    for (int c = 0; c < dv; ++c) num[c] *= into;
    den *= into;
    T ref = into * mass[bh * n_chunks + ch];
    if (causal) {
        for (int s = ch * chunk; s <= i; ++s) {
            const T dec = has_gate ? mcattn_exp(cum[kbase + i] - cum[kbase + s]) : T(1);
            T dot = T(0);
            for (int r = 0; r < m; ++r) dot += fr[r] * kw[(kbase + s) * m + r];
            const T a = dec * dot;
            for (int c = 0; c < dv; ++c) num[c] += a * v[(kbase + s) * dv + c];
            den += a;
            ref += dec * knorm[kbase + s];
        }
    }
    ref *= qnorm[row];
    flags[row] = 0;
    T* o = out + row * dv;
    if (ref > T(0)) {
        if (den <= eps * ref) {
            den = eps * ref;
            flags[row] = 1;
        }
        const T inv = T(1) / den;
        for (int c = 0; c < dv; ++c) o[c] = num[c] * inv;
    } else {
        for (int c = 0; c < dv; ++c) o[c] = T(0);
    }
}

// Argument lists of the extern "C" kernels (also used by the host-shim launchers).
#define MCATTN_RFA_FEATURES_ARGS(T)                                                        \
    const T *x, const T *omega, T *f, T *logw, T *fnorm, long long rows, int n, int d,     \
        int width, int heads, T factor, int unit, int kind
#define MCATTN_RFA_FEATURES_PASS x, omega, f, logw, fnorm, rows, n, d, width, heads, factor, unit, kind
#define MCATTN_RFA_STATES_ARGS(T)                                                          \
    const T *kw, const T *v, const T *knorm, const T *cum, int has_gate, T *states, T *mass, \
        long long bh_count, int n, int m, int dv, int chunk, int n_chunks
#define MCATTN_RFA_STATES_PASS \
    kw, v, knorm, cum, has_gate, states, mass, bh_count, n, m, dv, chunk, n_chunks
#define MCATTN_RFA_SCAN_ARGS(T) \
    T *states, T *mass, const T *chunk_decay, long long bh_count, int n_chunks, int m, int dv
#define MCATTN_RFA_SCAN_PASS states, mass, chunk_decay, bh_count, n_chunks, m, dv
#define MCATTN_RFA_OUTPUT_ARGS(T)                                                           \
    const T *fq, const T *qnorm, const T *kw, const T *v, const T *knorm, const T *cum,     \
        int has_gate, const T *states, const T *mass, T *out, int *flags, long long bh_count, \
        int nq, int nk, int m, int dv, int chunk, int n_chunks, int causal, T eps
#define MCATTN_RFA_OUTPUT_PASS                                                             \
    fq, qnorm, kw, v, knorm, cum, has_gate, states, mass, out, flags, bh_count, nq, nk, m, dv, \
        chunk, n_chunks, causal, eps

#define MCATTN_RFA_KERNELS(T, SUFFIX)                                                          \
    extern "C" __global__ void mcattn_rfa_features_##SUFFIX(MCATTN_RFA_FEATURES_ARGS(T)) {     \
        mcattn_rfa_features<T>(MCATTN_RFA_FEATURES_PASS);                                      \
    }                                                                                          \
    extern "C" __global__ void mcattn_rfa_states_##SUFFIX(MCATTN_RFA_STATES_ARGS(T)) {         \
        mcattn_rfa_states<T>(MCATTN_RFA_STATES_PASS);                                          \
    }                                                                                          \
    extern "C" __global__ void mcattn_rfa_scan_##SUFFIX(MCATTN_RFA_SCAN_ARGS(T)) {             \
        mcattn_rfa_scan<T>(MCATTN_RFA_SCAN_PASS);                                              \
    }                                                                                          \
    extern "C" __global__ void mcattn_rfa_output_##SUFFIX(MCATTN_RFA_OUTPUT_ARGS(T)) {         \
        mcattn_rfa_output<T, 128>(MCATTN_RFA_OUTPUT_PASS);                                     \
    }

MCATTN_RFA_KERNELS(float, f32)
MCATTN_RFA_KERNELS(double, f64)
