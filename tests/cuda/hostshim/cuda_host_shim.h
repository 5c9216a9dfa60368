// A small shim that lets the host C++ compiler (g++ -std=c++20 -pthread) compile mcattn's
// CUDA C kernels unchanged and RUN them on the CPU, so that their numbers are tested on a
// machine without a GPU (the NVRTC tests only prove that they compile).
//
// Model: a launch runs the blocks of the grid one after another; the threads of a block
// are host threads (std::thread), so __syncthreads is a real barrier and shared memory is
// really shared. What it provides:
//   __global__ __device__ __host__ __forceinline__ __restrict__   (no-ops / inline)
//   __shared__            `static`: one copy per kernel instantiation, shared by the
//                         threads of the (single) running block
//   threadIdx blockIdx blockDim gridDim, dim3, uint3
//   __syncthreads()       std::barrier of the block; a thread that returns early leaves
//                         the barrier (arrive_and_drop), as exited CUDA threads do
//   __int_as_float __float_as_int __longlong_as_double __double_as_longlong
//   __popcll              __builtin_popcountll
//   atomicAdd (int, unsigned, unsigned long long, float, double) via std::atomic_ref
//   the C math functions (expf, exp, fabs, sqrtf, ...) from <cmath>
// What it does not provide: warp intrinsics (__shfl_sync, __ballot_sync, ...), cooperative
// groups, dynamic shared memory, streams, textures. mcattn's kernels stay within this set
// (mcattn/kernels/common.cuh says so for kernel authors).
#ifndef MCATTN_CUDA_HOST_SHIM_H
#define MCATTN_CUDA_HOST_SHIM_H

#define MCATTN_HOST_SHIM 1

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

namespace mcattn_shim {
inline thread_local dim3 thread_index;
inline thread_local dim3 block_index;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline dim3 block_dim;
inline dim3 grid_dim;

// Run kernel() as a CUDA launch of `grid` blocks of `block` threads.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    block_dim = block;
    grid_dim = grid;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> barrier((std::ptrdiff_t)threads);
                std::vector<std::thread> team;
                team.reserve(threads);
                for (unsigned t = 0; t < threads; ++t) {
                    team.emplace_back([&, t] {
                        thread_index = dim3(t % block.x, (t / block.x) % block.y,
                                            t / (block.x * block.y));
                        block_index = dim3(bx, by, bz);
                        block_barrier = &barrier;
                        kernel();
                        barrier.arrive_and_drop();  // an exited thread no longer counts
                    });
                }
                for (auto& thread : team) thread.join();
            }
}
}  // namespace mcattn_shim

#define threadIdx (mcattn_shim::thread_index)
#define blockIdx (mcattn_shim::block_index)
#define blockDim (mcattn_shim::block_dim)
#define gridDim (mcattn_shim::grid_dim)

inline void __syncthreads() { mcattn_shim::block_barrier->arrive_and_wait(); }

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, sizeof i); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, sizeof d); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, sizeof i); return i; }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

template <typename T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

using std::fabs;
using std::exp;
using std::sqrt;
using std::log;

#endif  // MCATTN_CUDA_HOST_SHIM_H
