// Exact attention backward on tensor cores, the FlashAttention-2 recipe in two passes
// (launched in this order on one stream, no atomics), for the forward of exact_mma.cu:
//   dq pass    a block of 4 warps owns 64 query rows (16 a warp); it writes
//              delta_i = sum_c dO_ic O_ic and, over key tiles of 32,
//              dQ_i = scale sum_j P_ij (dP_ij - delta_i) K_j,  dP = dO V^T
//   dk/dv pass a block owns 64 keys (16 a warp); over query tiles of 32,
//              dV_j = sum_i P_ij dO_i,  dK_j = scale sum_i P_ij (dP_ij - delta_i) Q_i
// P_ij = exp(scale q_i k_j + bias_ij - lse_i) is recomputed from the forward's lse, never
// stored. Every product is an mma.m16n8k16 (f16 or bf16 operands: q, k, v, dO rounded as
// they are loaded, P and dS rounded before their mma; float32 accumulators). The
// operands an mma reads along its k dimension sit in shared memory packed along that
// dimension (two 16-bit values a word): Q, K, V, dO along dims, and K, Q, dO transposed
// along keys / queries. A warp's own rows (Q and dO in the dq pass, K and V in the dk/dv
// pass) stay in registers as A fragments; P and dS go from accumulator to A fragments
// without moving (the same lane holds the same cells).
// Masks as in the forward (bias, key padding as -inf bias, causal j <= i with tile
// skipping, keys >= Nk); a row with lse = -inf (no visible key) has zero gradients.
// Head dim d = dv in {32, 64}; wider heads use exact.cu's float32 kernels.
#include "common.cuh"
#include "warp.cuh"
#include "mma_backward.cuh"  // tile loads, A fragments (shared with latte_mma_backward.cu)

template <class Ops, int D>
__device__ __forceinline__ void mcattn_exact_mma_backward_dq(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ out, const float* __restrict__ dout, const float* __restrict__ lse,
    float* __restrict__ dq, float* __restrict__ delta, const float* __restrict__ bias,
    const long long* __restrict__ mask_index, int nq, int nk, float scale, int has_bias,
    int bias_rows, int is_causal) {
    __shared__ unsigned k_tile[MCATTN_MMA_BWD_TILE][D / 2 + 4];   // [key][dim pair]
    __shared__ unsigned kt_tile[D][MCATTN_MMA_BWD_TILE / 2 + 4];  // [dim][key pair]
    __shared__ unsigned v_tile[MCATTN_MMA_BWD_TILE][D / 2 + 4];   // [key][dim pair]
    const float log2e = 1.4426950408889634f, scale2 = scale * log2e;
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * MCATTN_MMA_BWD_ROWS + warp * 16;
    const int rows[2] = {row0 + g, row0 + g + 8};
    const long long qoff = bh * nq * (long long)D, koff = bh * nk * (long long)D;

    unsigned qa[D / 16][4], da[D / 16][4];
    mcattn_mma_load_a<Ops, D>(qa, q + qoff, row0, nq, g, t);
    mcattn_mma_load_a<Ops, D>(da, dout + qoff, row0, nq, g, t);
    float dl[2], lse2[2];  // delta and lse (log2 units) of the lane's two rows
    bool live[2];
    const float* brow[2];
    for (int h = 0; h < 2; ++h) {
        const int row = rows[h];
        float part = 0.0f;  // this lane's dims of the row: 2t, 2t+1 (mod 8)
        for (int n = 0; n < D / 8 && row < nq; ++n)
            for (int i = 0; i < 2; ++i) {
                const long long at = qoff + (long long)row * D + 8 * n + 2 * t + i;
                part += dout[at] * out[at];
            }
        part += __shfl_xor_sync(0xffffffffu, part, 1);
        part += __shfl_xor_sync(0xffffffffu, part, 2);
        dl[h] = part;
        const float top = row < nq ? lse[bh * nq + row] : mcattn_neg_inf<float>();
        live[h] = top != mcattn_neg_inf<float>();
        lse2[h] = live[h] ? top * log2e : 0.0f;
        if (row < nq && t == 0) delta[bh * nq + row] = part;
        brow[h] = mcattn_bias_row(bias, mask_index, bh, mcattn_min(row, nq - 1), bias_rows, nk,
                                  has_bias != 0);
    }
    float acc[D / 8][4];
    for (int n = 0; n < D / 8; ++n)
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;

    const int block_last = mcattn_min(nq, (int)(blockIdx.x + 1) * MCATTN_MMA_BWD_ROWS) - 1;
    const int key_end = is_causal ? mcattn_min(nk, block_last + 1) : nk;
    for (int j0 = 0; j0 < key_end; j0 += MCATTN_MMA_BWD_TILE) {
        __syncthreads();
        mcattn_mma_load_pairs<Ops, D>(k_tile, kt_tile, k + koff, j0, nk);
        mcattn_mma_load_pairs<Ops, D>(v_tile, 0, v + koff, j0, nk);
        __syncthreads();
        if (is_causal && j0 > row0 + 15) continue;
        float s[MCATTN_MMA_BWD_TILE / 8][4], dp[MCATTN_MMA_BWD_TILE / 8][4];
        for (int n = 0; n < MCATTN_MMA_BWD_TILE / 8; ++n) {
            for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.0f;
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned bk[2] = {k_tile[8 * n + g][8 * kk + t], k_tile[8 * n + g][8 * kk + 4 + t]};
                const unsigned bv[2] = {v_tile[8 * n + g][8 * kk + t], v_tile[8 * n + g][8 * kk + 4 + t]};
                Ops::mma(s[n], qa[kk], bk);
                Ops::mma(dp[n], da[kk], bv);
            }
        }
#pragma unroll
        for (int n = 0; n < MCATTN_MMA_BWD_TILE / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // s becomes dS = P (dP - delta)
                const int h = i >> 1, key = j0 + 8 * n + 2 * t + (i & 1);
                float p = 0.0f;
                if (live[h] && key < nk && !(is_causal && key > rows[h])) {
                    float x = s[n][i] * scale2;
                    if (has_bias) x += brow[h][key] * log2e;
                    p = exp2f(x - lse2[h]);
                }
                s[n][i] = p * (dp[n][i] - dl[h]);
            }
        for (int kk = 0; kk < MCATTN_MMA_BWD_TILE / 16; ++kk) {
            unsigned a[4];
            mcattn_mma_acc_to_a<Ops>(a, s, kk);
            for (int n = 0; n < D / 8; ++n) {
                const unsigned b[2] = {kt_tile[8 * n + g][8 * kk + t], kt_tile[8 * n + g][8 * kk + 4 + t]};
                Ops::mma(acc[n], a, b);
            }
        }
    }
    for (int h = 0; h < 2; ++h) {
        if (rows[h] >= nq) continue;
        float* drow = dq + qoff + (long long)rows[h] * D;
        for (int n = 0; n < D / 8; ++n)
            for (int i = 0; i < 2; ++i) drow[8 * n + 2 * t + i] = acc[n][2 * h + i] * scale;
    }
}

