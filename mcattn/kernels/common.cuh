// Small helpers shared by mcattn's CUDA C kernels.
//
// The kernels are compiled three ways: by CuPy (NVRTC) on a GPU machine, by NVRTC alone
// in the tests (sm_80, sm_90), and by the host C++ compiler under the test shim
// (tests/cuda/hostshim/cuda_host_shim.h), which runs a block's threads as host threads. So
// they use no CUDA headers and only what the shim provides: blockIdx/threadIdx/
// blockDim/gridDim, __shared__, __syncthreads, __int_as_float/__longlong_as_double and
// the C math functions; warp-level code (shuffles with full masks, mma.sync) only as
// warp.cuh declares it, which the shim emulates lane by lane.
#ifndef MCATTN_COMMON_CUH
#define MCATTN_COMMON_CUH

__device__ __forceinline__ float mcattn_exp(float x) { return expf(x); }
__device__ __forceinline__ double mcattn_exp(double x) { return exp(x); }
__device__ __forceinline__ float mcattn_log(float x) { return logf(x); }
__device__ __forceinline__ double mcattn_log(double x) { return log(x); }

template <typename T> __device__ __forceinline__ T mcattn_neg_inf();
template <> __device__ __forceinline__ float mcattn_neg_inf<float>() {
    return __int_as_float(0xff800000);
}
template <> __device__ __forceinline__ double mcattn_neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000LL);
}

__device__ __forceinline__ float mcattn_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double mcattn_abs(double x) { return fabs(x); }

__device__ __forceinline__ int mcattn_min(int a, int b) { return a < b ? a : b; }
template <typename T> __device__ __forceinline__ T mcattn_max(T a, T b) { return a > b ? a : b; }

// Set bits of a 64-bit (32-bit) word: the __popcll (__popc) intrinsic on the device, the
// compiler builtin under the host shim (tests/cuda/hostshim).
#ifdef MCATTN_HOST_SHIM
__device__ __forceinline__ int mcattn_popcll(unsigned long long x) { return __builtin_popcountll(x); }
__device__ __forceinline__ int mcattn_popc(unsigned x) { return __builtin_popcount(x); }
#else
__device__ __forceinline__ int mcattn_popcll(unsigned long long x) { return __popcll(x); }
__device__ __forceinline__ int mcattn_popc(unsigned x) { return __popc(x); }
#endif

// One thread's streaming-softmax step over a tile of `tile` scores whose maximum (with the
// running one) is `top`: rescale the running sum `l` and output `acc` to the new maximum,
// add exp(score - top) and its share of the tile's values (row r at v_tile + r * stride).
// A tile with nothing visible yet (top = -inf) adds exp(-inf) = 0: nothing to do.
template <typename T>
__device__ __forceinline__ void mcattn_softmax_tile(const T* scores, int tile, T top,
                                                    const T* v_tile, int stride, int dv, T& m,
                                                    T& l, T* acc) {
    if (top == mcattn_neg_inf<T>()) return;
    const T rescale = mcattn_exp(m - top);  // 0 on the first visible tile
    l *= rescale;
    for (int c = 0; c < dv; ++c) acc[c] *= rescale;
    for (int r = 0; r < tile; ++r) {
        const T p = mcattn_exp(scores[r] - top);
        l += p;
        for (int c = 0; c < dv; ++c) acc[c] += p * v_tile[r * stride + c];
    }
    m = top;
}

// The block's threads copy rows [row0, row0 + tile) of a row-major [rows, width] matrix
// `src` into the shared tile `dst` (row stride `stride`), each element times `factor`.
template <typename T>
__device__ __forceinline__ void mcattn_load_tile(T* dst, int stride, const T* src, long long row0,
                                                 int tile, int width, T factor) {
    for (int e = threadIdx.x; e < tile * width; e += blockDim.x)
        dst[(e / width) * stride + e % width] = src[(row0 + e / width) * width + e % width] * factor;
}

// Row `i` of the additive mask bias `[M, bias_rows, nk]` of (batch, head) `bh` (one row
// for every query when bias_rows == 1), or 0 without a bias.
template <typename T>
__device__ __forceinline__ const T* mcattn_bias_row(const T* bias, const long long* mask_index,
                                                    long long bh, int i, int bias_rows, int nk,
                                                    bool use) {
    if (!use) return 0;
    return bias + (mask_index[bh] * bias_rows + (bias_rows > 1 ? i : 0)) * (long long)nk;
}

// The keys a block of query rows may see: causal masking hides every key after the
// block's last row from the whole block.
__device__ __forceinline__ int mcattn_block_key_end(int nq, int nk, int is_causal) {
    if (!is_causal) return nk;
    const int last_row = mcattn_min(nq, (int)((blockIdx.x + 1) * blockDim.x)) - 1;
    return mcattn_min(nk, last_row + 1);
}

#endif  // MCATTN_COMMON_CUH
