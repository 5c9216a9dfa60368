// LATTE's hard-mask backward on tensor cores: exact_mma_backward.cu's two FlashAttention-2
// passes (launched in this order on one stream, no atomics on the gradients) with the
// kept set of latte_mma.cu recomputed per (row tile, key tile) in registers:
//   dq pass    a block of 4 warps owns 64 query rows (16 a warp). Over the key tiles of 32:
//              pass 1 the row maxima of the MS4B estimate hh = hi(q8) hi(k8)^T (int8
//              mma.m16n8k32, exact integers) and the cut (relative: max - theta / c,
//              absolute: min(theta / c, max)), the forward's IEEE operations, so the
//              kept keys are the forward's, bit for bit; pass 2 the kept scores, the
//              row's log-sum-exp and delta_i = sum_j P_ij dP_ij (dP = dO V^T) online;
//              pass 3 dQ_i = scale sum_j P_ij (dP_ij - delta_i) K_j. It writes the cut,
//              the lse (log2 units) and delta of each row for the second kernel.
//   dk/dv pass a block owns 64 keys (16 a warp); over query tiles of 32, the kept bits
//              again (hi(k8) hi(q8)^T: the same integers), P from the lse, then
//              dV_j = sum_i P_ij dO_i,  dK_j = scale sum_i P_ij (dP_ij - delta_i) Q_i.
// Kept scores: int8 (int8_scores = 1, the default) s = c_i s_k q8.k8 (+ bias), the
// forward's exact integer products, so P is the forward's up to float32 rounding (it is
// not rounded to 16 bits here) and the gradient is straight-through (dS goes to q and k
// as for scale q.k); float (int8_scores = 0) s = scale q.k on 16-bit mma. Dropped keys
// have P = 0. A (row tile, key tile) pair with no kept key loads no 16-bit operand and
// runs no 16-bit mma (the block's loads and each warp's mmas are skipped separately).
// dO, V, K, Q, P and dS are rounded to the 16-bit type before their mma (float32
// accumulators), as in exact_mma_backward.cu.
//
// Layout (C-contiguous): q8 [BH, Nq, D], k8 [BH, Nk, D] int8; q, dout [BH, Nq, D],
// k, v [BH, Nk, D] float; s_q [BH, Nq], s_k [BH, Nk] float; sk256 [BH, Nk] double
// (256 s_k); theta [BH] double; bias [M, bias_rows, Nk] float by mask_index [BH]; dq
// [BH, Nq, D], dk, dv [BH, Nk, D] float; cut [BH, Nq] double, lse2, delta [BH, Nq] float
// (written by the dq pass, read by the dk/dv pass); tiles [4] unsigned long long: (block,
// tile) pairs visited / computed by the dq pass, then by the dk/dv pass. D in {32, 64}:
// mcattn_latte_mma_backward_{dq,dkdv}_{f16,bf16}_d{D}. Modes relative and absolute.
#include "common.cuh"
#include "warp.cuh"
#include "mma_backward.cuh"
#include "latte_int8.cuh"  // mcattn_load_s8x4, mcattn_hi_nibbles (as the forward)

#define MCATTN_LBWD_GROUPS (MCATTN_MMA_BWD_TILE / 8)  // key (or query) groups of 8 per tile

// latte_mma.cu's keep rule for one visible element: hh the high-nibble product, skf256 /
// sk256 = 256 s_k in float / double, b the bias (0 without one), cq = scale s_q. Without a
// bias term fu = float(hh) 256 s_k is u rounded (monotone), so only equality with the
// rounded cut takes the double u = hh 256 s_k (+ b / cq), as in the forward.
__device__ __forceinline__ bool mcattn_latte_keeps(int hh, float skf256, double sk256, float b,
                                                   double cq, double cut, float cutf) {
    if (skf256 < -mcattn_neg_inf<float>() && b == 0.0f) {
        const float fu = (float)hh * skf256;
        if (fu > cutf) return true;
        if (fu < cutf) return false;
    }
    double u = (double)hh * sk256;
    if (b != 0.0f) u = u + (double)b / cq;
    return u >= cut;
}