template <class Ops, int D>
__device__ __forceinline__ void mcattn_exact_mma_backward_dkdv(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ bias,
    const long long* __restrict__ mask_index, int nq, int nk, float scale, int has_bias,
    int bias_rows, int is_causal) {
    __shared__ unsigned q_tile[MCATTN_MMA_BWD_TILE][D / 2 + 4];    // [query][dim pair]
    __shared__ unsigned qt_tile[D][MCATTN_MMA_BWD_TILE / 2 + 4];   // [dim][query pair]
    __shared__ unsigned do_tile[MCATTN_MMA_BWD_TILE][D / 2 + 4];
    __shared__ unsigned dot_tile[D][MCATTN_MMA_BWD_TILE / 2 + 4];
    __shared__ float lse_tile[MCATTN_MMA_BWD_TILE], delta_tile[MCATTN_MMA_BWD_TILE];
    const float log2e = 1.4426950408889634f, scale2 = scale * log2e;
    const float neg_inf = mcattn_neg_inf<float>();
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int key0 = blockIdx.x * MCATTN_MMA_BWD_ROWS + warp * 16;
    const int keys[2] = {key0 + g, key0 + g + 8};
    const long long qoff = bh * nq * (long long)D, koff = bh * nk * (long long)D;

    unsigned ka[D / 16][4], va[D / 16][4];
    mcattn_mma_load_a<Ops, D>(ka, k + koff, key0, nk, g, t);
    mcattn_mma_load_a<Ops, D>(va, v + koff, key0, nk, g, t);
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    for (int n = 0; n < D / 8; ++n)
        for (int i = 0; i < 4; ++i) dk_acc[n][i] = dv_acc[n][i] = 0.0f;

    // Causal: queries before the block's first key see none of its keys.
    const int block_first = blockIdx.x * MCATTN_MMA_BWD_ROWS;
    const int i_start = is_causal ? block_first / MCATTN_MMA_BWD_TILE * MCATTN_MMA_BWD_TILE : 0;
    for (int i0 = i_start; i0 < nq; i0 += MCATTN_MMA_BWD_TILE) {
        __syncthreads();
        mcattn_mma_load_pairs<Ops, D>(q_tile, qt_tile, q + qoff, i0, nq);
        mcattn_mma_load_pairs<Ops, D>(do_tile, dot_tile, dout + qoff, i0, nq);
        for (int r = threadIdx.x; r < MCATTN_MMA_BWD_TILE; r += MCATTN_MMA_BWD_THREADS) {
            const int i = i0 + r;
            lse_tile[r] = i < nq ? lse[bh * nq + i] : neg_inf;
            delta_tile[r] = i < nq ? delta[bh * nq + i] : 0.0f;
        }
        __syncthreads();
        if (is_causal && i0 + MCATTN_MMA_BWD_TILE - 1 < key0) continue;  // no query sees these keys
        float s[MCATTN_MMA_BWD_TILE / 8][4], dp[MCATTN_MMA_BWD_TILE / 8][4];  // [key][query]
        for (int n = 0; n < MCATTN_MMA_BWD_TILE / 8; ++n) {
            for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.0f;
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned bq[2] = {q_tile[8 * n + g][8 * kk + t], q_tile[8 * n + g][8 * kk + 4 + t]};
                const unsigned bd[2] = {do_tile[8 * n + g][8 * kk + t], do_tile[8 * n + g][8 * kk + 4 + t]};
                Ops::mma(s[n], ka[kk], bq);
                Ops::mma(dp[n], va[kk], bd);
            }
        }
        // unrolled: s and dp must stay in registers (indexed by constants)
#pragma unroll
        for (int n = 0; n < MCATTN_MMA_BWD_TILE / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // s becomes P^T, dp becomes dS^T
                const int key = keys[i >> 1], r = 8 * n + 2 * t + (i & 1), query = i0 + r;
                const float top = lse_tile[r];
                float p = 0.0f;
                if (query < nq && key < nk && top != neg_inf && !(is_causal && key > query)) {
                    float x = s[n][i] * scale2;
                    if (has_bias)
                        x += mcattn_bias_row(bias, mask_index, bh, query, bias_rows, nk, true)[key] * log2e;
                    p = exp2f(x - top * log2e);
                }
                s[n][i] = p;
                dp[n][i] = p * (dp[n][i] - delta_tile[r]);
            }
        for (int kk = 0; kk < MCATTN_MMA_BWD_TILE / 16; ++kk) {
            unsigned ap[4], ads[4];
            mcattn_mma_acc_to_a<Ops>(ap, s, kk);
            mcattn_mma_acc_to_a<Ops>(ads, dp, kk);
            for (int n = 0; n < D / 8; ++n) {
                const unsigned bdo[2] = {dot_tile[8 * n + g][8 * kk + t], dot_tile[8 * n + g][8 * kk + 4 + t]};
                const unsigned bq[2] = {qt_tile[8 * n + g][8 * kk + t], qt_tile[8 * n + g][8 * kk + 4 + t]};
                Ops::mma(dv_acc[n], ap, bdo);
                Ops::mma(dk_acc[n], ads, bq);
            }
        }
    }
    for (int h = 0; h < 2; ++h) {
        if (keys[h] >= nk) continue;
        float* krow = dk + koff + (long long)keys[h] * D;
        float* vrow = dv + koff + (long long)keys[h] * D;
        for (int n = 0; n < D / 8; ++n)
            for (int i = 0; i < 2; ++i) {
                krow[8 * n + 2 * t + i] = dk_acc[n][2 * h + i] * scale;
                vrow[8 * n + 2 * t + i] = dv_acc[n][2 * h + i];
            }
    }
}

