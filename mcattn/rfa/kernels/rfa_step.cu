// One decoding step of causal RFA for every batch row in one launch (RFADecoder.step on CuPy).
//
// Grid (BH); block: up to 256 threads over the value columns (and the features for the
// reductions). Batch row b, features m, value dim dv, the token's query and key features
// fq, fk [BH, m] and key log-weight lk [BH] (masks and log(1 - g) included), value
// v [BH, dv], log-gate [BH] (has_gate), and the state S [BH, m, dv], z [BH, m],
// mass [BH], shift [BH] (updated in place). The definition is mcattn.rfa.naive.step, in
// its order of operations:
//   1. the gate: S, z, mass *= g = exp(log_gate);
//   2. the weight shift c' = max(c, lk): S, z, mass *= exp(c - c') (0 before any key),
//      w = exp(lk - c') (c' = -inf: every weight 0);
//   3. S += w fk v^T, z += w fk, mass += w |fk|;
//   4. out = fq^T S / (fq . z), the denominator floored at eps |fq| mass (low = 1 where
//      it was), 0 where |fq| mass = 0.
// S is read and written once: each thread owns value columns and sums its share of
// fq^T S on the way; the three dot products over the features are block reductions.
#include "common.cuh"

#define MCATTN_STEP_THREADS 256

template <typename T>
__device__ __forceinline__ T mcattn_block_sum(T x, T* scratch) {
    const int t = threadIdx.x;
    scratch[t] = x;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {  // blockDim.x is a power of two
        if (t < half) scratch[t] += scratch[t + half];
        __syncthreads();
    }
    const T total = scratch[0];
    __syncthreads();  // scratch is reused by the next sum
    return total;
}

template <typename T>
__device__ void mcattn_rfa_step(const T* __restrict__ fq, const T* __restrict__ fk,
                                const T* __restrict__ lk, const T* __restrict__ v,
                                const T* __restrict__ log_gate, T* __restrict__ S,
                                T* __restrict__ z, T* __restrict__ mass, T* __restrict__ shift,
                                T* __restrict__ out, int* __restrict__ low, int m, int dv,
                                int has_gate, T eps) {
    __shared__ T scratch[MCATTN_STEP_THREADS];
    const long long b = blockIdx.x;
    const int t = threadIdx.x;
    const T neg_inf = mcattn_neg_inf<T>();
    const T* q_f = fq + b * m;
    const T* k_f = fk + b * m;
    T* Sb = S + b * (long long)m * dv;
    T* zb = z + b * m;
    // The scalars of the step, the same in every thread.
    const T g = has_gate ? mcattn_exp(log_gate[b]) : T(1);
    // Read before any barrier: thread 0 writes mass and shift back at the end.
    const T c = shift[b], l = lk[b], mass_old = mass[b];
    const T c_new = mcattn_max(c, l);
    const bool finite = c_new > neg_inf && c_new < -neg_inf;
    const T safe = finite ? c_new : T(0);
    const T rescale = (c > neg_inf && c < -neg_inf) ? mcattn_exp(c - safe) : T(0);
    const T w = mcattn_exp(l - safe);
    // z and the feature norms: threads over the features.
    T den_part = T(0), fk2 = T(0), fq2 = T(0);
    for (int j = t; j < m; j += blockDim.x) {
        T zj = zb[j];
        if (has_gate) zj *= g;
        zj *= rescale;
        const T kw = k_f[j] * w;
        zj += kw;
        zb[j] = zj;
        den_part += q_f[j] * zj;
        fk2 += k_f[j] * k_f[j];
        fq2 += q_f[j] * q_f[j];
    }
    const T den0 = mcattn_block_sum(den_part, scratch);
    const T k_norm = sqrt(mcattn_block_sum(fk2, scratch));
    const T q_norm = sqrt(mcattn_block_sum(fq2, scratch));
    T mass_b = mass_old;
    if (has_gate) mass_b *= g;
    mass_b *= rescale;
    mass_b += w * k_norm;
    const T ref = q_norm * mass_b;
    const bool has = ref > T(0);
    const bool floored = has && den0 <= eps * ref;
    const T den = floored ? eps * ref : den0;
    // S and the numerator: threads over the value columns.
    for (int col = t; col < dv; col += blockDim.x) {
        const T vc = v[b * dv + col];
        T num = T(0);
        for (int j = 0; j < m; ++j) {
            T s = Sb[(long long)j * dv + col];
            if (has_gate) s *= g;
            s *= rescale;
            s += (k_f[j] * w) * vc;
            Sb[(long long)j * dv + col] = s;
            num += q_f[j] * s;
        }
        out[b * dv + col] = has ? num / den : T(0);
    }
    if (t == 0) {
        mass[b] = mass_b;
        shift[b] = c_new;
        low[b] = floored ? 1 : 0;
    }
}

#define MCATTN_RFA_STEP_ARGS(T)                                                              \
    const T *fq, const T *fk, const T *lk, const T *v, const T *log_gate, T *S, T *z, T *mass, \
        T *shift, T *out, int *low, int m, int dv, int has_gate, T eps
#define MCATTN_RFA_STEP_PASS fq, fk, lk, v, log_gate, S, z, mass, shift, out, low, m, dv, has_gate, eps

extern "C" __global__ void mcattn_rfa_step_f32(MCATTN_RFA_STEP_ARGS(float)) {
    mcattn_rfa_step<float>(MCATTN_RFA_STEP_PASS);
}
extern "C" __global__ void mcattn_rfa_step_f64(MCATTN_RFA_STEP_ARGS(double)) {
    mcattn_rfa_step<double>(MCATTN_RFA_STEP_PASS);
}
