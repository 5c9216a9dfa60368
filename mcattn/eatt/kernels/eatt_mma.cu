// E-Att on the tile machinery: Hamming scores from XOR + popcount of packed sign codes, or
// L1 scores -sum_c |q_c - k_c| on CUDA cores from shared-memory tiles, then the softmax and
// P V of exact_mma.cu on float16 / bfloat16 tensor cores. The fast path of eatt.cu (which
// stays the float32 / float64 path and the reference).
//
// Block: 4 warps (128 threads), 64 query rows, each warp 16 of them. For each tile of 64
// keys (the keys' alignment data and V^T, rounded to 16 bits, in shared memory) a lane
// scores the 32 (row, key) cells of the mma C layout it owns (rows g, g + 8):
//   Hamming: its rows' codes as 32-bit words in registers, h = sum_w __popc(q_w ^ k_w),
//     s = neg_table[h] (+ bias): the same float32 numbers as eatt.cu;
//   L1: the block's 64 query rows and the tile's keys as float32 in shared memory (q, k
//     arrive scaled by `scale`), s = -sum_c |q_c - k_c| summed in eatt.cu's order (+ bias);
// then mcattn_mma_softmax_pv (kernels/mma_softmax.cuh): online softmax in base 2, P
// rounded to the 16-bit type, O += P V on mma.m16n8k16 with float32 accumulators. Masks:
// additive bias (key padding is a -inf bias), causal (tiles after the block's last row
// skipped; a warp skips the tiles after its own rows). A row with no visible key gives
// zeros. The tile loop is written once (mcattn_eatt_mma_tiles); an alignment is a struct
// with stage(j0) (all threads stage a key tile) and score(h, r) (row h of the lane, key r).
//
// Layout (C-contiguous): qc [BH, Nq, words], kc [BH, Nk, words] uint64 (pack_bits: bit i
// of word w is code 64 w + i; read as 2 words of 32 bits each, low half first); neg_table
// [d + 1] float (-scale h); q [BH, Nq, d], k [BH, Nk, d] float (L1); v [BH, Nk, DV],
// out [BH, Nq, DV] float; bias [M, bias_rows, Nk] float chosen by mask_index [BH].
// Hamming: words <= 2 (d <= 128), DV in {32, 64, 128}: mcattn_eatt_mma_hamming_{f16,bf16}_dv{DV}.
// L1: d <= D with (D, DV) in {(32, 32), (32, 64), (32, 128), (64, 32), (64, 64)} (the tiles
// within 48 KiB of static shared memory): mcattn_eatt_mma_l1_{f16,bf16}_d{D}_dv{DV}.
// Grid (ceil(Nq / 64), BH).
#include "common.cuh"
#include "mma_softmax.cuh"

#define MCATTN_EMMA_ROWS 64
#define MCATTN_EMMA_KEYS 64
#define MCATTN_EMMA_THREADS 128
#define MCATTN_EMMA_WORDS 4  // 32-bit code words per row at most (d <= 128)
#define MCATTN_EMMA_VT (MCATTN_EMMA_KEYS / 2 + 4)  // words per V^T row: key pairs, padded

// The tile loop both alignments share: V^T staging, causal skipping, scores with mask,
// online softmax and P V, the rows' output.
template <class Ops, int DV, class Align>
__device__ __forceinline__ void mcattn_eatt_mma_tiles(Align& align, unsigned (*vt_tile)[MCATTN_EMMA_VT],
                                                      const float* __restrict__ v, float* __restrict__ out,
                                                      const float* __restrict__ bias,
                                                      const long long* __restrict__ mask_index, int nq,
                                                      int nk, int has_bias, int bias_rows, int is_causal) {
    const float neg_inf = mcattn_neg_inf<float>();
    const float log2e = 1.4426950408889634f;
    const long long bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * MCATTN_EMMA_ROWS + warp * 16;
    const int rows[2] = {row0 + g, row0 + g + 8};
    const float* brow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h)
        brow[h] = mcattn_bias_row(bias, mask_index, bh, mcattn_min(rows[h], nq - 1), bias_rows, nk,
                                  has_bias != 0);
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
        __syncthreads();  // the previous tile is no longer read (and the rows' data are staged)
        align.stage(j0);
