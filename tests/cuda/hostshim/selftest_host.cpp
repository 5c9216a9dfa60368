#include "cuda_host_shim.h"
#include "selftest.cu"

extern "C" void launch_shim_block_sum(unsigned gx, unsigned bx, const float* in, float* out, int n,
                                      int active) {
    mcattn_shim::launch(dim3(gx), dim3(bx), [&] { shim_block_sum(in, out, n, active); });
}
extern "C" void launch_shim_atomic_sum(unsigned gx, unsigned bx, const double* in, double* total,
                                       int* count, int n) {
    mcattn_shim::launch(dim3(gx), dim3(bx), [&] { shim_atomic_sum(in, total, count, n); });
}
