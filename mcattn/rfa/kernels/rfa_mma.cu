// Random feature attention on tensor cores: the products of rfa.cu's states and output
// kernels as tiles on float16 / bfloat16 mma.sync (m16n8k16, float32 accumulation). The
// features, key weights and mass stay those of rfa.cu and the array code of
// mcattn/rfa/_gpu.py; this file replaces its steps 3 and 5: non-causal (one chunk) with
// states + output, causal and gated (the chunked form) with chunk_states, rfa.cu's
// float32 scan, then causal (described above its function).
//
// All kernels: blocks of 4 warps (128 threads), each warp 16 rows of a 64-row tile;
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
// chunk_states: grid (ceil(m / 64), n_chunks, BH): states as above with span = chunk,
//   written to states [BH, n_chunks, m, DV + 1] (the keys weighted by their tail decay).
// causal: grid (ceil(N / 64), BH): cum [BH, N] (the chunks' cumulative log-gates), ts
//   [BH, n_chunks, m, DV + 1] (states at chunk starts over their mass), cmass [BH,
//   n_chunks], kkey / ikey [BH, N] (each key's largest |kw| and its inverse). Static
//   shared memory at DV = 128: (64 + 64 + 136) x 36 words.
//
// Layout (C-contiguous, float32): kw [BH, Nk, m], v [BH, Nk, DV], partial
// [splits, BH, m, DV + 1]; fq [BH, Nq, m], t [BH, m, DV + 1], qnorm [BH, Nq], out
// [BH, Nq, DV], flags [BH, Nq] int. Static shared memory at DV = 128: 64 x 36 + 136 x 36
// words (states), 136 x 36 words (output).
#include "common.cuh"
#include "mma_softmax.cuh"
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

// CHUNKED: block y is chunk c of span keys, key s weighted by tail[s] / kscale[c] before the
// rounding (tail: the gate's decay to the chunk end, kscale: the chunk's largest |kw|, so the
// largest weighted feature is 1 and float16 does not underflow), the sum times kscale[c]
// written to states [BH, n_chunks, m, DV + 1].
// dst[r][p] = rows r0 + r of x [n, m] (r < 64), features f0 + 2 p and f0 + 2 p + 1, times
// the row's inv_row (none: 1), rounded; 0 outside x. The loop stays rolled: no loads in
// flight beside the accumulators (the tile kernels' register budget).
template <class Ops>
__device__ __forceinline__ void mcattn_rmma_stage_rows(unsigned (*dst)[MCATTN_RMMA_LD], const float* __restrict__ x,
                                                       int r0, int n, int f0, int m,
                                                       const float* __restrict__ inv_row) {
#pragma unroll 1
    for (int e = threadIdx.x; e < MCATTN_RMMA_ROWS * MCATTN_RMMA_KEYS / 2; e += MCATTN_RMMA_THREADS) {
        const int kp = e % (MCATTN_RMMA_KEYS / 2), r = e / (MCATTN_RMMA_KEYS / 2);
        const int row = r0 + r, f = f0 + 2 * kp;
        const float scale = inv_row != nullptr && row < n ? inv_row[row] : 1.0f;
        const float a0 = row < n && f < m ? x[(long long)row * m + f] * scale : 0.0f;
        const float a1 = row < n && f + 1 < m ? x[(long long)row * m + f + 1] * scale : 0.0f;
        dst[r][kp] = mcattn_pack16(Ops::round(a0), Ops::round(a1));
    }
}

// vt[c][p] = [V | 1 | 0...] of keys j0 + 2 p, j0 + 2 p + 1 (below s_end; 0 past it), column c < DV + 8.
template <class Ops, int DV>
__device__ __forceinline__ void mcattn_rmma_stage_values(unsigned (*vt)[MCATTN_RMMA_LD], const float* __restrict__ vb,
                                                         int j0, int s_end) {
    constexpr int W = DV + 8;
#pragma unroll 1
    for (int e = threadIdx.x; e < W * MCATTN_RMMA_KEYS / 2; e += MCATTN_RMMA_THREADS) {
        const int c = e % W, kp = e / W, j = j0 + 2 * kp;
        const float one = c == DV ? 1.0f : 0.0f;  // the ones column: z; then zeros
        const float b0 = j < s_end ? (c < DV ? vb[(long long)j * DV + c] : one) : 0.0f;
        const float b1 = j + 1 < s_end ? (c < DV ? vb[(long long)(j + 1) * DV + c] : one) : 0.0f;
        vt[c][kp] = mcattn_pack16(Ops::round(b0), Ops::round(b1));
    }
}

