// Exact attention forward on tensor cores, in the FlashAttention-2 recipe: the fast path
// for float16 / bfloat16 (float32 inputs are rounded to the 16-bit type as they are
// loaded; the products accumulate in float32). exact.cu's one-thread-per-row kernels stay
// the float32 / float64 path and the readable reference this one is tested against.
//
// Block: 4 warps (128 threads), 64 query rows, each warp 16 of them. A warp keeps its Q
// rows as mma A fragments in registers, and for every tile of 64 keys (K and V in shared
// memory, rounded to 16 bits, V transposed so that a B fragment is one 32-bit word):
//   S = Q K^T        8 key groups x D/16 mma.m16n8k16, S in accumulator fragments
//   online softmax   on the fragments: a lane holds 2 rows (g, g+8) x 16 keys; the row
//                    max and (at the end) the row sum meet the row's 4 lanes by
//                    __shfl_xor_sync 1 and 2; base-2 exponentials of scores in log2 units
//   O += P V         P's accumulator fragments are already the A fragments of the next
//                    mma (rounded to 16 bits), D/8 x 4 mma.m16n8k16
// Masks: additive bias (scaled by log2 e; key padding is a -inf bias), causal (key j
// visible from query i iff j <= i; tiles after the block's last row are skipped, and a
// warp skips tiles after its own last row), keys beyond Nk. Nq != Nk is allowed. A row
// with no visible key gives zeros and lse = -inf, as exact.cu. With write_lse the rows'
// natural log-sum-exp goes to lse [BH, Nq].
//
// Grid: (ceil(Nq / 64), BH), gridDim.y at most 65535 (the launcher splits BH). Head dim
// D = dv in {32, 64, 128}, one kernel each: mcattn_exact_mma_forward_{f16,bf16}_d{D}.
// Static shared memory: (64 (D + 8) + D (64 + 8)) * 2 bytes: 35,840 at D = 128.
//
// TF32 (mcattn_exact_tf32_forward_d{D}, float32 only when the user asks for it): the same
// recipe on mma.m16n8k8.tf32, operands rounded to tf32 (10 mantissa bits, cvt.rna) and
// kept as 32-bit words, so the tiles hold 32 keys (K [key][dim] and V [key][dim], rows
// padded by 4 and 8 words for conflict-free fragment reads: 34,304 bytes at D = 128).
// A tf32 A fragment holds P[g][t] and P[g][t+4] where the accumulator holds P[g][2t],
// P[g][2t+1]: the row's 4 lanes exchange them by __shfl_sync.
#include "common.cuh"
#include "warp.cuh"

#define MCATTN_MMA_ROWS 64   // query rows per block (4 warps x 16)
#define MCATTN_MMA_KEYS 64   // keys per shared-memory tile
#define MCATTN_MMA_THREADS 128