// int8 A fragments (m16n8k32) of 16 rows row0 + g, + 8 of a [rows, D] int8 matrix.
template <int D>
__device__ __forceinline__ void mcattn_lbwd_load_a8(unsigned (*frag)[4], const signed char* src,
                                                    int row0, int rows_end, int g, int t) {
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = row0 + g + 8 * (r & 1), c = 32 * kk + 4 * t + 16 * (r >> 1);
            frag[kk][r] = row < rows_end ? mcattn_load_s8x4(src + (long long)row * D + c) : 0u;
        }
}

// A tile of 32 int8 rows from `first` (and their high nibbles) into shared memory.
template <int D>
__device__ __forceinline__ void mcattn_lbwd_load_s8_tile(unsigned (*x8)[D / 4 + 4], unsigned (*xh)[D / 4 + 4],
                                                         const signed char* src, int first, int rows_end) {
    constexpr int W = D / 4;
    for (int e = threadIdx.x; e < MCATTN_MMA_BWD_TILE * W; e += MCATTN_MMA_BWD_THREADS) {
        const int r = e / W, word = e % W, row = first + r;
        const unsigned w = row < rows_end ? mcattn_load_s8x4(src + (long long)row * D + 4 * word) : 0u;
        x8[r][word] = w;
        xh[r][word] = mcattn_hi_nibbles(w);
    }
}

// One int8 mma product of a warp's 16 rows (A fragments a) with 8 rows of a shared tile.
template <int D>
__device__ __forceinline__ void mcattn_lbwd_dot8(int (&acc)[4], const unsigned (*a)[4],
                                                 const unsigned (*tile)[D / 4 + 4], int n, int g, int t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = 0;
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk) {
        const unsigned b[2] = {tile[8 * n + g][8 * kk + t], tile[8 * n + g][8 * kk + 4 + t]};
        mcattn_mma_m16n8k32_s8(acc, a[kk], b);
    }
}

