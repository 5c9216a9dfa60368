// LATTE on tensor cores: the MS4B estimate on int8 mma, tiles with no kept key skipped,
// kept scores from the int8 products and P V on float16 / bfloat16 mma. The fast path of
// latte.cu (which stays the float32 / float64 path, every mode, and the reference).
//
// Block: 4 warps (128 threads), 64 query rows, each warp 16 of them, as exact_mma.cu.
// A warp keeps hi(q8) and q8 of its rows as int8 A fragments (m16n8k32) in registers.
// For each tile of 64 keys (k8 and hi(k8) in shared memory, 4 int8 per word):
//   pass 1   hh = hi(q8) hi(k8)^T on mma.m16n8k32.s8 (exact integers), u = hh * 256 s_k
//            (+ bias / c) in double: the CPU kernel's IEEE operations, so the row maxima
//            are its maxima; the cut (relative: max - theta / c, absolute:
//            min(theta / c, max)) is one division and one subtraction, as on the CPU.
//            Most elements need no double: without a bias term, fu = float(hh) * 256 s_k
//            is u rounded to float32 (monotone), so an element with fu below the float32
//            maximum so far cannot be the maximum, and in pass 2 fu > float(cut) keeps,
//            fu < float(cut) drops; only equality (and bias terms) take the double;
//   pass 2   hh again, keep u >= cut as a bit per accumulator element (registers only);
//            kept counts (and, with write_mask, the mask) per key; a tile that no row of
//            the block keeps is skipped: V is not loaded and no score is computed;
//            otherwise dot8 = q8 k8^T (mma s8, exact), s = c s_k dot8 + bias on the kept
//            keys (-inf elsewhere), the online softmax in base 2 and O += P V with P and V
//            rounded to the 16-bit type (mma.m16n8k16, float32 accumulators), as
//            exact_mma.cu. A warp none of whose rows keeps a key of the tile skips its mmas.
// Kept sets are bit-identical to the CPU kernel's; outputs differ from float32 by the
// 16-bit rounding of P and V. Modes: relative and absolute (topk and safe stay on
// latte.cu), int8 kept scores, no dropped mass.
//
// Layout (C-contiguous): q8 [BH, Nq, D], k8 [BH, Nk, D] int8; v [BH, Nk, D] float (read
// only with do_output); s_q [BH, Nq], s_k [BH, Nk] float; sk256 [BH, Nk] double (256 s_k);
// theta [BH] double; bias [M, bias_rows, Nk] float selected by mask_index [BH]; out
// [BH, Nq, D] float; kept [BH, Nq] long long; mask_out [BH, Nq, Nk] bool (write_mask);
// tiles [2] unsigned long long: (query-block, key-tile) pairs estimated / computed
// (atomicAdd: the skip rate). Grid (ceil(Nq / 64), BH). D in {32, 64, 128}:
// mcattn_latte_mma_forward_{f16,bf16}_d{D}. Static shared memory at D = 128:
// 2 x 64 x 36 words (k8, hi) + 128 x 36 words (V^T) + 64 x 12 bytes = 37,632 bytes.
#include "common.cuh"
#include "mma_softmax.cuh"
#include "latte_int8.cuh"  // mcattn_load_s8x4, mcattn_hi_nibbles

#define MCATTN_LMMA_ROWS 64
#define MCATTN_LMMA_KEYS 64
#define MCATTN_LMMA_THREADS 128

