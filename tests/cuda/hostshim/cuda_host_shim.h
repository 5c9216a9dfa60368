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
//   grid and block limits of CUDA (gridDim.x < 2^31, y and z <= 65535, block <= 1024
//   threads, z <= 64): a launch outside them throws std::invalid_argument, as the driver
//   refuses it (CUDA_ERROR_INVALID_VALUE)
//   MCATTN_SHIM_EXPORT(kernel): C entry points that the fake CuPy of the tests
//   (tests/cuda/fake_cupy.py) calls: mcattn_shim_launch_<kernel>(grid, block, void** args),
//   which unpacks the arguments as cuLaunchKernel does, and mcattn_shim_signature_<kernel>(),
//   the parameter types ("f32 *f64 i32 ..."), so the caller's argument types are checked
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
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
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

// Why CUDA would refuse a launch of this shape (nullptr when it is valid).
inline const char* launch_refusal(dim3 grid, dim3 block) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0)
        return "a grid or block dimension is 0";
    if (grid.x > 2147483647u) return "gridDim.x exceeds 2^31 - 1";
    if (grid.y > 65535u || grid.z > 65535u) return "gridDim.y or gridDim.z exceeds 65535";
    if (block.x > 1024u || block.y > 1024u || block.z > 64u) return "a block dimension exceeds 1024 (z: 64)";
    if ((unsigned long long)block.x * block.y * block.z > 1024ull) return "more than 1024 threads per block";
    return nullptr;
}

// Run kernel() as a CUDA launch of `grid` blocks of `block` threads.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    if (const char* why = launch_refusal(grid, block)) throw std::invalid_argument(why);
    block_dim = block;
    grid_dim = grid;
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 1) {  // one thread per block: run it here (fast for very long grids)
        std::barrier<> barrier(1);
        block_barrier = &barrier;
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    thread_index = dim3(0, 0, 0);
                    block_index = dim3(bx, by, bz);
                    kernel();
                }
        block_barrier = nullptr;
        return;
    }
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

// --- Generic entry points (MCATTN_SHIM_EXPORT) -------------------------------------
namespace mcattn_shim {
template <typename T> struct type_code;
template <> struct type_code<float> { static std::string get() { return "f32"; } };
template <> struct type_code<double> { static std::string get() { return "f64"; } };
template <> struct type_code<int> { static std::string get() { return "i32"; } };
template <> struct type_code<unsigned int> { static std::string get() { return "u32"; } };
template <> struct type_code<long long> { static std::string get() { return "i64"; } };
template <> struct type_code<long> { static std::string get() { return "i64"; } };
template <> struct type_code<unsigned long long> { static std::string get() { return "u64"; } };
template <> struct type_code<unsigned long> { static std::string get() { return "u64"; } };
template <> struct type_code<bool> { static std::string get() { return "b8"; } };
template <> struct type_code<signed char> { static std::string get() { return "i8"; } };
template <> struct type_code<unsigned char> { static std::string get() { return "u8"; } };
template <> struct type_code<short> { static std::string get() { return "i16"; } };
template <> struct type_code<unsigned short> { static std::string get() { return "u16"; } };
template <typename T> struct type_code<T*> {
    static std::string get() { return "*" + type_code<std::remove_cv_t<T>>::get(); }
};

template <typename T> std::string param_code() { return type_code<std::remove_cv_t<T>>::get(); }

template <typename... A> const char* signature(void (*)(A...)) {
    static const std::string text = [] {
        std::string s;
        ((s += param_code<A>() + " "), ...);
        return s;
    }();
    return text.c_str();
}

inline thread_local std::string last_error;

template <typename... A, std::size_t... I>
void call_packed(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

// cuLaunchKernel's calling convention: args[i] points to the value of parameter i.
template <typename... A>
int launch_packed(void (*kernel)(A...), const unsigned* grid, const unsigned* block, void** args) {
    try {
        launch(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
               [&] { call_packed(kernel, args, std::index_sequence_for<A...>{}); });
        return 0;
    } catch (const std::exception& e) {
        last_error = e.what();
        return 1;
    }
}
}  // namespace mcattn_shim

#define MCATTN_SHIM_EXPORT(name)                                                              \
    extern "C" int mcattn_shim_launch_##name(const unsigned* grid, const unsigned* block,     \
                                             void** args) {                                   \
        return mcattn_shim::launch_packed(name, grid, block, args);                           \
    }                                                                                          \
    extern "C" const char* mcattn_shim_signature_##name() { return mcattn_shim::signature(name); }

extern "C" const char* mcattn_shim_last_error() { return mcattn_shim::last_error.c_str(); }

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