// tt[c][p] = T[f0 + 2 p][c], T[f0 + 2 p + 1][c] of a state T [m, DV + 1] (0 outside), c < DV + 8.
template <class Ops, int DV>
__device__ __forceinline__ void mcattn_rmma_stage_state(unsigned (*tt)[MCATTN_RMMA_LD], const float* __restrict__ tb,
                                                        int f0, int m) {
    constexpr int W = DV + 8;
#pragma unroll 1
    for (int e = threadIdx.x; e < W * MCATTN_RMMA_KEYS / 2; e += MCATTN_RMMA_THREADS) {
        const int c = e % W, kp = e / W, f = f0 + 2 * kp;
        const float b0 = c <= DV && f < m ? tb[(long long)f * (DV + 1) + c] : 0.0f;
        const float b1 = c <= DV && f + 1 < m ? tb[(long long)(f + 1) * (DV + 1) + c] : 0.0f;
        tt[c][kp] = mcattn_pack16(Ops::round(b0), Ops::round(b1));
    }
}

// out = acc[:, :DV] / acc[:, DV] for the warp's rows below nq, the denominator floored at
// eps * ref (ref: the rows' floor scale) and the floored rows flagged, as rfa.cu; a row
// with ref <= 0 (no visible key) is zero. out, flags: this batch row's.
template <int DV>
__device__ __forceinline__ void mcattn_rmma_store(const float (&acc)[DV / 8 + 1][4], const float (&ref)[2],
                                                  const int (&rows)[2], int nq, float* __restrict__ out,
                                                  int* __restrict__ flags, float eps, int lane, int t) {
    // The denominator of row g (g + 8) is column DV: element 0 (2) of group DV / 8 at t = 0.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = rows[h];
        float den = __shfl_sync(0xffffffffu, acc[DV / 8][2 * h], lane & ~3);
        if (row >= nq) continue;
        float* orow = out + row * (long long)DV;
        if (!(ref[h] > 0.0f)) {
#pragma unroll
            for (int n = 0; n < DV / 8; ++n) orow[8 * n + 2 * t] = orow[8 * n + 2 * t + 1] = 0.0f;
            if (t == 0) flags[row] = 0;
            continue;
        }
        const bool floored = den <= eps * ref[h];
        if (floored) den = eps * ref[h];
        if (t == 0) flags[row] = floored ? 1 : 0;
        const float inv = 1.0f / den;
#pragma unroll
        for (int n = 0; n < DV / 8; ++n)
#pragma unroll
            for (int i = 0; i < 2; ++i) orow[8 * n + 2 * t + i] = acc[n][2 * h + i] * inv;
    }
}

template <class Ops, int DV, bool CHUNKED>
__device__ __forceinline__ void mcattn_rfa_mma_states(const float* __restrict__ kw, const float* __restrict__ v,
                                                      const float* __restrict__ tail,
                                                      const float* __restrict__ kscale,
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
    const float* tb = CHUNKED ? tail + bh * nk : nullptr;
    const float kmax = CHUNKED ? kscale[bh * gridDim.y + blockIdx.y] : 1.0f;
    const float inv_k = 1.0f / kmax;
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
            float a0 = f < m && j < s_end ? kb[(long long)j * m + f] : 0.0f;
            float a1 = f < m && j + 1 < s_end ? kb[(long long)(j + 1) * m + f] : 0.0f;
            if (CHUNKED) {
                a0 *= j < s_end ? tb[j] * inv_k : 0.0f;
                a1 *= j + 1 < s_end ? tb[j + 1] * inv_k : 0.0f;
            }
            at[r][kp] = mcattn_pack16(Ops::round(a0), Ops::round(a1));
        }
        mcattn_rmma_stage_values<Ops, DV>(vt, vb, j0, s_end);
        __syncthreads();
        if (f0 + 16 * warp >= m) continue;  // a warp past the features: nothing to add
        mcattn_rmma_tile<Ops, W>(acc, at, vt, 16 * warp, g, t);
    }
    const long long slot = CHUNKED ? bh * gridDim.y + blockIdx.y : (long long)blockIdx.y * bh_count + bh;
    float* pb = partial + slot * m * (long long)(DV + 1);
