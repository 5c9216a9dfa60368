// Non-causal random feature attention on tensor cores: the two products of rfa.cu's
// states and output kernels as tiles on float16 / bfloat16 mma.sync (m16n8k16, float32
// accumulation). The features, key weights and mass stay those of rfa.cu and the array
// code of mcattn/rfa/_gpu.py; this file replaces steps 3 and 5 when there is one chunk.
//
// Both kernels: blocks of 4 warps (128 threads), each warp 16 rows of a 64-row tile;
// value dim DV in {32, 64, 128} and the width W = DV + 8 of [V | 1 | 0...] (the ones
// column gives z, the normaliser, in the same mma as S).
//
// states: grid (ceil(m / 64), splits, BH). Block (f0, sp) sums keys [sp * span, + span)
//   of  partial[sp, bh, r, c] = sum_s kw[s, r] [v_s, 1][c]  for its 64 feature rows r:
//   A = kw^T tiles (features x keys) and B = [V | 1] tiles (keys x W), both staged in
//   shared memory as pairs of 16-bit codes along the keys; the splits are summed by the
//   caller (deterministic: no atomics).
// output: grid (ceil(Nq / 64), BH). out = fq T[:, :DV] / (fq T[:, DV]), T = [S | z] /
//   mass (scaled by the caller so that |T| <= max |v| fits float16), A = fq straight
//   from global memory (rounded to the type), B = T^T tiles of 64 features; the
//   denominator floored at eps * qnorm (the Cauchy-Schwarz bound over mass) and the
//   floored rows flagged, as rfa.cu; a row with qnorm = 0 is zero.
//
// Layout (C-contiguous, float32): kw [BH, Nk, m], v [BH, Nk, DV], partial
// [splits, BH, m, DV + 1]; fq [BH, Nq, m], t [BH, m, DV + 1], qnorm [BH, Nq], out
// [BH, Nq, DV], flags [BH, Nq] int. Static shared memory at DV = 128: 64 x 36 + 136 x 36
// words (states), 136 x 36 words (output).
#include "common.cuh"
#include "warp.cuh"

#define MCATTN_RMMA_ROWS 64
#define MCATTN_RMMA_KEYS 64
#define MCATTN_RMMA_THREADS 128
#define MCATTN_RMMA_LD (MCATTN_RMMA_KEYS / 2 + 4)  // words a row, padded: conflict-free reads

// acc += A B over one staged tile of 64 along k: A rows from a[row][word], B columns from
// bt[col][word] (word p holds k = 2 p, 2 p + 1), the warp's rows a_row0.. a_row0 + 15.
template <class Ops, int W>
__device__ __forceinline__ void mcattn_rmma_tile(float (&acc)[W / 8][4], const unsigned (*a)[MCATTN_RMMA_LD],
                                                 const unsigned (*bt)[MCATTN_RMMA_LD], int a_row0, int g,
                                                 int t) {
#pragma unroll
    for (int kk = 0; kk < MCATTN_RMMA_KEYS / 16; ++kk) {
        const unsigned af[4] = {a[a_row0 + g][8 * kk + t], a[a_row0 + g + 8][8 * kk + t],
                                a[a_row0 + g][8 * kk + 4 + t], a[a_row0 + g + 8][8 * kk + 4 + t]};
#pragma unroll
        for (int n = 0; n < W / 8; ++n) {
            const unsigned b[2] = {bt[8 * n + g][8 * kk + t], bt[8 * n + g][8 * kk + 4 + t]};
            Ops::mma(acc[n], af, b);
        }
    }
}