template <class Ops, int D>
__device__ __forceinline__ void mcattn_latte_mma_backward_dq(
    const signed char* __restrict__ q8, const signed char* __restrict__ k8,
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ dout, const float* __restrict__ s_q, const float* __restrict__ s_k,
    const double* __restrict__ sk256, const double* __restrict__ theta,
    const float* __restrict__ bias, const long long* __restrict__ mask_index,
    float* __restrict__ dq, double* __restrict__ cut_out, float* __restrict__ lse_out,
    float* __restrict__ delta_out, unsigned long long* __restrict__ tiles, int nq, int nk,
    double scale, int mode, int int8_scores, int has_bias, int bias_rows, int is_causal) {
    constexpr int W = D / 4, T = MCATTN_MMA_BWD_TILE, G = MCATTN_LBWD_GROUPS;
    __shared__ unsigned k8_tile[T][W + 4], kh_tile[T][W + 4];
    __shared__ unsigned k_tile[T][D / 2 + 4];   // [key][dim pair] (float kept scores)
    __shared__ unsigned kt_tile[D][T / 2 + 4];  // [dim][key pair]
    __shared__ unsigned v_tile[T][D / 2 + 4];
    __shared__ double sk_tile[T];
    __shared__ float skf_tile[T], skf256_tile[T];
    __shared__ int any_kept;
    const double dninf = mcattn_neg_inf<double>();
    const float neg_inf = mcattn_neg_inf<float>();
    const float log2e = 1.4426950408889634f, scale2 = (float)scale * log2e;
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * MCATTN_MMA_BWD_ROWS + warp * 16;
    const int rows[2] = {row0 + g, row0 + g + 8};
    const long long qoff = bh * nq * (long long)D, koff = bh * nk * (long long)D;

    unsigned qa8[D / 32][4], qa[D / 16][4], da[D / 16][4];
    mcattn_lbwd_load_a8<D>(qa8, q8 + qoff, row0, nq, g, t);
    if (int8_scores) {
        for (int kk = 0; kk < D / 16; ++kk)
            for (int r = 0; r < 4; ++r) qa[kk][r] = 0u;
    } else {
        mcattn_mma_load_a<Ops, D>(qa, q + qoff, row0, nq, g, t);
    }
    mcattn_mma_load_a<Ops, D>(da, dout + qoff, row0, nq, g, t);
    double cq[2], cut[2] = {dninf, dninf};
    float cqf[2], cutf[2];
    const float* brow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = mcattn_min(rows[h], nq - 1);
        cq[h] = scale * (double)s_q[bh * nq + row];
        cqf[h] = (float)cq[h];
        brow[h] = mcattn_bias_row(bias, mask_index, bh, row, bias_rows, nk, has_bias != 0);
    }
    const int block_last = mcattn_min(nq, (int)(blockIdx.x + 1) * MCATTN_MMA_BWD_ROWS) - 1;
    const int key_end = is_causal ? mcattn_min(nk, block_last + 1) : nk;

    // Bias of a visible element (0 without a mask), or -inf where the key is not visible.
    auto bias_of = [&](int h, int key) -> float {
        if (rows[h] >= nq || key >= nk || (is_causal && key > rows[h])) return neg_inf;
        return has_bias ? brow[h][key] : 0.0f;
    };
    auto load_keys = [&](int j0) {
        mcattn_lbwd_load_s8_tile<D>(k8_tile, kh_tile, k8 + koff, j0, nk);
        for (int e = threadIdx.x; e < T; e += MCATTN_MMA_BWD_THREADS) {
            const int j = j0 + e;
            sk_tile[e] = j < nk ? sk256[bh * nk + j] : 0.0;
            skf_tile[e] = j < nk ? s_k[bh * nk + j] : 0.0f;
            skf256_tile[e] = 256.0f * skf_tile[e];  // exact, or inf
        }
    };
    // Bit 4 n + i: accumulator element i of key group n is kept.
    auto kept_bits = [&](int j0) -> unsigned {
        unsigned bits = 0, qh[D / 32][4];
        for (int kk = 0; kk < D / 32; ++kk)
            for (int r = 0; r < 4; ++r) qh[kk][r] = mcattn_hi_nibbles(qa8[kk][r]);
#pragma unroll 1
        for (int n = 0; n < G; ++n) {
            int hh[4];
            mcattn_lbwd_dot8<D>(hh, qh, kh_tile, n, g, t);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1, c = 8 * n + 2 * t + (i & 1);
                const float b = bias_of(h, j0 + c);
                if (b != neg_inf && mcattn_latte_keeps(hh[i], skf256_tile[c], sk_tile[c], b, cq[h], cut[h], cutf[h]))
                    bits |= 1u << (4 * n + i);
            }
        }
        return bits;
    };
    // Kept scores of the tile in log2 units (-inf where dropped), and dP = dO V^T.
    auto scores = [&](float (&s)[G][4], float (&dp)[G][4], int j0, unsigned bits) {
#pragma unroll
        for (int n = 0; n < G; ++n) {
            int dot[4] = {0, 0, 0, 0};
            for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.0f;
            if (int8_scores) mcattn_lbwd_dot8<D>(dot, qa8, k8_tile, n, g, t);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned bv[2] = {v_tile[8 * n + g][8 * kk + t], v_tile[8 * n + g][8 * kk + 4 + t]};
                Ops::mma(dp[n], da[kk], bv);
                if (!int8_scores) {
                    const unsigned bk[2] = {k_tile[8 * n + g][8 * kk + t], k_tile[8 * n + g][8 * kk + 4 + t]};
                    Ops::mma(s[n], qa[kk], bk);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1, c = 8 * n + 2 * t + (i & 1);
                float x = neg_inf;
                if (bits >> (4 * n + i) & 1u) {
                    const float b = has_bias ? brow[h][j0 + c] : 0.0f;
                    x = int8_scores ? (cqf[h] * skf_tile[c] * (float)dot[i] + b) * log2e
                                    : s[n][i] * scale2 + b * log2e;
                }
                s[n][i] = x;
            }
        }
    };
    // Block-wide: did any warp keep a key of the tile? (every thread calls it)
    auto block_any = [&](bool warp_any) -> bool {
        if (warp_any && lane == 0) atomicAdd(&any_kept, 1);
        __syncthreads();
        return any_kept != 0;
    };

    // Pass 1: the row maxima of the estimate, then the cut.
    double top[2] = {dninf, dninf};
    float topf[2] = {neg_inf, neg_inf};  // float32 maximum of the elements without a bias term
    for (int j0 = 0; j0 < key_end; j0 += T) {
        __syncthreads();
        load_keys(j0);
        __syncthreads();
        if (is_causal && j0 > row0 + 15) continue;
        unsigned qh[D / 32][4];
        for (int kk = 0; kk < D / 32; ++kk)
            for (int r = 0; r < 4; ++r) qh[kk][r] = mcattn_hi_nibbles(qa8[kk][r]);
#pragma unroll 1
        for (int n = 0; n < G; ++n) {
            int hh[4];
            mcattn_lbwd_dot8<D>(hh, qh, kh_tile, n, g, t);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1, c = 8 * n + 2 * t + (i & 1);
                const float b = bias_of(h, j0 + c);
                if (b == neg_inf) continue;
                if (skf256_tile[c] < -neg_inf && b == 0.0f) {  // below a float32 maximum: below the maximum
                    const float fu = (float)hh[i] * skf256_tile[c];
                    if (fu < topf[h]) continue;
                    topf[h] = fu;
                }
                double u = (double)hh[i] * sk_tile[c];
                if (b != 0.0f) u = u + (double)b / cq[h];
                top[h] = mcattn_max(top[h], u);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        top[h] = mcattn_max(top[h], __shfl_xor_sync(0xffffffffu, top[h], 1));
        top[h] = mcattn_max(top[h], __shfl_xor_sync(0xffffffffu, top[h], 2));
        if (top[h] != dninf) {
            const double th = theta[bh] / cq[h];
            cut[h] = mode == 1 ? (th < top[h] ? th : top[h]) : top[h] - th;
        }
        cutf[h] = (float)cut[h];
    }

    // Pass 2: lse and delta, online over the kept keys (per lane, then over the row's 4 lanes).
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f}, dd[2] = {0.0f, 0.0f};
    for (int j0 = 0; j0 < key_end; j0 += T) {
        __syncthreads();
        if (threadIdx.x == 0) any_kept = 0;
        load_keys(j0);
        __syncthreads();
        const unsigned bits = (is_causal && j0 > row0 + 15) ? 0u : kept_bits(j0);
        const bool warp_any = __ballot_sync(0xffffffffu, bits != 0) != 0;
        if (!block_any(warp_any)) continue;
        if (!int8_scores) mcattn_mma_load_pairs<Ops, D>(k_tile, 0, k + koff, j0, nk);
        mcattn_mma_load_pairs<Ops, D>(v_tile, 0, v + koff, j0, nk);
        __syncthreads();
        if (!warp_any) continue;
        float s[G][4], dp[G][4];
        scores(s, dp, j0, bits);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mt = m[h];
            for (int n = 0; n < G; ++n) mt = mcattn_max(mt, mcattn_max(s[n][2 * h], s[n][2 * h + 1]));
            if (mt == neg_inf) continue;
            const float alpha = exp2f(m[h] - mt);  // 0 while m was -inf
            l[h] *= alpha;
            dd[h] *= alpha;
            for (int n = 0; n < G; ++n)
                for (int i = 2 * h; i < 2 * h + 2; ++i) {
                    const float e = exp2f(s[n][i] - mt);
                    l[h] += e;
                    dd[h] += e * dp[n][i];
                }
            m[h] = mt;
        }
    }
    float lse2[2], dl[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float top2 = mcattn_max(m[h], __shfl_xor_sync(0xffffffffu, m[h], 1));
        top2 = mcattn_max(top2, __shfl_xor_sync(0xffffffffu, top2, 2));
        const float w = m[h] == neg_inf ? 0.0f : exp2f(m[h] - top2);
        float lsum = l[h] * w, dsum = dd[h] * w;
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
        dsum += __shfl_xor_sync(0xffffffffu, dsum, 1);
        dsum += __shfl_xor_sync(0xffffffffu, dsum, 2);
        const bool live = lsum > 0.0f;
        lse2[h] = live ? top2 + log2f(lsum) : neg_inf;
        dl[h] = live ? dsum / lsum : 0.0f;
        if (rows[h] < nq && t == 0) {
            cut_out[bh * nq + rows[h]] = cut[h];
            lse_out[bh * nq + rows[h]] = lse2[h];
            delta_out[bh * nq + rows[h]] = dl[h];
        }
    }

    // Pass 3: dQ = scale dS K over the kept keys.
    float acc[D / 8][4];
    for (int n = 0; n < D / 8; ++n)
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
    for (int j0 = 0; j0 < key_end; j0 += T) {
        __syncthreads();
        if (threadIdx.x == 0) any_kept = 0;
        load_keys(j0);
        __syncthreads();
        const unsigned bits = (is_causal && j0 > row0 + 15) ? 0u : kept_bits(j0);
        const bool warp_any = __ballot_sync(0xffffffffu, bits != 0) != 0;
        const bool tile_any = block_any(warp_any);
        if (threadIdx.x == 0) {
            atomicAdd(&tiles[0], 1ull);
            if (tile_any) atomicAdd(&tiles[1], 1ull);
        }
        if (!tile_any) continue;  // skipped: no 16-bit operand loaded, no mma
        mcattn_mma_load_pairs<Ops, D>(k_tile, kt_tile, k + koff, j0, nk);  // K^T for dS K
        mcattn_mma_load_pairs<Ops, D>(v_tile, 0, v + koff, j0, nk);
        __syncthreads();
        if (!warp_any) continue;
        float s[G][4], dp[G][4];
        scores(s, dp, j0, bits);
#pragma unroll
        for (int n = 0; n < G; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // s becomes dS = P (dP - delta)
                const int h = i >> 1;
                const float p = s[n][i] == neg_inf ? 0.0f : exp2f(s[n][i] - lse2[h]);
                s[n][i] = p * (dp[n][i] - dl[h]);
            }
        for (int kk = 0; kk < T / 16; ++kk) {
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
            for (int i = 0; i < 2; ++i) drow[8 * n + 2 * t + i] = acc[n][2 * h + i] * (float)scale;
    }
}

