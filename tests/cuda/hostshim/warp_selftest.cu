// Kernels that exercise mcattn/kernels/warp.cuh one primitive at a time, so that
// tests/cuda/test_warp_shim.py can compare each with NumPy: under the host shim (the
// emulation) and through NVRTC (the PTX that a GPU would run).
#include "common.cuh"
#include "warp.cuh"

// Per thread t: out[4t + 0] = __shfl_xor_sync(v, xor_mask), [1] = __shfl_sync(v, src[t]),
// [2] = __shfl_down_sync(v, delta), [3] = the double shuffle __shfl_xor_sync((double)v);
// ballot[t] = __ballot_sync(v > 0). All with the given width.
extern "C" __global__ void shim_warp_shuffles(const float* in, const int* src, float* out,
                                              unsigned* ballot, int xor_mask, int delta, int width) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = in[t];
    out[4 * t + 0] = __shfl_xor_sync(0xffffffffu, v, xor_mask, width);
    out[4 * t + 1] = __shfl_sync(0xffffffffu, v, src[t], width);
    out[4 * t + 2] = __shfl_down_sync(0xffffffffu, v, (unsigned)delta, width);
    out[4 * t + 3] = (float)__shfl_xor_sync(0xffffffffu, (double)v * 3.0, xor_mask, width);
    ballot[t] = __ballot_sync(0xffffffffu, v > 0.0f);
}

// A warp whose first `active` lanes return before the shuffle: a full mask names lanes
// that are gone (the shim refuses the launch), `mask` = the running lanes does not.
extern "C" __global__ void shim_warp_partial(const float* in, float* out, unsigned mask, int active) {
    const int t = threadIdx.x;
    if (t < active) return;
    out[t] = __shfl_xor_sync(mask, in[t], 1);
}

// One warp, one mma: a [32][4] and b [32][2] are the lanes' fragment registers, acc [32][4]
// the accumulators (updated in place).
extern "C" __global__ void shim_mma_f16(const unsigned* a, const unsigned* b, float* acc) {
    const int l = threadIdx.x;
    unsigned ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]}, rb[2] = {b[2 * l], b[2 * l + 1]};
    float c[4] = {acc[4 * l], acc[4 * l + 1], acc[4 * l + 2], acc[4 * l + 3]};
    mcattn_mma_m16n8k16_f16(c, ra, rb);
    for (int i = 0; i < 4; ++i) acc[4 * l + i] = c[i];
}
extern "C" __global__ void shim_mma_bf16(const unsigned* a, const unsigned* b, float* acc) {
    const int l = threadIdx.x;
    unsigned ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]}, rb[2] = {b[2 * l], b[2 * l + 1]};
    float c[4] = {acc[4 * l], acc[4 * l + 1], acc[4 * l + 2], acc[4 * l + 3]};
    mcattn_mma_m16n8k16_bf16(c, ra, rb);
    for (int i = 0; i < 4; ++i) acc[4 * l + i] = c[i];
}
extern "C" __global__ void shim_mma_tf32(const unsigned* a, const unsigned* b, float* acc) {
    const int l = threadIdx.x;
    unsigned ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]}, rb[2] = {b[2 * l], b[2 * l + 1]};
    float c[4] = {acc[4 * l], acc[4 * l + 1], acc[4 * l + 2], acc[4 * l + 3]};
    mcattn_mma_m16n8k8_tf32(c, ra, rb);
    for (int i = 0; i < 4; ++i) acc[4 * l + i] = c[i];
}
extern "C" __global__ void shim_mma_s8(const unsigned* a, const unsigned* b, int* acc) {
    const int l = threadIdx.x;
    unsigned ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]}, rb[2] = {b[2 * l], b[2 * l + 1]};
    int c[4] = {acc[4 * l], acc[4 * l + 1], acc[4 * l + 2], acc[4 * l + 3]};
    mcattn_mma_m16n8k32_s8(c, ra, rb);
    for (int i = 0; i < 4; ++i) acc[4 * l + i] = c[i];
}

// The conversions, element by element.
extern "C" __global__ void shim_convert(const float* x, unsigned short* f16, unsigned short* bf16,
                                        unsigned* tf32, float* f16_back, float* bf16_back, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        f16[i] = mcattn_f32_to_f16(x[i]);
        bf16[i] = mcattn_f32_to_bf16(x[i]);
        tf32[i] = mcattn_f32_to_tf32(x[i]);
        f16_back[i] = mcattn_f16_to_f32(f16[i]);
        bf16_back[i] = mcattn_bf16_to_f32(bf16[i]);
    }
}