template <class Ops, int D>
__device__ __forceinline__ void mcattn_exact_mma_forward(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ bias,
    const long long* __restrict__ mask_index, int nq, int nk, float scale, int has_bias,
    int bias_rows, int is_causal, int write_lse) {
    // Two 16-bit values per word; rows padded by 4 words so the 8 groups of a warp's
    // fragment reads fall in different banks.
    __shared__ unsigned k_tile[MCATTN_MMA_KEYS][D / 2 + 4];   // [key][dim pair]
    __shared__ unsigned vt_tile[D][MCATTN_MMA_KEYS / 2 + 4];  // [dim][key pair]
    const float neg_inf = mcattn_neg_inf<float>();
    const float log2e = 1.4426950408889634f;
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * MCATTN_MMA_ROWS + warp * 16;
    const int rows[2] = {row0 + g, row0 + g + 8};
    const float* qb = q + bh * nq * (long long)D;
    const float* kb = k + bh * nk * (long long)D;
    const float* vb = v + bh * nk * (long long)D;

    // Q as A fragments: register r holds row rows[r & 1], dims 16 kk + 2t (+8 for r >= 2).
    unsigned qa[D / 16][4];
    for (int kk = 0; kk < D / 16; ++kk)
        for (int r = 0; r < 4; ++r) {
            const int row = rows[r & 1], c = 16 * kk + 2 * t + 8 * (r >> 1);
            const float x0 = row < nq ? qb[(long long)row * D + c] : 0.0f;
            const float x1 = row < nq ? qb[(long long)row * D + c + 1] : 0.0f;
            qa[kk][r] = mcattn_pack16(Ops::round(x0), Ops::round(x1));
        }
    const float* brow[2];
    for (int h = 0; h < 2; ++h)
        brow[h] = mcattn_bias_row(bias, mask_index, bh, mcattn_min(rows[h], nq - 1), bias_rows, nk,
                                  has_bias != 0);

    float o[D / 8][4];
    for (int n = 0; n < D / 8; ++n)
        for (int i = 0; i < 4; ++i) o[n][i] = 0.0f;
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};  // l: this lane's share of the sum
    const float scale2 = scale * log2e;

    const int block_last = mcattn_min(nq, (int)(blockIdx.x + 1) * MCATTN_MMA_ROWS) - 1;
    const int key_end = is_causal ? mcattn_min(nk, block_last + 1) : nk;
    for (int j0 = 0; j0 < key_end; j0 += MCATTN_MMA_KEYS) {
        __syncthreads();  // the previous tile is no longer read
        for (int e = threadIdx.x; e < MCATTN_MMA_KEYS * D / 2; e += MCATTN_MMA_THREADS) {
            const int key = e / (D / 2), pair = e % (D / 2), j = j0 + key;  // K: along dims
            const float* src = kb + (long long)j * D + 2 * pair;
            k_tile[key][pair] = j < nk ? mcattn_pack16(Ops::round(src[0]), Ops::round(src[1])) : 0u;
            const int dim = e % D, kp = e / D, j2 = j0 + 2 * kp;  // V^T: along keys (coalesced reads)
            const float v0 = j2 < nk ? vb[(long long)j2 * D + dim] : 0.0f;
            const float v1 = j2 + 1 < nk ? vb[(long long)(j2 + 1) * D + dim] : 0.0f;
            vt_tile[dim][kp] = mcattn_pack16(Ops::round(v0), Ops::round(v1));
        }
        __syncthreads();
        if (is_causal && j0 > row0 + 15) continue;  // the whole warp: every key is after its rows

        float s[MCATTN_MMA_KEYS / 8][4];
        for (int n = 0; n < MCATTN_MMA_KEYS / 8; ++n) {
            for (int i = 0; i < 4; ++i) s[n][i] = 0.0f;
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned b[2] = {k_tile[8 * n + g][8 * kk + t], k_tile[8 * n + g][8 * kk + 4 + t]};
                Ops::mma(s[n], qa[kk], b);
            }
        }
        // Scores in log2 units, masked; the tile's row maxima.
        float top[2] = {neg_inf, neg_inf};
        for (int n = 0; n < MCATTN_MMA_KEYS / 8; ++n)
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1, key = j0 + 8 * n + 2 * t + (i & 1);
                float x = s[n][i] * scale2;
                if (key >= nk || (is_causal && key > rows[h])) x = neg_inf;
                else if (has_bias) x += brow[h][key] * log2e;
                s[n][i] = x;
                top[h] = mcattn_max(top[h], x);
            }
        for (int h = 0; h < 2; ++h) {
            top[h] = mcattn_max(top[h], __shfl_xor_sync(0xffffffffu, top[h], 1));
            top[h] = mcattn_max(top[h], __shfl_xor_sync(0xffffffffu, top[h], 2));
        }
        float alpha[2];
        for (int h = 0; h < 2; ++h) {
            const float m_new = mcattn_max(m[h], top[h]);
            const float base = m_new == neg_inf ? 0.0f : m_new;  // nothing visible yet: p = 0
            alpha[h] = exp2f(m[h] - base);                         // 0 on the first visible tile
            m[h] = m_new;
            top[h] = base;
            l[h] *= alpha[h];
        }
        for (int n = 0; n < D / 8; ++n)
            for (int i = 0; i < 4; ++i) o[n][i] *= alpha[i >> 1];
        for (int n = 0; n < MCATTN_MMA_KEYS / 8; ++n)
            for (int i = 0; i < 4; ++i) {
                s[n][i] = exp2f(s[n][i] - top[i >> 1]);
                l[i >> 1] += s[n][i];
            }
        // P's fragments of key groups 2kk and 2kk+1 are the A fragment of keys 16kk..16kk+15.
        for (int kk = 0; kk < MCATTN_MMA_KEYS / 16; ++kk) {
            const unsigned pa[4] = {
                mcattn_pack16(Ops::round(s[2 * kk][0]), Ops::round(s[2 * kk][1])),
                mcattn_pack16(Ops::round(s[2 * kk][2]), Ops::round(s[2 * kk][3])),
                mcattn_pack16(Ops::round(s[2 * kk + 1][0]), Ops::round(s[2 * kk + 1][1])),
                mcattn_pack16(Ops::round(s[2 * kk + 1][2]), Ops::round(s[2 * kk + 1][3]))};
            for (int n = 0; n < D / 8; ++n) {
                const unsigned b[2] = {vt_tile[8 * n + g][8 * kk + t], vt_tile[8 * n + g][8 * kk + 4 + t]};
                Ops::mma(o[n], pa, b);
            }
        }
    }

    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    for (int h = 0; h < 2; ++h) {
        const int row = rows[h];
        if (row >= nq) continue;
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        float* orow = out + (bh * nq + row) * (long long)D;
        for (int n = 0; n < D / 8; ++n)
            for (int i = 0; i < 2; ++i) orow[8 * n + 2 * t + i] = o[n][2 * h + i] * inv;
        if (write_lse && t == 0)
            lse[bh * nq + row] = l[h] > 0.0f ? (m[h] + log2f(l[h])) * 0.6931471805599453f : neg_inf;
    }
}