template <class Ops, int D>
__device__ __forceinline__ void mcattn_latte_mma_forward(
    const signed char* __restrict__ q8, const signed char* __restrict__ k8,
    const float* __restrict__ v, const float* __restrict__ s_q, const float* __restrict__ s_k,
    const double* __restrict__ sk256, const double* __restrict__ theta,
    const float* __restrict__ bias, const long long* __restrict__ mask_index,
    float* __restrict__ out, long long* __restrict__ kept, bool* __restrict__ mask_out,
    unsigned long long* __restrict__ tiles, int nq, int nk, double scale, int mode, int has_bias,
    int bias_rows, int is_causal, int write_mask, int do_output) {
    constexpr int W = D / 4;  // int8 words per row
    __shared__ unsigned k8_tile[MCATTN_LMMA_KEYS][W + 4];  // rows padded: conflict-free B reads
    __shared__ unsigned kh_tile[MCATTN_LMMA_KEYS][W + 4];
    __shared__ unsigned vt_tile[D][MCATTN_LMMA_KEYS / 2 + 4];  // [dim][key pair], 16-bit codes
    __shared__ double sk_tile[MCATTN_LMMA_KEYS];
    __shared__ float skf_tile[MCATTN_LMMA_KEYS];
    __shared__ float skf256_tile[MCATTN_LMMA_KEYS];
    __shared__ int any_kept;
    const double dninf = mcattn_neg_inf<double>();
    const float neg_inf = mcattn_neg_inf<float>();
    const float log2e = 1.4426950408889634f;
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * MCATTN_LMMA_ROWS + warp * 16;
    const int rows[2] = {row0 + g, row0 + g + 8};
    const signed char* kb = k8 + bh * nk * (long long)D;

    // q8 as A fragments: register r holds row rows[r & 1], words 8 kk + t (+4 for r >= 2);
    // hi(q8) is derived per tile (held beside the output fragments, it spilled at D = 128).
    unsigned qa[D / 32][4];
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = rows[r & 1], c = 32 * kk + 4 * t + 16 * (r >> 1);
            const unsigned w = row < nq ? mcattn_load_s8x4(q8 + (bh * nq + row) * (long long)D + c) : 0u;
            qa[kk][r] = w;
        }
    double cq[2], cut[2] = {dninf, dninf};
    float cutf[2];
    float cqf[2];
    const float* brow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = mcattn_min(rows[h], nq - 1);
        cq[h] = scale * (double)s_q[bh * nq + row];
        cqf[h] = (float)cq[h];
        brow[h] = mcattn_bias_row(bias, mask_index, bh, row, bias_rows, nk, has_bias != 0);
    }
    const int block_last = mcattn_min(nq, (int)(blockIdx.x + 1) * MCATTN_LMMA_ROWS) - 1;
    const int key_end = is_causal ? mcattn_min(nk, block_last + 1) : nk;

    // Accumulator element i of key group n: 0 when the key is not visible; 1 when u has no
    // bias term and a float32 scale, with fu = float(hh) * 256 s_k its float32 rounding
    // (an IEEE product of exact operands: round(u), monotone in u, so fu > float(cut)
    // implies u >= cut and fu < float(cut) implies u < cut); 2 when only the double says.
    auto classify = [&](const int* acc, int i, int j0, int n, float& fu) -> int {
        const int h = i >> 1, key = j0 + 8 * n + 2 * t + (i & 1);
        if (rows[h] >= nq || key >= nk || (is_causal && key > rows[h])) return 0;
        int kind = skf256_tile[key - j0] < -neg_inf ? 1 : 2;  // 256 s_k overflowed float
        if (has_bias) {
            const float b = brow[h][key];
            if (b == neg_inf) return 0;
            if (b != 0.0f) kind = 2;
        }
        fu = (float)acc[i] * skf256_tile[key - j0];
        return kind;
    };
    // u of a visible element in double: the CPU kernel's operations (exact product, one
    // division by c and one addition with a bias).
    auto unit = [&](const int* acc, int i, int j0, int n) -> double {
        const int h = i >> 1, key = j0 + 8 * n + 2 * t + (i & 1);
        double val = (double)acc[i] * sk_tile[key - j0];
        if (has_bias) {
            const float b = brow[h][key];
            if (b != 0.0f) val = val + (double)b / cq[h];  // + 0 / c changes no comparison
        }
        return val;
    };
    // The int8 tiles of keys j0.. (k8 and its high nibbles) and their scales.
    auto load_keys = [&](int j0) {
#pragma unroll 1  // rolled, as the V^T load (registers on sm_80)
        for (int e = threadIdx.x; e < MCATTN_LMMA_KEYS * W; e += MCATTN_LMMA_THREADS) {
            const int key = e / W, word = e % W, j = j0 + key;
            const unsigned w = j < nk ? mcattn_load_s8x4(kb + (long long)j * D + 4 * word) : 0u;
            k8_tile[key][word] = w;
            kh_tile[key][word] = mcattn_hi_nibbles(w);
        }
        for (int e = threadIdx.x; e < MCATTN_LMMA_KEYS; e += MCATTN_LMMA_THREADS) {
            const int j = j0 + e;
            sk_tile[e] = j < nk ? sk256[bh * nk + j] : 0.0;
            skf_tile[e] = j < nk ? s_k[bh * nk + j] : 0.0f;
            skf256_tile[e] = 256.0f * skf_tile[e];  // exact, or inf
        }
    };
    auto estimate = [&](int (&acc)[4], const unsigned (&qh)[D / 32][4], int n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = 0;
#pragma unroll
        for (int kk = 0; kk < D / 32; ++kk) {
            const unsigned b[2] = {kh_tile[8 * n + g][8 * kk + t], kh_tile[8 * n + g][8 * kk + 4 + t]};
            mcattn_mma_m16n8k32_s8(acc, qh[kk], b);
        }
    };
    auto hi_fragments = [&](unsigned (&qh)[D / 32][4]) {
#pragma unroll
        for (int kk = 0; kk < D / 32; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) qh[kk][r] = mcattn_hi_nibbles(qa[kk][r]);
    };

    // Pass 1: the row maxima of the estimate.
    double top[2] = {dninf, dninf};
    float topf[2] = {neg_inf, neg_inf};  // float32 maximum of the elements of kind 1 (a lower bound's rounding)
    for (int j0 = 0; j0 < key_end; j0 += MCATTN_LMMA_KEYS) {
        __syncthreads();
        load_keys(j0);
        __syncthreads();
        if (is_causal && j0 > row0 + 15) continue;  // the whole warp: every key after its rows
        unsigned qh[D / 32][4];
        hi_fragments(qh);
#pragma unroll 1  // rolled: fewer live registers (sm_80, D = 128)
        for (int n = 0; n < MCATTN_LMMA_KEYS / 8; ++n) {
            int acc[4];
            estimate(acc, qh, n);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float fu;
                const int kind = classify(acc, i, j0, n, fu), h = i >> 1;
                if (kind == 0) continue;
                if (kind == 1) {  // below a float32 maximum of such elements: below the maximum
                    if (fu < topf[h]) continue;
                    topf[h] = fu;
                }
                top[h] = mcattn_max(top[h], unit(acc, i, j0, n));
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
        cutf[h] = (float)cut[h];  // round to nearest: monotone
    }

    // Pass 2: keep, count, skip, score, P V.
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[n][i] = 0.0f;
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};
    int count[2] = {0, 0};
    const float* vb = v + bh * nk * (long long)D;
    for (int j0 = 0; j0 < key_end; j0 += MCATTN_LMMA_KEYS) {
        __syncthreads();  // the previous tile is no longer read
        if (threadIdx.x == 0) any_kept = 0;
        load_keys(j0);
        __syncthreads();
        unsigned bits = 0;  // bit 4 n + i: accumulator element i of key group n is kept
        if (!(is_causal && j0 > row0 + 15)) {
            unsigned qh[D / 32][4];
            hi_fragments(qh);
#pragma unroll 1  // rolled: fewer live registers (sm_80, D = 128)
            for (int n = 0; n < MCATTN_LMMA_KEYS / 8; ++n) {
                int acc[4];
                estimate(acc, qh, n);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float fu;
                    const int kind = classify(acc, i, j0, n, fu), h = i >> 1;
                    if (kind == 0) continue;
                    const bool keep = kind == 1 && fu > cutf[h]   ? true
                                      : kind == 1 && fu < cutf[h] ? false
                                                                  : unit(acc, i, j0, n) >= cut[h];
                    if (keep) bits |= 1u << (4 * n + i);
                }
            }
        }
        count[0] += mcattn_popcll(bits & 0x33333333u);  // elements 0, 1: row g
        count[1] += mcattn_popcll(bits & 0xccccccccu);  // elements 2, 3: row g + 8
        if (write_mask)
            for (int e = 0; e < 32; ++e)
                if (bits >> e & 1u) {
                    const int n = e >> 2, i = e & 3;
                    mask_out[(bh * nq + rows[i >> 1]) * (long long)nk + j0 + 8 * n + 2 * t + (i & 1)] = true;
                }
        const bool warp_any = __ballot_sync(0xffffffffu, bits != 0) != 0;
        if (!do_output) continue;
        if (warp_any && lane == 0) atomicAdd(&any_kept, 1);
        __syncthreads();
        const bool tile_any = any_kept != 0;  // the same for the whole block
        if (threadIdx.x == 0) {
            atomicAdd(&tiles[0], 1ull);
            if (tile_any) atomicAdd(&tiles[1], 1ull);
        }
        if (!tile_any) continue;  // skipped: no V load, no score
