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
//   warps: the threads of a block form warps of 32 consecutive linear thread ids, each with
//   its own barrier and register-exchange slots (mcattn_shim::Warp). On them:
//   __shfl_sync __shfl_xor_sync __shfl_down_sync __ballot_sync __syncwarp, and the
//   warp-level API of mcattn/kernels/warp.cuh: mma.sync m16n8k16 f16/bf16 -> f32, m16n8k8
//   tf32 -> f32, m16n8k32 s8 -> s32 (each lane publishes its fragment registers, meets its
//   warp at the barrier, and computes its own output elements from the PTX ISA's fragment
//   layouts), half / bfloat16 / tf32 conversions (round to nearest even; tf32: nearest,
//   ties away, as cvt.rna). The mask of a warp intrinsic must name exactly the lanes of the
//   warp that are still running (divergent warp code is not emulated): another mask fails
//   the launch.
// What it does not provide: cooperative groups, dynamic shared memory, streams, textures,
// ldmatrix / cp.async (warp.cuh's kernels load fragments with plain loads).
#ifndef MCATTN_CUDA_HOST_SHIM_H
#define MCATTN_CUDA_HOST_SHIM_H

#define MCATTN_HOST_SHIM 1

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <algorithm>
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

// A warp: its lanes meet at `barrier`; a warp operation writes the lane's words into one of
// two slot sets (alternating, so one barrier per operation suffices: a lane can only write
// a set again after every lane has passed the barrier of the operation in between, that is,
// after everyone finished reading it).
struct Warp {
    explicit Warp(unsigned lanes_) : barrier((std::ptrdiff_t)lanes_), lanes(lanes_), slots{} {}
    std::barrier<> barrier;
    unsigned lanes;                  // 32, or fewer for the last warp of an odd block
    unsigned long long slots[2][32][12];  // word 11: the lane's operation count
};
inline thread_local Warp* warp = nullptr;
inline thread_local unsigned lane_id = 0;
inline thread_local unsigned warp_parity = 0;
inline thread_local unsigned long long warp_ops = 0;  // warp operations of this thread
inline std::atomic<bool> warp_misuse{false};  // a mask that leaves out a running lane

// Publish `n` 64-bit words of this lane, wait for the warp, return the slot set to read.
inline unsigned long long (*warp_exchange(unsigned mask, const unsigned long long* words, int n))[12] {
    auto& set = warp->slots[warp_parity];
    warp_parity ^= 1u;
    for (int i = 0; i < n; ++i) set[lane_id][i] = words[i];
    set[lane_id][11] = ++warp_ops;  // which operation this lane is at
    warp->barrier.arrive_and_wait();
    // The lanes that met here are those at the same operation (a lane that returned left
    // the barrier with an older count): the mask must name exactly them.
    unsigned met = 0;
    for (unsigned l = 0; l < warp->lanes; ++l)
        if (set[l][11] == warp_ops) met |= 1u << l;
    const unsigned valid = warp->lanes == 32 ? 0xffffffffu : ((1u << warp->lanes) - 1u);
    if ((mask & valid) != met) warp_misuse = true;
    return set;
}

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
        Warp one(1);
        block_barrier = &barrier;
        warp = &one;
        lane_id = 0;
        warp_parity = 0;
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    thread_index = dim3(0, 0, 0);
                    block_index = dim3(bx, by, bz);
                    kernel();
                }
        block_barrier = nullptr;
        warp = nullptr;
        if (warp_misuse.exchange(false)) throw std::invalid_argument("warp intrinsic mask differs from the lanes that met (a running lane left out, or an exited one named)");
        return;
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> barrier((std::ptrdiff_t)threads);
                std::vector<std::unique_ptr<Warp>> warps;
                for (unsigned w = 0; w * 32 < threads; ++w)
                    warps.push_back(std::make_unique<Warp>(std::min(32u, threads - 32 * w)));
                std::vector<std::thread> team;
                team.reserve(threads);
                for (unsigned t = 0; t < threads; ++t) {
                    team.emplace_back([&, t] {
                        thread_index = dim3(t % block.x, (t / block.x) % block.y,
                                            t / (block.x * block.y));
                        block_index = dim3(bx, by, bz);
                        block_barrier = &barrier;
                        warp = warps[t / 32].get();
                        lane_id = t % 32;
                        warp_parity = 0;
                        warp_ops = 0;
                        kernel();
                        barrier.arrive_and_drop();  // an exited thread no longer counts
                        warp->barrier.arrive_and_drop();
                    });
                }
                for (auto& thread : team) thread.join();
                if (warp_misuse.exchange(false))
                    throw std::invalid_argument("warp intrinsic mask differs from the lanes that met (a running lane left out, or an exited one named)");
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