template <int D>
__device__ __forceinline__ void mcattn_exact_tf32_forward(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ bias,
    const long long* __restrict__ mask_index, int nq, int nk, float scale, int has_bias,
    int bias_rows, int is_causal, int write_lse) {
    constexpr int KEYS = 32;
    __shared__ unsigned k_tile[KEYS][D + 4];  // [key][dim], tf32 words
    __shared__ unsigned v_tile[KEYS][D + 8];  // [key][dim]
    const float neg_inf = mcattn_neg_inf<float>();
    const float log2e = 1.4426950408889634f;
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * MCATTN_MMA_ROWS + warp * 16;
    const int rows[2] = {row0 + g, row0 + g + 8};
    const float* qb = q + bh * nq * (long long)D;
    const float* kb = k + bh * nk * (long long)D;
    const float* vb = v + bh * nk * (long long)D;

    // Q as tf32 A fragments: register r holds row rows[r & 1], dim 8 kk + t (+4 for r >= 2).
    unsigned qa[D / 8][4];
    for (int kk = 0; kk < D / 8; ++kk)
        for (int r = 0; r < 4; ++r) {
            const int row = rows[r & 1], c = 8 * kk + t + 4 * (r >> 1);
            qa[kk][r] = mcattn_f32_to_tf32(row < nq ? qb[(long long)row * D + c] : 0.0f);
        }
    const float* brow[2];
    for (int h = 0; h < 2; ++h)
        brow[h] = mcattn_bias_row(bias, mask_index, bh, mcattn_min(rows[h], nq - 1), bias_rows, nk,
                                  has_bias != 0);
    float o[D / 8][4];
    for (int n = 0; n < D / 8; ++n)
        for (int i = 0; i < 4; ++i) o[n][i] = 0.0f;
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};
    const float scale2 = scale * log2e;
    // The lanes of this lane's row group that hold P[.][t] and P[.][t + 4] of a key group.
    const int src_lo = 4 * g + (t >> 1), src_hi = 4 * g + 2 + (t >> 1);
    const bool odd = t & 1;

    const int block_last = mcattn_min(nq, (int)(blockIdx.x + 1) * MCATTN_MMA_ROWS) - 1;
    const int key_end = is_causal ? mcattn_min(nk, block_last + 1) : nk;
    for (int j0 = 0; j0 < key_end; j0 += KEYS) {
        __syncthreads();
        for (int e = threadIdx.x; e < KEYS * D; e += MCATTN_MMA_THREADS) {
            const int key = e / D, c = e % D, j = j0 + key;
            k_tile[key][c] = j < nk ? mcattn_f32_to_tf32(kb[(long long)j * D + c]) : 0u;
            v_tile[key][c] = j < nk ? mcattn_f32_to_tf32(vb[(long long)j * D + c]) : 0u;
        }
        __syncthreads();
        if (is_causal && j0 > row0 + 15) continue;

        float s[KEYS / 8][4];
#pragma unroll
        for (int n = 0; n < KEYS / 8; ++n) {
            for (int i = 0; i < 4; ++i) s[n][i] = 0.0f;
            for (int kk = 0; kk < D / 8; ++kk) {
                const unsigned b[2] = {k_tile[8 * n + g][8 * kk + t], k_tile[8 * n + g][8 * kk + t + 4]};
                mcattn_mma_m16n8k8_tf32(s[n], qa[kk], b);
            }
        }
        float top[2] = {neg_inf, neg_inf};
#pragma unroll
        for (int n = 0; n < KEYS / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1, key = j0 + 8 * n + 2 * t + (i & 1);
                float x = s[n][i] * scale2;
                if (key >= nk || (is_causal && key > rows[h])) x = neg_inf;
                else if (has_bias) x += brow[h][key] * log2e;
                s[n][i] = x;
                top[h] = mcattn_max(top[h], x);
            }
        for (int h = 0; h < 2; ++h) {
            top[h] = mcattn_max(top[h], __shfl_xor_sync(0xffffffffu, top[h], 1));
            top[h] = mcattn_max(top[h], __shfl_xor_sync(0xffffffffu, top[h], 2));
        }
        float alpha[2];
        for (int h = 0; h < 2; ++h) {
            const float m_new = mcattn_max(m[h], top[h]);
            const float base = m_new == neg_inf ? 0.0f : m_new;
            alpha[h] = exp2f(m[h] - base);
            m[h] = m_new;
            top[h] = base;
            l[h] *= alpha[h];
        }
        for (int n = 0; n < D / 8; ++n)
            for (int i = 0; i < 4; ++i) o[n][i] *= alpha[i >> 1];
#pragma unroll
        for (int n = 0; n < KEYS / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float p = exp2f(s[n][i] - top[i >> 1]);
                l[i >> 1] += p;
                s[n][i] = __int_as_float((int)mcattn_f32_to_tf32(p));
            }
        // Key group kk (8 keys) is one k-step: gather its A fragment from the row's lanes.
#pragma unroll
        for (int kk = 0; kk < KEYS / 8; ++kk) {
            float x[8];
            for (int i = 0; i < 4; ++i) {
                x[i] = __shfl_sync(0xffffffffu, s[kk][i], src_lo);
                x[4 + i] = __shfl_sync(0xffffffffu, s[kk][i], src_hi);
            }
            const unsigned a[4] = {(unsigned)__float_as_int(odd ? x[1] : x[0]),
                                   (unsigned)__float_as_int(odd ? x[3] : x[2]),
                                   (unsigned)__float_as_int(odd ? x[5] : x[4]),
                                   (unsigned)__float_as_int(odd ? x[7] : x[6])};
            for (int n = 0; n < D / 8; ++n) {
                const unsigned b[2] = {v_tile[8 * kk + t][8 * n + g], v_tile[8 * kk + t + 4][8 * n + g]};
                mcattn_mma_m16n8k8_tf32(o[n], a, b);
            }
        }
    }
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    for (int h = 0; h < 2; ++h) {
        const int row = rows[h];
        if (row >= nq) continue;
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        float* orow = out + (bh * nq + row) * (long long)D;
        for (int n = 0; n < D / 8; ++n)
            for (int i = 0; i < 2; ++i) orow[8 * n + 2 * t + i] = o[n][2 * h + i] * inv;
        if (write_lse && t == 0)
            lse[bh * nq + row] = l[h] > 0.0f ? (m[h] + log2f(l[h])) * 0.6931471805599453f : neg_inf;
    }
}