#define MCATTN_EXACT_MMA_BACKWARD(TAG, OPS, D)                                                   \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_MMA_BWD_THREADS)                      \
        mcattn_exact_mma_backward_dq_##TAG##_d##D(                                              \
            const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, \
            const float* __restrict__ out, const float* __restrict__ dout,                      \
            const float* __restrict__ lse, float* __restrict__ dq, float* __restrict__ delta,   \
            const float* __restrict__ bias, const long long* __restrict__ mask_index, int nq,   \
            int nk, float scale, int has_bias, int bias_rows, int is_causal) {                  \
        mcattn_exact_mma_backward_dq<OPS, D>(q, k, v, out, dout, lse, dq, delta, bias,          \
                                             mask_index, nq, nk, scale, has_bias, bias_rows,    \
                                             is_causal);                                        \
    }                                                                                            \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_MMA_BWD_THREADS)                      \
        mcattn_exact_mma_backward_dkdv_##TAG##_d##D(                                            \
            const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, \
            const float* __restrict__ dout, const float* __restrict__ lse,                      \
            const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv,    \
            const float* __restrict__ bias, const long long* __restrict__ mask_index, int nq,   \
            int nk, float scale, int has_bias, int bias_rows, int is_causal) {                  \
        mcattn_exact_mma_backward_dkdv<OPS, D>(q, k, v, dout, lse, delta, dk, dv, bias,         \
                                               mask_index, nq, nk, scale, has_bias, bias_rows,  \
                                               is_causal);                                      \
    }

MCATTN_EXACT_MMA_BACKWARD(f16, mcattn_f16_ops, 32)
MCATTN_EXACT_MMA_BACKWARD(f16, mcattn_f16_ops, 64)
MCATTN_EXACT_MMA_BACKWARD(bf16, mcattn_bf16_ops, 32)
MCATTN_EXACT_MMA_BACKWARD(bf16, mcattn_bf16_ops, 64)