#pragma unroll
    for (int n = 0; n < W / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int f = f0 + 16 * warp + g + 8 * (i >> 1), c = 8 * n + 2 * t + (i & 1);
            if (f < m && c <= DV) pb[(long long)f * (DV + 1) + c] = acc[n][i] * kmax;
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
        mcattn_rmma_stage_rows<Ops>(qt, qb, q0, nq, r0, m, nullptr);
        mcattn_rmma_stage_state<Ops, DV>(tt, tb, r0, m);
        __syncthreads();
        mcattn_rmma_tile<Ops, W>(acc, qt, tt, 16 * warp, g, t);
    }
    const int rows[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    float ref[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) ref[h] = rows[h] < nq ? qnorm[bh * nq + rows[h]] : 0.0f;
    mcattn_rmma_store<DV>(acc, ref, rows, nq, out + bh * nq * (long long)DV, flags + bh * nq, eps, lane, t);
}

// Causal (and gated) rfa, the chunked form: one block per 64 query rows of a chunk (the
// chunk a multiple of 64 rows, or all of them), num and den of row t in one accumulator
// [num | den | 0...] of width DV + 8:
//   1. the state at the chunk start, fq_t (T_c / mass_c) (T_c from the float32 scan, over
//      its mass so that it fits float16, as the non-causal output), worth into_t mass_c;
//   2. the chunk's keys s <= t, tile by tile of 64: the scores fq kw'^T on mma with each
//      key's features over its largest |kw| (ikey = 1 / that: every staged key feature is
//      at most 1), then in registers A = scores * kkey_s * D_ts, D_ts = exp(b_t - b_s)
//      (1 without a gate; b: cumulative log-gates within the chunk) the masked decay
//      matrix, and acc += P [V | 1] with P = A / M_t rounded to the 16-bit type as the A
//      fragment.
// M_t, the row's unit, is a running maximum (as the softmax's): into_t mass_c, then the
// largest kkey_s D_ts seen; acc and the floor's sum are rescaled when it grows. So P's
// largest weight is 1 and a key vanishes in the 16-bit rounding only when it weighs
// below ~2^-24 of the row's largest, whatever the weights' range. The floor's scale
// qnorm_t (into_t mass_c + sum_s D_ts knorm_s) / M_t is summed by each lane over its
// keys while D is applied; the ratio and the floor are unchanged by the unit.
template <class Ops, int DV>
__device__ __forceinline__ void mcattn_rfa_mma_causal(const float* __restrict__ fq, const float* __restrict__ kw,
                                                      const float* __restrict__ v, const float* __restrict__ knorm,
                                                      const float* __restrict__ cum, int has_gate,
                                                      const float* __restrict__ ts, const float* __restrict__ cmass,
                                                      const float* __restrict__ kkey, const float* __restrict__ ikey,
                                                      const float* __restrict__ qnorm, float* __restrict__ out,
                                                      int* __restrict__ flags, int n, int m, int chunk, float eps) {
    constexpr int W = DV + 8, G = MCATTN_RMMA_KEYS / 8;
    __shared__ unsigned qt[MCATTN_RMMA_ROWS][MCATTN_RMMA_LD];  // [query row][feature pair]
    __shared__ unsigned kt[MCATTN_RMMA_KEYS][MCATTN_RMMA_LD];  // [key][feature pair]
    __shared__ unsigned bt[W][MCATTN_RMMA_LD];                 // [column of T][feature pair], then of [V | 1][key pair]
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * MCATTN_RMMA_ROWS, c0 = q0 / chunk * chunk;
    const long long cs = bh * ((n + chunk - 1) / chunk) + q0 / chunk;  // [BH, n_chunks] slot
    const float* qb = fq + bh * n * (long long)m;
    const float* kb = kw + bh * n * (long long)m;
    const float* vb = v + bh * n * (long long)DV;
    const float* nb = knorm + bh * n;
    const float* sb = kkey + bh * n;
    const float* ib = ikey + bh * n;
    const float* cb = cum + (has_gate ? bh * n : 0);
    const float mass = cmass[cs];
    const int rows[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    float b_row[2], fac[2], unit[2], ref[2] = {0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        b_row[h] = has_gate && rows[h] < n ? cb[rows[h]] : 0.0f;
        fac[h] = (has_gate ? mcattn_exp(b_row[h]) : 1.0f) * mass;
        unit[h] = fac[h];  // acc = fq (T_c / mass_c) is in units of into_t mass_c
    }
    float acc[W / 8][4];
#pragma unroll
    for (int nn = 0; nn < W / 8; ++nn)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nn][i] = 0.0f;
    if (mass > 0.0f) {  // 1. the state before the chunk (none in the first chunk)
        const float* tc = ts + cs * m * (long long)(DV + 1);
        for (int r0 = 0; r0 < m; r0 += MCATTN_RMMA_KEYS) {
            __syncthreads();
            mcattn_rmma_stage_rows<Ops>(qt, qb, q0, n, r0, m, nullptr);
            mcattn_rmma_stage_state<Ops, DV>(bt, tc, r0, m);
            __syncthreads();
            mcattn_rmma_tile<Ops, W>(acc, qt, bt, 16 * warp, g, t);
        }
    }
    for (int j0 = c0; j0 <= q0; j0 += MCATTN_RMMA_KEYS) {  // 2. the chunk's keys up to the tile's last row
        float sc[G][4];
#pragma unroll
        for (int nn = 0; nn < G; ++nn)
#pragma unroll
            for (int i = 0; i < 4; ++i) sc[nn][i] = 0.0f;
        for (int r0 = 0; r0 < m; r0 += MCATTN_RMMA_KEYS) {
            __syncthreads();  // every warp is done with the previous tiles
            if (m > MCATTN_RMMA_KEYS || j0 == c0)  // one stage of features: the query tile stays
                mcattn_rmma_stage_rows<Ops>(qt, qb, q0, n, r0, m, nullptr);
            mcattn_rmma_stage_rows<Ops>(kt, kb, j0, n, r0, m, ib);
            if (r0 == 0) mcattn_rmma_stage_values<Ops, DV>(bt, vb, j0, n);
            __syncthreads();
            mcattn_rmma_tile<Ops, MCATTN_RMMA_KEYS>(sc, qt, kt, 16 * warp, g, t);
        }
        float top[2] = {0.0f, 0.0f}, mass_t[2] = {0.0f, 0.0f};  // the tile's largest weight, its floor sum
#pragma unroll
        for (int nn = 0; nn < G; ++nn)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int s = j0 + 8 * nn + 2 * t + e;
                const bool in = s < n;
                const float b_s = has_gate && in ? cb[s] : 0.0f;
                const float ks = in ? sb[s] : 0.0f, kn = in ? nb[s] : 0.0f;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const bool vis = in && s <= rows[h];
                    const float dec = vis ? (has_gate ? mcattn_exp(b_row[h] - b_s) : 1.0f) : 0.0f;
                    const float wgt = dec * ks;
                    sc[nn][2 * h + e] *= wgt;
                    top[h] = mcattn_max(top[h], wgt);
                    mass_t[h] += dec * kn;
                }
            }
        float alpha[2], inv[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // the row's 4 lanes meet: the new unit
            top[h] = mcattn_max(top[h], __shfl_xor_sync(0xffffffffu, top[h], 1));
            top[h] = mcattn_max(top[h], __shfl_xor_sync(0xffffffffu, top[h], 2));
            const float grown = mcattn_max(unit[h], top[h]);
            alpha[h] = grown > 0.0f ? unit[h] / grown : 1.0f;
            inv[h] = grown > 0.0f ? 1.0f / grown : 0.0f;
            unit[h] = grown;
            ref[h] = ref[h] * alpha[h] + mass_t[h] * inv[h];
        }