template <class Ops, int D>
__device__ __forceinline__ void mcattn_latte_mma_backward_dkdv(
    const signed char* __restrict__ q8, const signed char* __restrict__ k8,
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ dout, const float* __restrict__ s_q, const float* __restrict__ s_k,
    const double* __restrict__ sk256, const float* __restrict__ bias,
    const long long* __restrict__ mask_index, const double* __restrict__ cut,
    const float* __restrict__ lse2, const float* __restrict__ delta, float* __restrict__ dk,
    float* __restrict__ dv, unsigned long long* __restrict__ tiles, int nq, int nk, double scale,
    int int8_scores, int has_bias, int bias_rows, int is_causal) {
    constexpr int W = D / 4, T = MCATTN_MMA_BWD_TILE, G = MCATTN_LBWD_GROUPS;
    __shared__ unsigned q8_tile[T][W + 4], qh_tile[T][W + 4];
    __shared__ unsigned q_tile[T][D / 2 + 4];   // [query][dim pair] (float kept scores)
    __shared__ unsigned qt_tile[D][T / 2 + 4];  // [dim][query pair]
    __shared__ unsigned do_tile[T][D / 2 + 4];
    __shared__ unsigned dot_tile[D][T / 2 + 4];
    __shared__ double cut_tile[T], cq_tile[T];
    __shared__ float cutf_tile[T], cqf_tile[T], lse_tile[T], delta_tile[T];
    __shared__ int any_kept;
    const float neg_inf = mcattn_neg_inf<float>();
    const float log2e = 1.4426950408889634f, scale2 = (float)scale * log2e;
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int key0 = blockIdx.x * MCATTN_MMA_BWD_ROWS + warp * 16;
    const int keys[2] = {key0 + g, key0 + g + 8};
    const long long qoff = bh * nq * (long long)D, koff = bh * nk * (long long)D;

    // The block's keys: int8 (and, for float scores, 16-bit) in shared memory, read as A
    // fragments when used (held in registers beside dK, dV and V they spilled on sm_80).
    __shared__ unsigned k8_own[MCATTN_MMA_BWD_ROWS][W + 4];
    __shared__ unsigned k16_own[MCATTN_MMA_BWD_ROWS][D / 2 + 4];
    const int block_first = blockIdx.x * MCATTN_MMA_BWD_ROWS;
    for (int e = threadIdx.x; e < MCATTN_MMA_BWD_ROWS * W; e += MCATTN_MMA_BWD_THREADS) {
        const int r = e / W, word = e % W, key = block_first + r;
        k8_own[r][word] = key < nk ? mcattn_load_s8x4(k8 + koff + (long long)key * D + 4 * word) : 0u;
    }
    for (int e = threadIdx.x; e < MCATTN_MMA_BWD_ROWS * D / 2 && !int8_scores; e += MCATTN_MMA_BWD_THREADS) {
        const int r = e / (D / 2), pair = e % (D / 2), key = block_first + r;
        const float* p = k + koff + (long long)key * D + 2 * pair;
        k16_own[r][pair] = key < nk ? mcattn_pack16(Ops::round(p[0]), Ops::round(p[1])) : 0u;
    }
    const int own = warp * 16 + g;  // the lane's first row of k8_own / k16_own
    unsigned va[D / 16][4];
    mcattn_mma_load_a<Ops, D>(va, v + koff, key0, nk, g, t);
    float skf[2], skf256[2];
    double skd[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int key = mcattn_min(keys[h], nk - 1);
        skf[h] = s_k[bh * nk + key];
        skf256[h] = 256.0f * skf[h];
        skd[h] = sk256[bh * nk + key];
    }
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    for (int n = 0; n < D / 8; ++n)
        for (int i = 0; i < 4; ++i) dk_acc[n][i] = dv_acc[n][i] = 0.0f;

    auto bias_of = [&](int h, int query) -> float {
        const int key = keys[h];
        if (query >= nq || key >= nk || (is_causal && key > query)) return neg_inf;
        return has_bias ? mcattn_bias_row(bias, mask_index, bh, query, bias_rows, nk, true)[key] : 0.0f;
    };
    const int i_start = is_causal ? block_first / T * T : 0;
    for (int i0 = i_start; i0 < nq; i0 += T) {
        __syncthreads();
        if (threadIdx.x == 0) any_kept = 0;
        mcattn_lbwd_load_s8_tile<D>(q8_tile, qh_tile, q8 + qoff, i0, nq);
        for (int r = threadIdx.x; r < T; r += MCATTN_MMA_BWD_THREADS) {
            const int i = i0 + r;
            const double c = i < nq ? scale * (double)s_q[bh * nq + i] : 1.0;
            cq_tile[r] = c;
            cqf_tile[r] = (float)c;
            cut_tile[r] = i < nq ? cut[bh * nq + i] : mcattn_neg_inf<double>();
            cutf_tile[r] = (float)cut_tile[r];
            lse_tile[r] = i < nq ? lse2[bh * nq + i] : neg_inf;
            delta_tile[r] = i < nq ? delta[bh * nq + i] : 0.0f;
        }
        __syncthreads();
        unsigned bits = 0;  // bit 4 n + i: element i of query group n is kept
        if (!(is_causal && i0 + T - 1 < key0)) {
            unsigned kh[D / 32][4];
            for (int kk = 0; kk < D / 32; ++kk)
                for (int r = 0; r < 4; ++r)
                    kh[kk][r] = mcattn_hi_nibbles(k8_own[own + 8 * (r & 1)][8 * kk + t + 4 * (r >> 1)]);
#pragma unroll 1
            for (int n = 0; n < G; ++n) {
                int hh[4];
                mcattn_lbwd_dot8<D>(hh, kh, qh_tile, n, g, t);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int h = i >> 1, r = 8 * n + 2 * t + (i & 1);
                    const float b = bias_of(h, i0 + r);
                    if (b != neg_inf && mcattn_latte_keeps(hh[i], skf256[h], skd[h], b, cq_tile[r],
                                                           cut_tile[r], cutf_tile[r]))
                        bits |= 1u << (4 * n + i);
                }
            }
        }
        const bool warp_any = __ballot_sync(0xffffffffu, bits != 0) != 0;
        if (warp_any && lane == 0) atomicAdd(&any_kept, 1);
        __syncthreads();
        const bool tile_any = any_kept != 0;
        if (threadIdx.x == 0) {
            atomicAdd(&tiles[2], 1ull);
            if (tile_any) atomicAdd(&tiles[3], 1ull);
        }
        if (!tile_any) continue;  // skipped: no 16-bit operand loaded, no mma
        mcattn_mma_load_pairs<Ops, D>(q_tile, qt_tile, q + qoff, i0, nq);
        mcattn_mma_load_pairs<Ops, D>(do_tile, dot_tile, dout + qoff, i0, nq);
        __syncthreads();
        if (!warp_any) continue;
        float s[G][4], dp[G][4];  // [key][query]
#pragma unroll
        for (int n = 0; n < G; ++n) {
            int dot[4] = {0, 0, 0, 0};
            for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.0f;
            if (int8_scores) {
                unsigned a8[D / 32][4];
                for (int kk = 0; kk < D / 32; ++kk)
                    for (int r = 0; r < 4; ++r) a8[kk][r] = k8_own[own + 8 * (r & 1)][8 * kk + t + 4 * (r >> 1)];
                mcattn_lbwd_dot8<D>(dot, a8, q8_tile, n, g, t);
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned bd[2] = {do_tile[8 * n + g][8 * kk + t], do_tile[8 * n + g][8 * kk + 4 + t]};
                Ops::mma(dp[n], va[kk], bd);
                if (!int8_scores) {
                    const unsigned bq[2] = {q_tile[8 * n + g][8 * kk + t], q_tile[8 * n + g][8 * kk + 4 + t]};
                    const unsigned a[4] = {k16_own[own][8 * kk + t], k16_own[own + 8][8 * kk + t],
                                           k16_own[own][8 * kk + t + 4], k16_own[own + 8][8 * kk + t + 4]};
                    Ops::mma(s[n], a, bq);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // s becomes P^T, dp becomes dS^T
                const int h = i >> 1, r = 8 * n + 2 * t + (i & 1);
                float p = 0.0f;
                if (bits >> (4 * n + i) & 1u) {
                    const float b = has_bias ? bias_of(h, i0 + r) : 0.0f;
                    // the dq pass's operations, in its order: the same P
                    const float x = int8_scores ? (cqf_tile[r] * skf[h] * (float)dot[i] + b) * log2e
                                                : s[n][i] * scale2 + b * log2e;
                    p = exp2f(x - lse_tile[r]);
                }
                s[n][i] = p;
                dp[n][i] = p * (dp[n][i] - delta_tile[r]);
            }
        }
        for (int kk = 0; kk < T / 16; ++kk) {
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
                krow[8 * n + 2 * t + i] = dk_acc[n][2 * h + i] * (float)scale;
                vrow[8 * n + 2 * t + i] = dv_acc[n][2 * h + i];
            }
    }
}

