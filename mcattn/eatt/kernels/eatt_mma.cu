// E-Att with Hamming alignment on the tile machinery: scores from XOR + popcount of packed
// sign codes, then the softmax and P V of exact_mma.cu on float16 / bfloat16 tensor cores.
// The fast path of eatt.cu's Hamming kernel (which stays the float32 / float64 path, the L1
// alignment and the reference).
//
// Block: 4 warps (128 threads), 64 query rows, each warp 16 of them. A lane holds the
// codes of its two rows (g, g + 8) as 32-bit words in registers; for each tile of 64 keys
// (the keys' code words and V^T, rounded to 16 bits, in shared memory) it scores the 32
// (row, key) cells of the mma C layout it owns: h = sum_w __popc(q_w ^ k_w) over the
// 32-bit words, s = neg_table[h] (+ bias), the same float32 numbers as eatt.cu; then
// mcattn_mma_softmax_pv (kernels/mma_softmax.cuh): online softmax in base 2, P rounded
// to the 16-bit type, O += P V on mma.m16n8k16 with float32 accumulators. Masks: additive
// bias (key padding is a -inf bias), causal (tiles after the block's last row skipped; a
// warp skips the tiles after its own rows). A row with no visible key gives zeros.
//
// Layout (C-contiguous): qc [BH, Nq, words], kc [BH, Nk, words] uint64 (pack_bits: bit i
// of word w is code 64 w + i; read as 2 words of 32 bits each, low half first); neg_table
// [d + 1] float (-scale h); v [BH, Nk, DV], out [BH, Nq, DV] float; bias [M, bias_rows, Nk]
// float chosen by mask_index [BH]. words <= 2 (d <= 128). Grid (ceil(Nq / 64), BH);
// mcattn_eatt_mma_hamming_{f16,bf16}_dv{DV}, DV in {32, 64, 128}.
#include "common.cuh"
#include "mma_softmax.cuh"

#define MCATTN_EMMA_ROWS 64
#define MCATTN_EMMA_KEYS 64
#define MCATTN_EMMA_THREADS 128
#define MCATTN_EMMA_WORDS 4  // 32-bit code words per row at most (d <= 128)

template <class Ops, int DV>
__device__ __forceinline__ void mcattn_eatt_mma_hamming(
    const unsigned long long* __restrict__ qc, const unsigned long long* __restrict__ kc,
    const float* __restrict__ neg_table, const float* __restrict__ v, float* __restrict__ out,
    const float* __restrict__ bias, const long long* __restrict__ mask_index, int nq, int nk,
    int d, int words, int has_bias, int bias_rows, int is_causal) {
    __shared__ unsigned kc_tile[MCATTN_EMMA_KEYS][MCATTN_EMMA_WORDS + 1];
    __shared__ unsigned vt_tile[DV][MCATTN_EMMA_KEYS / 2 + 4];  // [dim][key pair], 16-bit codes
    __shared__ float table[129];
    const float neg_inf = mcattn_neg_inf<float>();
    const float log2e = 1.4426950408889634f;
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * MCATTN_EMMA_ROWS + warp * 16;
    const int rows[2] = {row0 + g, row0 + g + 8};
    const int w32 = 2 * words;

    unsigned qw[2][MCATTN_EMMA_WORDS];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int w = 0; w < MCATTN_EMMA_WORDS; ++w) {
            const unsigned long long x = rows[h] < nq && w < w32 ? qc[(bh * nq + rows[h]) * words + w / 2] : 0ull;
            qw[h][w] = (unsigned)(w & 1 ? x >> 32 : x);  // padding words are 0: they add no bit
        }
    const float* brow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h)
        brow[h] = mcattn_bias_row(bias, mask_index, bh, mcattn_min(rows[h], nq - 1), bias_rows, nk,
                                  has_bias != 0);
    for (int e = threadIdx.x; e <= d; e += MCATTN_EMMA_THREADS) table[e] = neg_table[e];

    float o[DV / 8][4];