#pragma unroll 1  // rolled: no loads in flight beside o (it spilled on sm_80 at D = 128)
        for (int e = threadIdx.x; e < MCATTN_LMMA_KEYS * D / 2; e += MCATTN_LMMA_THREADS) {
            const int dim = e % D, kp = e / D, j2 = j0 + 2 * kp;  // V^T: along keys (coalesced reads)
            const float v0 = j2 < nk ? vb[(long long)j2 * D + dim] : 0.0f;
            const float v1 = j2 + 1 < nk ? vb[(long long)(j2 + 1) * D + dim] : 0.0f;
            vt_tile[dim][kp] = mcattn_pack16(Ops::round(v0), Ops::round(v1));
        }
        __syncthreads();
        if (!warp_any) continue;
        // Kept scores in log2 units from the exact int8 dot products (-inf where not kept),
        // 32 keys at a time (half the score fragments live at once: no spills at D = 128).
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            constexpr int G = MCATTN_LMMA_KEYS / 16;  // key groups of 8 per half
            float s[G][4];
#pragma unroll
            for (int nn = 0; nn < G; ++nn) {
                const int n = G * half + nn;
                int acc[4] = {0, 0, 0, 0};
#pragma unroll
                for (int kk = 0; kk < D / 32; ++kk) {
                    const unsigned b[2] = {k8_tile[8 * n + g][8 * kk + t], k8_tile[8 * n + g][8 * kk + 4 + t]};
                    mcattn_mma_m16n8k32_s8(acc, qa[kk], b);
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int h = i >> 1, key = j0 + 8 * n + 2 * t + (i & 1);
                    float x = neg_inf;
                    if (bits >> (4 * n + i) & 1u) {
                        x = cqf[h] * skf_tile[key - j0] * (float)acc[i];
                        if (has_bias) x += brow[h][key];
                        x *= log2e;
                    }
                    s[nn][i] = x;
                }
            }
            mcattn_mma_softmax_pv<Ops, D, G>(s, m, l, o, vt_tile, 4 * G * half, g, t);
        }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        count[h] += __shfl_xor_sync(0xffffffffu, count[h], 1);
        count[h] += __shfl_xor_sync(0xffffffffu, count[h], 2);
        if (rows[h] < nq && t == 0) kept[bh * nq + rows[h]] = count[h];
    }
    if (do_output) mcattn_mma_store_rows<D>(out + bh * nq * (long long)D, o, l, rows, nq, t);
}