#define MCATTN_EXACT_TF32_FORWARD(D)                                                            \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_MMA_THREADS)                         \
        mcattn_exact_tf32_forward_d##D(                                                         \
            const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, \
            float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ bias,   \
            const long long* __restrict__ mask_index, int nq, int nk, float scale, int has_bias, \
            int bias_rows, int is_causal, int write_lse) {                                      \
        mcattn_exact_tf32_forward<D>(q, k, v, out, lse, bias, mask_index, nq, nk, scale,        \
                                     has_bias, bias_rows, is_causal, write_lse);                \
    }

#define MCATTN_EXACT_MMA_FORWARD(NAME, OPS, D)                                                  \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_MMA_THREADS) NAME(                    \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,  \
        float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ bias,       \
        const long long* __restrict__ mask_index, int nq, int nk, float scale, int has_bias,    \
        int bias_rows, int is_causal, int write_lse) {                                          \
        mcattn_exact_mma_forward<OPS, D>(q, k, v, out, lse, bias, mask_index, nq, nk, scale,    \
                                         has_bias, bias_rows, is_causal, write_lse);            \
    }

MCATTN_EXACT_MMA_FORWARD(mcattn_exact_mma_forward_f16_d32, mcattn_f16_ops, 32)
MCATTN_EXACT_MMA_FORWARD(mcattn_exact_mma_forward_f16_d64, mcattn_f16_ops, 64)
MCATTN_EXACT_MMA_FORWARD(mcattn_exact_mma_forward_f16_d128, mcattn_f16_ops, 128)
MCATTN_EXACT_MMA_FORWARD(mcattn_exact_mma_forward_bf16_d32, mcattn_bf16_ops, 32)
MCATTN_EXACT_MMA_FORWARD(mcattn_exact_mma_forward_bf16_d64, mcattn_bf16_ops, 64)
MCATTN_EXACT_MMA_FORWARD(mcattn_exact_mma_forward_bf16_d128, mcattn_bf16_ops, 128)
MCATTN_EXACT_TF32_FORWARD(32)
MCATTN_EXACT_TF32_FORWARD(64)
MCATTN_EXACT_TF32_FORWARD(128)