template <class Ops, int DV>
__device__ __forceinline__ void mcattn_rfa_mma_states(const float* __restrict__ kw, const float* __restrict__ v,
                                                      float* __restrict__ partial, int nk, int m, int span) {
    constexpr int W = DV + 8;
    __shared__ unsigned at[MCATTN_RMMA_ROWS][MCATTN_RMMA_LD];  // [feature][key pair]
    __shared__ unsigned vt[W][MCATTN_RMMA_LD];                 // [column of V | 1][key pair]
    const long long bh = blockIdx.z, bh_count = gridDim.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int f0 = blockIdx.x * MCATTN_RMMA_ROWS;
    const int s_begin = blockIdx.y * span, s_end = mcattn_min(nk, s_begin + span);
    const float* kb = kw + bh * nk * (long long)m;
    const float* vb = v + bh * nk * (long long)DV;
    float acc[W / 8][4];
#pragma unroll
    for (int n = 0; n < W / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
    for (int j0 = s_begin; j0 < s_end; j0 += MCATTN_RMMA_KEYS) {
        __syncthreads();  // the previous tile is no longer read
#pragma unroll 1
        for (int e = threadIdx.x; e < MCATTN_RMMA_ROWS * MCATTN_RMMA_KEYS / 2; e += MCATTN_RMMA_THREADS) {
            const int r = e % MCATTN_RMMA_ROWS, kp = e / MCATTN_RMMA_ROWS, j = j0 + 2 * kp, f = f0 + r;
            const float a0 = f < m && j < s_end ? kb[(long long)j * m + f] : 0.0f;
            const float a1 = f < m && j + 1 < s_end ? kb[(long long)(j + 1) * m + f] : 0.0f;
            at[r][kp] = mcattn_pack16(Ops::round(a0), Ops::round(a1));
        }
#pragma unroll 1
        for (int e = threadIdx.x; e < W * MCATTN_RMMA_KEYS / 2; e += MCATTN_RMMA_THREADS) {
            const int c = e % W, kp = e / W, j = j0 + 2 * kp;
            const float one = c == DV ? 1.0f : 0.0f;  // the ones column: z; then zeros
            const float b0 = j < s_end ? (c < DV ? vb[(long long)j * DV + c] : one) : 0.0f;
            const float b1 = j + 1 < s_end ? (c < DV ? vb[(long long)(j + 1) * DV + c] : one) : 0.0f;
            vt[c][kp] = mcattn_pack16(Ops::round(b0), Ops::round(b1));
        }
        __syncthreads();
        if (f0 + 16 * warp >= m) continue;  // a warp past the features: nothing to add
        mcattn_rmma_tile<Ops, W>(acc, at, vt, 16 * warp, g, t);
    }
    float* pb = partial + ((long long)blockIdx.y * bh_count + bh) * m * (long long)(DV + 1);
#pragma unroll
    for (int n = 0; n < W / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int f = f0 + 16 * warp + g + 8 * (i >> 1), c = 8 * n + 2 * t + (i & 1);
            if (f < m && c <= DV) pb[(long long)f * (DV + 1) + c] = acc[n][i];
        }
}

template <class Ops, int DV>
__device__ __forceinline__ void mcattn_rfa_mma_output(const float* __restrict__ fq, const float* __restrict__ ts,
                                                      const float* __restrict__ qnorm, float* __restrict__ out,
                                                      int* __restrict__ flags, int nq, int m, float eps) {
    constexpr int W = DV + 8;
    __shared__ unsigned qt[MCATTN_RMMA_ROWS][MCATTN_RMMA_LD];  // [query row][feature pair]
    __shared__ unsigned tt[W][MCATTN_RMMA_LD];                 // [column of T][feature pair]
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * MCATTN_RMMA_ROWS;
    const float* qb = fq + bh * nq * (long long)m;
    const float* tb = ts + bh * m * (long long)(DV + 1);
    float acc[W / 8][4];
#pragma unroll
    for (int n = 0; n < W / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
    for (int r0 = 0; r0 < m; r0 += MCATTN_RMMA_KEYS) {  // 64 features at a time
        __syncthreads();
#pragma unroll 1
        for (int e = threadIdx.x; e < MCATTN_RMMA_ROWS * MCATTN_RMMA_KEYS / 2; e += MCATTN_RMMA_THREADS) {
            const int kp = e % (MCATTN_RMMA_KEYS / 2), r = e / (MCATTN_RMMA_KEYS / 2);  // along features
            const int row = q0 + r, f = r0 + 2 * kp;
            const float a0 = row < nq && f < m ? qb[(long long)row * m + f] : 0.0f;
            const float a1 = row < nq && f + 1 < m ? qb[(long long)row * m + f + 1] : 0.0f;
            qt[r][kp] = mcattn_pack16(Ops::round(a0), Ops::round(a1));
        }
#pragma unroll 1
        for (int e = threadIdx.x; e < W * MCATTN_RMMA_KEYS / 2; e += MCATTN_RMMA_THREADS) {
            const int c = e % W, kp = e / W, f = r0 + 2 * kp;
            const float b0 = c <= DV && f < m ? tb[(long long)f * (DV + 1) + c] : 0.0f;
            const float b1 = c <= DV && f + 1 < m ? tb[(long long)(f + 1) * (DV + 1) + c] : 0.0f;
            tt[c][kp] = mcattn_pack16(Ops::round(b0), Ops::round(b1));
        }
        __syncthreads();
        mcattn_rmma_tile<Ops, W>(acc, qt, tt, 16 * warp, g, t);
    }
    // The denominator of row g (g + 8) is column DV: element 0 (2) of group DV / 8 at t = 0.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = q0 + 16 * warp + g + 8 * h;
        float den = __shfl_sync(0xffffffffu, acc[DV / 8][2 * h], lane & ~3);
        if (row >= nq) continue;
        const float ref = qnorm[bh * nq + row];
        float* orow = out + (bh * nq + row) * (long long)DV;
        if (!(ref > 0.0f)) {
#pragma unroll
            for (int n = 0; n < DV / 8; ++n) orow[8 * n + 2 * t] = orow[8 * n + 2 * t + 1] = 0.0f;
            if (t == 0) flags[bh * nq + row] = 0;
            continue;
        }
        const bool floored = den <= eps * ref;
        if (floored) den = eps * ref;
        if (t == 0) flags[bh * nq + row] = floored ? 1 : 0;
        const float inv = 1.0f / den;
#pragma unroll
        for (int n = 0; n < DV / 8; ++n)
#pragma unroll
            for (int i = 0; i < 2; ++i) orow[8 * n + 2 * t + i] = acc[n][2 * h + i] * inv;
    }
}

#define MCATTN_RFA_MMA_KERNELS(TAG, OPS, DV)                                                      \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_RMMA_THREADS)                            \
        mcattn_rfa_mma_states_##TAG##_dv##DV(const float* __restrict__ kw, const float* __restrict__ v, \
                                            float* __restrict__ partial, int nk, int m, int span) {   \
        mcattn_rfa_mma_states<OPS, DV>(kw, v, partial, nk, m, span);                              \
    }                                                                                             \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_RMMA_THREADS)                            \
        mcattn_rfa_mma_output_##TAG##_dv##DV(const float* __restrict__ fq, const float* __restrict__ ts, \
                                            const float* __restrict__ qnorm, float* __restrict__ out, \
                                            int* __restrict__ flags, int nq, int m, float eps) {      \
        mcattn_rfa_mma_output<OPS, DV>(fq, ts, qnorm, out, flags, nq, m, eps);                    \
    }

MCATTN_RFA_MMA_KERNELS(f16, mcattn_f16_ops, 32)
MCATTN_RFA_MMA_KERNELS(f16, mcattn_f16_ops, 64)
MCATTN_RFA_MMA_KERNELS(f16, mcattn_f16_ops, 128)
MCATTN_RFA_MMA_KERNELS(bf16, mcattn_bf16_ops, 32)
MCATTN_RFA_MMA_KERNELS(bf16, mcattn_bf16_ops, 64)
MCATTN_RFA_MMA_KERNELS(bf16, mcattn_bf16_ops, 128)