#define MCATTN_LATTE_MMA_FORWARD(NAME, OPS, D)                                                   \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_LMMA_THREADS) NAME(                    \
        const signed char* __restrict__ q8, const signed char* __restrict__ k8,                  \
        const float* __restrict__ v, const float* __restrict__ s_q, const float* __restrict__ s_k, \
        const double* __restrict__ sk256, const double* __restrict__ theta,                      \
        const float* __restrict__ bias, const long long* __restrict__ mask_index,                \
        float* __restrict__ out, long long* __restrict__ kept, bool* __restrict__ mask_out,      \
        unsigned long long* __restrict__ tiles, int nq, int nk, double scale, int mode,          \
        int has_bias, int bias_rows, int is_causal, int write_mask, int do_output) {             \
        mcattn_latte_mma_forward<OPS, D>(q8, k8, v, s_q, s_k, sk256, theta, bias, mask_index,    \
                                         out, kept, mask_out, tiles, nq, nk, scale, mode,         \
                                         has_bias, bias_rows, is_causal, write_mask, do_output);  \
    }

MCATTN_LATTE_MMA_FORWARD(mcattn_latte_mma_forward_f16_d32, mcattn_f16_ops, 32)
MCATTN_LATTE_MMA_FORWARD(mcattn_latte_mma_forward_f16_d64, mcattn_f16_ops, 64)
MCATTN_LATTE_MMA_FORWARD(mcattn_latte_mma_forward_f16_d128, mcattn_f16_ops, 128)
MCATTN_LATTE_MMA_FORWARD(mcattn_latte_mma_forward_bf16_d32, mcattn_bf16_ops, 32)
MCATTN_LATTE_MMA_FORWARD(mcattn_latte_mma_forward_bf16_d64, mcattn_bf16_ops, 64)
MCATTN_LATTE_MMA_FORWARD(mcattn_latte_mma_forward_bf16_d128, mcattn_bf16_ops, 128)