#pragma unroll
        for (int nn = 0; nn < W / 8; ++nn)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nn][i] *= alpha[i >> 1];
#pragma unroll
        for (int nn = 0; nn < G; ++nn)
#pragma unroll
            for (int i = 0; i < 4; ++i) sc[nn][i] *= inv[i >> 1];
        mcattn_mma_pv<Ops, W, G, MCATTN_RMMA_LD>(acc, sc, bt, 0, g, t);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the row's 4 lanes' shares of the floor's sum
        ref[h] += __shfl_xor_sync(0xffffffffu, ref[h], 1);
        ref[h] += __shfl_xor_sync(0xffffffffu, ref[h], 2);
        const float state = unit[h] > 0.0f ? fac[h] / unit[h] : 0.0f;
        ref[h] = rows[h] < n ? qnorm[bh * n + rows[h]] * (state + ref[h]) : 0.0f;
    }
    mcattn_rmma_store<DV>(acc, ref, rows, n, out + bh * n * (long long)DV, flags + bh * n, eps, lane, t);
}

#define MCATTN_RFA_MMA_KERNELS(TAG, OPS, DV)                                                      \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_RMMA_THREADS)                            \
        mcattn_rfa_mma_states_##TAG##_dv##DV(const float* __restrict__ kw, const float* __restrict__ v, \
                                            float* __restrict__ partial, int nk, int m, int span) {   \
        mcattn_rfa_mma_states<OPS, DV, false>(kw, v, nullptr, nullptr, partial, nk, m, span);      \
    }                                                                                             \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_RMMA_THREADS)                            \
        mcattn_rfa_mma_output_##TAG##_dv##DV(const float* __restrict__ fq, const float* __restrict__ ts, \
                                            const float* __restrict__ qnorm, float* __restrict__ out, \
                                            int* __restrict__ flags, int nq, int m, float eps) {      \
        mcattn_rfa_mma_output<OPS, DV>(fq, ts, qnorm, out, flags, nq, m, eps);                    \
    }                                                                                             \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_RMMA_THREADS)                            \
        mcattn_rfa_mma_chunk_states_##TAG##_dv##DV(const float* __restrict__ kw, const float* __restrict__ v, \
                                                  const float* __restrict__ tail,                   \
                                                  const float* __restrict__ kscale,                 \
                                                  float* __restrict__ states, int nk, int m, int chunk) { \
        mcattn_rfa_mma_states<OPS, DV, true>(kw, v, tail, kscale, states, nk, m, chunk);           \
    }                                                                                             \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_RMMA_THREADS)                            \
        mcattn_rfa_mma_causal_##TAG##_dv##DV(                                                     \
            const float* __restrict__ fq, const float* __restrict__ kw, const float* __restrict__ v, \
            const float* __restrict__ knorm, const float* __restrict__ cum, int has_gate,         \
            const float* __restrict__ ts, const float* __restrict__ cmass,                        \
            const float* __restrict__ kkey, const float* __restrict__ ikey, const float* __restrict__ qnorm, \
            float* __restrict__ out, int* __restrict__ flags, int n, int m, int chunk, float eps) {   \
        mcattn_rfa_mma_causal<OPS, DV>(fq, kw, v, knorm, cum, has_gate, ts, cmass, kkey, ikey, qnorm, out, \
                                       flags, n, m, chunk, eps);                                  \
    }

MCATTN_RFA_MMA_KERNELS(f16, mcattn_f16_ops, 32)
MCATTN_RFA_MMA_KERNELS(f16, mcattn_f16_ops, 64)
MCATTN_RFA_MMA_KERNELS(f16, mcattn_f16_ops, 128)
MCATTN_RFA_MMA_KERNELS(bf16, mcattn_bf16_ops, 32)
MCATTN_RFA_MMA_KERNELS(bf16, mcattn_bf16_ops, 64)
MCATTN_RFA_MMA_KERNELS(bf16, mcattn_bf16_ops, 128)