// --- Warp intrinsics -----------------------------------------------------------------
namespace mcattn_shim {
template <typename T> unsigned long long to_word(T v) {
    static_assert(sizeof(T) <= 8, "a shuffled value is at most 64 bits");
    unsigned long long w = 0;
    std::memcpy(&w, &v, sizeof v);
    return w;
}
template <typename T> T from_word(unsigned long long w) {
    T v;
    std::memcpy(&v, &w, sizeof v);
    return v;
}
// var of lane `src`; a lane outside the warp (or `own`) gives the caller's own value.
template <typename T> T shuffle(unsigned mask, T var, unsigned src, bool own) {
    const unsigned long long w = to_word(var);
    auto set = warp_exchange(mask, &w, 1);
    return (own || src >= warp->lanes) ? var : from_word<T>(set[src][0]);
}
}  // namespace mcattn_shim

template <typename T> inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    const unsigned base = mcattn_shim::lane_id & ~(unsigned)(width - 1);
    return mcattn_shim::shuffle(mask, var, base + ((unsigned)src_lane & (unsigned)(width - 1)), false);
}
// A source in a later width-group than the caller's returns the caller's own value.
template <typename T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    const unsigned base = mcattn_shim::lane_id & ~(unsigned)(width - 1);
    const unsigned src = mcattn_shim::lane_id ^ (unsigned)lane_mask;
    return mcattn_shim::shuffle(mask, var, src, src >= base + (unsigned)width);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    const unsigned base = mcattn_shim::lane_id & ~(unsigned)(width - 1);
    const unsigned src = mcattn_shim::lane_id + delta;
    return mcattn_shim::shuffle(mask, var, src, src >= base + (unsigned)width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    const unsigned long long w = predicate != 0;
    auto set = mcattn_shim::warp_exchange(mask, &w, 1);
    unsigned out = 0;
    for (unsigned l = 0; l < mcattn_shim::warp->lanes; ++l)
        if (((mask >> l) & 1u) && set[l][0]) out |= 1u << l;
    return out;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { mcattn_shim::warp_exchange(mask, nullptr, 0); }

// --- mcattn/kernels/warp.cuh on the host: conversions ----------------------------------
// float -> half, round to nearest even (cvt.rn.f16.f32): overflow to inf, subnormals kept.
inline unsigned short mcattn_f32_to_f16(float f) {
    const unsigned x = (unsigned)__float_as_int(f);
    const unsigned sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);     // NaN
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);    // >= 65520: inf
    if (ax < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 (exact scaling, then RNE)
        const float r = std::nearbyint(__int_as_float((int)ax) * 16777216.0f);
        return (unsigned short)(sign | (unsigned)r);                 // 1024 is 2^-14's code
    }
    unsigned h = (ax >> 13) - (112u << 10);  // rebias the exponent (127 -> 15)
    const unsigned rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent
    return (unsigned short)(sign | h);
}
inline float mcattn_f16_to_f32(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
        const float v = (float)m * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    const unsigned bits = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112u) << 23) | (m << 13));
    return __int_as_float((int)bits);
}
// float -> bfloat16, round to nearest even (cvt.rn.bf16.f32).
inline unsigned short mcattn_f32_to_bf16(float f) {
    const unsigned x = (unsigned)__float_as_int(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // quiet NaN
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
// float -> tf32 (cvt.rna.tf32.f32): 10 mantissa bits, nearest, ties away from zero.
inline unsigned mcattn_f32_to_tf32(float f) {
    const unsigned x = (unsigned)__float_as_int(f);
    if ((x & 0x7fffffffu) >= 0x7f800000u) return x;  // inf and NaN unchanged
    return (x + 0x1000u) & 0xffffe000u;
}

// --- mcattn/kernels/warp.cuh on the host: mma.sync -------------------------------------
// Element i of a lane's fragment <-> (row, col) of its matrix, as the PTX ISA's sections
// "Matrix fragments for mma.m16n8k16 / m16n8k8 / m16n8k32" give them (g = lane / 4,
// t = lane % 4). The accumulators C/D (16x8) have the same layout for all three shapes.
namespace mcattn_shim {
struct Cell { int row, col; };
inline Cell layout_c(unsigned lane, int i) {
    return {(int)(lane >> 2) + 8 * (i >> 1), (int)(lane & 3) * 2 + (i & 1)};
}
inline Cell layout_a_k16_16bit(unsigned lane, int i) {  // 8 elements, 2 per register
    return {(int)(lane >> 2) + 8 * ((i >> 1) & 1), (int)(lane & 3) * 2 + (i & 1) + 8 * (i >> 2)};
}
inline Cell layout_b_k16_16bit(unsigned lane, int i) {  // 4 elements, 2 per register
    return {(int)(lane & 3) * 2 + (i & 1) + 8 * (i >> 1), (int)(lane >> 2)};
}
inline Cell layout_a_k8_tf32(unsigned lane, int i) {  // 4 elements, 1 per register
    return {(int)(lane >> 2) + 8 * (i & 1), (int)(lane & 3) + 4 * (i >> 1)};
}
inline Cell layout_b_k8_tf32(unsigned lane, int i) {  // 2 elements
    return {(int)(lane & 3) + 4 * i, (int)(lane >> 2)};
}
inline Cell layout_a_k32_8bit(unsigned lane, int i) {  // 16 elements, 4 per register
    return {(int)(lane >> 2) + 8 * ((i >> 2) & 1), (int)(lane & 3) * 4 + (i & 3) + 16 * (i >> 3)};
}
inline Cell layout_b_k32_8bit(unsigned lane, int i) {  // 8 elements, 4 per register
    return {(int)(lane & 3) * 4 + (i & 3) + 16 * (i >> 2), (int)(lane >> 2)};
}

// The warp's A [16 x K] and B [K x 8] from every lane's fragment registers (4 and 2 words),
// decoded by `element(word, index within the word)`.
template <int K, int PER_WORD, typename Decode>
void gather_operands(const unsigned* a, const unsigned* b, Cell (*la)(unsigned, int),
                     Cell (*lb)(unsigned, int), Decode element, double (&A)[16][K], double (&B)[K][8]) {
    unsigned long long words[6];
    for (int r = 0; r < 4; ++r) words[r] = a[r];
    for (int r = 0; r < 2; ++r) words[4 + r] = b[r];
    auto set = warp_exchange(0xffffffffu, words, 6);
    if (warp->lanes != 32) warp_misuse = true;  // mma.sync needs the whole warp
    for (unsigned l = 0; l < warp->lanes; ++l) {
        for (int i = 0; i < 4 * PER_WORD; ++i) {
            const Cell c = la(l, i);
            A[c.row][c.col] = element((unsigned)set[l][i / PER_WORD], i % PER_WORD);
        }
        for (int i = 0; i < 2 * PER_WORD; ++i) {
            const Cell c = lb(l, i);
            B[c.row][c.col] = element((unsigned)set[l][4 + i / PER_WORD], i % PER_WORD);
        }
    }
}

// acc (this lane's 4 accumulators) += A B over the lane's output cells. The products of
// f16/bf16/tf32 values are exact in double and the K-term sums are rounded once, to
// float, at the end: what an exact tensor core gives. (Hardware may differ from it in
// the last bits of float32: the PTX ISA leaves the order and width of its internal sums
// unspecified.)
template <int K>
void mma_float(float* acc, const double (&A)[16][K], const double (&B)[K][8]) {
    for (int i = 0; i < 4; ++i) {
        const Cell c = layout_c(lane_id, i);
        double s = acc[i];
        for (int k = 0; k < K; ++k) s += A[c.row][k] * B[k][c.col];
        acc[i] = (float)s;
    }
}
}  // namespace mcattn_shim

inline void mcattn_mma_m16n8k16_f16(float* acc, const unsigned* a, const unsigned* b) {
    double A[16][16], B[16][8];
    mcattn_shim::gather_operands<16, 2>(a, b, mcattn_shim::layout_a_k16_16bit, mcattn_shim::layout_b_k16_16bit,
        [](unsigned w, int h) { return (double)mcattn_f16_to_f32((unsigned short)(w >> (16 * h))); }, A, B);
    mcattn_shim::mma_float<16>(acc, A, B);
}
inline void mcattn_mma_m16n8k16_bf16(float* acc, const unsigned* a, const unsigned* b) {
    double A[16][16], B[16][8];
    mcattn_shim::gather_operands<16, 2>(a, b, mcattn_shim::layout_a_k16_16bit, mcattn_shim::layout_b_k16_16bit,
        [](unsigned w, int h) { return (double)__int_as_float((int)((w >> (16 * h)) << 16)); }, A, B);
    mcattn_shim::mma_float<16>(acc, A, B);
}
// tf32 operands are 32-bit words of which the tensor core reads the top 19 bits (sign,
// exponent, 10 mantissa bits): the low 13 are ignored, not rounded.
inline void mcattn_mma_m16n8k8_tf32(float* acc, const unsigned* a, const unsigned* b) {
    double A[16][8], B[8][8];
    mcattn_shim::gather_operands<8, 1>(a, b, mcattn_shim::layout_a_k8_tf32, mcattn_shim::layout_b_k8_tf32,
        [](unsigned w, int) { return (double)__int_as_float((int)(w & 0xffffe000u)); }, A, B);
    mcattn_shim::mma_float<8>(acc, A, B);
}
// s8 x s8 -> s32, exact, wrapping modulo 2^32 (no .satfinite).
inline void mcattn_mma_m16n8k32_s8(int* acc, const unsigned* a, const unsigned* b) {
    double A[16][32], B[32][8];
    mcattn_shim::gather_operands<32, 4>(a, b, mcattn_shim::layout_a_k32_8bit, mcattn_shim::layout_b_k32_8bit,
        [](unsigned w, int q) { return (double)(signed char)(w >> (8 * q)); }, A, B);
    for (int i = 0; i < 4; ++i) {
        const mcattn_shim::Cell c = mcattn_shim::layout_c(mcattn_shim::lane_id, i);
        long long s = 0;
        for (int k = 0; k < 32; ++k) s += (long long)A[c.row][k] * (long long)B[k][c.col];
        acc[i] = (int)(unsigned)((unsigned long long)(long long)acc[i] + (unsigned long long)s);
    }
}

#endif  // MCATTN_CUDA_HOST_SHIM_H