#pragma unroll
    for (int n = 0; n < DV / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[n][i] = 0.0f;
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};
    const float* vb = v + bh * nk * (long long)DV;
    const int block_last = mcattn_min(nq, (int)(blockIdx.x + 1) * MCATTN_EMMA_ROWS) - 1;
    const int key_end = is_causal ? mcattn_min(nk, block_last + 1) : nk;
    for (int j0 = 0; j0 < key_end; j0 += MCATTN_EMMA_KEYS) {
        __syncthreads();  // the previous tile is no longer read (and the table is written)
#pragma unroll 1  // rolled: no loads in flight beside o (it spilled on sm_80 at DV = 128)
        for (int e = threadIdx.x; e < MCATTN_EMMA_KEYS * MCATTN_EMMA_WORDS; e += MCATTN_EMMA_THREADS) {
            const int key = e / MCATTN_EMMA_WORDS, w = e % MCATTN_EMMA_WORDS, j = j0 + key;
            const unsigned long long x = j < nk && w < w32 ? kc[(bh * nk + j) * words + w / 2] : 0ull;
            kc_tile[key][w] = (unsigned)(w & 1 ? x >> 32 : x);
        }
#pragma unroll 1
        for (int e = threadIdx.x; e < MCATTN_EMMA_KEYS * DV / 2; e += MCATTN_EMMA_THREADS) {
            const int dim = e % DV, kp = e / DV, j2 = j0 + 2 * kp;  // V^T: along keys (coalesced reads)
            const float v0 = j2 < nk ? vb[(long long)j2 * DV + dim] : 0.0f;
            const float v1 = j2 + 1 < nk ? vb[(long long)(j2 + 1) * DV + dim] : 0.0f;
            vt_tile[dim][kp] = mcattn_pack16(Ops::round(v0), Ops::round(v1));
        }
        __syncthreads();
        if (is_causal && j0 > row0 + 15) continue;  // the whole warp: every key after its rows
#pragma unroll 1  // rolled: 32 keys at a time, half the score registers (no sm_80 spills)
        for (int half = 0; half < 2; ++half) {
            constexpr int G = MCATTN_EMMA_KEYS / 16;
            float s[G][4];
#pragma unroll
            for (int nn = 0; nn < G; ++nn)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int h = i >> 1, r = 8 * (G * half + nn) + 2 * t + (i & 1), key = j0 + r;
                    int bits = 0;
#pragma unroll
                    for (int w = 0; w < MCATTN_EMMA_WORDS; ++w) bits += mcattn_popc(qw[h][w] ^ kc_tile[r][w]);
                    float x = table[bits];
                    if (has_bias && key < nk) x += brow[h][key];
                    if (key >= nk || (is_causal && key > rows[h])) x = neg_inf;
                    s[nn][i] = x * log2e;
                }
            mcattn_mma_softmax_pv<Ops, DV, G>(s, m, l, o, vt_tile, 4 * G * half, g, t);
        }
    }
    mcattn_mma_store_rows<DV>(out + bh * nq * (long long)DV, o, l, rows, nq, t);
}

#define MCATTN_EATT_MMA_HAMMING(NAME, OPS, DV)                                                    \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_EMMA_THREADS) NAME(                     \
        const unsigned long long* __restrict__ qc, const unsigned long long* __restrict__ kc,     \
        const float* __restrict__ neg_table, const float* __restrict__ v, float* __restrict__ out, \
        const float* __restrict__ bias, const long long* __restrict__ mask_index, int nq, int nk,  \
        int d, int words, int has_bias, int bias_rows, int is_causal) {                           \
        mcattn_eatt_mma_hamming<OPS, DV>(qc, kc, neg_table, v, out, bias, mask_index, nq, nk, d,   \
                                         words, has_bias, bias_rows, is_causal);                   \
    }

MCATTN_EATT_MMA_HAMMING(mcattn_eatt_mma_hamming_f16_dv32, mcattn_f16_ops, 32)
MCATTN_EATT_MMA_HAMMING(mcattn_eatt_mma_hamming_f16_dv64, mcattn_f16_ops, 64)
MCATTN_EATT_MMA_HAMMING(mcattn_eatt_mma_hamming_f16_dv128, mcattn_f16_ops, 128)
MCATTN_EATT_MMA_HAMMING(mcattn_eatt_mma_hamming_bf16_dv32, mcattn_bf16_ops, 32)
MCATTN_EATT_MMA_HAMMING(mcattn_eatt_mma_hamming_bf16_dv64, mcattn_bf16_ops, 64)
MCATTN_EATT_MMA_HAMMING(mcattn_eatt_mma_hamming_bf16_dv128, mcattn_bf16_ops, 128)