#pragma unroll 1  // rolled: no loads in flight beside o (it spilled on sm_80 at DV = 128)
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
                    float x = align.score(h, r);
                    if (has_bias && key < nk) x += brow[h][key];
                    if (key >= nk || (is_causal && key > rows[h])) x = neg_inf;
                    s[nn][i] = x * log2e;
                }
            mcattn_mma_softmax_pv<Ops, DV, G>(s, m, l, o, vt_tile, 4 * G * half, g, t);
        }
    }
    mcattn_mma_store_rows<DV>(out + bh * nq * (long long)DV, o, l, rows, nq, t);
}

// Hamming: the lane's two rows' codes in registers, the tile's key codes in shared memory.
struct mcattn_eatt_hamming {
    const unsigned long long* kc;
    unsigned (*kc_tile)[MCATTN_EMMA_WORDS + 1];
    const float* table;
    unsigned qw[2][MCATTN_EMMA_WORDS];
    long long bh;
    int nk, words;

    __device__ __forceinline__ void stage(int j0) {
        const int w32 = 2 * words;
#pragma unroll 1
        for (int e = threadIdx.x; e < MCATTN_EMMA_KEYS * MCATTN_EMMA_WORDS; e += MCATTN_EMMA_THREADS) {
            const int key = e / MCATTN_EMMA_WORDS, w = e % MCATTN_EMMA_WORDS, j = j0 + key;
            const unsigned long long x = j < nk && w < w32 ? kc[(bh * nk + j) * words + w / 2] : 0ull;
            kc_tile[key][w] = (unsigned)(w & 1 ? x >> 32 : x);
        }
    }
    __device__ __forceinline__ float score(int h, int r) const {
        int bits = 0;
#pragma unroll
        for (int w = 0; w < MCATTN_EMMA_WORDS; ++w) bits += mcattn_popc(qw[h][w] ^ kc_tile[r][w]);
        return table[bits];
    }
};

template <class Ops, int DV>
__device__ __forceinline__ void mcattn_eatt_mma_hamming(
    const unsigned long long* __restrict__ qc, const unsigned long long* __restrict__ kc,
    const float* __restrict__ neg_table, const float* __restrict__ v, float* __restrict__ out,
    const float* __restrict__ bias, const long long* __restrict__ mask_index, int nq, int nk,
    int d, int words, int has_bias, int bias_rows, int is_causal) {
    __shared__ unsigned kc_tile[MCATTN_EMMA_KEYS][MCATTN_EMMA_WORDS + 1];
    __shared__ unsigned vt_tile[DV][MCATTN_EMMA_VT];  // [dim][key pair], 16-bit codes
    __shared__ float table[129];
    const long long bh = blockIdx.y;
    const int lane = threadIdx.x % 32, g = lane >> 2;
    const int row0 = blockIdx.x * MCATTN_EMMA_ROWS + (threadIdx.x / 32) * 16;
    const int w32 = 2 * words;
    mcattn_eatt_hamming align{kc, kc_tile, table, {}, bh, nk, words};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + g + 8 * h;
#pragma unroll
        for (int w = 0; w < MCATTN_EMMA_WORDS; ++w) {
            const unsigned long long x = row < nq && w < w32 ? qc[(bh * nq + row) * words + w / 2] : 0ull;
            align.qw[h][w] = (unsigned)(w & 1 ? x >> 32 : x);  // padding words are 0: they add no bit
        }
    }
    for (int e = threadIdx.x; e <= d; e += MCATTN_EMMA_THREADS) table[e] = neg_table[e];
    mcattn_eatt_mma_tiles<Ops, DV>(align, vt_tile, v, out, bias, mask_index, nq, nk, has_bias, bias_rows,
                                   is_causal);
}