#define MCATTN_LATTE_MMA_BACKWARD(TAG, OPS, D)                                                   \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_MMA_BWD_THREADS)                      \
        mcattn_latte_mma_backward_dq_##TAG##_d##D(                                              \
            const signed char* __restrict__ q8, const signed char* __restrict__ k8,             \
            const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, \
            const float* __restrict__ dout, const float* __restrict__ s_q,                      \
            const float* __restrict__ s_k, const double* __restrict__ sk256,                    \
            const double* __restrict__ theta, const float* __restrict__ bias,                   \
            const long long* __restrict__ mask_index, float* __restrict__ dq,                   \
            double* __restrict__ cut, float* __restrict__ lse2, float* __restrict__ delta,      \
            unsigned long long* __restrict__ tiles, int nq, int nk, double scale, int mode,     \
            int int8_scores, int has_bias, int bias_rows, int is_causal) {                      \
        mcattn_latte_mma_backward_dq<OPS, D>(q8, k8, q, k, v, dout, s_q, s_k, sk256, theta,     \
                                             bias, mask_index, dq, cut, lse2, delta, tiles, nq, \
                                             nk, scale, mode, int8_scores, has_bias, bias_rows, \
                                             is_causal);                                        \
    }                                                                                            \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_MMA_BWD_THREADS)                      \
        mcattn_latte_mma_backward_dkdv_##TAG##_d##D(                                            \
            const signed char* __restrict__ q8, const signed char* __restrict__ k8,             \
            const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, \
            const float* __restrict__ dout, const float* __restrict__ s_q,                      \
            const float* __restrict__ s_k, const double* __restrict__ sk256,                    \
            const float* __restrict__ bias, const long long* __restrict__ mask_index,           \
            const double* __restrict__ cut, const float* __restrict__ lse2,                     \
            const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv,    \
            unsigned long long* __restrict__ tiles, int nq, int nk, double scale,               \
            int int8_scores, int has_bias, int bias_rows, int is_causal) {                      \
        mcattn_latte_mma_backward_dkdv<OPS, D>(q8, k8, q, k, v, dout, s_q, s_k, sk256, bias,    \
                                               mask_index, cut, lse2, delta, dk, dv, tiles, nq, \
                                               nk, scale, int8_scores, has_bias, bias_rows,     \
                                               is_causal);                                      \
    }

MCATTN_LATTE_MMA_BACKWARD(f16, mcattn_f16_ops, 32)
MCATTN_LATTE_MMA_BACKWARD(f16, mcattn_f16_ops, 64)
MCATTN_LATTE_MMA_BACKWARD(bf16, mcattn_bf16_ops, 32)
MCATTN_LATTE_MMA_BACKWARD(bf16, mcattn_bf16_ops, 64)
