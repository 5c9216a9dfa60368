// Kernels that exercise the shim itself: shared memory, barriers, early exits, atomics.
#include "common.cuh"

// out[block] = sum of in[block * blockDim.x + t] by a tree reduction in shared memory;
// threads past `n` return at once (they must not hold up the barrier).
extern "C" __global__ void shim_block_sum(const float* in, float* out, int n, int active) {
    __shared__ float partial[256];
    const int t = threadIdx.x;
    if (t >= active) return;  // early exit before any barrier
    const int i = blockIdx.x * active + t;
    partial[t] = i < n ? in[i] : 0.0f;
    __syncthreads();
    for (int stride = 1; stride < active; stride *= 2) {
        float add = 0.0f;
        if (t % (2 * stride) == 0 && t + stride < active) add = partial[t + stride];
        __syncthreads();
        partial[t] += add;
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

// total += in[i] for every thread of every block (atomics across threads).
extern "C" __global__ void shim_atomic_sum(const double* in, double* total, int* count, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        atomicAdd(total, in[i]);
        atomicAdd(count, 1);
    }
}