// L1: the block's query rows and the tile's keys as float32 in shared memory (rows padded
// by one word against bank conflicts).
template <int D>
struct mcattn_eatt_l1 {
    const float* k;
    const float (*q_rows)[D + 1];
    float (*k_tile)[D + 1];
    long long bh;
    int nk, d, local[2];  // the lane's two rows within the block

    __device__ __forceinline__ void stage(int j0) {
#pragma unroll 1
        for (int e = threadIdx.x; e < MCATTN_EMMA_KEYS * D; e += MCATTN_EMMA_THREADS) {
            const int key = e / D, c = e % D, j = j0 + key;
            k_tile[key][c] = j < nk && c < d ? k[(bh * nk + j) * d + c] : 0.0f;
        }
    }
    __device__ __forceinline__ float score(int h, int r) const {
        float dist = 0.0f;  // padding dims are 0 in both: |0 - 0| adds nothing
#pragma unroll 8
        for (int c = 0; c < D; ++c) dist += mcattn_abs(q_rows[local[h]][c] - k_tile[r][c]);
        return -dist;
    }
};

template <class Ops, int D, int DV>
__device__ __forceinline__ void mcattn_eatt_mma_l1(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, const float* __restrict__ bias, const long long* __restrict__ mask_index,
    int nq, int nk, int d, int has_bias, int bias_rows, int is_causal) {
    __shared__ float q_rows[MCATTN_EMMA_ROWS][D + 1];
    __shared__ float k_tile[MCATTN_EMMA_KEYS][D + 1];
    __shared__ unsigned vt_tile[DV][MCATTN_EMMA_VT];
    const long long bh = blockIdx.y;
    const int lane = threadIdx.x % 32, g = lane >> 2, local0 = (threadIdx.x / 32) * 16 + g;
    const int first = blockIdx.x * MCATTN_EMMA_ROWS;
#pragma unroll 1
    for (int e = threadIdx.x; e < MCATTN_EMMA_ROWS * D; e += MCATTN_EMMA_THREADS) {
        const int row = e / D, c = e % D, i = first + row;
        q_rows[row][c] = i < nq && c < d ? q[(bh * nq + i) * d + c] : 0.0f;
    }
    mcattn_eatt_l1<D> align{k, q_rows, k_tile, bh, nk, d, {local0, local0 + 8}};
    mcattn_eatt_mma_tiles<Ops, DV>(align, vt_tile, v, out, bias, mask_index, nq, nk, has_bias, bias_rows,
                                   is_causal);
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

#define MCATTN_EATT_MMA_L1(NAME, OPS, D, DV)                                                      \
    extern "C" __global__ void MCATTN_LAUNCH_BOUNDS(MCATTN_EMMA_THREADS) NAME(                     \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,    \
        float* __restrict__ out, const float* __restrict__ bias,                                  \
        const long long* __restrict__ mask_index, int nq, int nk, int d, int has_bias,            \
        int bias_rows, int is_causal) {                                                           \
        mcattn_eatt_mma_l1<OPS, D, DV>(q, k, v, out, bias, mask_index, nq, nk, d, has_bias,      \
                                       bias_rows, is_causal);                                     \
    }

MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_f16_d32_dv32, mcattn_f16_ops, 32, 32)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_f16_d32_dv64, mcattn_f16_ops, 32, 64)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_f16_d32_dv128, mcattn_f16_ops, 32, 128)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_f16_d64_dv32, mcattn_f16_ops, 64, 32)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_f16_d64_dv64, mcattn_f16_ops, 64, 64)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_bf16_d32_dv32, mcattn_bf16_ops, 32, 32)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_bf16_d32_dv64, mcattn_bf16_ops, 32, 64)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_bf16_d32_dv128, mcattn_bf16_ops, 32, 128)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_bf16_d64_dv32, mcattn_bf16_ops, 64, 32)
MCATTN_EATT_MMA_L1(mcattn_eatt_mma_l1_bf16_d64_dv64, mcattn_bf16_ops, 64, 64)
